"""The DCAP quote parser on real quotes (SGX v3, TDX v4/v5) and on malformed input."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence.dcap import TDX_HANDLER, parse_quote, parse_td_report_body
from coffer.evidence.dcap.quote import BODY_TD15, EnclaveReport, TdReportBody
from tests.conftest import vector_bytes

pytestmark = pytest.mark.vectors

TRUSTEE = "trustee/deps/verifier/test_data/"
SPR_E4 = "go-tdx-guest/testing/testdata/tdx_prod_quote_SPR_E4.dat"
V5 = "go-tdx-guest/testing/testdata/quote_v5_sample.dat"
SGX = "dcap-qvl/sample/sgx_quote"

ALL_QUOTES = [
    (SGX, 3, False),
    (SPR_E4, 4, True),
    (V5, 5, True),
    ("go-tdx-guest/testing/testdata/ccel/cos-113-tdx-quote.dat", 4, True),
    (TRUSTEE + "tdx_quote_4.dat", 4, True),
    (TRUSTEE + "tdx_quote_5.dat", 5, True),
    (TRUSTEE + "tdx_quote_6.dat", 4, True),
    (TRUSTEE + "occlum_quote.dat", 3, False),
    (TRUSTEE + "az-tdx-vtpm/td-quote.bin", 4, True),
]


@pytest.mark.parametrize(("path", "version", "tdx"), ALL_QUOTES)
def test_parses_real_quote(path: str, version: int, tdx: bool) -> None:
    quote = parse_quote(vector_bytes(path))
    assert quote.version == version
    assert quote.is_tdx is tdx
    assert quote.header.att_key_type == 2
    assert quote.header.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert quote.qe.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
    assert len(quote.qe.qe_auth_data) == 32
    json.dumps(quote.to_dict())  # JSON-ready


def test_signed_bytes_cover_header_and_body() -> None:
    assert len(parse_quote(vector_bytes(SGX)).signed_bytes) == 0x1B0
    assert len(parse_quote(vector_bytes(SPR_E4)).signed_bytes) == 0x278
    v5 = parse_quote(vector_bytes(V5))
    assert v5.body_type == BODY_TD15
    assert len(v5.signed_bytes) == 0x36 + 648


def test_ignores_ascii_trailer_after_signature_data() -> None:
    data = vector_bytes(SPR_E4)
    quote = parse_quote(data)
    assert quote.size == 4935
    assert data[quote.size:] == b"\nextra bytes(only for testing purpose)\n"


def test_ignores_zero_padding() -> None:
    data = vector_bytes("go-tdx-guest/testing/testdata/ccel/cos-113-tdx-quote.dat")
    quote = parse_quote(data)
    assert len(data) == 8000
    assert not any(data[quote.size:])


def test_v5_td15_fields() -> None:
    quote = parse_quote(vector_bytes(V5))
    td = quote.td_report
    assert td.tee_tcb_svn2 is not None
    assert td.mr_servicetd is not None
    assert len(td.mr_servicetd) == 48
    assert "mr_servicetd" in td.to_dict()


def test_tdx_quote_4_matches_trustee_expected_claims() -> None:
    expected = json.loads(vector_bytes(TRUSTEE + "parse_tdx_claims_expected.json"))
    quote = parse_quote(vector_bytes(TRUSTEE + "tdx_quote_4.dat"))
    td = quote.td_report
    body = expected["quote"]["body"]
    header = expected["quote"]["header"]
    assert td.mr_td.hex() == body["mr_td"]
    assert td.mr_seam.hex() == body["mr_seam"]
    assert td.mr_signer_seam.hex() == body["mrsigner_seam"]
    assert td.rtmrs == tuple(bytes.fromhex(body[f"rtmr_{i}"]) for i in range(4))
    assert quote.rtmrs == td.rtmrs
    assert td.report_data.hex() == body["report_data"]
    assert td.tee_tcb_svn.hex() == body["tcb_svn"]
    assert td.td_attributes.hex() == body["td_attributes"]
    assert td.xfam.hex() == body["xfam"]
    assert td.mr_config_id.hex() == body["mr_config_id"]
    assert td.debug is expected["td_attributes"]["debug"]
    assert quote.header.user_data.hex() == header["user_data"]


def test_trustee_v5_and_v6_report_data() -> None:
    q5 = parse_quote(vector_bytes(TRUSTEE + "tdx_quote_5.dat"))
    assert q5.body_type == 3
    assert q5.report_data.hex().startswith("6d6ab13b")
    q6 = parse_quote(vector_bytes(TRUSTEE + "tdx_quote_6.dat"))
    assert q6.report_data.hex().startswith("26cae1c7")
    assert q6.report_data[48:] == bytes(16)
    assert q6.td_report.mr_config_id.hex().startswith("889abf47")


def test_occlum_sgx_fields() -> None:
    quote = parse_quote(vector_bytes(TRUSTEE + "occlum_quote.dat"))
    report = quote.enclave_report
    assert isinstance(report, EnclaveReport)
    assert report.mr_enclave.hex().startswith("8f173e46")
    assert report.report_data == b"test".ljust(64, b"\0")


def test_td_report_body_parser_standalone() -> None:
    quote = parse_quote(vector_bytes(SPR_E4))
    raw = quote.signed_bytes[48:]
    body = parse_td_report_body(raw)
    assert isinstance(body, TdReportBody)
    assert body == quote.body


def test_handler_parse_returns_quote() -> None:
    assert TDX_HANDLER.parse(vector_bytes(SPR_E4)).to_dict()["tee"] == "tdx"
    assert TDX_HANDLER.input_kind == "binary"


def test_td_report_accessor_refuses_sgx_quote() -> None:
    with pytest.raises(FormatError):
        _ = parse_quote(vector_bytes(SGX)).td_report


@pytest.mark.parametrize("cut", [0, 1, 47, 48, 0x277, 0x278, 0x27B, 0x300, 1000, 4000, 4934])
def test_rejects_truncated_quote(cut: int) -> None:
    with pytest.raises(FormatError):
        parse_quote(vector_bytes(SPR_E4)[:cut])


def test_rejects_unknown_version() -> None:
    data = bytearray(vector_bytes(SPR_E4))
    data[0] = 6
    with pytest.raises(FormatError, match="version 6"):
        parse_quote(bytes(data))


def test_rejects_p384_attestation_key_type() -> None:
    data = bytearray(vector_bytes(SPR_E4))
    data[2] = 3
    with pytest.raises(FormatError, match="attestation key type 3"):
        parse_quote(bytes(data))


def test_rejects_lying_signature_data_length() -> None:
    data = bytearray(vector_bytes(SPR_E4))
    data[0x278:0x27C] = struct.pack("<I", 5000)
    with pytest.raises(FormatError, match="truncated"):
        parse_quote(bytes(data))


def test_rejects_wrong_v5_body_size() -> None:
    data = bytearray(vector_bytes(V5))
    data[0x32:0x36] = struct.pack("<I", 584)
    with pytest.raises(FormatError, match="body type 3 must be 648"):
        parse_quote(bytes(data))


def test_rejects_unsupported_certification_type() -> None:
    data = bytearray(vector_bytes(SPR_E4))
    data[0x27C + 128] = 4  # certification data type 6 -> 4
    with pytest.raises(FormatError, match="certification data type 4"):
        parse_quote(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_fuzz_random_bytes_only_raise_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_quote(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_quotes_only_raise_format_error(data: st.DataObject) -> None:
    base = bytearray(vector_bytes(data.draw(st.sampled_from([SPR_E4, V5, SGX]))))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    with contextlib.suppress(FormatError):
        parse_quote(bytes(base[:cut]))
