"""Certificate and CRL helpers shared by the SNP and DCAP verifiers.

Chains are verified by hand rather than with ``cryptography.x509.verification``: AMD VCEKs carry no
authority key identifier and Intel PCK certificates no subject alternative name, which the
WebPKI-shaped builder rejects. Each helper does one explicit check and raises
:class:`~coffer.errors.FormatError` or :class:`~coffer.errors.CollateralError`; the verifier's step
runner turns those into a rejection naming its step.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from datetime import datetime
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from coffer._internal.memo import IdentityMemo
from coffer.errors import CofferError, FormatError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
# What cryptography raises for certificates it cannot decode (InvalidVersion is not a ValueError;
# lazily decoded names and keys may raise KeyError or UnsupportedAlgorithm).
_CERT_ERRORS = (ValueError, KeyError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm)
_STRONG_HASHES = frozenset({"sha256", "sha384", "sha512"})
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


class ChainError(CofferError):
    """A certificate or CRL check failed; the verifier's step runner reports it at its step."""


@lru_cache(maxsize=512)
def _load_der(der: bytes) -> x509.Certificate:
    # Every AMD VCEK/VLEK has serial number 0; cryptography 48 warns about that (and a later release
    # plans to refuse it). The serial plays no part in SNP verification.
    # cryptography decodes some fields lazily; touching them here makes a malformed certificate fail
    # at load (as a FormatError from the callers) rather than later inside a chain check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cert = x509.load_der_x509_certificate(der)
        _ = (cert.serial_number, cert.issuer, cert.subject, cert.not_valid_before_utc,
             cert.not_valid_after_utc, cert.signature_hash_algorithm, cert.public_key())
    return cert


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """One certificate, DER or PEM."""
    certs = load_certificates(data, what)
    if len(certs) != 1:
        raise FormatError(what, f"expected one certificate, found {len(certs)}")
    return certs[0]


def load_certificates(data: bytes, what: str = "certificate chain") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, or the single certificate of a DER file, in file order."""
    return [_load_der(der) for der in certificate_ders(data, what)]


def certificate_ders(data: bytes, what: str = "certificate chain") -> list[bytes]:
    """The DER bytes of every certificate in PEM or DER input (checked to parse)."""
    blocks = _PEM_CERT.findall(data)
    ders: list[bytes] = []
    if blocks:
        for block in blocks:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cert = x509.load_pem_x509_certificate(block)
            except _CERT_ERRORS as exc:
                raise FormatError(what, "a PEM certificate does not parse") from exc
            ders.append(cert.public_bytes(Encoding.DER))
        return ders
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        raise FormatError(what, "PEM input holds no certificate")
    try:
        _load_der(bytes(data))
    except _CERT_ERRORS as exc:
        raise FormatError(what, "neither a PEM bundle nor a DER certificate") from exc
    return [bytes(data)]


def load_crl(data: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    """A CRL given as DER, PEM or (as PCCS stores them) hex of the DER."""
    try:
        match = _PEM_CRL.search(data)
        stripped = data.strip()
        if match:
            crl = x509.load_pem_x509_crl(match.group(0))
        elif stripped and re.fullmatch(rb"[0-9a-fA-F]+", stripped) and len(stripped) % 2 == 0:
            crl = x509.load_der_x509_crl(bytes.fromhex(stripped.decode()))
        else:
            crl = x509.load_der_x509_crl(data)
        # Decoded lazily by cryptography: touch them here so a malformed CRL fails at load.
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_hash_algorithm)
    except _CERT_ERRORS as exc:
        raise FormatError(what, "not a DER, PEM or hex CRL") from exc
    return crl


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def check_validity(cert: x509.Certificate, at: datetime, label: str) -> None:
    """The certificate's validity window contains ``at``."""
    if at < cert.not_valid_before_utc:
        raise ChainError(f"{label} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise ChainError(f"{label} expired on {cert.not_valid_after_utc.isoformat()}")


# Pairs (child, parent) whose issuance already checked out in this process. A certificate object is
# immutable, so a pair is a fixed fact (names and signature included) and re-checking it on every
# report only costs time. Validity windows depend on the reference time and are checked by the
# callers on every call.
_VERIFIED_PAIRS: IdentityMemo[bool] = IdentityMemo()


# AMD signs ASK, ASVK, VCEK and VLEK certificates with RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt.
AMD_RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def check_issued_by(
    child: x509.Certificate, parent: x509.Certificate, label: str, *, rsa_pss: padding.PSS | None = None
) -> None:
    """``parent`` issued ``child``: names chain and the signature verifies with the parent's key.

    EC keys are checked with ECDSA and the certificate's hash. For RSA keys, ``rsa_pss`` pins the
    scheme (with SHA-384 as the hash): the algorithm field a certificate declares outside its signed
    part is not trusted to choose it. Without ``rsa_pss``, the declared scheme is used, and only
    PSS or PKCS#1 v1.5 with SHA-256 or stronger is accepted.
    """
    pinned = rsa_pss is not None
    if _VERIFIED_PAIRS.get((child, parent), pinned):
        return
    if child.issuer != parent.subject:
        raise ChainError(f"{label}: issuer {cn(child.issuer)!r} is not {cn(parent.subject)!r}")
    key = parent.public_key()
    hash_alg = child.signature_hash_algorithm
    if hash_alg is None:
        raise ChainError(f"{label}: signature algorithm without a hash is not accepted")
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if rsa_pss is not None:
                key.verify(child.signature, child.tbs_certificate_bytes, rsa_pss, hashes.SHA384())
            else:
                if hash_alg.name not in _STRONG_HASHES:
                    raise ChainError(f"{label}: signature hash {hash_alg.name} is not accepted")
                declared = child.signature_algorithm_parameters
                scheme = declared if isinstance(declared, padding.PSS) else padding.PKCS1v15()
                key.verify(child.signature, child.tbs_certificate_bytes, scheme, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        else:
            raise ChainError(f"{label}: issuer key type {type(key).__name__} is not accepted")
    except InvalidSignature as exc:
        raise ChainError(f"{label}: signature by {cn(parent.subject)!r} does not verify") from exc
    _VERIFIED_PAIRS.put((child, parent), True, pinned)


def check_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, at: datetime, label: str
) -> None:
    """The CRL is signed by ``issuer`` and current at ``at``."""
    if crl.issuer != issuer.subject:
        raise ChainError(f"{label}: issued by {cn(crl.issuer)!r}, expected {cn(issuer.subject)!r}")
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ChainError(f"{label}: issuer key type is not accepted")
    if not crl.is_signature_valid(key):
        raise ChainError(f"{label}: signature does not verify")
    if at < crl.last_update_utc:
        raise ChainError(f"{label} is not valid before {crl.last_update_utc.isoformat()}")
    next_update = crl.next_update_utc
    if next_update is None:
        raise ChainError(f"{label} has no nextUpdate, so it would never expire")
    if at > next_update:
        raise ChainError(f"{label} expired on {next_update.isoformat()}")


def check_not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, label: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise ChainError(f"{label} (serial {cert.serial_number:#x}) is revoked")
