"""End-to-end verification of real DCAP quotes with real collateral (INDEX.md section B), and
mutation tests that must be rejected at the right step."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coffer.errors import PolicyDeniedError, VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import NoCollateral
from coffer.evidence.dcap import (
    OfflineIntelCollateral,
    SgxClaims,
    TdxClaims,
    parse_quote,
    verify_sgx_quote,
    verify_tdx_quote,
)
from coffer.evidence.dcap.sources import LAYOUT, signed_body
from tests.conftest import vector_bytes, vector_path, write_t5_collateral

pytestmark = pytest.mark.vectors

GTG = "go-tdx-guest/testing/"
SPR_E4 = GTG + "testdata/tdx_prod_quote_SPR_E4.dat"
V5 = GTG + "testdata/quote_v5_sample.dat"
COS = GTG + "testdata/ccel/cos-113-tdx-quote.dat"
SGX = "dcap-qvl/sample/sgx_quote"
SGX_COLLATERAL = "dcap-qvl/sample/sgx_quote_collateral.json"
TRUSTEE = "trustee/deps/verifier/test_data/"
PCK_CRL_2025 = "dcap-qvl/sample/derived_pck_platform_crl_2025.der"
ROOT_CRL_2025 = "dcap-qvl/sample/derived_root_ca_crl_2025.der"
PCK_CRL_CHAIN = GTG + "derived_pck_crl_issuer_chain.pem"

T2_AT = datetime(2025, 7, 1, tzinfo=UTC)
T5_AT = datetime(2023, 7, 1, 1, 0, tzinfo=UTC)


def _opts(at: datetime, **kw: object) -> VerifyOptions:
    return VerifyOptions(at=at, **kw)  # type: ignore[arg-type]


@pytest.fixture
def t5_dir(tmp_path: Path) -> Path:
    return write_t5_collateral(tmp_path)


@pytest.fixture
def t2_dir(tmp_path: Path) -> Path:
    """The dcap-qvl SGX collateral JSON written out in the offline directory layout."""
    doc = json.loads(vector_bytes(SGX_COLLATERAL))
    (tmp_path / LAYOUT["tcb_info"]).write_bytes(
        signed_body("tcbInfo", doc["tcb_info"], doc["tcb_info_signature"]))
    (tmp_path / LAYOUT["qe_identity"]).write_bytes(
        signed_body("enclaveIdentity", doc["qe_identity"], doc["qe_identity_signature"]))
    for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain"):
        (tmp_path / LAYOUT[key]).write_text(doc[key])
    (tmp_path / LAYOUT["pck_crl"]).write_bytes(bytes.fromhex(doc["pck_crl"]))
    (tmp_path / LAYOUT["root_ca_crl"]).write_bytes(bytes.fromhex(doc["root_ca_crl"]))
    return tmp_path


# ------------------------------------------------------------------------------------------ T2


def test_t2_sgx_quote_configuration_and_sw_hardening_needed(t2_dir: Path) -> None:
    claims = verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert isinstance(claims, SgxClaims)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.fmspc.hex() == "00a067110000"
    assert claims.pck_ca == "processor"
    assert claims.quote_version == 3
    assert claims.insecure is False
    assert len(claims.steps) == 12
    out = claims.to_dict()
    assert out["tee"] == "sgx"
    for name in ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "attributes", "misc_select",
                 "config_id", "report_data", "fmspc", "tcb_status", "advisory_ids"):
        assert name in out
    json.dumps(out)


def test_t2_single_json_file_source() -> None:
    source = OfflineIntelCollateral(vector_path(SGX_COLLATERAL))
    claims = verify_sgx_quote(vector_bytes(SGX), source, _opts(T2_AT))
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_t2_through_the_facade(t2_dir: Path) -> None:
    claims = verify("sgx", vector_bytes(SGX), collateral=OfflineIntelCollateral(t2_dir), options=_opts(T2_AT))
    assert claims.tee == "sgx"


def test_t2_report_data_binding(t2_dir: Path) -> None:
    source = OfflineIntelCollateral(t2_dir)
    claims = verify_sgx_quote(vector_bytes(SGX), source, _opts(T2_AT, expected_report_data=b"Hello, world!"))
    assert claims.report_data.startswith(b"Hello, world!")
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), source, _opts(T2_AT, expected_report_data=b"Hello, world?"))
    assert err.value.step == 12


def test_t2_rejected_after_qe_identity_next_update(t2_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir),
                         _opts(datetime(2025, 7, 19, 12, 0, tzinfo=UTC)))
    assert err.value.step == 7
    assert "nextUpdate" in err.value.reason


def test_t2_rejected_before_tcb_info_issue_date(t2_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir),
                         _opts(datetime(2025, 6, 1, tzinfo=UTC)))
    assert err.value.step == 7


def test_t2_rejects_sgx_quote_given_to_tdx_verifier(t2_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert err.value.step == 1


def test_t2_rejects_flipped_byte_in_tcb_info_collateral(t2_dir: Path) -> None:
    path = t2_dir / LAYOUT["tcb_info"]
    path.write_bytes(path.read_bytes().replace(b'"tcbEvaluationDataNumber":17',
                                               b'"tcbEvaluationDataNumber":18'))
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert err.value.step == 7
    assert "signature" in err.value.reason


def test_t2_rejects_flipped_byte_in_qe_identity_collateral(t2_dir: Path) -> None:
    path = t2_dir / LAYOUT["qe_identity"]
    path.write_bytes(path.read_bytes().replace(b'"isvprodid":1', b'"isvprodid":2'))
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert err.value.step == 7


def test_t2_rejects_flipped_byte_in_pck_crl(t2_dir: Path) -> None:
    path = t2_dir / LAYOUT["pck_crl"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the CRL signature
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert err.value.step == 8


def test_t2_missing_collateral_file_is_named(t2_dir: Path) -> None:
    (t2_dir / LAYOUT["root_ca_crl"]).unlink()
    with pytest.raises(VerificationError) as err:
        verify_sgx_quote(vector_bytes(SGX), OfflineIntelCollateral(t2_dir), _opts(T2_AT))
    assert err.value.step == 6
    assert "root_ca_crl.der" in err.value.reason


# ------------------------------------------------------------------------------------------ T5


def test_t5_signatures_verify_but_tcb_is_not_supported(t5_dir: Path) -> None:
    with pytest.raises(PolicyDeniedError) as err:
        verify_tdx_quote(vector_bytes(SPR_E4), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 10  # steps 1-9 (all signatures, chains, CRLs, QE identity) passed
    assert "TcbNotSupported" in err.value.reason


def test_t5_rejected_in_2053_at_a_validity_step(t5_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(SPR_E4), OfflineIntelCollateral(t5_dir),
                         _opts(datetime(2053, 7, 1, tzinfo=UTC)))
    assert err.value.step == 2
    assert "expired" in err.value.reason


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_t5_rejects_flipped_quote_signature_byte(t5_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), 0x27C + 10), OfflineIntelCollateral(t5_dir),
                         _opts(T5_AT))
    assert err.value.step == 5


def test_t5_rejects_flipped_signed_body_byte(t5_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), 0x238), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 5


def test_t5_rejects_flipped_header_byte(t5_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), 0x1C), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 5


def test_t5_rejects_flipped_qe_report_byte(t5_dir: Path) -> None:
    qe_report_offset = 0x27C + 64 + 64 + 6
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), qe_report_offset + 0x40), OfflineIntelCollateral(t5_dir),
                         _opts(T5_AT))
    assert err.value.step == 3


def test_t5_rejects_flipped_qe_auth_data_byte(t5_dir: Path) -> None:
    auth_offset = 0x27C + 64 + 64 + 6 + 384 + 64 + 2
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), auth_offset), OfflineIntelCollateral(t5_dir),
                         _opts(T5_AT))
    assert err.value.step == 4


def test_t5_rejects_flipped_attestation_key_byte(t5_dir: Path) -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(_flip(vector_bytes(SPR_E4), 0x27C + 64 + 5), OfflineIntelCollateral(t5_dir),
                         _opts(T5_AT))
    assert err.value.step in (4, 5)  # the key no longer hashes to the QE report data


def test_t5_rejects_flipped_pck_certificate_byte(t5_dir: Path) -> None:
    data = vector_bytes(SPR_E4)
    pem = parse_quote(data).qe.pck_chain_pem
    match = re.search(rb"-----BEGIN CERTIFICATE-----\n(.+?)-----END CERTIFICATE-----", pem, re.S)
    assert match is not None
    der = bytearray(base64.b64decode(match.group(1)))
    der[-20] ^= 0x01  # inside the signature value of the PCK certificate
    lines = base64.b64encode(bytes(der))
    wrapped = b"\n".join(lines[i:i + 64] for i in range(0, len(lines), 64)) + b"\n"
    assert len(wrapped) == len(match.group(1))
    mutated = data.replace(match.group(1), wrapped)
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(mutated, OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 2


def test_t5_rejects_flipped_byte_in_tcb_info_collateral(t5_dir: Path) -> None:
    path = t5_dir / LAYOUT["tcb_info"]
    path.write_bytes(path.read_bytes().replace(b'"pceId":"0000"', b'"pceId":"0001"'))
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(SPR_E4), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 7


def test_t5_rejects_pck_crl_from_other_time(t5_dir: Path) -> None:
    (t5_dir / LAYOUT["pck_crl"]).write_bytes(vector_bytes(PCK_CRL_2025))
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(SPR_E4), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 8
    assert "PCK CRL" in err.value.reason


def test_t5_rejects_expired_root_ca_crl(t5_dir: Path) -> None:
    # The 2023 root CRL is current until 2024-04-02; the 2025 one is not yet valid in 2023.
    (t5_dir / LAYOUT["root_ca_crl"]).write_bytes(vector_bytes(ROOT_CRL_2025))
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(SPR_E4), OfflineIntelCollateral(t5_dir), _opts(T5_AT))
    assert err.value.step == 8


# ------------------------------------------------------------------------------------------ T6


def test_t6_v5_quote_chain_and_signatures_at_2026(t5_dir: Path) -> None:
    # Only the quote fits 2026-02-03; the go-tdx-guest QE identity and CRLs are from 2023.
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(V5), OfflineIntelCollateral(t5_dir),
                         _opts(datetime(2026, 2, 3, tzinfo=UTC)))
    assert err.value.step == 7


def test_t6_v5_quote_reaches_collateral_step() -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(V5), NoCollateral(), _opts(datetime(2026, 2, 3, tzinfo=UTC)))
    assert err.value.step == 6


def test_t6_v5_flipped_body_descriptor_is_rejected() -> None:
    data = _flip(vector_bytes(V5), 0x36 + 0x248)  # TEE_TCB_SVN2, inside the signed TD 1.5 body
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(data, NoCollateral(), _opts(datetime(2026, 2, 3, tzinfo=UTC)))
    assert err.value.step == 5


# ------------------------------------------------------------------------------------------ T7


def test_t7_cos_quote_without_collateral_is_rejected_at_collateral_step() -> None:
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(COS), NoCollateral(), _opts(datetime(2025, 1, 1, tzinfo=UTC)))
    assert err.value.step == 6
    assert "00806f050000" in err.value.reason
    assert "--collateral" in err.value.reason


# --------------------------------------------------------------------------- trustee quotes


@pytest.mark.parametrize(("path", "tdx"), [
    (TRUSTEE + "tdx_quote_4.dat", True),
    (TRUSTEE + "tdx_quote_5.dat", True),
    (TRUSTEE + "tdx_quote_6.dat", True),
    (TRUSTEE + "az-tdx-vtpm/td-quote.bin", True),
    (TRUSTEE + "occlum_quote.dat", False),
])
def test_trustee_quote_signature_chain_verifies(path: str, tdx: bool) -> None:
    verifier = verify_tdx_quote if tdx else verify_sgx_quote
    with pytest.raises(VerificationError) as err:
        verifier(vector_bytes(path), NoCollateral(), _opts(datetime(2026, 1, 1, tzinfo=UTC)))
    assert err.value.step == 6  # steps 1-5 (chain, QE report, binding, quote signature) passed


def test_trustee_quote_6_with_pcs_collateral_until_crl_step(tmp_path: Path) -> None:
    """tdx_quote_6 + trustee tcbInfo.json/enclaveIdentity.json (signed by the re-issued TCB signing
    certificate): everything through step 7 verifies at 2025-11-01; the only PCK CRL available is
    from July 2025, so step 8 refuses it as expired."""
    chain = vector_bytes("dcap-qvl/sample/derived_tcb_info_issuer_chain_2025.pem")
    (tmp_path / LAYOUT["tcb_info"]).write_bytes(vector_bytes(TRUSTEE + "tcbInfo.json"))
    (tmp_path / LAYOUT["qe_identity"]).write_bytes(vector_bytes(TRUSTEE + "enclaveIdentity.json"))
    (tmp_path / LAYOUT["tcb_info_issuer_chain"]).write_bytes(chain)
    (tmp_path / LAYOUT["qe_identity_issuer_chain"]).write_bytes(chain)
    (tmp_path / LAYOUT["pck_crl"]).write_bytes(vector_bytes(PCK_CRL_2025))
    (tmp_path / LAYOUT["pck_crl_issuer_chain"]).write_bytes(vector_bytes(PCK_CRL_CHAIN))
    (tmp_path / LAYOUT["root_ca_crl"]).write_bytes(vector_bytes(ROOT_CRL_2025))
    with pytest.raises(VerificationError) as err:
        verify_tdx_quote(vector_bytes(TRUSTEE + "tdx_quote_6.dat"), OfflineIntelCollateral(tmp_path),
                         _opts(datetime(2025, 11, 1, tzinfo=UTC)))
    assert err.value.step == 8
    assert "PCK CRL expired" in err.value.reason


def test_tdx_claims_names(t5_dir: Path) -> None:
    names = set(TdxClaims.__dataclass_fields__)
    for name in ("quote_version", "body_type", "tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes",
                 "td_attributes", "debug", "xfam", "mr_td", "mr_config_id", "mr_owner", "mr_owner_config",
                 "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data", "tee_tcb_svn2", "mr_servicetd", "fmspc",
                 "tcb_status", "advisory_ids", "tcb_date"):
        assert name in names
