"""The ``tpm`` attester against a real software TPM: evidence that verifies with the evidence
library, an AK trusted by enrollment or by credential activation against the EK certificate."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coffer.errors import FormatError, VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.evidence.tpm import TpmClaims, parse_attest
from coffer.guest.attesters import attester_for
from coffer.guest.attesters.base import AttesterError
from coffer.guest.attesters.tpm import (
    TpmAttester,
    check_activation,
    check_ak_public,
    enroll_ak,
    enroll_by_activation,
    make_credential,
    make_credential_challenge,
    verify_ek_certificate,
)
from coffer.sandbox.swtpm import Swtpm

DIGEST = hashlib.sha384(b'{"additional-evidence":"","nonce":"n","tee-pubkey":{}}').digest()


def _verify(evidence: dict[str, Any], expected: bytes | None, trusted: tuple[bytes, ...] = ()) -> TpmClaims:
    claims = verify("tpm", json.dumps(evidence).encode(),
                    options=VerifyOptions(expected_report_data=expected, trusted_keys=trusted))
    assert isinstance(claims, TpmClaims)
    return claims


@pytest.fixture(scope="module")
def attester(software_tpm: Swtpm) -> TpmAttester:
    return TpmAttester(software_tpm.tcti)


@pytest.fixture(scope="module")
def evidence(attester: TpmAttester) -> dict[str, Any]:
    result: dict[str, Any] = attester.evidence(DIGEST)
    return result


def test_evidence_has_the_trustee_tpm_shape(evidence: dict[str, Any]) -> None:
    assert set(evidence) == {"ak_public", "tpm_quote"}
    assert set(evidence["tpm_quote"]) == {"signature", "message", "pcrs"}
    spki = base64.b64decode(evidence["ak_public"], validate=True)
    assert serialization.load_der_public_key(spki).key_size == 2048  # type: ignore[union-attr]
    assert len(evidence["tpm_quote"]["pcrs"]) == 24
    assert all(len(p) == 64 and p == p.lower() for p in evidence["tpm_quote"]["pcrs"])
    attest = parse_attest(base64.b64decode(evidence["tpm_quote"]["message"]))
    assert attest.extra_data == DIGEST[:32]


def test_evidence_verifies_with_the_first_32_bytes_of_the_digest(evidence: dict[str, Any]) -> None:
    claims = _verify(evidence, DIGEST[:32])
    assert claims.report_data == DIGEST[:32]
    assert claims.insecure is True  # the AK is not rooted yet
    assert claims.ak_trusted is False
    assert claims.steps[-1] == "6 check PCR digest"


def test_rejects_other_runtime_data_at_nonce_step(evidence: dict[str, Any]) -> None:
    with pytest.raises(VerificationError) as err:
        _verify(evidence, hashlib.sha384(b"other").digest()[:32])
    assert err.value.step == 5


def test_enrolled_ak_makes_claims_secure(attester: TpmAttester, evidence: dict[str, Any]) -> None:
    spki = enroll_ak(attester)
    claims = _verify(evidence, DIGEST[:32], trusted=(spki,))
    assert claims.insecure is False
    assert claims.ak_trusted is True
    assert claims.ak_public_sha256 == hashlib.sha256(spki).digest()


def test_credential_activation_against_the_ek_certificate(
        attester: TpmAttester, software_tpm: Swtpm, evidence: dict[str, Any]) -> None:
    spki = enroll_by_activation(attester, ca_certs=software_tpm.local_ca.certificates())
    assert spki == attester.ak_public()
    assert _verify(evidence, DIGEST[:32], trusted=(spki,)).insecure is False


def test_ak_is_persisted_and_reused(software_tpm: Swtpm, attester: TpmAttester) -> None:
    again = TpmAttester(software_tpm.tcti)
    assert again.ak_public() == attester.ak_public()
    assert isinstance(attester_for("tpm", tcti=software_tpm.tcti), TpmAttester)


def test_quote_follows_a_pcr_extension(software_tpm: Swtpm, attester: TpmAttester) -> None:
    before = attester.read_pcrs()[16]
    subprocess.run(["tpm2_pcrextend", "16:sha256=" + "ab" * 32], check=True, capture_output=True,
                   env={"TPM2TOOLS_TCTI": software_tpm.tcti, "PATH": "/usr/bin:/bin"})
    evidence = attester.evidence(DIGEST)
    after = bytes.fromhex(evidence["tpm_quote"]["pcrs"][16])
    assert after == hashlib.sha256(before + bytes.fromhex("ab" * 32)).digest()
    claims = _verify(evidence, DIGEST[:32])
    assert claims.pcrs["sha256"]["16"] == after


def test_tool_made_credential_activates_too(attester: TpmAttester, tmp_path: Path) -> None:
    """Cross-check: a credential from tpm2_makecredential (offline) is accepted by the same path as
    ours, so our software MakeCredential is not merely self-consistent."""
    ek_pem = attester.ek_public().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ek.pem").write_bytes(ek_pem)
    (tmp_path / "secret").write_bytes(b"s" * 32)
    subprocess.run(["tpm2_makecredential", "-T", "none", "-u", "ek.pem", "-G", "rsa", "-s", "secret",
                    "-n", attester.ensure_ak().name.hex(), "-o", "cred"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert attester.activate_credential((tmp_path / "cred").read_bytes()) == b"s" * 32


def test_rejects_tampered_credential(attester: TpmAttester) -> None:
    blob = bytearray(make_credential(attester.ek_public(), attester.ensure_ak().name, b"k" * 32))
    blob[14] ^= 1  # inside the integrity HMAC
    with pytest.raises(AttesterError):
        attester.activate_credential(bytes(blob))


def test_credential_for_another_name_does_not_release_the_secret(attester: TpmAttester) -> None:
    name = attester.ensure_ak().name
    other = name[:2] + hashlib.sha256(b"another key").digest()
    with pytest.raises(AttesterError):
        attester.activate_credential(make_credential(attester.ek_public(), other, b"k" * 32))


def test_wrong_returned_secret_is_refused(attester: TpmAttester, software_tpm: Swtpm) -> None:
    ek_cert = attester.ek_certificate()
    assert ek_cert is not None
    challenge = make_credential_challenge(ek_cert, attester.ensure_ak().tpm2b_public,
                                          ca_certs=software_tpm.local_ca.certificates())
    with pytest.raises(VerificationError) as err:
        check_activation(challenge, b"\0" * 32)
    assert err.value.step == 2


def _foreign_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swtpm-localca")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_rejects_ek_certificate_from_an_untrusted_ca(attester: TpmAttester) -> None:
    ek_cert = attester.ek_certificate()
    assert ek_cert is not None
    with pytest.raises(VerificationError) as err:
        verify_ek_certificate(ek_cert, [_foreign_ca()])
    assert err.value.step == 1


def test_rejects_ek_certificate_outside_its_validity(attester: TpmAttester, software_tpm: Swtpm) -> None:
    ek_cert = attester.ek_certificate()
    assert ek_cert is not None
    verify_ek_certificate(ek_cert, software_tpm.local_ca.certificates())
    with pytest.raises(VerificationError, match="not valid"):
        verify_ek_certificate(ek_cert, software_tpm.local_ca.certificates(),
                              at=datetime(2000, 1, 1, tzinfo=UTC))


def test_rejects_ek_as_attestation_key(attester: TpmAttester, tmp_path: Path) -> None:
    subprocess.run(["tpm2_readpublic", "-c", "0x81010001", "-o", "ek.tpm2b"], cwd=tmp_path, check=True,
                   capture_output=True, env={"TPM2TOOLS_TCTI": attester.tools.tcti or "",
                                             "PATH": "/usr/bin:/bin"})
    with pytest.raises(FormatError, match="restricted"):
        check_ak_public((tmp_path / "ek.tpm2b").read_bytes())


def test_make_credential_checks_its_inputs(attester: TpmAttester) -> None:
    with pytest.raises(ValueError, match="name"):
        make_credential(attester.ek_public(), b"\0" * 10, b"k")
    with pytest.raises(ValueError, match="secret"):
        make_credential(attester.ek_public(), attester.ensure_ak().name, b"")


def test_rejects_bad_digest_and_options(attester: TpmAttester) -> None:
    with pytest.raises(ValueError, match="digest"):
        attester.evidence(b"")
    with pytest.raises(ValueError, match="bank"):
        TpmAttester("swtpm:path=/nonexistent", bank="md5")
    with pytest.raises(ValueError, match="pcrs"):
        TpmAttester("swtpm:path=/nonexistent", pcrs=[24])


def test_unreachable_tpm_is_an_attester_error(tmp_path: Path) -> None:
    broken = TpmAttester(f"swtpm:path={tmp_path / 'none'}")
    with pytest.raises(AttesterError, match="tpm2_getcap"):
        broken.evidence(DIGEST)


def test_event_log_is_included_when_configured(software_tpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "log.bin"
    log.write_bytes(b"\x01\x02")
    doc = TpmAttester(software_tpm.tcti, event_log=log, pcrs=[0, 1]).evidence(DIGEST)
    assert base64.b64decode(doc["event_log"]) == b"\x01\x02"
    assert doc["tpm_quote"]["pcrs"][0] == "00" * 32
