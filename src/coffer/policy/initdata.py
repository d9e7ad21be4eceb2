"""CoCo initdata: the document that carries the workload policy into the TEE, and its digest.

The document is TOML (``version = "0.1.0"``, ``algorithm``, and a ``[data]`` table of file name to
contents: ``policy.rego``, optionally ``aa.toml`` and ``cdh.toml``). Its digest -- the algorithm it
names, over the exact bytes delivered -- is what the host places in the TEE at launch:

* AMD SEV-SNP ``HOSTDATA``: the digest truncated or zero-padded to 32 bytes;
* Intel TDX ``MRCONFIGID``: 48 bytes;
* (v)TPM platforms: extended once into PCR 8, from zero (SHA-256 bank).

Kubernetes carries it in the pod annotation ``io.katacontainers.config.hypervisor.cc_init_data`` as
``base64(gzip(toml))``. Building is deterministic (gzip with mtime 0), so the same policy always
gives the same annotation and digest.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from typing import Final

from coffer.attestation.binding import (
    INITDATA_ALGORITHMS,
    MAX_INITDATA_BYTES,
    initdata_digest,
    parse_initdata,
    pcr8_for_initdata,
)
from coffer.errors import FormatError, UsageError

INITDATA_VERSION: Final = "0.1.0"
ANNOTATION: Final = "io.katacontainers.config.hypervisor.cc_init_data"
POLICY_FILE: Final = "policy.rego"
AA_FILE: Final = "aa.toml"
CDH_FILE: Final = "cdh.toml"
#: Kubernetes refuses more than 256 KiB of annotations in all.
MAX_ANNOTATION_BYTES: Final = 256 * 1024
SNP_HOSTDATA_BYTES: Final = 32
TDX_MRCONFIGID_BYTES: Final = 48


def _control(ch: str) -> bool:
    """Characters a TOML literal string cannot hold (tab and newline can be held)."""
    return (ord(ch) < 0x20 and ch not in "\t\n") or ch == "\x7f"


def _toml_string(text: str) -> str:
    """A TOML multi-line string holding ``text`` exactly: literal when it can be, else escaped basic."""
    if "'''" not in text and not any(_control(ch) for ch in text):
        # A newline right after the opening delimiter is trimmed by TOML; add one so text starts intact.
        return "'''\n" + text + "'''"
    escaped = []
    for ch in text:
        if ch == "\\":
            escaped.append("\\\\")
        elif ch == '"':
            escaped.append('\\"')
        elif ch == "\n":
            escaped.append("\n")
        elif _control(ch) or ch == "\t":
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"""\n' + "".join(escaped) + '"""'


def build_initdata(
    policy_rego: str,
    *,
    algorithm: str = "sha256",
    aa_toml: str | None = None,
    cdh_toml: str | None = None,
) -> bytes:
    """The initdata TOML document for a compiled policy (and optional guest component configs)."""
    if algorithm not in INITDATA_ALGORITHMS:
        raise UsageError(
            f"initdata algorithm must be one of {', '.join(INITDATA_ALGORITHMS)}, not {algorithm!r}"
        )
    files = {AA_FILE: aa_toml, CDH_FILE: cdh_toml, POLICY_FILE: policy_rego}
    lines = [f'version = "{INITDATA_VERSION}"', f'algorithm = "{algorithm}"', "", "[data]"]
    for name, content in files.items():
        if content is not None:
            lines.append(f'"{name}" = {_toml_string(content)}')
    body = ("\n".join(lines) + "\n").encode("utf-8")
    if len(body) > MAX_INITDATA_BYTES:
        raise UsageError(f"initdata of {len(body)} bytes is over the {MAX_INITDATA_BYTES}-byte limit")
    parsed = parse_initdata_document(body)  # what we emit must read back to the same contents
    if parsed.data.get(POLICY_FILE) != policy_rego:
        raise AssertionError("initdata TOML did not round-trip")  # pragma: no cover - a bug, not input
    return body


@dataclass(frozen=True)
class InitData:
    """A parsed initdata document (``raw`` is the exact bytes the digest is over)."""

    version: str
    algorithm: str
    data: dict[str, str]
    raw: bytes

    @property
    def policy(self) -> str | None:
        return self.data.get(POLICY_FILE)


def parse_initdata_document(raw: bytes) -> InitData:
    """Parse and check an initdata document: version 0.1.0, a known algorithm, a string map of files."""
    doc = parse_initdata(raw)
    version = doc.get("version")
    if version != INITDATA_VERSION:
        raise FormatError("initdata", f"version must be {INITDATA_VERSION!r}, not {version!r}")
    algorithm = doc.get("algorithm")
    if algorithm not in INITDATA_ALGORITHMS:
        raise FormatError("initdata", f"algorithm must be one of {', '.join(INITDATA_ALGORITHMS)}")
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise FormatError("initdata", "[data] must map file names to strings")
    unknown = set(doc) - {"version", "algorithm", "data"}
    if unknown:
        raise FormatError("initdata", f"unknown top-level keys: {', '.join(sorted(unknown))}")
    return InitData(version=str(version), algorithm=str(algorithm), data=dict(data), raw=bytes(raw))


@dataclass(frozen=True)
class InitDataDigests:
    """The digest and the value each TEE holds for it."""

    algorithm: str
    digest: bytes

    @property
    def snp_hostdata(self) -> bytes:
        return self.digest[:SNP_HOSTDATA_BYTES].ljust(SNP_HOSTDATA_BYTES, b"\0")

    @property
    def tdx_mrconfigid(self) -> bytes:
        return self.digest[:TDX_MRCONFIGID_BYTES].ljust(TDX_MRCONFIGID_BYTES, b"\0")

    @property
    def tpm_pcr8(self) -> bytes:
        return pcr8_for_initdata(self.digest)

    def to_json(self) -> dict[str, str]:
        return {
            "algorithm": self.algorithm,
            "digest": self.digest.hex(),
            "snp_hostdata": self.snp_hostdata.hex(),
            "tdx_mrconfigid": self.tdx_mrconfigid.hex(),
            "tpm_pcr8": self.tpm_pcr8.hex(),
        }


def digests(initdata: bytes) -> InitDataDigests:
    """The digest of an initdata document (the algorithm it names, over its exact bytes)."""
    algorithm, digest = initdata_digest(initdata)
    if hashlib.new(algorithm, initdata).digest() != digest:  # pragma: no cover - defensive
        raise AssertionError("initdata digest mismatch")
    return InitDataDigests(algorithm=algorithm, digest=digest)


def initdata_annotation(initdata: bytes) -> str:
    """``base64(gzip(initdata))`` for :data:`ANNOTATION` (deterministic: gzip mtime 0)."""
    value = base64.b64encode(gzip.compress(initdata, compresslevel=9, mtime=0)).decode("ascii")
    if len(value) > MAX_ANNOTATION_BYTES:
        raise UsageError(
            f"the initdata annotation is {len(value)} bytes, over Kubernetes' {MAX_ANNOTATION_BYTES}"
        )
    return value


def decode_annotation(value: str) -> bytes:
    """The initdata bytes inside an annotation value (bounded: a gzip bomb is refused)."""
    if len(value) > MAX_ANNOTATION_BYTES:
        raise FormatError("initdata annotation", f"over {MAX_ANNOTATION_BYTES} bytes")
    try:
        packed = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise FormatError("initdata annotation", "not base64") from exc
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            raw = stream.read(MAX_INITDATA_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError("initdata annotation", f"not gzip data ({exc.__class__.__name__})") from exc
    if len(raw) > MAX_INITDATA_BYTES:
        raise FormatError("initdata annotation", f"expands past {MAX_INITDATA_BYTES} bytes")
    return raw


def aa_toml_for_kbs(url: str) -> str:
    """The attestation-agent config naming the KBS the workload trusts (``[token_configs.kbs]``)."""
    if not url.startswith(("http://", "https://")) or any(ch in url for ch in "\"\\\n\r\t"):
        raise UsageError(f"KBS URL {url!r} is not an http(s) URL")
    return f'[token_configs.kbs]\nurl = "{url}"\n'


def kbs_url(init: InitData) -> str | None:
    """The KBS the measured initdata names: ``aa.toml`` ``[token_configs.kbs] url``, else ``cdh.toml``
    ``[kbc] url``; None when it names none. FormatError when a named config is not valid TOML."""
    import tomllib  # noqa: PLC0415 - only the agent needs it

    for name, table in ((AA_FILE, ("token_configs", "kbs")), (CDH_FILE, ("kbc",))):
        text = init.data.get(name)
        if text is None:
            continue
        try:
            doc: object = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FormatError(f"initdata {name}", f"not TOML ({exc})") from None
        for key in table:
            doc = doc.get(key) if isinstance(doc, dict) else None
        url = doc.get("url") if isinstance(doc, dict) else None
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise FormatError(f"initdata {name}", "the KBS url is not an http(s) URL")
            return url
    return None
