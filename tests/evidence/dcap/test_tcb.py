"""TCB evaluation (Intel QVL algorithm): level matching, TDX module identities, QE level, convergence."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from coffer.evidence.dcap import parse_quote
from coffer.evidence.dcap.collateral import (
    IdentityLevel,
    TcbInfo,
    parse_qe_identity,
    parse_tcb_info,
    tcb_info_from_json,
)
from coffer.evidence.dcap.pck import PckTcb, pck_extension
from coffer.evidence.dcap.quote import TdReportBody, parse_td_report_body
from coffer.evidence.dcap.tcb import (
    TCB_NOT_SUPPORTED,
    TcbMismatchError,
    check_qe_identity,
    evaluate_tcb,
    platform_level,
)
from coffer.evidence.x509util import load_certificates
from tests.conftest import vector_bytes
from tests.evidence.dcap.synth import tcb_level, td_body

SGX = (2, 2, 7, 7, 4, 1, 0, 2) + (0,) * 8
PCK = PckTcb(components=SGX, pcesvn=11, cpusvn=bytes(SGX))


def _info(levels: list[dict[str, Any]], identities: list[dict[str, Any]] | None = None) -> TcbInfo:
    obj: dict[str, Any] = {
        "id": "TDX", "version": 3, "issueDate": "2030-01-01T00:00:00Z", "nextUpdate": "2030-02-01T00:00:00Z",
        "fmspc": "00a06d080000", "pceId": "0000", "tcbType": 0, "tcbEvaluationDataNumber": 17,
        "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8},
        "tcbLevels": levels,
    }
    if identities is not None:
        obj["tdxModuleIdentities"] = identities
    return tcb_info_from_json(obj)


def _td(svn: bytes, mr_signer_seam: bytes = bytes(48)) -> TdReportBody:
    body = bytearray(td_body(tee_tcb_svn=svn, report_data=bytes(64), debug=False))
    body[0x40:0x70] = mr_signer_seam
    return parse_td_report_body(bytes(body))


def _qe(status: str, advisories: tuple[str, ...] = ()) -> IdentityLevel:
    return IdentityLevel(isvsvn=4, tcb_date=datetime(2029, 6, 1, tzinfo=UTC), tcb_status=status,
                         advisory_ids=advisories)


TDX_OK = (3, 0, 5) + (0,) * 13
SVN_OK = bytes([3, 0, 5]) + bytes(13)


def test_first_matching_level_wins() -> None:
    info = _info([
        tcb_level(sgx=(3,) * 16, pcesvn=11, tdx=TDX_OK, status="UpToDate"),
        tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status="SWHardeningNeeded", advisories=("SA-1",)),
        tcb_level(sgx=(0,) * 16, pcesvn=0, tdx=(0,) * 16, status="OutOfDate"),
    ])
    result = evaluate_tcb(info, PCK, _qe("UpToDate"), _td(SVN_OK))
    assert result.status == "SWHardeningNeeded"
    assert result.advisory_ids == ("SA-1",)


def test_pcesvn_below_every_level_is_not_supported() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=12, tdx=TDX_OK, status="UpToDate")])
    result = evaluate_tcb(info, PCK, _qe("UpToDate"), _td(SVN_OK))
    assert result.status == TCB_NOT_SUPPORTED
    assert result.rejected


def test_tdx_components_compared_from_index_zero_when_module_major_is_zero() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=(4,) + (0,) * 15, status="UpToDate")])
    assert platform_level(info, PCK, SVN_OK) is None


def test_tdx_components_compared_from_index_two_when_module_major_is_set() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=(9, 9, 5) + (0,) * 13, status="UpToDate")])
    svn = bytes([3, 1, 5]) + bytes(13)
    assert platform_level(info, PCK, svn) is not None


@pytest.mark.parametrize(("platform", "component", "expected"), [
    ("UpToDate", "OutOfDate", "OutOfDate"),
    ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
    ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("OutOfDate", "OutOfDate", "OutOfDate"),
    ("UpToDate", "Revoked", "Revoked"),
    ("ConfigurationNeeded", "UpToDate", "ConfigurationNeeded"),
])
def test_convergence_with_qe_status(platform: str, component: str, expected: str) -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status=platform, advisories=("SA-P",))])
    result = evaluate_tcb(info, PCK, _qe(component, ("SA-Q", "SA-P")), _td(SVN_OK))
    assert result.status == expected
    assert result.advisory_ids == ("SA-P", "SA-Q")


def test_qe_below_every_level_is_not_supported() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status="UpToDate")])
    assert evaluate_tcb(info, PCK, None, _td(SVN_OK)).status == TCB_NOT_SUPPORTED


def _module(levels: list[tuple[int, str]]) -> list[dict[str, Any]]:
    return [{"id": "TDX_01", "mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8,
             "tcbLevels": [{"tcb": {"isvsvn": svn}, "tcbDate": "2028-01-01T00:00:00Z", "tcbStatus": status}
                           for svn, status in levels]}]


def test_out_of_date_module_converges() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=(0, 0, 5) + (0,) * 13, status="UpToDate")],
                 _module([(6, "UpToDate"), (2, "OutOfDate")]))
    result = evaluate_tcb(info, PCK, _qe("UpToDate"), _td(bytes([3, 1, 5]) + bytes(13)))
    assert result.module_status == "OutOfDate"
    assert result.status == "OutOfDate"


def test_module_svn_below_every_level_is_not_supported() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=(0, 0, 5) + (0,) * 13, status="UpToDate")],
                 _module([(6, "UpToDate")]))
    result = evaluate_tcb(info, PCK, _qe("UpToDate"), _td(bytes([3, 1, 5]) + bytes(13)))
    assert result.status == TCB_NOT_SUPPORTED


def test_rejects_unknown_module_major_version() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status="UpToDate")], _module([(1, "UpToDate")]))
    with pytest.raises(TcbMismatchError, match="TDX_07"):
        evaluate_tcb(info, PCK, _qe("UpToDate"), _td(bytes([3, 7, 5]) + bytes(13)))


def test_rejects_foreign_tdx_module_signer() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status="UpToDate")])
    with pytest.raises(TcbMismatchError, match="MRSIGNERSEAM"):
        evaluate_tcb(info, PCK, _qe("UpToDate"), _td(SVN_OK, mr_signer_seam=b"\1" * 48))


def test_tcb_date_is_the_earliest_level_date() -> None:
    info = _info([tcb_level(sgx=SGX, pcesvn=11, tdx=TDX_OK, status="UpToDate", date="2029-01-01T00:00:00Z")])
    result = evaluate_tcb(info, PCK, _qe("UpToDate"), _td(SVN_OK))
    assert result.tcb_date == datetime(2029, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------- real collateral


def _evaluate(quote_path: str, tcb_path: str, qe_path: str) -> tuple[str, tuple[str, ...]]:
    quote = parse_quote(vector_bytes(quote_path))
    pck = pck_extension(load_certificates(quote.qe.pck_chain_pem)[0])
    info, _ = parse_tcb_info(vector_bytes(tcb_path))
    identity, _ = parse_qe_identity(vector_bytes(qe_path))
    result = evaluate_tcb(info, pck.tcb, check_qe_identity(identity, quote.qe.qe_report),
                          quote.td_report if quote.is_tdx else None)
    return result.status, result.advisory_ids


@pytest.mark.vectors
def test_t5_spr_e4_is_not_supported() -> None:
    status, _ = _evaluate("go-tdx-guest/testing/testdata/tdx_prod_quote_SPR_E4.dat",
                          "go-tdx-guest/testing/testdata/sample_tcbInfo_response",
                          "go-tdx-guest/testing/testdata/sample_qeIdentity_response")
    assert status == TCB_NOT_SUPPORTED


@pytest.mark.vectors
def test_t6_v5_quote_is_up_to_date_with_v5_tcb_info() -> None:
    status, advisories = _evaluate("go-tdx-guest/testing/testdata/quote_v5_sample.dat",
                                   "go-tdx-guest/testing/testdata/sample_tcbinfo_response_v5",
                                   "go-tdx-guest/testing/testdata/sample_qeIdentity_response")
    assert status == "UpToDate"
    assert advisories == ()


@pytest.mark.vectors
def test_trustee_quote_6_is_out_of_date_on_pcesvn() -> None:
    status, _ = _evaluate("trustee/deps/verifier/test_data/tdx_quote_6.dat",
                          "trustee/deps/verifier/test_data/tcbInfo.json",
                          "trustee/deps/verifier/test_data/enclaveIdentity.json")
    assert status == "OutOfDate"


@pytest.mark.vectors
def test_sgx_qe_report_does_not_match_td_qe_identity() -> None:
    quote = parse_quote(vector_bytes("dcap-qvl/sample/sgx_quote"))
    identity, _ = parse_qe_identity(vector_bytes("go-tdx-guest/testing/testdata/sample_qeIdentity_response"))
    with pytest.raises(TcbMismatchError, match="MRSIGNER"):
        check_qe_identity(identity, quote.qe.qe_report)
