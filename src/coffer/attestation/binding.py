"""How a guest's runtime data and init-data are bound into its hardware evidence (KBS protocol 0.4.0).

Runtime data. The guest and the attestation service both serialise the runtime-data object
(``{"additional-evidence": ..., "nonce": ..., "tee-pubkey": {...}}``) with RFC 8785 JSON
canonicalisation and hash it (SHA-384 for every TEE Coffer supports). Each TEE then carries that
digest D in its own field, by its own rule (:func:`report_data_for`):

========================  ==================================================================
snp, tdx, sgx             REPORT_DATA (64 bytes): D zero-padded to 64
az-snp-vtpm, az-tdx-vtpm  the vTPM quote's qualifying data: D exactly (48 bytes)
tpm                       the TPM quote's qualifying data: the first 32 bytes of D
sample                    ``report_data``: D exactly
========================  ==================================================================

Init-data. The plaintext initdata document (TOML: ``version``, ``algorithm``, ``[data]``) is hashed as
given with its ``algorithm``; the digest is the launch-time value of SNP HOST_DATA (32 bytes, padded
or truncated), TDX MRCONFIGID (48), SGX CONFIGID (64), or, on TPM platforms, extended once into PCR 8
from zero (:func:`initdata_expected`).
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coffer.errors import FormatError

RUNTIME_DATA_HASH = "sha384"
INITDATA_ALGORITHMS = ("sha256", "sha384", "sha512")
MAX_INITDATA_BYTES = 1024 * 1024
# How deeply containers may nest in an initdata document and in the claims taken from it.
MAX_INITDATA_DEPTH = 32

# TEE -> how many bytes of the report-data field the digest fills (None: the digest as is).
_PAD_64 = ("snp", "tdx", "sgx")
_EXACT = ("az-snp-vtpm", "az-tdx-vtpm", "sample")
_TPM_NONCE_BYTES = 32

# TEE -> (claim name, field size) for init-data bound into a launch-time register.
_INITDATA_FIELDS = {"snp": ("host_data", 32), "tdx": ("mr_config_id", 48), "sgx": ("config_id", 64),
                    "sample": ("init_data", 64)}
_PCR8_TEES = ("tpm", "az-snp-vtpm", "az-tdx-vtpm")
INITDATA_PCR = 8


# --------------------------------------------------------------------------------------------------
# RFC 8785 canonical JSON


def _number(value: int | float) -> str:
    """A number as ECMAScript's Number.prototype.toString writes it (RFC 8785 section 3.2.2.3)."""
    if isinstance(value, bool):
        raise TypeError("bool is not a number")
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise FormatError("canonical JSON", "integer outside the IEEE-754 exact range")
        return str(value)
    if not math.isfinite(value):
        raise FormatError("canonical JSON", "NaN and Infinity are not JSON")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr gives the shortest round-tripping digits; lay them out by ECMAScript's rules, where the
    # value is 0.<digits> x 10^n.
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    all_digits = int_part + frac_part
    significant = all_digits.lstrip("0")
    n = len(int_part) + (int(exp_text) if exp_text else 0) - (len(all_digits) - len(significant))
    digits = significant.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp_out = f"e+{e}" if e >= 0 else f"e-{-e}"
    if k == 1:
        return sign + digits + exp_out
    return sign + digits[0] + "." + digits[1:] + exp_out


def _utf16_key(text: str) -> bytes:
    return text.encode("utf-16-be", "surrogatepass")


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int | float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        items = []
        for key in value:
            if not isinstance(key, str):
                raise FormatError("canonical JSON", "object keys must be strings")
            items.append(key)
        items.sort(key=_utf16_key)
        out.append("{")
        for index, key in enumerate(items):
            if index:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise FormatError("canonical JSON", f"{type(value).__name__} is not a JSON value")


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) serialisation: keys sorted by UTF-16 code units, no white space, ECMAScript
    number formatting, minimal string escaping, UTF-8. Lone surrogates are refused."""
    out: list[str] = []
    _write(obj, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError("canonical JSON", "string holds a lone surrogate") from exc


# --------------------------------------------------------------------------------------------------
# Runtime data


def runtime_data_preimage(nonce: str, tee_pubkey: Mapping[str, Any], additional_evidence: str = "") -> dict[
        str, Any]:
    """The runtime-data object a protocol-0.4.0 guest hashes for its primary evidence."""
    return {"additional-evidence": additional_evidence, "nonce": nonce, "tee-pubkey": dict(tee_pubkey)}


def runtime_data_digest(runtime_data: Mapping[str, Any], algorithm: str = RUNTIME_DATA_HASH) -> bytes:
    """H(JCS(runtime_data)), by default SHA-384 (48 bytes)."""
    if algorithm not in ("sha256", "sha384", "sha512"):
        raise FormatError("runtime data", f"unsupported hash algorithm {algorithm!r}")
    return hashlib.new(algorithm, canonical_json(runtime_data)).digest()


def report_data_for(tee: str, digest: bytes) -> bytes:
    """The value a TEE's evidence must carry for a runtime-data digest (see the module table)."""
    if tee in _PAD_64:
        if len(digest) > 64:
            raise FormatError("report data", f"a {len(digest)}-byte digest does not fit 64 bytes")
        return digest.ljust(64, b"\0")
    if tee in _EXACT:
        return bytes(digest)
    if tee == "tpm":
        return digest[:_TPM_NONCE_BYTES].ljust(_TPM_NONCE_BYTES, b"\0")
    raise FormatError("report data", f"no report-data binding rule for TEE {tee!r}")


# --------------------------------------------------------------------------------------------------
# Init-data


@dataclass(frozen=True, kw_only=True)
class InitData:
    """Plaintext init-data as the guest sends it: ``format`` (only ``toml``) and the document."""

    format: str
    body: str


def parse_initdata(body: bytes) -> dict[str, Any]:
    """Parse an initdata TOML document (size-limited); FormatError when it is not one."""
    if len(body) > MAX_INITDATA_BYTES:
        raise FormatError("initdata", f"{len(body)} bytes exceeds the {MAX_INITDATA_BYTES}-byte limit")
    try:
        doc = tomllib.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        # RecursionError: arrays/inline tables nested deeper than the parser's recursion allows.
        raise FormatError("initdata", f"not a TOML document ({exc.__class__.__name__})") from None
    check_nesting(doc, "initdata")
    return doc


def check_nesting(value: Any, what: str, max_depth: int = MAX_INITDATA_DEPTH) -> None:
    """FormatError when a parsed document nests containers deeper than ``max_depth`` or holds a
    float that is not finite (JSON has neither Infinity nor NaN). Iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping | list | tuple):
            if depth >= max_depth:
                raise FormatError(what, f"nested deeper than {max_depth} levels")
            children = node.values() if isinstance(node, Mapping) else node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, float) and not math.isfinite(node):
            raise FormatError(what, "holds a non-finite number (inf or nan)")


def initdata_digest(body: bytes) -> tuple[str, bytes]:
    """The algorithm named by the document's ``algorithm`` key and the digest of the raw bytes."""
    doc = parse_initdata(body)
    algorithm = doc.get("algorithm")
    if algorithm not in INITDATA_ALGORITHMS:
        raise FormatError("initdata", f"'algorithm' must be one of {', '.join(INITDATA_ALGORITHMS)}")
    version = doc.get("version")
    if version is not None and not isinstance(version, str):
        raise FormatError("initdata", "'version' must be a string")
    return str(algorithm), hashlib.new(str(algorithm), body).digest()


def pcr8_for_initdata(digest: bytes) -> bytes:
    """PCR 8 after a single SHA-256 extend of the init-data digest from zero."""
    return hashlib.sha256(b"\0" * 32 + digest).digest()


def initdata_expected(tee: str, digest: bytes) -> tuple[str, bytes]:
    """The claim that carries init-data for ``tee`` and the value it must hold.

    snp ``host_data`` (32 bytes), tdx ``mr_config_id`` (48), sgx ``config_id`` (64), sample
    ``init_data`` (64): the digest zero-padded or truncated; tpm/az-*: ``pcr8`` = SHA-256(32 zero
    bytes || digest).
    """
    if tee in _INITDATA_FIELDS:
        name, size = _INITDATA_FIELDS[tee]
        return name, digest[:size].ljust(size, b"\0")
    if tee in _PCR8_TEES:
        return "pcr8", pcr8_for_initdata(digest)
    raise FormatError("initdata", f"no init-data binding rule for TEE {tee!r}")
