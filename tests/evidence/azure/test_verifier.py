"""Azure vTPM verifiers (az-snp-vtpm, az-tdx-vtpm) on the Trustee and azure-cvm-tooling vectors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from coffer.errors import VerificationError
from coffer.evidence import parse, verify
from coffer.evidence.azure import (
    SNP_VTPM_HANDLER,
    TDX_VTPM_HANDLER,
    ak_from_var_data,
    expected_user_data_matches,
    parse_azure_evidence,
    parse_hcl_report,
    parse_var_data,
    td_quote_mismatches,
    var_data_binding_problem,
)
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import EmbeddedSnpEndorsements, SnpEndorsements
from coffer.evidence.tpm import verify_tpm_quote
from coffer.evidence.tpm.structures import parse_attest
from coffer.evidence.x509util import certificate_ders
from tests.conftest import vector_bytes

D = "trustee/deps/verifier/test_data/"
# Every Azure VCEK here was issued in January 2025 and is valid for 7 years.
AT = datetime(2026, 1, 1, tzinfo=UTC)
V2_REPORT_DATA = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef")
GENOA_REPORT_DATA = bytes.fromhex(
    "0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938ca05475f8b46094de6b64270ea35d950f")


def _options(report_data: bytes | None, at: datetime = AT) -> VerifyOptions:
    return VerifyOptions(at=at, expected_report_data=report_data)


def _rejected_at(tee: str, data: bytes, step: int, options: VerifyOptions) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify(tee, data, options=options)
    assert info.value.step == step, str(info.value)
    return info.value


@pytest.mark.parametrize(("name", "report_data", "pcr0", "product"), [
    ("evidence-v0.json", b"challenge", "e15c4479", "Milan"),
    ("evidence-v1.json", b"challenge", "e15c4479", "Milan"),
    ("evidence-v2.json", V2_REPORT_DATA, "84275b2f", "Milan"),
    ("evidence-genoa.json", GENOA_REPORT_DATA, "afd689d0", "Genoa"),
])
def test_az_snp_vtpm_evidence_verifies(name: str, report_data: bytes, pcr0: str, product: str) -> None:
    claims = verify("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/" + name), options=_options(report_data))
    out = claims.to_dict()
    assert out["tee"] == "az-snp-vtpm"
    assert out["insecure"] is False
    assert out["report_data"] == report_data.hex()
    assert out["tpm"]["pcrs"]["sha256"]["0"].startswith(pcr0)
    assert len(out["tpm"]["pcrs"]["sha256"]) == 24
    assert out["snp"]["product"] == product
    assert out["snp"]["vmpl"] == 0
    assert out["tdx"] is None
    assert out["hcl"]["report_type"] == "snp"
    assert out["hcl"]["hash_type"] == "sha256"
    assert "vmUniqueId" in out["vm_configuration"]
    assert out["steps"][:5] == ["1 parse evidence", "2 parse HCL report", "3 check var-data binding",
                                "4 verify SNP report", "5 read attestation key"]


def test_v2_checks_user_data_step() -> None:
    claims = verify("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v2.json"),
                    options=_options(V2_REPORT_DATA))
    assert claims.steps[-1] == "10 check user data"
    assert claims.to_dict()["user_data"] == V2_REPORT_DATA.hex() + "00" * 16


def test_v2_rejects_wrong_report_data() -> None:
    err = _rejected_at("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v2.json"), 8,
                       _options(bytes.fromhex("123abc")))
    assert err.step_name == "check nonce"


def test_v2_user_data_rule() -> None:
    var = parse_var_data(parse_azure_evidence(vector_bytes(D + "az-snp-vtpm/evidence-v2.json"),
                                              "az-snp-vtpm").hcl_report[0x4D4:].split(b"\0")[0])
    assert expected_user_data_matches(var.user_data, V2_REPORT_DATA)
    assert not expected_user_data_matches(var.user_data, bytes.fromhex("123abc"))
    assert not expected_user_data_matches(var.user_data, b"x" * 65)


def test_v1_rejects_wrong_nonce() -> None:
    _rejected_at("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v1.json"), 8,
                 _options(b"challenge"[::-1]))


def test_vcek_validity_is_checked_against_reference_time() -> None:
    err = _rejected_at("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v1.json"), 4,
                       _options(b"challenge", at=datetime(2033, 1, 1, tzinfo=UTC)))
    assert "snp step" in err.reason


def test_parse_for_display() -> None:
    shown = parse("az-snp-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v1.json")).to_dict()
    assert shown["version"] == 1
    assert shown["hcl_report"]["report_type"] == "snp"
    assert shown["tpm_attest"]["extra_data"] == b"challenge".hex()
    assert SNP_VTPM_HANDLER.input_kind == "json"
    assert TDX_VTPM_HANDLER.name == "az-tdx-vtpm"


# ---------------------------------------------------------------------------------------------
# Trustee hcl-report.bin + vcek.pem + tpm-quote-v1.json assembled into v1 evidence


def _assembled(hcl: bytes | None = None, quote: dict[str, Any] | None = None) -> bytes:
    vcek = certificate_ders(vector_bytes(D + "az-snp-vtpm/vcek.pem"))[0]
    doc = {
        "version": 1,
        "tpm_quote": quote or json.loads(vector_bytes(D + "az-snp-vtpm/tpm-quote-v1.json")),
        "hcl_report": base64.urlsafe_b64encode(
            hcl or vector_bytes(D + "az-snp-vtpm/hcl-report.bin")).decode(),
        "vcek": base64.urlsafe_b64encode(vcek).decode(),
    }
    return json.dumps(doc).encode()


def _hcl_with(offset: int, fn: Any) -> bytes:
    raw = bytearray(vector_bytes(D + "az-snp-vtpm/hcl-report.bin"))
    raw[offset] = fn(raw[offset])
    return bytes(raw)


def test_assembled_trustee_pieces_verify() -> None:
    claims = verify("az-snp-vtpm", _assembled(), options=_options(b"challenge"))
    assert claims.report_data == b"challenge"


def test_rejects_snp_report_tcb_byte_at_hardware_step() -> None:
    # 0x1a6 is REPORTED_TCB's SNP SPL inside the SNP report: the VCEK no longer matches it.
    err = _rejected_at("az-snp-vtpm", _assembled(_hcl_with(0x1A6, lambda _: 0)), 4, _options(b"challenge"))
    assert err.step_name == "verify SNP report"


def test_rejects_var_data_change_at_binding_step() -> None:
    err = _rejected_at("az-snp-vtpm", _assembled(_hcl_with(0x6E0, lambda v: v + 1)), 3,
                       _options(b"challenge"))
    assert err.step_name == "check var-data binding"


def test_rejects_corrupted_ak_before_using_it() -> None:
    # The var data is hashed into the SNP report, so a corrupted AK is caught by the binding first;
    # on its own the AK is unreadable (test_hcl.test_trustee_snp_ak_unreadable_after_nul_byte).
    _rejected_at("az-snp-vtpm", _assembled(_hcl_with(0x540, lambda _: 0)), 3, _options(b"challenge"))


def test_rejects_flipped_tpm_signature_byte() -> None:
    quote = json.loads(vector_bytes(D + "az-snp-vtpm/tpm-quote-v1.json"))
    quote["signature"] = f"{int(quote['signature'][:2], 16) ^ 0xFF:02x}" + quote["signature"][2:]
    err = _rejected_at("az-snp-vtpm", _assembled(quote=quote), 6, _options(b"challenge"))
    assert err.step_name == "verify quote signature"


def test_rejects_flipped_pcr0_byte() -> None:
    quote = json.loads(vector_bytes(D + "az-snp-vtpm/tpm-quote-v1.json"))
    quote["pcrs"][0] = f"{int(quote['pcrs'][0][:2], 16) ^ 0xFF:02x}" + quote["pcrs"][0][2:]
    err = _rejected_at("az-snp-vtpm", _assembled(quote=quote), 9, _options(b"challenge"))
    assert err.step_name == "check PCR digest"


def test_rejects_tdx_hcl_for_snp_tee() -> None:
    err = _rejected_at("az-snp-vtpm", _assembled(vector_bytes(D + "az-tdx-vtpm/hcl-report.bin")), 2,
                       _options(b"challenge"))
    assert "tdx" in err.reason


@pytest.mark.parametrize("doc", [b"{}", b'{"version": 7}', b"[1]",
                                 b'{"version":1,"tpm_quote":{},"hcl_report":"","vcek":""}'])
def test_rejects_malformed_evidence_at_parse(doc: bytes) -> None:
    _rejected_at("az-snp-vtpm", doc, 1, _options(None))


# ---------------------------------------------------------------------------------------------
# C1: azure-cvm-tooling SNP HCL with certs.pem of another chip


def test_c1_binding_holds_but_snp_signature_fails_with_other_chips_vcek() -> None:
    hcl_bytes = vector_bytes("azure-cvm-tooling/az-cvm-vtpm/test/hcl-report-snp.bin")
    hcl = parse_hcl_report(hcl_bytes)
    assert var_data_binding_problem(hcl) is None
    from coffer.evidence.snp import verify_snp_report

    ders = certificate_ders(vector_bytes("azure-cvm-tooling/az-cvm-vtpm/test/certs.pem"))
    source = EmbeddedSnpEndorsements(SnpEndorsements(leaf=ders[0], chain=tuple(ders[1:]), source="test"))
    with pytest.raises(VerificationError):
        verify_snp_report(hcl.snp_report, source, VerifyOptions(at=datetime(2024, 1, 1, tzinfo=UTC)))


# ---------------------------------------------------------------------------------------------
# az-tdx-vtpm: no Intel collateral in the vectors


@pytest.mark.parametrize("name", ["evidence-v0.json", "evidence-v1.json"])
def test_az_tdx_vtpm_fails_exactly_at_td_quote_collateral(name: str) -> None:
    err = _rejected_at("az-tdx-vtpm", vector_bytes(D + "az-tdx-vtpm/" + name), 4, _options(b"challenge"))
    assert err.step_name == "verify TD quote"
    assert "collateral" in err.reason


@pytest.mark.parametrize("name", ["evidence-v0.json", "evidence-v1.json"])
def test_az_tdx_vtpm_hcl_and_tpm_parts_verify(name: str) -> None:
    evidence = parse_azure_evidence(vector_bytes(D + "az-tdx-vtpm/" + name), "az-tdx-vtpm")
    assert evidence.td_quote is not None
    hcl = parse_hcl_report(evidence.hcl_report)
    assert var_data_binding_problem(hcl) is None
    assert td_quote_mismatches(evidence.td_quote, hcl.td_report) == []
    from coffer.evidence.dcap import parse_quote

    assert parse_quote(evidence.td_quote).td_report.report_data == hcl.td_report.report_data
    ak = ak_from_var_data(hcl.var_data)
    q = evidence.quote
    claims = verify_tpm_quote(q.message, q.signature, q.pcrs, ak,
                              options=VerifyOptions(expected_report_data=b"challenge"))
    assert claims.pcrs["sha256"]["0"].hex().startswith("782b20b1")
    assert parse_attest(q.message).extra_data == b"challenge"


def test_az_tdx_vtpm_v0_and_v1_carry_the_same_td_quote() -> None:
    v0 = parse_azure_evidence(vector_bytes(D + "az-tdx-vtpm/evidence-v0.json"), "az-tdx-vtpm")
    v1 = parse_azure_evidence(vector_bytes(D + "az-tdx-vtpm/evidence-v1.json"), "az-tdx-vtpm")
    assert v0.td_quote == v1.td_quote
    assert v0.hcl_report == v1.hcl_report


def test_az_tdx_vtpm_rejects_snp_evidence_shape() -> None:
    _rejected_at("az-tdx-vtpm", vector_bytes(D + "az-snp-vtpm/evidence-v1.json"), 1, _options(b"challenge"))


def test_library_api_accepts_separate_pieces() -> None:
    """hcl-report.bin + the bincode quote.bin + vcek.pem, without any JSON."""
    from coffer.evidence.azure import AzureVtpmEvidence, verify_azure_vtpm
    from coffer.evidence.collateral import NoCollateral
    from coffer.evidence.tpm import parse_bincode_quote

    evidence = AzureVtpmEvidence(
        tee="az-snp-vtpm", version=0,
        hcl_report=vector_bytes(D + "az-snp-vtpm/hcl-report.bin"),
        quote=parse_bincode_quote(vector_bytes(D + "az-snp-vtpm/quote.bin")),
        vcek=certificate_ders(vector_bytes(D + "az-snp-vtpm/vcek.pem"))[0],
    )
    claims = verify_azure_vtpm(evidence, "az-snp-vtpm", NoCollateral(), _options(b"challenge"))
    assert claims.report_data == b"challenge"
    with pytest.raises(VerificationError) as info:
        verify_azure_vtpm(evidence, "az-tdx-vtpm", NoCollateral(), _options(b"challenge"))
    assert info.value.step == 1
