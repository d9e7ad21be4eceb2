"""Azure HCL report, variable data and TDREPORT parsing; the var-data binding (rows C1, C2)."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as strat

from coffer.errors import FormatError
from coffer.evidence.azure import (
    ak_from_var_data,
    parse_hcl_report,
    parse_td_report,
    parse_var_data,
    td_quote_mismatches,
    var_data_binding_problem,
)
from coffer.evidence.azure.hcl import td_quote_body
from tests.conftest import vector_bytes

C1_SNP = "azure-cvm-tooling/az-cvm-vtpm/test/hcl-report-snp.bin"
C2_TDX = "azure-cvm-tooling/az-cvm-vtpm/test/hcl-report-tdx.bin"
C2_TDX_CONSTELLATION = "constellation/internal/attestation/azure/tdx/testdata/hclreport.bin"
TRUSTEE_SNP = "trustee/deps/verifier/test_data/az-snp-vtpm/hcl-report.bin"
TRUSTEE_TDX = "trustee/deps/verifier/test_data/az-tdx-vtpm/hcl-report.bin"
TRUSTEE_TD_QUOTE = "trustee/deps/verifier/test_data/az-tdx-vtpm/td-quote.bin"


def test_c1_snp_hcl_layout_and_binding() -> None:
    hcl = parse_hcl_report(vector_bytes(C1_SNP))
    summary = (hcl.version, hcl.report_size, hcl.kind, hcl.hash_type, len(hcl.var_data))
    assert summary == (1, 1819, "snp", 1, 583)
    assert var_data_binding_problem(hcl) is None
    assert hcl.hw_report_data[:32] == hashlib.sha256(hcl.var_data).digest()
    assert hcl.hw_report_data[32:] == bytes(32)
    var = parse_var_data(hcl.var_data)
    assert var.ek_jwk is None  # the older SNP HCL has only HCLAkPub
    assert ak_from_var_data(var).key.key_size == 2048
    assert hcl.to_dict()["report_type"] == "snp"


def test_c1_ak_differs_from_akpub_pem() -> None:
    from coffer.evidence.tpm import load_ak

    hcl = parse_hcl_report(vector_bytes(C1_SNP))
    akpub = load_ak(vector_bytes("azure-cvm-tooling/az-cvm-vtpm/test/akpub.pem"))
    assert ak_from_var_data(hcl.var_data).spki_der != akpub.spki_der


@pytest.mark.parametrize("path", [C2_TDX, C2_TDX_CONSTELLATION, TRUSTEE_TDX])
def test_c2_tdx_hcl_binding(path: str) -> None:
    hcl = parse_hcl_report(vector_bytes(path))
    assert hcl.version == 2
    assert hcl.kind == "tdx"
    assert var_data_binding_problem(hcl) is None
    td = hcl.td_report
    assert td.report_type[0] == 0x81
    assert td.report_data[:32] == hashlib.sha256(hcl.var_data).digest()
    var = parse_var_data(hcl.var_data)
    assert var.ek_jwk is not None
    assert var.user_data is not None
    assert "root-cert-thumbprint" in var.vm_configuration


def test_c2_user_data_is_64_zero_bytes() -> None:
    var = parse_var_data(parse_hcl_report(vector_bytes(C2_TDX)).var_data)
    assert var.user_data == "00" * 64


def test_trustee_td_quote_report_data_is_var_data_digest() -> None:
    hcl = parse_hcl_report(vector_bytes(TRUSTEE_TDX))
    quote = vector_bytes(TRUSTEE_TD_QUOTE)
    report_data = td_quote_body(quote)[0x208:0x248]
    assert report_data[:32] == hashlib.sha256(hcl.var_data).digest()
    assert var_data_binding_problem(hcl, report_data) is None
    assert td_quote_mismatches(quote, hcl.td_report) == []


def test_trustee_tdx_var_data_change_breaks_td_quote_binding() -> None:
    raw = bytearray(vector_bytes(TRUSTEE_TDX))
    raw[0x880] += 1
    hcl = parse_hcl_report(bytes(raw))
    report_data = td_quote_body(vector_bytes(TRUSTEE_TD_QUOTE))[0x208:0x248]
    problem = var_data_binding_problem(hcl, report_data)
    assert problem is not None
    assert "sha256" in problem


def test_td_quote_differing_from_tdreport_is_detected() -> None:
    hcl = parse_hcl_report(vector_bytes(TRUSTEE_TDX))
    quote = bytearray(vector_bytes(TRUSTEE_TD_QUOTE))
    quote[48 + 0x148] ^= 1  # RTMR0 in the quote body
    assert td_quote_mismatches(bytes(quote), hcl.td_report) == ["RTMR0"]


def test_trustee_snp_var_data_change_breaks_binding() -> None:
    raw = bytearray(vector_bytes(TRUSTEE_SNP))
    raw[0x6E0] += 1
    assert var_data_binding_problem(parse_hcl_report(bytes(raw))) is not None


def test_trustee_snp_ak_unreadable_after_nul_byte() -> None:
    raw = bytearray(vector_bytes(TRUSTEE_SNP))
    ak_from_var_data(parse_hcl_report(bytes(raw)).var_data)
    raw[0x540] = 0
    with pytest.raises(FormatError):
        ak_from_var_data(parse_hcl_report(bytes(raw)).var_data)


def test_trailing_bytes_are_ignored() -> None:
    raw = vector_bytes(C1_SNP)
    hcl = parse_hcl_report(raw)
    assert len(raw) > 0x4D4 + len(hcl.var_data)
    assert parse_hcl_report(raw[: 0x4D4 + len(hcl.var_data)]) == hcl


def _with(raw: bytes, offset: int, value: int) -> bytes:
    out = bytearray(raw)
    out[offset : offset + 4] = struct.pack("<I", value)
    return bytes(out)


@pytest.mark.parametrize(("offset", "value", "match"), [
    (0x0, 0x41424344, "HCLA"),
    (0x4, 9, "version"),
    (0x8, 0x100, "report_size"),
    (0x4C8, 3, "report_type"),
    (0x4CC, 7, "hash_type"),
    (0x4D0, 0x10000000, "variable data size"),
    (0x4C0, 5, "data_size"),
])
def test_rejects_bad_header_fields(offset: int, value: int, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_hcl_report(_with(vector_bytes(C1_SNP), offset, value))


def test_rejects_var_data_beyond_the_buffer() -> None:
    raw = vector_bytes(C1_SNP)
    hcl = parse_hcl_report(raw)
    with pytest.raises(FormatError):
        parse_hcl_report(raw[: 0x4D4 + len(hcl.var_data) - 1])


def test_rejects_var_data_without_ak() -> None:
    with pytest.raises(FormatError, match="HCLAkPub"):
        parse_var_data(b'{"keys":[{"kid":"HCLEkPub","kty":"RSA","e":"AQAB","n":"AA"}]}')


def test_rejects_duplicate_ak() -> None:
    key = '{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"AA"}'
    with pytest.raises(FormatError, match="more than one"):
        parse_var_data(f'{{"keys":[{key},{key}]}}'.encode())


def test_rejects_tiny_rsa_jwk() -> None:
    with pytest.raises(FormatError, match="out of range"):
        ak_from_var_data(b'{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"AQAB"}]}')


def test_td_report_parses_and_rejects_non_tdx_type() -> None:
    hcl = parse_hcl_report(vector_bytes(C2_TDX))
    td_bytes = hcl.hw_report[:1024]
    assert parse_td_report(td_bytes) == hcl.td_report
    with pytest.raises(FormatError, match="0x81"):
        parse_td_report(b"\x00" + td_bytes[1:])
    with pytest.raises(FormatError):
        parse_td_report(td_bytes[:1000])


def test_snp_view_of_tdx_report_is_refused() -> None:
    with pytest.raises(FormatError):
        _ = parse_hcl_report(vector_bytes(C2_TDX)).snp_report


@settings(max_examples=200, deadline=None)
@given(strat.data())
def test_fuzz_hcl_report(data: strat.DataObject) -> None:
    seed = bytearray(vector_bytes(data.draw(strat.sampled_from([C1_SNP, C2_TDX]))))
    for _ in range(data.draw(strat.integers(1, 4))):
        region = data.draw(strat.sampled_from([(0, 0x20), (0x4C0, 0x4D4), (0x4D4, len(seed) - 1),
                                               (0x20, 0x4C0)]))
        seed[data.draw(strat.integers(*region))] = data.draw(strat.integers(0, 255))
    candidate = bytes(seed[: data.draw(strat.integers(0, len(seed)))])
    try:
        hcl = parse_hcl_report(candidate)
        hcl.to_dict()
        var_data_binding_problem(hcl)
        ak_from_var_data(hcl.var_data)
    except FormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(strat.binary(max_size=0x600))
def test_fuzz_hcl_random(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_hcl_report(b"HCLA" + data)
