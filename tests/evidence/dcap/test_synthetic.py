"""The verifier against synthetic platforms (own root, PCK CA, PCK with the SGX extension and signed
collateral): expiry, revocation, wrong root, TCB outcomes, debug and report data."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from coffer.errors import PolicyDeniedError, VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.dcap import StaticIntelCollateral, TdxClaims, verify_sgx_quote, verify_tdx_quote
from coffer.evidence.dcap.collateral import parse_tcb_info
from tests.evidence.dcap.synth import NOW, Platform, build, tcb_level

SGX = (2, 2, 7, 7, 4, 1, 0, 2) + (0,) * 8


@pytest.fixture(scope="module")
def platform() -> Platform:
    return build()


def _verify(p: Platform, **options: object) -> TdxClaims:
    opts = VerifyOptions(at=options.pop("at", NOW), **options)  # type: ignore[arg-type]
    return verify_tdx_quote(p.quote, StaticIntelCollateral(p.collateral), opts, root=p.root)


def _step(p: Platform, **options: object) -> int:
    with pytest.raises(VerificationError) as err:
        _verify(p, **options)
    return err.value.step


def test_synthetic_platform_verifies(platform: Platform) -> None:
    claims = _verify(platform)
    assert claims.tcb_status == "UpToDate"
    assert claims.fmspc == platform.fmspc
    assert claims.pck_ca == "platform"


def test_warm_verification_is_repeatable(platform: Platform) -> None:
    first = _verify(platform)
    assert _verify(platform) == first


def test_rejects_the_real_intel_root_for_a_synthetic_chain(platform: Platform) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(platform.quote, StaticIntelCollateral(platform.collateral), VerifyOptions(at=NOW))
    assert err.value.step == 2
    assert "not the trusted Intel SGX Root CA" in err.value.reason


def test_rejects_chain_under_another_root(platform: Platform) -> None:
    other = build(root_cn="Test SGX Root CA")  # same name, different key
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(platform.quote, StaticIntelCollateral(platform.collateral), VerifyOptions(at=NOW),
                         root=other.root)
    assert err.value.step == 2


def test_rejects_expired_pck_certificate() -> None:
    p = build(pck_not_after=NOW - timedelta(days=1))
    with pytest.raises(VerificationError) as err:
        _verify(p)
    assert err.value.step == 2
    assert "expired" in err.value.reason


def test_rejects_pck_listed_in_pck_crl() -> None:
    p = build(pck_crl_revokes_pck=True)
    with pytest.raises(VerificationError) as err:
        _verify(p)
    assert err.value.step == 8
    assert "revoked" in err.value.reason


def test_rejects_pck_ca_listed_in_root_crl() -> None:
    p = build(root_crl_revokes_ca=True)
    with pytest.raises(VerificationError) as err:
        _verify(p)
    assert err.value.step == 8
    assert "revoked" in err.value.reason


def test_rejects_missing_root_ca_crl(platform: Platform) -> None:
    p = dataclasses.replace(platform, collateral=dataclasses.replace(platform.collateral, root_ca_crl=None))
    assert _step(p) == 8


def test_rejects_pck_crl_signed_by_another_ca(platform: Platform) -> None:
    other = build()
    col = dataclasses.replace(platform.collateral, pck_crl=other.collateral.pck_crl)
    assert _step(dataclasses.replace(platform, collateral=col)) == 8


def test_rejects_collateral_for_another_fmspc() -> None:
    p = build(collateral_fmspc=bytes.fromhex("00906ed50000"))
    with pytest.raises(VerificationError) as err:
        _verify(p)
    assert err.value.step == 7
    assert "FMSPC" in err.value.reason


def test_rejects_tcb_info_signed_by_another_key(platform: Platform) -> None:
    other = build()
    col = dataclasses.replace(platform.collateral, tcb_info=other.collateral.tcb_info)
    assert _step(dataclasses.replace(platform, collateral=col)) == 7


def test_rejects_collateral_after_next_update(platform: Platform) -> None:
    assert _step(platform, at=NOW + timedelta(days=21)) == 7


def test_tcb_not_supported_is_denied() -> None:
    p = build(levels=[tcb_level(sgx=(9,) * 16, pcesvn=11, tdx=(0,) * 16, status="UpToDate")])
    with pytest.raises(PolicyDeniedError) as err:
        _verify(p)
    assert err.value.step == 10


def test_revoked_tcb_is_denied() -> None:
    p = build(levels=[tcb_level(sgx=SGX, pcesvn=11, tdx=(0,) * 16, status="Revoked", advisories=("SA-X",))])
    with pytest.raises(PolicyDeniedError) as err:
        _verify(p)
    assert err.value.step == 10
    assert "SA-X" in err.value.reason


def test_out_of_date_is_reported_not_rejected() -> None:
    p = build(levels=[tcb_level(sgx=SGX, pcesvn=11, tdx=(0,) * 16, status="OutOfDate", advisories=("SA-1",))])
    claims = _verify(p)
    assert claims.tcb_status == "OutOfDate"
    assert claims.advisory_ids == ("SA-1",)


def test_out_of_date_qe_converges() -> None:
    p = build(qe_isvsvn=2)
    claims = _verify(p)
    assert claims.qe_tcb_status == "OutOfDate"
    assert claims.tcb_status == "OutOfDate"
    assert claims.advisory_ids == ("INTEL-SA-00999",)


def test_module_identity_used_when_major_version_set() -> None:
    p = build(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    claims = _verify(p)
    assert claims.tdx_module_tcb_status == "OutOfDate"
    assert claims.tcb_status == "OutOfDate"
    assert "INTEL-SA-01036" in claims.advisory_ids


def test_rejects_debug_td_unless_allowed() -> None:
    p = build(debug=True)
    with pytest.raises(PolicyDeniedError) as err:
        _verify(p)
    assert err.value.step == 11
    claims = _verify(p, allow_debug=True)
    assert claims.debug is True
    assert claims.insecure is True


def test_report_data_padding(platform: Platform) -> None:
    claims = _verify(platform, expected_report_data=b"\x42" * 64)
    assert claims.report_data == b"\x42" * 64
    assert _step(platform, expected_report_data=b"\x42" * 32) == 12
    assert _step(platform, expected_report_data=b"\x42" * 65) == 12


def test_sgx_verifier_refuses_tdx_quote(platform: Platform) -> None:
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(platform.quote, StaticIntelCollateral(platform.collateral), VerifyOptions(at=NOW),
                         root=platform.root)
    assert err.value.step == 1


def test_claims_json_shape(platform: Platform) -> None:
    claims = _verify(platform)
    out = claims.to_dict()
    assert out["tee"] == "tdx"
    assert "tee_tcb_svn2" not in out  # TD 1.0 body
    assert out["tcb_date"] == "2029-01-01T00:00:00Z"
    assert out["steps"][-1] == "12 check report data"


def test_collateral_parse_is_cached(platform: Platform) -> None:
    assert parse_tcb_info(platform.collateral.tcb_info) is parse_tcb_info(platform.collateral.tcb_info)
