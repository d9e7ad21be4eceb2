"""Regression tests for hostile inputs found in review: each must end in a typed Coffer error (or a
rejection), never in a foreign exception, and pinned schemes must not be chosen by the input."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from coffer import evidence
from coffer.errors import FormatError, VerificationError
from coffer.evidence.sample import make_sample_evidence
from coffer.evidence.x509util import AMD_RSA_PSS, ChainError, check_crl, check_issued_by

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(key: rsa.RSAPrivateKey) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(_name("CA")).issuer_name(_name("CA"))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .sign(key, hashes.SHA384(), rsa_padding=AMD_RSA_PSS))


def _child(ca_key: rsa.RSAPrivateKey, scheme: padding.PSS | padding.PKCS1v15) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (x509.CertificateBuilder().subject_name(_name("leaf")).issuer_name(_name("CA"))
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .sign(ca_key, hashes.SHA384(), rsa_padding=scheme))


def test_pinned_pss_refuses_a_pkcs1v15_signed_child() -> None:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _ca(ca_key)
    check_issued_by(_child(ca_key, AMD_RSA_PSS), ca, "leaf", rsa_pss=AMD_RSA_PSS)
    pkcs1 = _child(ca_key, padding.PKCS1v15())
    with pytest.raises(ChainError):
        check_issued_by(pkcs1, ca, "leaf", rsa_pss=AMD_RSA_PSS)


def test_pinned_pss_refuses_a_child_with_another_salt_length() -> None:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=0)
    with pytest.raises(ChainError):
        check_issued_by(_child(ca_key, other), _ca(ca_key), "leaf", rsa_pss=AMD_RSA_PSS)


def test_crl_without_next_update_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = (x509.CertificateBuilder().subject_name(_name("CA")).issuer_name(_name("CA"))
              .public_key(key.public_key()).serial_number(1)
              .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
              .sign(key, hashes.SHA256()))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(_name("CA"))
           .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(hours=1))
           .sign(key, hashes.SHA256()))
    check_crl(crl, issuer, NOW, "CRL")
    # cryptography cannot build a CRL without nextUpdate; check the rule with a stand-in.

    class _NoNextUpdate:
        def __getattr__(self, name: str) -> object:
            return None if name == "next_update_utc" else getattr(crl, name)

    with pytest.raises(ChainError, match="nextUpdate"):
        check_crl(_NoNextUpdate(), issuer, NOW, "CRL")  # type: ignore[arg-type]


def test_sample_key_of_unknown_algorithm_is_rejected_at_step_2() -> None:
    doc = json.loads(make_sample_evidence())
    # SubjectPublicKeyInfo { AlgorithmIdentifier { OID 1.2.3.4 }, BIT STRING 00 }
    doc["public_key"] = "300b300506032a030403020000"
    with pytest.raises(VerificationError) as info:
        evidence.verify("sample", json.dumps(doc).encode())
    assert info.value.step == 2


def test_tpm_rsa_ak_below_2048_bits_is_refused() -> None:
    from coffer.evidence.tpm import load_ak

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(FormatError, match="2048"):
        load_ak(der)


def test_tpm_evidence_with_small_ak_is_rejected_not_crashing() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = small.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    doc = {"ak_public": base64.b64encode(der).decode(),
           "tpm_quote": {"signature": "AAA=", "message": "AAA=", "pcrs": ["00" * 32] * 24}}
    with pytest.raises(VerificationError):
        evidence.verify("tpm", json.dumps(doc).encode())
