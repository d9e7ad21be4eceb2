"""The SNP rows of ../shared/vectors/INDEX.md, verified at their stated reference times, and byte
mutations of them rejected at the right step."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import PolicyDeniedError, VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import (
    CollateralSource,
    EmbeddedSnpEndorsements,
    NoCollateral,
    SnpEndorsements,
)
from coffer.evidence.snp import (
    OfflineSnpEndorsements,
    ProductRoots,
    SnpClaims,
    SnpTrustStore,
    builtin_roots,
    verify_snp_report,
)
from coffer.evidence.x509util import certificate_ders, load_certificate
from tests.conftest import vector_bytes, vector_path

pytestmark = pytest.mark.vectors

AT_2025 = datetime(2025, 1, 1, tzinfo=UTC)
AT_VLEK = datetime(2025, 6, 1, tzinfo=UTC)

S1_REPORT = "virtee-sev/tests/certs_data/report_milan.hex"
S1_VCEK = "virtee-sev/tests/certs_data/vcek_milan.der"
S2_REPORT = "go-sev-guest/verify/testdata/attestation.bin"
S2_VCEK = "go-sev-guest/verify/testdata/vcek.testcer"
S3_DIR = "constellation/internal/attestation/snp/testdata/"
S4_DIR = "constellation/internal/attestation/aws/snp/testdata/"
S12_HCL = "azure-cvm-tooling/az-cvm-vtpm/test/hcl-report-snp.bin"
S12_CERTS = "azure-cvm-tooling/az-cvm-vtpm/test/certs.pem"
TRUSTEE_SNP = "trustee/deps/verifier/test_data/snp/"
E2E = "trustee/attestation-service/tests/e2e/evidence.json"


def s1_report() -> bytes:
    return bytes.fromhex(vector_bytes(S1_REPORT).decode().strip())


def s4_report() -> bytes:
    return base64.b64decode(vector_bytes(S4_DIR + "report.txt"))


def offline(relative: str) -> OfflineSnpEndorsements:
    return OfflineSnpEndorsements(vector_path(relative))


def check(report: bytes, source: CollateralSource, *, at: datetime = AT_2025, **kw: object) -> SnpClaims:
    return verify_snp_report(report, source, VerifyOptions(at=at, **kw))  # type: ignore[arg-type]


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


def expect_step(step: int, report: bytes, source: CollateralSource, *, at: datetime = AT_2025,
                **kw: object) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        check(report, source, at=at, **kw)
    assert info.value.step == step, str(info.value)
    return info.value


# --- S1 virtee Milan v2 ---------------------------------------------------------------------------

def test_s1_virtee_milan_report_verifies() -> None:
    claims = check(s1_report(), offline(S1_VCEK), at=datetime(2030, 4, 1, tzinfo=UTC))
    assert claims.product == "Milan"
    assert claims.signer == "vcek"
    assert claims.version == 2
    assert claims.reported_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert claims.chip_id.hex().startswith("d49554ec717f4e5b")
    assert claims.measurement.hex().startswith("7a1e5c266c0108db")
    assert claims.measurement.hex().endswith("841f")
    assert claims.report_data.hex().startswith("d447b55d")
    assert claims.policy["raw"] == 0x30000
    assert claims.policy["debug"] is False
    assert claims.insecure is False
    assert len(claims.steps) == 8
    out = claims.to_dict()
    json.dumps(out)
    assert out["tee"] == "snp"
    assert "fmc" not in out["reported_tcb"]


def test_s1_verifies_with_the_kds_cert_chain_supplied() -> None:
    report = s1_report()
    leaf = vector_bytes(S1_VCEK)
    chain = tuple(certificate_ders(vector_bytes("virtee-sev/tests/certs_data/cert_chain_milan")))
    claims = check(report, EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf, chain=chain)))
    assert claims.product == "Milan"


def test_rejects_flipped_family_id_byte_21() -> None:
    expect_step(6, flip(s1_report(), 21), offline(S1_VCEK))


def test_rejects_flipped_signature_byte() -> None:
    expect_step(6, flip(s1_report(), 0x2A0 + 5), offline(S1_VCEK))


def test_rejects_flipped_byte_in_vcek_signature() -> None:
    leaf = bytearray(vector_bytes(S1_VCEK))
    leaf[-10] ^= 0x01  # inside the certificate's signature value
    expect_step(4, s1_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=bytes(leaf))))


def test_rejects_missing_endorsement_at_fetch_step() -> None:
    err = expect_step(3, s1_report(), NoCollateral())
    assert "--endorsements" in err.reason


def test_rejects_vcek_after_its_expiry() -> None:
    err = expect_step(4, s1_report(), offline(S1_VCEK), at=datetime(2031, 1, 1, tzinfo=UTC))
    assert "expired" in err.reason


def test_rejects_wrong_expected_report_data() -> None:
    expect_step(8, s1_report(), offline(S1_VCEK), expected_report_data=b"\x01" * 64)


# --- S2 go-sev-guest Milan v2 (a debug guest) ------------------------------------------------------

def test_s2_go_sev_guest_report_verifies_when_debug_is_allowed() -> None:
    nonce = bytes([1, 2, 3, 4, 5])
    claims = check(vector_bytes(S2_REPORT), offline(S2_VCEK), allow_debug=True, expected_report_data=nonce)
    assert claims.chip_id.hex().startswith("3ac3fe21e13fb099")
    assert claims.measurement.hex().startswith("b07af9620f3b")
    assert claims.reported_tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert claims.policy["debug"] is True


def test_s2_debug_guest_is_denied_by_default() -> None:
    with pytest.raises(PolicyDeniedError) as info:
        check(vector_bytes(S2_REPORT), offline(S2_VCEK))
    assert info.value.step == 7


# --- S3 constellation Azure (trailing IGVM header, runtime-data binding) --------------------------

@pytest.mark.parametrize("vcek", ["vcek.cert", "vcek.pem"])
def test_s3_azure_report_with_trailing_bytes_verifies(vcek: str) -> None:
    report = vector_bytes(S3_DIR + "attestation.bin")
    assert len(report) == 1204
    digest = hashlib.sha256(vector_bytes(S3_DIR + "runtimedata.bin")).digest()
    claims = check(report, offline(S3_DIR + vcek), at=datetime(2030, 8, 1, tzinfo=UTC),
                   expected_report_data=digest)
    assert claims.report_data == digest + bytes(32)
    assert claims.id_key_digest.hex().startswith("57e229e0ffe5")
    assert claims.reported_tcb == {"bootloader": 2, "tee": 0, "snp": 6, "microcode": 93}
    assert claims.policy["raw"] == 0x3001F


def test_s3_rejects_runtime_data_mismatch() -> None:
    expect_step(8, vector_bytes(S3_DIR + "attestation.bin"), offline(S3_DIR + "vcek.cert"),
                expected_report_data=hashlib.sha256(b"other").digest())


# --- S4 AWS VLEK Milan v3 ------------------------------------------------------------------------

def test_s4_aws_vlek_report_verifies() -> None:
    claims = check(s4_report(), offline(S4_DIR + "vlek.pem"), at=AT_VLEK)
    assert claims.signer == "vlek"
    assert claims.version == 3
    assert claims.product == "Milan"
    assert claims.chip_id == bytes(64)
    assert claims.reported_tcb == {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 0xD9}
    assert claims.current_tcb["microcode"] == 0xDC
    assert claims.report_data.hex().startswith("87ab7caf510e")
    assert claims.endorsement["csp_id"] == "CN=cc-eu-west-1.amazonaws.com"


def test_s4_verifies_with_its_vlek_cert_chain_file() -> None:
    vlek = certificate_ders(vector_bytes(S4_DIR + "vlek.pem"))[0]
    chain = tuple(certificate_ders(vector_bytes(S4_DIR + "certchain.pem")))
    claims = check(s4_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=vlek, chain=chain)), at=AT_VLEK)
    assert claims.signer == "vlek"


def test_s4_rejects_vlek_after_it_expired() -> None:
    err = expect_step(4, s4_report(), offline(S4_DIR + "vlek.pem"), at=datetime(2025, 12, 11, tzinfo=UTC))
    assert "expired" in err.reason


def test_s4_vlek_report_rejected_against_a_vcek() -> None:
    expect_step(4, s4_report(), offline(S1_VCEK), at=AT_VLEK)


# --- S12 Azure HCL report with another chip's VCEK -----------------------------------------------

def test_s12_rejects_vcek_of_another_chip() -> None:
    report = vector_bytes(S12_HCL)[0x20 : 0x20 + 0x4A0]
    err = expect_step(5, report, offline(S12_CERTS))
    assert "chip" in err.reason


# --- trustee snp vectors ------------------------------------------------------------------------

def trustee_report() -> bytes:
    return vector_bytes(TRUSTEE_SNP + "test-report.bin")


def test_trustee_report_verifies() -> None:
    claims = check(trustee_report(), offline(TRUSTEE_SNP + "test-vcek.der"))
    assert claims.report_data.hex().startswith("ec6c52d7")
    assert claims.report_data[32:] == bytes(32)
    assert claims.host_data == bytes(32)
    assert claims.vmpl == 0


def test_trustee_report_flipped_byte_42_fails_signature() -> None:
    expect_step(6, flip(trustee_report(), 42), offline(TRUSTEE_SNP + "test-vcek.der"))


def test_trustee_report_flipped_byte_384_fails_tcb_check() -> None:
    err = expect_step(5, flip(trustee_report(), 384), offline(TRUSTEE_SNP + "test-vcek.der"))
    assert "blSPL" in err.reason


def test_trustee_vcek_flipped_byte_42_is_rejected() -> None:
    leaf = flip(vector_bytes(TRUSTEE_SNP + "test-vcek.der"), 42)
    with pytest.raises(VerificationError) as info:
        check(trustee_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf)))
    assert info.value.step in (4, 5)


def test_trustee_vlek_report_verifies_at_vmpl_1() -> None:
    claims = check(vector_bytes(TRUSTEE_SNP + "test-vlek-report.bin"), offline(TRUSTEE_SNP + "test-vlek.der"),
                   at=AT_VLEK)
    assert claims.signer == "vlek"
    assert claims.vmpl == 1
    assert claims.report_data.hex().startswith("819770b7")
    assert claims.chip_id == bytes(64)


@pytest.mark.parametrize(("offset", "step"), [(42, 6), (384, 5)])
def test_trustee_vlek_report_mutations(offset: int, step: int) -> None:
    report = flip(vector_bytes(TRUSTEE_SNP + "test-vlek-report.bin"), offset)
    expect_step(step, report, offline(TRUSTEE_SNP + "test-vlek.der"), at=AT_VLEK)


def test_trustee_vlek_rejected_for_a_vcek_signed_report() -> None:
    expect_step(4, trustee_report(), EmbeddedSnpEndorsements(
        SnpEndorsements(leaf=vector_bytes(TRUSTEE_SNP + "test-vlek.der"))), at=AT_VLEK)


def test_supplied_asvk_is_harmless_but_never_issues_the_vcek() -> None:
    bundle = vector_bytes("trustee/deps/verifier/src/snp/milan_ask_ark_asvk.pem")
    asvk = tuple(d for d in certificate_ders(bundle) if b"SEV-VLEK-Milan" in d)
    leaf = vector_bytes(TRUSTEE_SNP + "test-vcek.der")
    claims = check(trustee_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf, chain=asvk)))
    assert claims.endorsement["issuer"] == "SEV-Milan"


def test_rejects_vcek_chained_through_the_asvk_instead_of_the_ask() -> None:
    milan = builtin_roots().get("Milan")
    assert milan is not None
    swapped = SnpTrustStore({"Milan": ProductRoots(ark=milan.ark, ask=milan.asvk, asvk=milan.asvk)})
    with pytest.raises(VerificationError) as info:
        verify_snp_report(trustee_report(), offline(TRUSTEE_SNP + "test-vcek.der"),
                          VerifyOptions(at=AT_2025), roots=swapped)
    assert info.value.step == 4


def test_supplied_root_of_another_product_is_rejected() -> None:
    genoa = tuple(certificate_ders(vector_bytes("virtee-sev/src/certs/snp/builtin/genoa/ark.pem")))
    leaf = vector_bytes(TRUSTEE_SNP + "test-vcek.der")
    err = expect_step(4, trustee_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf, chain=genoa)))
    assert "ARK-Milan" in err.reason


# --- trustee e2e: Genoa v3 in the CoCo attester JSON form ----------------------------------------

def test_trustee_e2e_json_evidence_verifies_with_embedded_vcek() -> None:
    claims = check(vector_bytes(E2E), NoCollateral(), at=datetime(2026, 1, 1, tzinfo=UTC))
    assert claims.product == "Genoa"
    assert claims.version == 3
    assert claims.report_data.hex().startswith("7e732088")
    assert claims.report_data.hex().endswith("f9b0")
    assert claims.policy["raw"] == 0x30000
    assert claims.endorsement["source"] == "evidence cert_chain"


def test_trustee_e2e_through_the_facade() -> None:
    claims = verify("snp", vector_bytes(E2E), options=VerifyOptions(at=datetime(2026, 1, 1, tzinfo=UTC)))
    assert claims.to_dict()["product"] == "Genoa"


def test_trustee_e2e_rejects_tampered_json_field() -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["attestation_report"]["report_data"][0] ^= 1
    expect_step(6, json.dumps(doc).encode(), NoCollateral(), at=datetime(2026, 1, 1, tzinfo=UTC))


def test_trustee_e2e_rejects_tampered_tcb_field() -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["attestation_report"]["reported_tcb"]["snp"] += 1
    expect_step(5, json.dumps(doc).encode(), NoCollateral(), at=datetime(2026, 1, 1, tzinfo=UTC))


def test_trustee_e2e_rejects_missing_field_at_parse_step() -> None:
    doc = json.loads(vector_bytes(E2E))
    del doc["attestation_report"]["measurement"]
    expect_step(1, json.dumps(doc).encode(), NoCollateral(), at=datetime(2026, 1, 1, tzinfo=UTC))


def test_trustee_e2e_without_cert_chain_falls_back_to_caller_source(tmp_path: Path) -> None:
    doc = json.loads(vector_bytes(E2E))
    vcek = bytes(doc["cert_chain"][0]["data"])
    (tmp_path / "vcek.der").write_bytes(vcek)
    doc["cert_chain"] = None
    claims = check(json.dumps(doc).encode(), OfflineSnpEndorsements(tmp_path),
                   at=datetime(2026, 1, 1, tzinfo=UTC))
    assert claims.endorsement["source"].endswith("vcek.der")


# --- Azure trustee az-snp-vtpm HCL report ---------------------------------------------------------

def test_trustee_az_snp_vtpm_hcl_snp_report_verifies() -> None:
    report = vector_bytes("trustee/deps/verifier/test_data/az-snp-vtpm/hcl-report.bin")[0x20:]
    claims = check(report, offline("trustee/deps/verifier/test_data/az-snp-vtpm/vcek.pem"))
    assert claims.product == "Milan"


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 1359), st.integers(0, 255))
def test_mutated_vcek_only_raises_verification_error(offset: int, value: int) -> None:
    leaf = bytearray(vector_bytes(TRUSTEE_SNP + "test-vcek.der"))
    if leaf[offset] == value:
        return
    leaf[offset] = value
    step = 0
    try:
        check(trustee_report(), EmbeddedSnpEndorsements(SnpEndorsements(leaf=bytes(leaf))))
    except VerificationError as exc:
        step = exc.step
    if step:
        assert step in (3, 4, 5, 6)
        return
    # Accepted only if the mutation left the signed part and the signature alone (e.g. the unsigned
    # outer copy of the RSASSA-PSS trailerField, which cryptography does not compare with the inner one).
    original = load_certificate(vector_bytes(TRUSTEE_SNP + "test-vcek.der"))
    mutated = load_certificate(bytes(leaf))
    assert mutated.tbs_certificate_bytes == original.tbs_certificate_bytes
    assert mutated.signature == original.signature
