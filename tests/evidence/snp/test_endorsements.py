"""Offline endorsement layouts and the AMD KDS fetcher (against a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest

from coffer.errors import CollateralError, VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import DiskCache, HttpResponse, SnpEndorsementQuery
from coffer.evidence.snp import KdsFetcher, OfflineSnpEndorsements, parse_report, verify_snp_report
from coffer.evidence.x509util import certificate_ders, load_certificate
from tests.conftest import vector_bytes

S1_REPORT = "virtee-sev/tests/certs_data/report_milan.hex"
S1_VCEK = "virtee-sev/tests/certs_data/vcek_milan.der"
S1_CHAIN = "virtee-sev/tests/certs_data/cert_chain_milan"
AT = datetime(2025, 1, 1, tzinfo=UTC)


def s1_report() -> bytes:
    return bytes.fromhex(vector_bytes(S1_REPORT).decode().strip())


def s1_query() -> SnpEndorsementQuery:
    report = parse_report(s1_report(), product="Milan")
    return SnpEndorsementQuery(product="Milan", signer="vcek", hwid=report.kds_hwid(),
                               tcb_params=report.reported_tcb.kds_params())


# --- offline layouts ----------------------------------------------------------------------------

def test_single_der_file(tmp_path: Path) -> None:
    path = tmp_path / "anything.der"
    path.write_bytes(vector_bytes(S1_VCEK))
    found = OfflineSnpEndorsements(path).snp_endorsements(s1_query())
    assert found.leaf == vector_bytes(S1_VCEK)
    assert found.chain == ()


def test_pem_bundle_with_vcek_after_chain(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    vcek_pem = load_certificate(vector_bytes(S1_VCEK)).public_bytes(Encoding.PEM)
    path = tmp_path / "bundle.pem"
    path.write_bytes(vector_bytes(S1_CHAIN) + vcek_pem)
    found = OfflineSnpEndorsements(path).snp_endorsements(s1_query())
    assert found.leaf == vector_bytes(S1_VCEK)
    assert len(found.chain) == 2
    claims = verify_snp_report(s1_report(), OfflineSnpEndorsements(path), VerifyOptions(at=AT))
    assert claims.product == "Milan"


def test_directory_layout(tmp_path: Path) -> None:
    (tmp_path / "vcek.der").write_bytes(vector_bytes(S1_VCEK))
    (tmp_path / "cert_chain.pem").write_bytes(vector_bytes(S1_CHAIN))
    found = OfflineSnpEndorsements(tmp_path).snp_endorsements(s1_query())
    assert len(found.chain) == 2
    claims = verify_snp_report(s1_report(), OfflineSnpEndorsements(tmp_path), VerifyOptions(at=AT))
    assert claims.endorsement["source"].endswith("vcek.der")


def test_directory_without_the_requested_signer(tmp_path: Path) -> None:
    (tmp_path / "vcek.der").write_bytes(vector_bytes(S1_VCEK))
    query = SnpEndorsementQuery(product="Milan", signer="vlek", hwid=bytes(64), tcb_params=())
    with pytest.raises(CollateralError, match=r"vlek\.der or vlek\.pem"):
        OfflineSnpEndorsements(tmp_path).snp_endorsements(query)


def test_missing_path_is_a_collateral_error(tmp_path: Path) -> None:
    with pytest.raises(CollateralError):
        OfflineSnpEndorsements(tmp_path / "nope").snp_endorsements(s1_query())


def test_file_with_only_chain_certificates(tmp_path: Path) -> None:
    path = tmp_path / "chain.pem"
    path.write_bytes(vector_bytes(S1_CHAIN))
    with pytest.raises(CollateralError, match="no VCEK or VLEK"):
        OfflineSnpEndorsements(path).snp_endorsements(s1_query())


def test_garbage_file_fails_the_fetch_step(tmp_path: Path) -> None:
    path = tmp_path / "vcek.der"
    path.write_bytes(b"\x30\x03garbage")
    with pytest.raises(VerificationError) as info:
        verify_snp_report(s1_report(), OfflineSnpEndorsements(path), VerifyOptions(at=AT))
    assert info.value.step == 3


# --- KDS fetcher against a local server ---------------------------------------------------------

class _Kds(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        body = self.routes.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def kds() -> Iterator[tuple[str, type[_Kds]]]:
    handler = type("Kds", (_Kds,), {"routes": {}, "hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def s1_vcek_path() -> str:
    query = s1_query()
    params = "&".join(f"{k}={v}" for k, v in query.tcb_params)
    return f"/vcek/v1/Milan/{query.hwid.hex()}?{params}"


def test_vcek_url_follows_kds_layout() -> None:
    url = KdsFetcher(getter=_NoGetter()).vcek_url(s1_query())
    assert url.startswith("https://kdsintf.amd.com/vcek/v1/Milan/d49554ec717f4e5b")
    assert url.endswith("?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")


def test_turin_url_uses_8_byte_hwid_and_fmc() -> None:
    query = SnpEndorsementQuery(product="Turin", signer="vcek", hwid=bytes.fromhex("3b42092f69c656d3"),
                                tcb_params=(("blSPL", 1), ("teeSPL", 0), ("snpSPL", 2), ("ucodeSPL", 71),
                                            ("fmcSPL", 0)))
    url = KdsFetcher(getter=_NoGetter()).vcek_url(query)
    assert url.endswith("/vcek/v1/Turin/3b42092f69c656d3?blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71&fmcSPL=0")


class _NoGetter:
    def get(self, url: str) -> HttpResponse:
        raise AssertionError("no network expected")


def test_fetches_vcek_and_verifies(kds: tuple[str, type[_Kds]], tmp_path: Path) -> None:
    base, handler = kds
    handler.routes[s1_vcek_path()] = vector_bytes(S1_VCEK)
    fetcher = KdsFetcher(base, cache=DiskCache(tmp_path / "cache"))
    claims = verify_snp_report(s1_report(), fetcher, VerifyOptions(at=AT))
    assert claims.endorsement["source"].startswith(base + "/vcek/v1/Milan/")
    assert handler.hits == [s1_vcek_path()]
    # Served from the cache afterwards: the server forgets the certificate, verification still works.
    handler.routes.clear()
    again = KdsFetcher(base, cache=DiskCache(tmp_path / "cache"))
    verify_snp_report(s1_report(), again, VerifyOptions(at=AT))
    assert handler.hits == [s1_vcek_path()]


def test_fetches_the_cert_chain(kds: tuple[str, type[_Kds]]) -> None:
    base, handler = kds
    handler.routes[s1_vcek_path()] = vector_bytes(S1_VCEK)
    handler.routes["/vcek/v1/Milan/cert_chain"] = vector_bytes(S1_CHAIN)
    handler.routes["/vlek/v1/Milan/cert_chain"] = vector_bytes(
        "go-sev-guest/verify/trust/ask_ark_milan_vlek.pem")
    fetcher = KdsFetcher(base, fetch_chain=True)
    found = fetcher.snp_endorsements(s1_query())
    assert found.chain == tuple(certificate_ders(vector_bytes(S1_CHAIN)))
    assert len(fetcher.cert_chain("Milan", "vlek")) == 2


def test_kds_404_is_a_collateral_error_at_the_fetch_step(kds: tuple[str, type[_Kds]]) -> None:
    base, _ = kds
    with pytest.raises(VerificationError) as info:
        verify_snp_report(s1_report(), KdsFetcher(base), VerifyOptions(at=AT))
    assert info.value.step == 3
    assert "404" in info.value.reason


def test_kds_garbage_body_is_not_cached(kds: tuple[str, type[_Kds]], tmp_path: Path) -> None:
    base, handler = kds
    handler.routes[s1_vcek_path()] = b"<html>rate limited</html>"
    cache = DiskCache(tmp_path)
    with pytest.raises(CollateralError, match="does not parse"):
        KdsFetcher(base, cache=cache).snp_endorsements(s1_query())
    assert not any(tmp_path.iterdir())


def test_unreachable_kds_is_a_collateral_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CollateralError, match="cannot fetch"):
        KdsFetcher(f"http://127.0.0.1:{port}").snp_endorsements(s1_query())


def test_vlek_cannot_be_fetched_per_chip() -> None:
    query = SnpEndorsementQuery(product="Milan", signer="vlek", hwid=bytes(64), tcb_params=())
    with pytest.raises(CollateralError, match="--endorsements"):
        KdsFetcher(getter=_NoGetter()).snp_endorsements(query)


def test_v2_report_tries_the_next_product_after_a_404(kds: tuple[str, type[_Kds]]) -> None:
    from tests.evidence.snp.synth import (
        AT as SYNTH_AT,
    )
    from tests.evidence.snp.synth import (
        ReportSpec,
        Tcb,
        build_report,
        cert_der,
        chip_id_for,
        endorsement_cert,
        sign_report,
        trust_store,
    )

    base, handler = kds
    report = sign_report(build_report(ReportSpec(product="Genoa", version=2, reported_tcb=Tcb())))
    genoa_path = f"/vcek/v1/Genoa/{chip_id_for('Genoa').hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    handler.routes[genoa_path] = cert_der(endorsement_cert("Genoa", tcb=Tcb()))
    claims = verify_snp_report(report, KdsFetcher(base), VerifyOptions(at=SYNTH_AT), roots=trust_store())
    assert claims.product == "Genoa"
    assert [hit.split("/")[3] for hit in handler.hits] == ["Milan", "Genoa"]
