"""One byte flipped in each part of every positive recorded vector is rejected at the right step.

Parts: the signature, the signed body, the endorsing certificate, and the collateral. Each positive
vector first verifies unchanged (so a rejection is due to the mutation alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coffer import evidence
from coffer._internal.encoding import decode_binary_file
from coffer.errors import VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.sources import CollateralSettings, build_collateral_source
from tests.conftest import vector_bytes, vector_path


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class SnpCase:
    name: str
    report: str  # raw, hex or base64 file
    vcek: str
    at: datetime
    allow_debug: bool = False


SNP_CASES = [
    SnpCase("S1", "virtee-sev/tests/certs_data/report_milan.hex",
            "virtee-sev/tests/certs_data/vcek_milan.der", _at("2026-01-01")),
    SnpCase("S2", "go-sev-guest/verify/testdata/attestation.bin",
            "go-sev-guest/verify/testdata/vcek.testcer", _at("2025-01-01"), allow_debug=True),
    SnpCase("S3", "constellation/internal/attestation/snp/testdata/attestation.bin",
            "constellation/internal/attestation/snp/testdata/vcek.cert", _at("2026-01-01")),
    SnpCase("S4", "constellation/internal/attestation/aws/snp/testdata/report.txt",
            "constellation/internal/attestation/aws/snp/testdata/vlek.pem", _at("2025-06-01")),
    SnpCase("trustee-vcek", "trustee/deps/verifier/test_data/snp/test-report.bin",
            "trustee/deps/verifier/test_data/snp/test-vcek.der", _at("2026-01-01")),
    SnpCase("trustee-vlek", "trustee/deps/verifier/test_data/snp/test-vlek-report.bin",
            "trustee/deps/verifier/test_data/snp/test-vlek.der", _at("2025-06-01")),
]


def _snp_report(case: SnpCase) -> bytes:
    return decode_binary_file(vector_bytes(case.report))


def _verify_snp(report: bytes, vcek_path: Path, case: SnpCase) -> None:
    source = build_collateral_source(CollateralSettings(endorsements=vcek_path))
    evidence.verify("snp", report, collateral=source,
                    options=VerifyOptions(at=case.at, allow_debug=case.allow_debug))


def _der_vcek(case: SnpCase, tmp: Path) -> Path:
    """The case's VCEK/VLEK as a DER file (so one byte of its signature can be flipped)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from coffer.evidence.x509util import load_certificates

    certs = load_certificates(vector_bytes(case.vcek))
    path = tmp / "leaf.der"
    path.write_bytes(certs[0].public_bytes(Encoding.DER))
    return path


@pytest.mark.vectors
@pytest.mark.parametrize("case", SNP_CASES, ids=[c.name for c in SNP_CASES])
@pytest.mark.parametrize(
    ("part", "offset", "step"),
    [
        ("signature r", 0x2A0 + 5, 6),
        ("signature s", 0x2E8 + 5, 6),
        ("measurement", 0x90 + 7, 6),
        ("report data", 0x50, 6),
        ("host data", 0xC0 + 1, 6),
    ],
)
def test_snp_report_mutation_rejected(
    case: SnpCase, part: str, offset: int, step: int, tmp_path: Path
) -> None:
    report = bytearray(_snp_report(case))
    vcek = _der_vcek(case, tmp_path)
    _verify_snp(bytes(report), vcek, case)  # the unmutated vector verifies
    report[offset] ^= 0x01
    with pytest.raises(VerificationError) as info:
        _verify_snp(bytes(report), vcek, case)
    assert info.value.step == step, (part, str(info.value))


@pytest.mark.vectors
@pytest.mark.parametrize("case", SNP_CASES, ids=[c.name for c in SNP_CASES])
def test_snp_certificate_signature_mutation_rejected_at_chain_step(case: SnpCase, tmp_path: Path) -> None:
    report = _snp_report(case)
    vcek = _der_vcek(case, tmp_path)
    der = bytearray(vcek.read_bytes())
    der[-10] ^= 0x01  # inside the certificate's signature (the last field of the DER)
    vcek.write_bytes(bytes(der))
    with pytest.raises(VerificationError) as info:
        _verify_snp(report, vcek, case)
    assert info.value.step == 4, str(info.value)


def _sgx_collateral(tmp: Path, mutate: str | None = None) -> Path:
    doc = json.loads(vector_bytes("dcap-qvl/sample/sgx_quote_collateral.json"))
    if mutate is not None:
        text = doc[mutate]
        index = text.index('"tcbEvaluationDataNumber":') + len('"tcbEvaluationDataNumber":')
        doc[mutate] = text[:index] + str(int(text[index]) ^ 1) + text[index + 1:]
    path = tmp / "collateral.json"
    path.write_text(json.dumps(doc))
    return path


def _verify_sgx(quote: bytes, collateral: Path) -> None:
    source = build_collateral_source(CollateralSettings(collateral_dir=collateral))
    evidence.verify("sgx", quote, collateral=source, options=VerifyOptions(at=_at("2025-07-01")))


@pytest.mark.vectors
@pytest.mark.parametrize(
    ("part", "offset", "step"),
    [
        ("quote signature", 48 + 384 + 4 + 3, 5),
        ("attestation key", 48 + 384 + 4 + 64 + 3, 4),
        ("enclave report body (MRENCLAVE)", 48 + 64 + 2, 5),
        ("header", 10, 5),
        ("QE report", 48 + 384 + 4 + 128 + 100, 3),
    ],
)
def test_sgx_quote_mutation_rejected(part: str, offset: int, step: int, tmp_path: Path) -> None:
    quote = bytearray(vector_bytes("dcap-qvl/sample/sgx_quote"))
    collateral = _sgx_collateral(tmp_path)
    _verify_sgx(bytes(quote), collateral)
    quote[offset] ^= 0x01
    with pytest.raises(VerificationError) as info:
        _verify_sgx(bytes(quote), collateral)
    assert info.value.step == step, (part, str(info.value))


@pytest.mark.vectors
@pytest.mark.parametrize("field", ["tcb_info", "qe_identity"])
def test_sgx_collateral_mutation_rejected_at_collateral_step(field: str, tmp_path: Path) -> None:
    quote = vector_bytes("dcap-qvl/sample/sgx_quote")
    with pytest.raises(VerificationError) as info:
        _verify_sgx(quote, _sgx_collateral(tmp_path, mutate=field))
    assert info.value.step == 7, str(info.value)


@pytest.mark.vectors
def test_sgx_pck_certificate_mutation_rejected_at_chain_step() -> None:
    quote = bytearray(vector_bytes("dcap-qvl/sample/sgx_quote"))
    start = quote.index(b"-----BEGIN CERTIFICATE-----") + len(b"-----BEGIN CERTIFICATE-----\n")
    end = quote.index(b"-----END CERTIFICATE-----", start)
    # Change one base64 character near the end of the PCK certificate (inside its signature).
    position = end - 10
    quote[position] = ord("A") if quote[position] != ord("A") else ord("B")
    with pytest.raises(VerificationError) as info:
        _verify_sgx(bytes(quote), vector_path("dcap-qvl/sample/sgx_quote_collateral.json"))
    assert info.value.step == 2, str(info.value)


AZ = "trustee/deps/verifier/test_data/az-snp-vtpm"


def _verify_az(doc: dict[str, object]) -> None:
    evidence.verify("az-snp-vtpm", json.dumps(doc).encode(),
                    options=VerifyOptions(at=_at("2026-01-01"), expected_report_data=b"challenge"))


def _flip_hex(text: str, index: int) -> str:
    return text[:index] + format(int(text[index], 16) ^ 1, "x") + text[index + 1:]


@pytest.mark.vectors
def test_azure_vtpm_mutations_rejected_at_their_steps() -> None:
    import base64

    doc = json.loads(vector_bytes(f"{AZ}/evidence-v1.json"))
    _verify_az(doc)
    quote = doc["tpm_quote"]
    assert isinstance(quote, dict)

    tampered = json.loads(json.dumps(doc))
    tampered["tpm_quote"]["signature"] = _flip_hex(quote["signature"], 10)
    with pytest.raises(VerificationError, match="signature"):
        _verify_az(tampered)

    tampered = json.loads(json.dumps(doc))
    tampered["tpm_quote"]["message"] = _flip_hex(quote["message"], 40)
    with pytest.raises(VerificationError):
        _verify_az(tampered)

    hcl = bytearray(base64.urlsafe_b64decode(str(doc["hcl_report"]) + "=="))
    hcl[0x20 + 0x90] ^= 1  # SNP measurement inside the HCL report
    tampered = dict(doc, hcl_report=base64.urlsafe_b64encode(bytes(hcl)).decode().rstrip("="))
    with pytest.raises(VerificationError) as info:
        _verify_az(tampered)
    assert info.value.step == 4, str(info.value)

    vcek = bytearray(base64.urlsafe_b64decode(str(doc["vcek"]) + "=="))
    vcek[-10] ^= 1
    tampered = dict(doc, vcek=base64.urlsafe_b64encode(bytes(vcek)).decode().rstrip("="))
    with pytest.raises(VerificationError) as info:
        _verify_az(tampered)
    assert info.value.step == 4, str(info.value)
