"""Collateral sources: the offline directory, the dcap-qvl JSON file and the PCS fetcher against a
real HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from coffer.errors import CollateralError, PolicyDeniedError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import DiskCache, HttpxGetter, IntelCollateralQuery
from coffer.evidence.dcap import OfflineIntelCollateral, PcsFetcher, verify_tdx_quote
from tests.conftest import vector_bytes

pytestmark = pytest.mark.vectors

GTG = "go-tdx-guest/testing/"
FMSPC = bytes.fromhex("50806f000000")
QUERY = IntelCollateralQuery(tee="tdx", fmspc=FMSPC, pck_ca="platform")


def test_offline_directory_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match=r"has no tcb_info\.json"):
        OfflineIntelCollateral(tmp_path).intel_collateral(QUERY)


def test_offline_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="does not exist"):
        OfflineIntelCollateral(tmp_path / "nope").intel_collateral(QUERY)


def test_offline_json_file_with_missing_member(tmp_path: Path) -> None:
    path = tmp_path / "collateral.json"
    path.write_text('{"tcb_info": "{}"}')
    with pytest.raises(CollateralError, match="pck_crl_issuer_chain"):
        OfflineIntelCollateral(path).intel_collateral(QUERY)


def test_dcap_qvl_json_keeps_exact_signed_bytes() -> None:
    import json

    from coffer.evidence.dcap.sources import collateral_from_dcap_qvl_json

    raw = vector_bytes("dcap-qvl/sample/sgx_quote_collateral.json")
    col = collateral_from_dcap_qvl_json(raw, "sample")
    assert json.loads(raw)["tcb_info"].encode() in col.tcb_info
    assert len(col.tcb_info_issuer_chain) == 2


def test_offline_directory_accepts_pem_and_hex_crls(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from coffer.evidence.dcap.collateral import verify_crl
    from coffer.evidence.dcap.roots import intel_sgx_root_ca

    der = vector_bytes(GTG + "testdata/rootcrl.der")
    pem = x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)
    at = datetime(2023, 7, 1, tzinfo=UTC)
    for encoded in (der, pem, der.hex().encode()):
        verify_crl(encoded, intel_sgx_root_ca(), at, "root CA CRL")


# -------------------------------------------------------------------------------- PCS fetcher


class _Pcs:
    """Routes of a fake PCS serving the go-tdx-guest 2023 collateral with PCS's headers."""

    def __init__(self) -> None:
        chain = {name: quote(vector_bytes(GTG + f"derived_{name}_issuer_chain.pem").decode(), safe="")
                 for name in ("tcb_info", "qe_identity", "pck_crl")}
        self.routes: dict[str, tuple[bytes, dict[str, str]]] = {
            "/tdx/certification/v4/tcb?fmspc=50806f000000": (
                vector_bytes(GTG + "testdata/sample_tcbInfo_response"),
                {"TCB-Info-Issuer-Chain": chain["tcb_info"]}),
            "/tdx/certification/v4/qe/identity": (
                vector_bytes(GTG + "testdata/sample_qeIdentity_response"),
                {"SGX-Enclave-Identity-Issuer-Chain": chain["qe_identity"]}),
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
                vector_bytes(GTG + "testdata/pckcrl"), {"SGX-PCK-CRL-Issuer-Chain": chain["pck_crl"]}),
            "/IntelSGXRootCA.der": (vector_bytes(GTG + "testdata/rootcrl.der"), {}),
        }
        self.hits: list[str] = []


@pytest.fixture
def pcs() -> Iterator[tuple[_Pcs, str]]:
    state = _Pcs()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_response(404)
                self.end_headers()
                return
            body, headers = route
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _fetcher(base: str, cache: DiskCache | None = None) -> PcsFetcher:
    return PcsFetcher(HttpxGetter(timeout=5), base_url=base, root_ca_crl_url=f"{base}/IntelSGXRootCA.der",
                      cache=cache)


def test_fetcher_collateral_verifies_t5(pcs: tuple[_Pcs, str]) -> None:
    _, base = pcs
    with pytest.raises(PolicyDeniedError) as err:
        verify_tdx_quote(vector_bytes(GTG + "testdata/tdx_prod_quote_SPR_E4.dat"), _fetcher(base),
                         VerifyOptions(at=datetime(2023, 7, 1, 1, 0, tzinfo=UTC)))
    assert err.value.step == 10  # every collateral signature, chain and CRL check passed


def test_fetcher_decodes_issuer_chain_headers(pcs: tuple[_Pcs, str]) -> None:
    _, base = pcs
    col = _fetcher(base).intel_collateral(QUERY)
    assert len(col.tcb_info_issuer_chain) == 2
    assert len(col.qe_identity_issuer_chain) == 2
    assert len(col.pck_crl_issuer_chain) == 2
    assert col.root_ca_crl == vector_bytes(GTG + "testdata/rootcrl.der")


def test_fetcher_uses_disk_cache(pcs: tuple[_Pcs, str], tmp_path: Path) -> None:
    state, base = pcs
    cache = DiskCache(tmp_path / "cache")
    first = _fetcher(base, cache).intel_collateral(QUERY)
    hits = len(state.hits)
    second = _fetcher(base, cache).intel_collateral(QUERY)
    assert len(state.hits) == hits
    assert second.tcb_info == first.tcb_info
    assert second.pck_crl_issuer_chain == first.pck_crl_issuer_chain


def test_fetcher_reports_http_error(pcs: tuple[_Pcs, str]) -> None:
    _, base = pcs
    query = IntelCollateralQuery(tee="tdx", fmspc=bytes(6), pck_ca="platform")
    with pytest.raises(CollateralError, match="HTTP 404"):
        _fetcher(base).intel_collateral(query)


def test_fetcher_reports_missing_chain_header(pcs: tuple[_Pcs, str]) -> None:
    state, base = pcs
    body, _ = state.routes["/tdx/certification/v4/qe/identity"]
    state.routes["/tdx/certification/v4/qe/identity"] = (body, {})
    with pytest.raises(CollateralError, match="sgx-enclave-identity-issuer-chain"):
        _fetcher(base).intel_collateral(QUERY)


def test_fetcher_reports_unreachable_server() -> None:
    fetcher = PcsFetcher(HttpxGetter(timeout=2), base_url="http://127.0.0.1:9",
                         root_ca_crl_url="http://127.0.0.1:9/x")
    with pytest.raises(CollateralError, match="cannot fetch"):
        fetcher.intel_collateral(QUERY)
