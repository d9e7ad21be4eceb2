"""Where endorsements (AMD VCEK/VLEK) and collateral (Intel PCS) come from: one interface,
several sources.

Verifiers stay pure: they describe what they need with a query and receive bytes. Sources do the
I/O: an offline directory with a fixed layout (so other tools can produce it), or online fetchers for
AMD KDS and Intel PCS that keep an on-disk cache. Sources chain, so a user can supply some files and
let the rest be fetched.

Every source raises :class:`~coffer.errors.CollateralError` when it cannot answer; the verifier turns
that into a rejection at its fetch step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from coffer.errors import CollateralError, TransportError

SnpSigner = Literal["vcek", "vlek"]
IntelTee = Literal["sgx", "tdx"]
PckCa = Literal["processor", "platform"]


@dataclass(frozen=True, kw_only=True)
class SnpEndorsementQuery:
    """What identifies the certificate that signed an SNP report.

    ``product`` is ``Milan``, ``Genoa`` or ``Turin``; ``tcb_params`` are the AMD KDS query
    parameters taken from REPORTED_TCB, in KDS order (``blSPL``, ``teeSPL``, ``snpSPL``, ``ucodeSPL``
    and ``fmcSPL`` on Turin); ``hwid`` is the KDS hardware id (the whole CHIP_ID, or its first 8 bytes
    on Turin).
    """

    product: str
    signer: SnpSigner
    hwid: bytes
    tcb_params: tuple[tuple[str, int], ...]


@dataclass(frozen=True, kw_only=True)
class SnpEndorsements:
    """The signing certificate (DER) and any chain certificates supplied with it (DER, ASK/ASVK then
    ARK). Built-in AMD roots are always used; a supplied root must equal them."""

    leaf: bytes
    chain: tuple[bytes, ...] = ()
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class IntelCollateralQuery:
    tee: IntelTee
    fmspc: bytes
    pck_ca: PckCa


@dataclass(frozen=True, kw_only=True)
class IntelCollateral:
    """Intel PCS collateral, kept as the raw bytes PCS serves, because the TCB info and QE identity
    signatures are over the exact bytes of the JSON body. Certificate chains are DER, leaf first."""

    tcb_info: bytes
    tcb_info_issuer_chain: tuple[bytes, ...]
    qe_identity: bytes
    qe_identity_issuer_chain: tuple[bytes, ...]
    pck_crl: bytes
    pck_crl_issuer_chain: tuple[bytes, ...]
    root_ca_crl: bytes | None = None
    source: str = ""


class CollateralSource(Protocol):
    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements: ...

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral: ...


class NoCollateral:
    """The source used when nothing was supplied and fetching is off: every request is refused
    with an error that says which option supplies it."""

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        raise CollateralError(
            f"no {query.signer.upper()} certificate for this {query.product} report: pass --endorsements "
            "(a certificate file or a directory) or allow fetching from AMD KDS"
        )

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        raise CollateralError(
            f"no Intel collateral for {query.tee.upper()} FMSPC {query.fmspc.hex()}: pass --collateral DIR "
            "or allow fetching from Intel PCS"
        )


class EmbeddedSnpEndorsements:
    """Endorsements that arrived inside the evidence (the CoCo ``snp`` attester's ``cert_chain``,
    Azure's VCEK from THIM). They are untrusted input like the report itself: the verifier still
    chains them to the built-in AMD roots and checks them against the report."""

    def __init__(self, endorsements: SnpEndorsements) -> None:
        self._endorsements = endorsements

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        return self._endorsements

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        raise CollateralError("evidence carried no Intel collateral")


class ChainedSource:
    """Ask each source in turn; the first answer wins. If all refuse, the errors are combined."""

    def __init__(self, sources: Sequence[CollateralSource]) -> None:
        self._sources = tuple(sources) or (NoCollateral(),)

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        errors: list[str] = []
        for source in self._sources:
            try:
                return source.snp_endorsements(query)
            except CollateralError as exc:
                errors.append(str(exc))
        raise CollateralError("; ".join(errors))

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        errors: list[str] = []
        for source in self._sources:
            try:
                return source.intel_collateral(query)
            except CollateralError as exc:
                errors.append(str(exc))
        raise CollateralError("; ".join(errors))


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str]


class HttpGetter(Protocol):
    """The only network interface of the collateral fetchers (so tests can point them at a local
    server, and the attestation service can share one connection pool)."""

    def get(self, url: str) -> HttpResponse: ...


class HttpxGetter:
    """:class:`HttpGetter` on httpx with a timeout and a response size limit."""

    def __init__(self, *, timeout: float = 10.0, max_bytes: int = 4 * 1024 * 1024) -> None:
        self._timeout = timeout
        self._max_bytes = max_bytes

    def get(self, url: str) -> HttpResponse:
        import httpx  # noqa: PLC0415  (only fetching needs it)

        try:
            with httpx.Client(timeout=self._timeout, follow_redirects=False) as client, \
                    client.stream("GET", url) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body.extend(chunk)
                    if len(body) > self._max_bytes:
                        raise TransportError(f"response from {url} exceeds {self._max_bytes} bytes")
                headers = {k.lower(): v for k, v in response.headers.items()}
                return HttpResponse(response.status_code, bytes(body), headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {url} failed: {exc.__class__.__name__}") from exc


class DiskCache:
    """A small cache of fetched responses keyed by URL, written atomically.

    Entries older than ``max_age`` seconds are treated as missing; ``None`` keeps them forever (right
    for VCEK certificates, which KDS never changes for a given chip and TCB).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str, *, max_age: float | None) -> bytes | None:
        path = self._path(key)
        try:
            if max_age is not None and time.time() - path.stat().st_mtime > max_age:
                return None
            return path.read_bytes()
        except OSError:
            return None

    def put(self, key: str, value: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coffer" / "collateral"
