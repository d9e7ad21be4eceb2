"""Where Intel collateral comes from: an offline directory (or a dcap-qvl collateral JSON file), or
Intel PCS over HTTP with an on-disk cache.

Offline directory layout (every file as PCS serves it):

=============================== ==========================================================
``tcb_info.json``               raw body of ``/{sgx,tdx}/certification/v4/tcb?fmspc=...``
``tcb_info_issuer_chain.pem``   the ``TCB-Info-Issuer-Chain`` header, URL-decoded (PEM)
``qe_identity.json``            raw body of ``/{sgx,tdx}/certification/v4/qe/identity``
``qe_identity_issuer_chain.pem`` the ``SGX-Enclave-Identity-Issuer-Chain`` header (PEM)
``pck_crl.der``                 ``/sgx/certification/v4/pckcrl?ca=...&encoding=der`` (DER, PEM or hex)
``pck_crl_issuer_chain.pem``    the ``SGX-PCK-CRL-Issuer-Chain`` header (PEM)
``root_ca_crl.der``             the Intel SGX Root CA CRL (DER, PEM or hex)
=============================== ==========================================================

The directory holds collateral for one platform (FMSPC) and TEE; the verifier checks that it fits
the quote. The alternative single file is dcap-qvl's ``QuoteCollateralV3`` JSON, whose ``tcb_info``
and ``qe_identity`` strings are the exact signed bytes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import unquote

from coffer._internal.encoding import load_json_object
from coffer.errors import CofferError, CollateralError, FormatError, TransportError
from coffer.evidence.collateral import (
    DiskCache,
    HttpGetter,
    HttpResponse,
    HttpxGetter,
    IntelCollateral,
    IntelCollateralQuery,
    SnpEndorsementQuery,
    SnpEndorsements,
)
from coffer.evidence.x509util import certificate_ders

PCS_BASE_URL = "https://api.trustedservices.intel.com"
ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

LAYOUT = {
    "tcb_info": "tcb_info.json",
    "tcb_info_issuer_chain": "tcb_info_issuer_chain.pem",
    "qe_identity": "qe_identity.json",
    "qe_identity_issuer_chain": "qe_identity_issuer_chain.pem",
    "pck_crl": "pck_crl.der",
    "pck_crl_issuer_chain": "pck_crl_issuer_chain.pem",
    "root_ca_crl": "root_ca_crl.der",
}

_TCB_CHAIN_HEADERS = ("tcb-info-issuer-chain", "sgx-tcb-info-issuer-chain")
_QE_CHAIN_HEADERS = ("sgx-enclave-identity-issuer-chain", "enclave-identity-issuer-chain")
_CRL_CHAIN_HEADERS = ("sgx-pck-crl-issuer-chain",)


def _chain(pem: bytes, what: str) -> tuple[bytes, ...]:
    try:
        return tuple(certificate_ders(pem, what))
    except FormatError as exc:
        raise CollateralError(f"{what}: {exc}") from exc


def _no_snp(query: SnpEndorsementQuery) -> SnpEndorsements:
    raise CollateralError("Intel collateral sources hold no AMD endorsements")


def signed_body(key: str, inner: str, signature: str) -> bytes:
    """A PCS-shaped body around the exact signed bytes of ``inner``."""
    return (b'{"' + key.encode() + b'":' + inner.encode("utf-8") + b',"signature":'
            + json.dumps(signature).encode() + b"}")


def collateral_from_dcap_qvl_json(data: bytes, source: str) -> IntelCollateral:
    """Decode dcap-qvl's ``QuoteCollateralV3`` JSON into :class:`IntelCollateral`."""
    try:
        doc = load_json_object(data, "dcap-qvl collateral")
    except FormatError as exc:
        raise CollateralError(f"{source}: {exc}") from exc
    fields = ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
              "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature")
    values: dict[str, str] = {}
    for name in fields:
        value = doc.get(name)
        if not isinstance(value, str):
            raise CollateralError(f"{source}: {name!r} is missing or not a string")
        values[name] = value
    return IntelCollateral(
        tcb_info=signed_body("tcbInfo", values["tcb_info"], values["tcb_info_signature"]),
        tcb_info_issuer_chain=_chain(values["tcb_info_issuer_chain"].encode(),
                                     f"{source} tcb_info_issuer_chain"),
        qe_identity=signed_body("enclaveIdentity", values["qe_identity"], values["qe_identity_signature"]),
        qe_identity_issuer_chain=_chain(values["qe_identity_issuer_chain"].encode(),
                                        f"{source} qe_identity_issuer_chain"),
        pck_crl=values["pck_crl"].encode(),
        pck_crl_issuer_chain=_chain(values["pck_crl_issuer_chain"].encode(),
                                    f"{source} pck_crl_issuer_chain"),
        root_ca_crl=values["root_ca_crl"].encode(),
        source=source,
    )


class StaticIntelCollateral:
    """Collateral already in memory (a test, or a caller that fetched it itself); it answers every
    query with the same bundle and the verifier checks that it fits the quote."""

    def __init__(self, collateral: IntelCollateral) -> None:
        self.collateral = collateral

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        return self.collateral

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        return _no_snp(query)


class OfflineIntelCollateral:
    """Collateral from a directory with the fixed layout above, or from a dcap-qvl collateral JSON
    file. Files are read on first use and kept (they are immutable inputs)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._loaded: IntelCollateral | None = None

    def _read(self, name: str) -> bytes:
        file = self.path / name
        try:
            return file.read_bytes()
        except FileNotFoundError:
            raise CollateralError(f"collateral directory {self.path} has no {name}") from None
        except OSError as exc:
            raise CollateralError(f"cannot read {file}: {exc.strerror}") from exc

    def _load(self) -> IntelCollateral:
        if self._loaded is not None:
            return self._loaded
        if self.path.is_file():
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise CollateralError(f"cannot read {self.path}: {exc.strerror}") from exc
            loaded = collateral_from_dcap_qvl_json(data, str(self.path))
        elif self.path.is_dir():
            raw = {key: self._read(name) for key, name in LAYOUT.items()}
            loaded = IntelCollateral(
                tcb_info=raw["tcb_info"],
                tcb_info_issuer_chain=_chain(raw["tcb_info_issuer_chain"], LAYOUT["tcb_info_issuer_chain"]),
                qe_identity=raw["qe_identity"],
                qe_identity_issuer_chain=_chain(raw["qe_identity_issuer_chain"],
                                                LAYOUT["qe_identity_issuer_chain"]),
                pck_crl=raw["pck_crl"],
                pck_crl_issuer_chain=_chain(raw["pck_crl_issuer_chain"], LAYOUT["pck_crl_issuer_chain"]),
                root_ca_crl=raw["root_ca_crl"],
                source=str(self.path),
            )
        else:
            raise CollateralError(f"collateral path {self.path} does not exist")
        self._loaded = loaded
        return loaded

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        return self._load()

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        return _no_snp(query)


class PcsFetcher:
    """Collateral from Intel PCS (v4 API) or a PCCS with the same paths, cached on disk.

    Responses are cached by URL for ``max_age`` seconds (collateral is reissued about monthly, and
    the verifier checks nextUpdate anyway). Any failure is a :class:`CollateralError` naming the URL.
    """

    def __init__(self, getter: HttpGetter | None = None, *, base_url: str = PCS_BASE_URL,
                 root_ca_crl_url: str = ROOT_CA_CRL_URL, cache: DiskCache | None = None,
                 max_age: float = 6 * 3600) -> None:
        self.getter: HttpGetter = getter if getter is not None else HttpxGetter()
        self.base_url = base_url.rstrip("/")
        self.root_ca_crl_url = root_ca_crl_url
        self.cache = cache
        self.max_age = max_age

    def _get(self, url: str, chain_headers: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(body, URL-decoded issuer chain PEM or b"")."""
        if self.cache is not None:
            cached = self.cache.get(url, max_age=self.max_age)
            if cached is not None:
                try:
                    entry = json.loads(cached)
                    return base64.b64decode(entry["body"]), entry["chain"].encode()
                except (ValueError, KeyError, TypeError, UnicodeError):
                    pass  # a damaged entry is refetched
        try:
            response: HttpResponse = self.getter.get(url)
        except TransportError as exc:
            raise CollateralError(f"cannot fetch {url}: {exc}") from exc
        if response.status != 200:
            raise CollateralError(f"{url} answered HTTP {response.status}")
        chain = b""
        if chain_headers:
            headers = {k.lower(): v for k, v in response.headers.items()}
            found = next((headers[h] for h in chain_headers if h in headers), None)
            if found is None:
                raise CollateralError(f"{url} sent no {chain_headers[0]} header")
            chain = unquote(found).encode()
        if self.cache is not None:
            entry_bytes = json.dumps({"body": base64.b64encode(response.body).decode(),
                                      "chain": chain.decode()}).encode()
            self.cache.put(url, entry_bytes)
        return response.body, chain

    def intel_collateral(self, query: IntelCollateralQuery) -> IntelCollateral:
        base = f"{self.base_url}/{query.tee}/certification/v4"
        try:
            tcb_url = f"{base}/tcb?fmspc={query.fmspc.hex()}"
            tcb_info, tcb_chain = self._get(tcb_url, _TCB_CHAIN_HEADERS)
            qe_url = f"{base}/qe/identity"
            qe_identity, qe_chain = self._get(qe_url, _QE_CHAIN_HEADERS)
            crl_url = f"{self.base_url}/sgx/certification/v4/pckcrl?ca={query.pck_ca}&encoding=der"
            pck_crl, crl_chain = self._get(crl_url, _CRL_CHAIN_HEADERS)
            root_crl, _ = self._get(self.root_ca_crl_url)
            return IntelCollateral(
                tcb_info=tcb_info, tcb_info_issuer_chain=_chain(tcb_chain, f"{tcb_url} issuer chain"),
                qe_identity=qe_identity, qe_identity_issuer_chain=_chain(qe_chain, f"{qe_url} issuer chain"),
                pck_crl=pck_crl, pck_crl_issuer_chain=_chain(crl_chain, f"{crl_url} issuer chain"),
                root_ca_crl=root_crl, source=self.base_url,
            )
        except CollateralError:
            raise
        except CofferError as exc:
            raise CollateralError(f"Intel PCS collateral: {exc}") from exc

    def snp_endorsements(self, query: SnpEndorsementQuery) -> SnpEndorsements:
        return _no_snp(query)
