"""Where SNP endorsements come from: an offline file or directory, or AMD's Key Distribution Service.

Offline layout (``--endorsements PATH``), fixed so that other tools can produce it:

* ``PATH`` is a certificate file: the VCEK or VLEK, DER or PEM. A PEM file may also carry the chain
  (ASK or ASVK, and the ARK); the signing certificate is the one with an EC key, in any position.
* ``PATH`` is a directory holding ``vcek.der`` or ``vcek.pem`` (or ``vlek.der`` / ``vlek.pem``), and
  optionally ``cert_chain.pem`` (ASK/ASVK then ARK, as KDS serves it).

Either way the certificates are untrusted until the verifier chains them to the built-in AMD roots.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec

from coffer.errors import CollateralError, FormatError, TransportError
from coffer.evidence.collateral import (
    DiskCache,
    HttpGetter,
    HttpxGetter,
    IntelCollateral,
    IntelCollateralQuery,
    SnpEndorsementQuery,
    SnpEndorsements,
)
from coffer.evidence.snp.certs import cert_ders, load_cert

_MAX_FILE_BYTES = 1 << 20
KDS_BASE_URL = "https://kdsintf.amd.com"
_PRODUCTS = ("Milan", "Genoa", "Turin")


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise CollateralError(f"{path} is {size} bytes, larger than any certificate file")
        return path.read_bytes()
    except OSError as exc:
        raise CollateralError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from exc


def split_signing_certificate(ders: list[bytes], what: str) -> SnpEndorsements:
    """Pick the VCEK/VLEK (the EC-key certificate) out of a bundle; the rest is the chain."""
    leaf: bytes | None = None
    chain: list[bytes] = []
    for der in ders:
        key = load_cert(der, what).public_key()
        if isinstance(key, ec.EllipticCurvePublicKey) and leaf is None:
            leaf = der
        else:
            chain.append(der)
    if leaf is None:
        raise CollateralError(f"{what} holds no VCEK or VLEK (no certificate with an EC key)")
    return SnpEndorsements(leaf=leaf, chain=tuple(chain), source=what)


class OfflineSnpEndorsements:
    """Endorsements read from a certificate file or a directory in the fixed layout."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # signer -> (identities of the files the answer came from, answer): a warm verifier re-reads
        # nothing while those files (and, for a directory, its entries) are unchanged.
        self._memo: dict[str, tuple[tuple[tuple[Path, object], ...], SnpEndorsements]] = {}

    @staticmethod
    def _identity(path: Path) -> object:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        memo = self._memo.get(query.signer)
        if memo is not None and all(self._identity(p) == ident for p, ident in memo[0]):
            return memo[1]
        found, used = self._load(query)
        identities = tuple((p, self._identity(p)) for p in used)
        if all(ident is not None for _, ident in identities):
            self._memo[query.signer] = (identities, found)
        return found

    def _load(self, query: SnpEndorsementQuery) -> tuple[SnpEndorsements, list[Path]]:
        if not self.path.exists():
            raise CollateralError(f"endorsements path {self.path} does not exist")
        if not self.path.is_dir():
            found = split_signing_certificate(cert_ders(_read(self.path), str(self.path)), str(self.path))
            return found, [self.path]
        names = (f"{query.signer}.der", f"{query.signer}.pem")
        leaf_path = next((self.path / n for n in names if (self.path / n).is_file()), None)
        if leaf_path is None:
            raise CollateralError(
                f"{self.path} holds no {query.signer.upper()} certificate (expected {' or '.join(names)})"
            )
        found = split_signing_certificate(cert_ders(_read(leaf_path), str(leaf_path)), str(leaf_path))
        chain = list(found.chain)
        used = [self.path, leaf_path]
        chain_path = self.path / "cert_chain.pem"
        if chain_path.is_file():
            chain.extend(cert_ders(_read(chain_path), str(chain_path)))
            used.append(chain_path)
        return SnpEndorsements(leaf=found.leaf, chain=tuple(chain), source=str(leaf_path)), used

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        raise CollateralError("an SNP endorsements path holds no Intel collateral")


class KdsFetcher:
    """Fetches VCEKs from AMD KDS, keeping every certificate it got in a disk cache forever (KDS
    never changes the certificate for a given chip and TCB).

    VLEKs are not published per chip (the cloud provider holds them), so a VLEK-signed report needs
    its certificate supplied; :meth:`cert_chain` can still fetch the ASVK chain.
    """

    def __init__(
        self,
        base_url: str = KDS_BASE_URL,
        getter: HttpGetter | None = None,
        cache: DiskCache | None = None,
        *,
        fetch_chain: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._getter = getter if getter is not None else HttpxGetter()
        self._cache = cache
        self._fetch_chain = fetch_chain

    def vcek_url(self, query: SnpEndorsementQuery) -> str:
        if query.product not in _PRODUCTS:
            raise CollateralError(f"AMD KDS has no product {query.product!r}")
        params = "&".join(f"{name}={value}" for name, value in query.tcb_params)
        return f"{self.base_url}/vcek/v1/{quote(query.product)}/{query.hwid.hex()}?{params}"

    def chain_url(self, product: str, signer: str) -> str:
        if product not in _PRODUCTS:
            raise CollateralError(f"AMD KDS has no product {product!r}")
        kind = "vlek" if signer == "vlek" else "vcek"
        return f"{self.base_url}/{kind}/v1/{product}/cert_chain"

    def _get(self, url: str, what: str) -> bytes:
        if self._cache is not None:
            cached = self._cache.get(url, max_age=None)
            if cached is not None:
                return cached
        try:
            response = self._getter.get(url)
        except TransportError as exc:
            raise CollateralError(f"cannot fetch the {what} from AMD KDS: {exc}") from exc
        if response.status == 404:
            raise CollateralError(f"AMD KDS has no {what} at {url} (404)")
        if response.status != 200:
            raise CollateralError(f"AMD KDS answered {response.status} for the {what} at {url}")
        if not response.body:
            raise CollateralError(f"AMD KDS sent an empty {what}")
        try:
            cert_ders(response.body, f"{what} from AMD KDS")
        except FormatError as exc:
            raise CollateralError(f"AMD KDS sent a {what} that does not parse") from exc
        if self._cache is not None:
            self._cache.put(url, response.body)
        return response.body

    def cert_chain(self, product: str, signer: str) -> tuple[bytes, ...]:
        """The ASK (or ASVK) and ARK that KDS publishes for a product, as DER."""
        body = self._get(self.chain_url(product, signer), f"{product} {signer.upper()} certificate chain")
        return tuple(cert_ders(body, "AMD KDS certificate chain"))

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        if query.signer == "vlek":
            raise CollateralError(
                "VLEK certificates are not published per chip by AMD KDS: the cloud provider holds "
                "them; supply the VLEK with --endorsements"
            )
        url = self.vcek_url(query)
        body = self._get(url, f"{query.product} VCEK")
        ders = cert_ders(body, "VCEK from AMD KDS")
        if len(ders) != 1:
            raise CollateralError(f"AMD KDS sent {len(ders)} certificates for one VCEK")
        chain = self.cert_chain(query.product, "vcek") if self._fetch_chain else ()
        return SnpEndorsements(leaf=ders[0], chain=chain, source=url)

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        raise CollateralError("AMD KDS serves no Intel collateral")
