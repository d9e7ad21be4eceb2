"""TCB info and QE identity: the raw-bytes scanner, typed parsing, and signature/chain/time checks."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence.dcap.collateral import (
    parse_qe_identity,
    parse_tcb_info,
    signed_member,
    top_level_members,
    verify_qe_identity,
    verify_tcb_info,
)
from coffer.evidence.dcap.roots import intel_sgx_root_ca
from coffer.evidence.x509util import ChainError, certificate_ders
from tests.conftest import vector_bytes

GTG = "go-tdx-guest/testing/"
TCB_2023 = GTG + "testdata/sample_tcbInfo_response"
QE_2023 = GTG + "testdata/sample_qeIdentity_response"
TCB_V5 = GTG + "testdata/sample_tcbinfo_response_v5"
CHAIN_2023 = GTG + "derived_tcb_info_issuer_chain.pem"
QE_CHAIN_2023 = GTG + "derived_qe_identity_issuer_chain.pem"
CHAIN_2025 = "dcap-qvl/sample/derived_tcb_info_issuer_chain_2025.pem"
TRUSTEE = "trustee/deps/verifier/test_data/"


def _chain(path: str) -> tuple[bytes, ...]:
    return tuple(certificate_ders(vector_bytes(path)))


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# ------------------------------------------------------------------------------------- scanner


def test_scanner_returns_exact_member_bytes() -> None:
    body = b' { "a" : {"x": "}\\"{", "y": [1, {"z": null}]} , "signature":"00" }\n'
    spans = top_level_members(body, "t")
    start, end = spans["a"]
    assert body[start:end] == b'{"x": "}\\"{", "y": [1, {"z": null}]}'
    assert body[slice(*spans["signature"])] == b'"00"'


def test_scanner_handles_signature_first_and_escaped_keys() -> None:
    inner = b'{"id":"TDX"}'
    body = b'{"signature":"' + b"ab" * 64 + b'","tcb\\u0049nfo":' + inner + b"}"
    raw, value, sig = signed_member(body, "tcbInfo", "TCB info")
    assert raw == inner
    assert value == {"id": "TDX"}
    assert sig == b"\xab" * 64


def test_scanner_rejects_trailing_garbage() -> None:
    with pytest.raises(FormatError, match="trailing"):
        top_level_members(b'{"a":1} x', "t")


def test_signed_member_rejects_duplicate_keys() -> None:
    with pytest.raises(FormatError, match="duplicate"):
        signed_member(b'{"tcbInfo":{},"tcbInfo":{},"signature":"00"}', "tcbInfo", "TCB info")


def test_signed_member_rejects_short_signature() -> None:
    with pytest.raises(FormatError, match="64 bytes"):
        signed_member(b'{"tcbInfo":{},"signature":"0011"}', "tcbInfo", "TCB info")


# ------------------------------------------------------------------------------------- parsing


@pytest.mark.vectors
def test_parses_tdx_tcb_info_2023() -> None:
    info, signed = parse_tcb_info(vector_bytes(TCB_2023))
    assert info.id == "TDX"
    assert info.version == 3
    assert info.fmspc.hex() == "50806f000000"
    assert info.tdx_module is not None
    assert info.tcb_levels[0].tdx_components is not None
    body = vector_bytes(TCB_2023)
    assert body.startswith(b'{"tcbInfo":' + signed.signed)


@pytest.mark.vectors
def test_parses_v5_tcb_info_with_module_identities() -> None:
    info, _ = parse_tcb_info(vector_bytes(TCB_V5))
    assert {m.id for m in info.tdx_module_identities} == {"TDX_01", "TDX_03"}


@pytest.mark.vectors
def test_parses_trustee_tcb_info_and_enclave_identity() -> None:
    info, _ = parse_tcb_info(vector_bytes(TRUSTEE + "tcbInfo.json"))
    assert info.fmspc.hex() == "00a06d080000"
    assert info.issue_date == _at("2025-10-27T13:07:17Z")
    ident, _ = parse_qe_identity(vector_bytes(TRUSTEE + "enclaveIdentity.json"))
    assert ident.id == "TD_QE"
    assert ident.isvprodid == 2
    assert ident.tcb_levels[0].isvsvn == 4
    assert ident.to_dict()["mrsigner"].startswith("dc9e2a7c")


@pytest.mark.vectors
def test_parses_qe_identity_2023() -> None:
    ident, _ = parse_qe_identity(vector_bytes(QE_2023))
    assert ident.attributes_mask.hex().upper() == "FBFFFFFFFFFFFFFF0000000000000000"
    assert ident.miscselect_mask == 0xFFFFFFFF


def test_rejects_unknown_tcb_status() -> None:
    body = (b'{"enclaveIdentity":{"id":"QE","version":2,"issueDate":"2025-01-01T00:00:00Z",'
            b'"nextUpdate":"2025-02-01T00:00:00Z","tcbEvaluationDataNumber":1,"miscselect":"00000000",'
            b'"miscselectMask":"FFFFFFFF","attributes":"' + b"00" * 16 + b'","attributesMask":"'
            + b"00" * 16 + b'","mrsigner":"' + b"00" * 32 + b'","isvprodid":1,"tcbLevels":[{"tcb":'
            b'{"isvsvn":1},"tcbDate":"2025-01-01T00:00:00Z","tcbStatus":"Fine"}]},"signature":"'
            + b"00" * 64 + b'"}')
    with pytest.raises(FormatError, match="unknown tcbStatus"):
        parse_qe_identity(body)


# -------------------------------------------------------------------------------- verification


@pytest.mark.vectors
def test_verifies_tcb_info_2023_in_window() -> None:
    info, signers = verify_tcb_info(vector_bytes(TCB_2023), _chain(CHAIN_2023), _at("2023-07-01T01:00:00Z"),
                                    root=intel_sgx_root_ca())
    assert info.id == "TDX"
    assert signers[-1] == intel_sgx_root_ca()


@pytest.mark.vectors
def test_verifies_qe_identity_2023_in_window() -> None:
    ident, _ = verify_qe_identity(vector_bytes(QE_2023), _chain(QE_CHAIN_2023), _at("2023-07-01T01:00:00Z"),
                                  root=intel_sgx_root_ca())
    assert ident.id == "TD_QE"


@pytest.mark.vectors
def test_verifies_v5_tcb_info_with_reissued_signing_cert() -> None:
    info, _ = verify_tcb_info(vector_bytes(TCB_V5), _chain(CHAIN_2025), _at("2026-02-03T00:00:00Z"),
                              root=intel_sgx_root_ca())
    assert info.fmspc.hex() == "90c06f000000"


@pytest.mark.vectors
def test_rejects_v5_tcb_info_with_expired_2023_signing_cert() -> None:
    # Same key and serial, so the signature verifies, but the old certificate expired in 2025.
    with pytest.raises(ChainError, match="expired"):
        verify_tcb_info(vector_bytes(TCB_V5), _chain(CHAIN_2023), _at("2026-02-03T00:00:00Z"),
                        root=intel_sgx_root_ca())


@pytest.mark.vectors
def test_verifies_trustee_tcb_info_with_reissued_chain() -> None:
    info, _ = verify_tcb_info(vector_bytes(TRUSTEE + "tcbInfo.json"), _chain(CHAIN_2025),
                              _at("2025-11-01T00:00:00Z"), root=intel_sgx_root_ca())
    assert info.tcb_evaluation_data_number == 17


@pytest.mark.vectors
def test_rejects_tcb_info_after_next_update() -> None:
    with pytest.raises(ChainError, match="nextUpdate"):
        verify_tcb_info(vector_bytes(TCB_2023), _chain(CHAIN_2023), _at("2023-07-19T00:00:00Z"),
                        root=intel_sgx_root_ca())


@pytest.mark.vectors
def test_rejects_tcb_info_before_issue_date() -> None:
    with pytest.raises(ChainError, match="issueDate"):
        verify_tcb_info(vector_bytes(TCB_2023), _chain(CHAIN_2023), _at("2023-06-01T00:00:00Z"),
                        root=intel_sgx_root_ca())


@pytest.mark.vectors
def test_rejects_flipped_byte_in_tcb_info() -> None:
    body = vector_bytes(TCB_2023).replace(b'"tcbEvaluationDataNumber":15', b'"tcbEvaluationDataNumber":16')
    with pytest.raises(ChainError, match="signature does not verify"):
        verify_tcb_info(body, _chain(CHAIN_2023), _at("2023-07-01T01:00:00Z"), root=intel_sgx_root_ca())


@pytest.mark.vectors
def test_rejects_reserialised_tcb_info() -> None:
    # Same JSON value with different white space: the signature is over the exact bytes.
    body = vector_bytes(TCB_2023).replace(b'{"tcbInfo":{"id":"TDX"', b'{"tcbInfo":{ "id":"TDX"')
    with pytest.raises(ChainError, match="signature does not verify"):
        verify_tcb_info(body, _chain(CHAIN_2023), _at("2023-07-01T01:00:00Z"), root=intel_sgx_root_ca())


@pytest.mark.vectors
def test_rejects_tcb_info_signed_under_another_root() -> None:
    from tests.evidence.dcap.synth import build

    other = build().root
    with pytest.raises(ChainError, match="not the trusted Intel SGX Root CA"):
        verify_tcb_info(vector_bytes(TCB_2023), _chain(CHAIN_2023), _at("2023-07-01T01:00:00Z"), root=other)


# ---------------------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_only_raise_format_error(data: bytes) -> None:
    for parse in (parse_tcb_info, parse_qe_identity):
        with contextlib.suppress(FormatError):
            parse(data)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.text(max_size=8),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "version", "tcbLevels", "fmspc", "issueDate", "tdxModule",
                                        "pceId", "mrsigner", "isvprodid", "nextUpdate"]), JSONISH))
def test_fuzz_structured_json_only_raises_format_error(inner: dict[str, object]) -> None:
    import json

    for key, parse in (("tcbInfo", parse_tcb_info), ("enclaveIdentity", parse_qe_identity)):
        body = json.dumps({key: inner, "signature": "00" * 64}).encode()
        with contextlib.suppress(FormatError):
            parse(body)


@pytest.mark.vectors
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_pcs_bodies_only_raise_format_error(data: st.DataObject) -> None:
    base = bytearray(vector_bytes(data.draw(st.sampled_from([TCB_2023, QE_2023]))))
    for _ in range(data.draw(st.integers(1, 4))):
        base[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.sampled_from(b'{}[]",:0a9 \\x'))
    try:
        parse_tcb_info(bytes(base))
        parse_qe_identity(bytes(base))
    except FormatError:
        pass
