"""The ocicrypt layer cipher, byte-compatible with skopeo, podman, containerd imgcrypt and CoCo.

An encrypted layer is the stored blob (compressed or not) run through AES-256-CTR under a random
32-byte key, with a 16-byte random nonce as the whole initial counter block, followed by
HMAC-SHA256 over the entire ciphertext under the same key. The key, nonce and plaintext digest form
the *private options* JSON, which is wrapped for each recipient and stored as a layer annotation
(``org.opencontainers.image.enc.keys.<scheme>``, several wrapped copies comma-separated); the HMAC
sits in the *public options* JSON (annotation ``org.opencontainers.image.enc.pubopts``).

Two wrapping schemes are implemented:

* ``jwe``: a JWE JSON serialization (flattened for one recipient, general for several), content
  encryption A256GCM, key management RSA-OAEP / RSA-OAEP-256 or ECDH-ES+A{128,192,256}KW.
* ``provider.attestation-agent``: CoCo's AnnotationPacket, the private options sealed with
  AES-256-GCM under a key-encryption key that the KBS releases to an attested workload.

Unlike ocicrypt, which hands out plaintext before the HMAC is checked at EOF, decryption here spools
to a temporary file and releases it (rename or return) only after the HMAC matched (compared in
constant time) and the plaintext digest equals the one in the private options. Memory stays flat: the
blob is processed in fixed-size chunks.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac as _hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from coffer.errors import FormatError, UnsupportedError, VerificationError

CIPHER: Final = "AES_256_CTR_HMAC_SHA256"
ANNOTATION_PREFIX: Final = "org.opencontainers.image.enc."
ANNOTATION_PUBOPTS: Final = "org.opencontainers.image.enc.pubopts"
ANNOTATION_JWE: Final = "org.opencontainers.image.enc.keys.jwe"
ANNOTATION_PROVIDER_AA: Final = "org.opencontainers.image.enc.keys.provider.attestation-agent"

#: Upper bound on one annotation value. A wrapped copy is well under 2 KiB; this leaves room for
#: dozens of recipients while refusing to parse megabytes of attacker-chosen JSON.
MAX_ANNOTATION_LEN: Final = 256 * 1024
#: Upper bound on the number of comma-separated wrapped copies under one scheme.
MAX_WRAPPED_COPIES: Final = 64

CHUNK_SIZE: Final = 1024 * 1024
SYMKEY_LEN: Final = 32
NONCE_LEN: Final = 16
HMAC_LEN: Final = 32
KEK_LEN: Final = 32
GCM_IV_LEN: Final = 12

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_VERIFIER: Final = "ocicrypt layer"
STEP_UNWRAP: Final = (1, "unwrap layer key")
STEP_HMAC: Final = (2, "authenticate ciphertext")
STEP_DIGEST: Final = (3, "check plaintext digest")

_DIGEST_ALGS: Final = {"sha256": 64, "sha384": 96, "sha512": 128}
_RSA_ALGS: Final = ("RSA-OAEP", "RSA-OAEP-256")
_ECDH_ALGS: Final = {"ECDH-ES+A128KW": 16, "ECDH-ES+A192KW": 24, "ECDH-ES+A256KW": 32}
_GCM_ENCS: Final = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}
_CURVES: Final[dict[str, tuple[type[ec.EllipticCurve], int]]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _fail(step: tuple[int, str], reason: str) -> VerificationError:
    return VerificationError(_VERIFIER, step[0], step[1], reason)


# --------------------------------------------------------------------------------------------------
# base64 and JSON helpers (strict)


def _b64std(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64std_decode(text: object, what: str) -> bytes:
    """Decode padded standard base64, as Go's encoding/json writes ``[]byte``."""
    if not isinstance(text, str):
        raise FormatError(what, "expected a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise FormatError(what, "not padded standard base64") from exc


def _b64url_decode(text: object, what: str) -> bytes:
    """Decode unpadded base64url, as JOSE writes binary members."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise FormatError(what, "expected an unpadded base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise FormatError(what, "not base64url") from exc


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(what, "not valid JSON") from exc
    if not isinstance(value, dict):
        raise FormatError(what, "expected a JSON object")
    return value


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _check_annotation_size(value: str, what: str) -> None:
    if len(value) > MAX_ANNOTATION_LEN:
        raise FormatError(what, f"annotation is {len(value)} bytes, over the {MAX_ANNOTATION_LEN}-byte limit")


def _split_copies(value: str, what: str) -> list[bytes]:
    _check_annotation_size(value, what)
    parts = value.split(",")
    if len(parts) > MAX_WRAPPED_COPIES:
        raise FormatError(what, f"more than {MAX_WRAPPED_COPIES} wrapped copies")
    return [_b64std_decode(part, what) for part in parts]


# --------------------------------------------------------------------------------------------------
# Options JSON


def _check_digest(digest: object, what: str) -> str:
    if not isinstance(digest, str) or ":" not in digest:
        raise FormatError(what, "digest must be 'algorithm:hex'")
    alg, _, hexpart = digest.partition(":")
    if alg not in _DIGEST_ALGS:
        raise UnsupportedError(f"{what}: digest algorithm {alg!r} is not supported")
    if len(hexpart) != _DIGEST_ALGS[alg] or any(c not in "0123456789abcdef" for c in hexpart):
        raise FormatError(what, f"digest is not {_DIGEST_ALGS[alg]} lowercase hex digits")
    return digest


@dataclass(frozen=True, repr=False)
class PrivateOptions:
    """The secret half: layer key, CTR nonce and the digest of the plaintext blob."""

    symkey: bytes
    nonce: bytes
    digest: str

    def __repr__(self) -> str:  # never show the key
        return f"PrivateOptions(digest={self.digest!r})"

    def to_json(self) -> bytes:
        """Serialise exactly as ocicrypt's Go struct does (field order, padded base64)."""
        return _compact(
            {
                "symkey": _b64std(self.symkey),
                "digest": self.digest,
                "cipheroptions": {"nonce": _b64std(self.nonce)},
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> PrivateOptions:
        what = "ocicrypt private options"
        obj = _json_object(data, what)
        symkey = _b64std_decode(obj.get("symkey"), what)
        if len(symkey) != SYMKEY_LEN:
            raise FormatError(what, f"symkey is {len(symkey)} bytes, expected {SYMKEY_LEN}")
        opts = obj.get("cipheroptions")
        if not isinstance(opts, dict):
            raise FormatError(what, "cipheroptions missing")
        nonce = _b64std_decode(opts.get("nonce"), what)
        if len(nonce) != NONCE_LEN:
            raise FormatError(what, f"nonce is {len(nonce)} bytes, expected {NONCE_LEN}")
        return cls(symkey=symkey, nonce=nonce, digest=_check_digest(obj.get("digest"), what))


@dataclass(frozen=True)
class PublicOptions:
    """The public half, stored in ``org.opencontainers.image.enc.pubopts``."""

    hmac: bytes
    cipher: str = CIPHER

    def to_json(self) -> bytes:
        return _compact({"cipher": self.cipher, "hmac": _b64std(self.hmac), "cipheroptions": {}})

    def to_annotation(self) -> str:
        return _b64std(self.to_json())

    @classmethod
    def from_json(cls, data: bytes) -> PublicOptions:
        what = "ocicrypt public options"
        obj = _json_object(data, what)
        cipher = obj.get("cipher")
        if not isinstance(cipher, str) or not cipher:
            raise FormatError(what, "no cipher type provided")
        if cipher != CIPHER:
            raise UnsupportedError(f"{what}: cipher {cipher!r} is not supported")
        if obj.get("hmac") is None:
            raise FormatError(what, "HMAC is not provided")
        mac = _b64std_decode(obj["hmac"], what)
        if len(mac) != HMAC_LEN:
            raise FormatError(what, f"hmac is {len(mac)} bytes, expected {HMAC_LEN}")
        return cls(hmac=mac, cipher=cipher)

    @classmethod
    def from_annotation(cls, value: str) -> PublicOptions:
        what = "ocicrypt public options"
        _check_annotation_size(value, what)
        return cls.from_json(_b64std_decode(value, what))


# --------------------------------------------------------------------------------------------------
# Keys


def load_public_key(data: bytes) -> PublicKey:
    """A recipient public key: PEM or DER SubjectPublicKeyInfo, or PKCS#1 RSA, or an X.509 cert."""
    what = "recipient public key"
    loaders: list[Callable[[], object]] = []
    if b"-----BEGIN" in data:
        loaders.append(lambda: serialization.load_pem_public_key(data))
        if b"CERTIFICATE" in data:
            loaders.append(lambda: x509.load_pem_x509_certificate(data).public_key())
    else:
        loaders.append(lambda: serialization.load_der_public_key(data))
    for load in loaders:
        try:
            key = load()
        except (ValueError, TypeError, UnsupportedError):
            continue
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return key
        raise UnsupportedError(f"{what}: only RSA and EC (P-256/384/521) keys are supported")
    raise FormatError(what, "not a PEM or DER public key")


def load_private_key(data: bytes, password: bytes | None = None) -> PrivateKey:
    """A decryption key: PEM or DER, PKCS#8, PKCS#1 (RSA) or SEC1 (EC), optionally encrypted."""
    what = "decryption private key"
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError as exc:
        raise FormatError(what, "key is encrypted and needs a password (or was given one it lacks)") from exc
    except (ValueError, UnsupportedError) as exc:
        raise FormatError(what, "not a PEM or DER private key, or wrong password") from exc
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return key
    raise UnsupportedError(f"{what}: only RSA and EC keys are supported")


# --------------------------------------------------------------------------------------------------
# JWE (JSON serialization) wrapping


@dataclass(frozen=True)
class JweRecipient:
    """A ``jwe:`` recipient. ``alg`` defaults to what ocicrypt picks for the key type."""

    key: PublicKey
    alg: str | None = None

    def algorithm(self) -> str:
        if isinstance(self.key, rsa.RSAPublicKey):
            alg = self.alg or "RSA-OAEP"
            if alg not in _RSA_ALGS:
                raise UnsupportedError(f"JWE algorithm {alg!r} does not fit an RSA key")
            return alg
        alg = self.alg or "ECDH-ES+A256KW"
        if alg not in _ECDH_ALGS:
            raise UnsupportedError(f"JWE algorithm {alg!r} does not fit an EC key")
        if _curve_name(self.key.curve) is None:
            raise UnsupportedError("EC recipient key must be on P-256, P-384 or P-521")
        return alg


def _oaep(alg: str) -> padding.OAEP:
    h: hashes.HashAlgorithm = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()  # noqa: S303
    return padding.OAEP(mgf=padding.MGF1(algorithm=h), algorithm=h, label=None)


def _curve_name(curve: ec.EllipticCurve) -> str | None:
    for name, (cls, _) in _CURVES.items():
        if isinstance(curve, cls):
            return name
    return None


def _concat_kdf(shared: bytes, alg: str, apu: bytes, apv: bytes, length: int) -> bytes:
    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    other = lp(alg.encode("ascii")) + lp(apu) + lp(apv) + (length * 8).to_bytes(4, "big")
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=length, otherinfo=other).derive(shared)


def _epk_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    name = _curve_name(key.curve)
    assert name is not None
    size = _CURVES[name][1]
    nums = key.public_numbers()
    return {
        "kty": "EC",
        "crv": name,
        "x": _b64url(nums.x.to_bytes(size, "big")),
        "y": _b64url(nums.y.to_bytes(size, "big")),
    }


def _epk_from_jwk(obj: object, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(obj, dict) or obj.get("kty") != "EC" or obj.get("crv") not in _CURVES:
        raise FormatError(what, "epk must be an EC JWK on P-256, P-384 or P-521")
    curve_cls, size = _CURVES[obj["crv"]]
    x = _b64url_decode(obj.get("x"), what)
    y = _b64url_decode(obj.get("y"), what)
    if len(x) != size or len(y) != size:
        raise FormatError(what, "epk coordinates have the wrong length")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve_cls()
        ).public_key()
    except ValueError as exc:
        raise FormatError(what, "epk is not a point on its curve") from exc


def _wrap_cek(recipient: JweRecipient, cek: bytes) -> tuple[dict[str, Any], bytes]:
    alg = recipient.algorithm()
    key = recipient.key
    if isinstance(key, rsa.RSAPublicKey):
        return {"alg": alg}, key.encrypt(cek, _oaep(alg))
    eph = ec.generate_private_key(key.curve)
    kek = _concat_kdf(eph.exchange(ec.ECDH(), key), alg, b"", b"", _ECDH_ALGS[alg])
    return {"alg": alg, "epk": _epk_jwk(eph.public_key())}, aes_key_wrap(kek, cek)


def jwe_encrypt(plaintext: bytes, recipients: Sequence[JweRecipient]) -> bytes:
    """JWE JSON serialization with A256GCM, flattened for one recipient, general for several."""
    if not recipients:
        raise UnsupportedError("JWE needs at least one recipient")
    cek = secrets.token_bytes(32)
    wrapped = [_wrap_cek(r, cek) for r in recipients]
    if len(wrapped) == 1:
        header, ek = wrapped[0]
        protected = _b64url(_compact({**header, "enc": "A256GCM"}))
        out: dict[str, Any] = {"protected": protected, "encrypted_key": _b64url(ek)}
    else:
        protected = _b64url(_compact({"enc": "A256GCM"}))
        out = {
            "protected": protected,
            "recipients": [{"header": h, "encrypted_key": _b64url(ek)} for h, ek in wrapped],
        }
    iv = secrets.token_bytes(GCM_IV_LEN)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    out["iv"] = _b64url(iv)
    out["ciphertext"] = _b64url(sealed[:-16])
    out["tag"] = _b64url(sealed[-16:])
    return _compact(out)


@dataclass(frozen=True)
class _JweRecipientEntry:
    header: dict[str, Any]
    encrypted_key: bytes


@dataclass(frozen=True)
class ParsedJwe:
    """A parsed (not yet decrypted) JWE JSON serialization."""

    protected_b64: str
    protected: dict[str, Any]
    unprotected: dict[str, Any]
    recipients: tuple[_JweRecipientEntry, ...]
    iv: bytes
    ciphertext: bytes
    tag: bytes
    aad: bytes | None

    def header_for(self, entry: _JweRecipientEntry) -> dict[str, Any]:
        return {**self.unprotected, **entry.header, **self.protected}


def parse_jwe(data: bytes) -> ParsedJwe:
    """Parse a JWE in flattened or general JSON serialization; raises FormatError only."""
    what = "JWE"
    obj = _json_object(data, what)
    protected_b64 = obj.get("protected", "")
    if not isinstance(protected_b64, str):
        raise FormatError(what, "protected must be a string")
    protected = (
        _json_object(_b64url_decode(protected_b64, what), "JWE protected header") if protected_b64 else {}
    )
    unprotected = obj.get("unprotected", {})
    if not isinstance(unprotected, dict):
        raise FormatError(what, "unprotected must be an object")
    raw_recipients: list[Any]
    if "recipients" in obj:
        raw_recipients = obj["recipients"]
        if not isinstance(raw_recipients, list) or not raw_recipients:
            raise FormatError(what, "recipients must be a non-empty array")
        if len(raw_recipients) > MAX_WRAPPED_COPIES:
            raise FormatError(what, "too many recipients")
    else:
        raw_recipients = [{"header": obj.get("header", {}), "encrypted_key": obj.get("encrypted_key", "")}]
    entries: list[_JweRecipientEntry] = []
    for raw in raw_recipients:
        if not isinstance(raw, dict):
            raise FormatError(what, "recipient must be an object")
        header = raw.get("header", {})
        if not isinstance(header, dict):
            raise FormatError(what, "recipient header must be an object")
        entries.append(_JweRecipientEntry(header, _b64url_decode(raw.get("encrypted_key", ""), what)))
    aad_text = obj.get("aad")
    return ParsedJwe(
        protected_b64=protected_b64,
        protected=protected,
        unprotected=unprotected,
        recipients=tuple(entries),
        iv=_b64url_decode(obj.get("iv"), what),
        ciphertext=_b64url_decode(obj.get("ciphertext"), what),
        tag=_b64url_decode(obj.get("tag"), what),
        aad=None if aad_text is None else _b64url_decode(aad_text, what),
    )


def _unwrap_cek(header: Mapping[str, Any], encrypted_key: bytes, key: PrivateKey) -> bytes | None:
    alg = header.get("alg")
    try:
        if isinstance(key, rsa.RSAPrivateKey):
            if alg not in _RSA_ALGS:
                return None
            return key.decrypt(encrypted_key, _oaep(str(alg)))
        if alg not in _ECDH_ALGS:
            return None
        epk = _epk_from_jwk(header.get("epk"), "JWE epk")
        if not isinstance(epk.curve, type(key.curve)):
            return None
        apu = _b64url_decode(header["apu"], "JWE apu") if "apu" in header else b""
        apv = _b64url_decode(header["apv"], "JWE apv") if "apv" in header else b""
        kek = _concat_kdf(key.exchange(ec.ECDH(), epk), str(alg), apu, apv, _ECDH_ALGS[str(alg)])
        return aes_key_unwrap(kek, encrypted_key)
    except (ValueError, InvalidUnwrap, FormatError):
        return None


def jwe_decrypt(data: bytes, keys: Iterable[PrivateKey]) -> bytes | None:
    """The JWE plaintext if one of ``keys`` opens one of its recipients, else None.

    Raises FormatError for a malformed JWE and UnsupportedError for an unknown ``enc`` or ``zip``.
    """
    jwe = parse_jwe(data)
    keys = tuple(keys)
    unsupported: str | None = None
    for entry in jwe.recipients:
        header = jwe.header_for(entry)
        enc = header.get("enc")
        if "zip" in header:
            unsupported = "JWE compression ('zip') is not supported"
            continue
        if enc not in _GCM_ENCS:
            unsupported = f"JWE content encryption {str(enc)[:40]!r} is not supported"
            continue
        if len(jwe.iv) != GCM_IV_LEN or len(jwe.tag) != 16:
            raise FormatError("JWE", "iv must be 12 bytes and tag 16 bytes for AES-GCM")
        for key in keys:
            cek = _unwrap_cek(header, entry.encrypted_key, key)
            if cek is None or len(cek) != _GCM_ENCS[str(enc)]:
                continue
            aad = jwe.protected_b64.encode("ascii")
            if jwe.aad is not None:
                aad += b"." + _b64url(jwe.aad).encode("ascii")
            try:
                return AESGCM(cek).decrypt(jwe.iv, jwe.ciphertext + jwe.tag, aad)
            except InvalidTag:
                continue
    if unsupported is not None:
        raise UnsupportedError(unsupported)
    return None


# --------------------------------------------------------------------------------------------------
# CoCo attestation-agent key provider: AnnotationPacket


@dataclass(frozen=True)
class AnnotationPacket:
    """CoCo's ``provider.attestation-agent`` payload (v1, or v2 when ``version`` is set)."""

    kid: str
    wrapped_data: bytes
    iv: bytes | None
    wrap_type: str | None
    version: str | None = None
    provider: str = "kbs"
    provider_settings: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {}
        if self.version is not None:
            obj["version"] = self.version
        obj["kid"] = self.kid
        obj["wrapped_data"] = _b64std(self.wrapped_data)
        if self.version is not None:
            obj["provider"] = self.provider
        if self.iv is not None:
            obj["iv"] = _b64std(self.iv)
        if self.wrap_type is not None:
            obj["wrap_type"] = self.wrap_type
        if self.version is not None:
            obj["provider_settings"] = self.provider_settings
            obj["annotations"] = self.annotations
        return _compact(obj)

    @classmethod
    def from_json(cls, data: bytes) -> AnnotationPacket:
        what = "attestation-agent annotation packet"
        obj = _json_object(data, what)
        kid = obj.get("kid")
        if not isinstance(kid, str) or not kid:
            raise FormatError(what, "kid must be a non-empty string")
        version = obj.get("version")
        if version is not None and version != "0.1.0":
            raise UnsupportedError(f"{what}: version {version!r} is not supported")
        iv = obj.get("iv")
        wrap_type = obj.get("wrap_type")
        if wrap_type is not None and not isinstance(wrap_type, str):
            raise FormatError(what, "wrap_type must be a string")
        provider = obj.get("provider", "kbs")
        settings = obj.get("provider_settings", {})
        annotations = obj.get("annotations", {})
        if (
            not isinstance(provider, str)
            or not isinstance(settings, dict)
            or not isinstance(annotations, dict)
        ):
            raise FormatError(what, "provider, provider_settings or annotations has the wrong type")
        return cls(
            kid=kid,
            wrapped_data=_b64std_decode(obj.get("wrapped_data"), what),
            iv=None if iv is None else _b64std_decode(iv, what),
            wrap_type=wrap_type,
            version=version,
            provider=provider,
            provider_settings=settings,
            annotations=annotations,
        )


@dataclass(frozen=True, repr=False)
class KekRecipient:
    """A ``provider.attestation-agent`` recipient: the KEK and its KBS resource id."""

    kid: str
    kek: bytes

    def __repr__(self) -> str:
        return f"KekRecipient(kid={self.kid!r})"


def kek_wrap(plaintext: bytes, recipient: KekRecipient) -> AnnotationPacket:
    if len(recipient.kek) != KEK_LEN:
        raise UnsupportedError(f"the key-encryption key must be {KEK_LEN} bytes")
    iv = secrets.token_bytes(GCM_IV_LEN)
    sealed = AESGCM(recipient.kek).encrypt(iv, plaintext, None)
    return AnnotationPacket(kid=recipient.kid, wrapped_data=sealed, iv=iv, wrap_type="A256GCM")


def kek_unwrap(packet: AnnotationPacket, kek: bytes) -> bytes | None:
    """The private-options bytes, or None if ``kek`` does not open the packet."""
    wrap_type = packet.wrap_type or "A256GCM"
    if wrap_type != "A256GCM":
        raise UnsupportedError(f"attestation-agent wrap_type {wrap_type!r} is not supported")
    if packet.iv is None or len(packet.iv) != GCM_IV_LEN:
        raise FormatError("attestation-agent annotation packet", "A256GCM needs a 12-byte iv")
    if len(kek) != KEK_LEN:
        return None
    try:
        return AESGCM(kek).decrypt(packet.iv, packet.wrapped_data, None)
    except InvalidTag:
        return None


# --------------------------------------------------------------------------------------------------
# Annotation parsers


def parse_jwe_annotation(value: str) -> list[ParsedJwe]:
    """Every wrapped copy under ``org.opencontainers.image.enc.keys.jwe``."""
    return [parse_jwe(copy) for copy in _split_copies(value, "jwe key annotation")]


def parse_provider_annotation(value: str) -> list[AnnotationPacket]:
    """Every packet under ``org.opencontainers.image.enc.keys.provider.attestation-agent``."""
    return [AnnotationPacket.from_json(c) for c in _split_copies(value, "attestation-agent key annotation")]


def filter_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations without ocicrypt's ``org.opencontainers.image.enc.*`` entries."""
    return {k: v for k, v in annotations.items() if not k.startswith(ANNOTATION_PREFIX)}


# --------------------------------------------------------------------------------------------------
# Layer encryption


def _chunks(src: IO[bytes], chunk_size: int) -> Iterator[memoryview]:
    """Read ``src`` in chunks into one reused buffer (each view is valid until the next one)."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    readinto = getattr(src, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(view)
            if not n:
                return
            yield view[:n]
        else:
            data = src.read(chunk_size)
            if not data:
                return
            yield memoryview(data)


class ByteSink(Protocol):
    """Where streamed output goes: a binary file, or a destination's blob sink."""

    def write(self, data: bytes | memoryview, /) -> object: ...


@dataclass(frozen=True)
class EncryptedLayer:
    """What changes in the layer descriptor: digest, annotations (size stays the same)."""

    digest: str
    size: int
    plaintext_digest: str
    annotations: dict[str, str]


def encrypt_layer(
    src: BinaryIO,
    dst: ByteSink,
    *,
    jwe: Sequence[JweRecipient] = (),
    kek: Sequence[KekRecipient] = (),
    chunk_size: int = CHUNK_SIZE,
) -> EncryptedLayer:
    """Encrypt the blob read from ``src`` into ``dst`` and wrap its key for every recipient."""
    if not jwe and not kek:
        raise UnsupportedError("encryption needs at least one jwe or key-provider recipient")
    for r in jwe:
        r.algorithm()  # fail on a bad recipient before streaming gigabytes
    symkey = secrets.token_bytes(SYMKEY_LEN)
    nonce = secrets.token_bytes(NONCE_LEN)
    encryptor = Cipher(algorithms.AES(symkey), modes.CTR(nonce)).encryptor()
    mac = HMAC(symkey, hashes.SHA256())
    plain_hash = hashlib.sha256()
    cipher_hash = hashlib.sha256()
    size = 0
    out = bytearray(chunk_size + 16)
    for chunk in _chunks(src, chunk_size):
        n = len(chunk)
        plain_hash.update(chunk)
        encryptor.update_into(chunk, out)
        ct = memoryview(out)[:n]
        mac.update(ct)
        cipher_hash.update(ct)
        dst.write(ct)
        size += n
    tail = encryptor.finalize()
    assert not tail  # CTR is a stream mode
    private = PrivateOptions(symkey=symkey, nonce=nonce, digest="sha256:" + plain_hash.hexdigest())
    public = PublicOptions(hmac=mac.finalize())
    private_json = private.to_json()
    annotations = {ANNOTATION_PUBOPTS: public.to_annotation()}
    if jwe:
        annotations[ANNOTATION_JWE] = _b64std(jwe_encrypt(private_json, jwe))
    if kek:
        annotations[ANNOTATION_PROVIDER_AA] = ",".join(
            _b64std(kek_wrap(private_json, r).to_json()) for r in kek
        )
    return EncryptedLayer(
        digest="sha256:" + cipher_hash.hexdigest(),
        size=size,
        plaintext_digest=private.digest,
        annotations=annotations,
    )


# --------------------------------------------------------------------------------------------------
# Layer decryption


@dataclass(frozen=True, repr=False)
class DecryptionKeys:
    """What a decryptor holds: JWE private keys and/or a KEK lookup by KBS resource id.

    ``kek_for(kid)`` is called only for packets present on the layer; for KBS keys it is where the
    attested resource fetch happens. It returns None when it has no key for that id.
    """

    private_keys: tuple[PrivateKey, ...] = ()
    kek_for: Callable[[str], bytes | None] | None = None

    def __repr__(self) -> str:
        return f"DecryptionKeys(private_keys={len(self.private_keys)}, kek_for={self.kek_for is not None})"


def unwrap_private_options(annotations: Mapping[str, str], keys: DecryptionKeys) -> PrivateOptions:
    """Open the private options with the first key that fits, trying every scheme present."""
    tried: list[str] = []
    if ANNOTATION_JWE in annotations and keys.private_keys:
        tried.append("jwe")
        for wrapped in _split_copies(annotations[ANNOTATION_JWE], "jwe key annotation"):
            try:
                opened = jwe_decrypt(wrapped, keys.private_keys)
            except UnsupportedError as exc:
                tried.append(str(exc))
                continue
            if opened is not None:
                return PrivateOptions.from_json(opened)
    if ANNOTATION_PROVIDER_AA in annotations and keys.kek_for is not None:
        tried.append("provider.attestation-agent")
        for packet in parse_provider_annotation(annotations[ANNOTATION_PROVIDER_AA]):
            kek = keys.kek_for(packet.kid)
            if kek is None:
                continue
            try:
                opened = kek_unwrap(packet, kek)
            except UnsupportedError as exc:
                tried.append(str(exc))
                continue
            if opened is not None:
                return PrivateOptions.from_json(opened)
    if not any(k.startswith(ANNOTATION_PREFIX + "keys.") for k in annotations):
        raise _fail(STEP_UNWRAP, "the layer carries no wrapped key annotation")
    if not tried:
        raise _fail(STEP_UNWRAP, "no decryption key for any key scheme present on the layer")
    raise _fail(STEP_UNWRAP, f"none of the given keys opens the wrapped layer key (tried {'; '.join(tried)})")


@dataclass(frozen=True)
class DecryptedLayer:
    """The restored descriptor fields of a verified plaintext layer."""

    digest: str
    size: int


def _decrypt_stream(
    src: BinaryIO,
    dst: ByteSink,
    private: PrivateOptions,
    public: PublicOptions,
    *,
    expected_size: int | None,
    chunk_size: int,
) -> DecryptedLayer:
    decryptor = Cipher(algorithms.AES(private.symkey), modes.CTR(private.nonce)).decryptor()
    mac = HMAC(private.symkey, hashes.SHA256())
    alg = private.digest.partition(":")[0]
    plain_hash = hashlib.new(alg)
    size = 0
    out = bytearray(chunk_size + 16)
    for chunk in _chunks(src, chunk_size):
        n = len(chunk)
        size += n
        if expected_size is not None and size > expected_size:
            raise _fail(STEP_HMAC, f"blob is longer than its descriptor size {expected_size}")
        mac.update(chunk)
        decryptor.update_into(chunk, out)
        pt = memoryview(out)[:n]
        plain_hash.update(pt)
        dst.write(pt)
    decryptor.finalize()
    if expected_size is not None and size != expected_size:
        raise _fail(STEP_HMAC, f"blob is truncated: {size} of {expected_size} bytes")
    if not _hmac.compare_digest(mac.finalize(), public.hmac):
        raise _fail(STEP_HMAC, "HMAC mismatch: the ciphertext or its public options were altered")
    actual = f"{alg}:{plain_hash.hexdigest()}"
    if not _hmac.compare_digest(actual, private.digest):
        raise _fail(STEP_DIGEST, f"plaintext digest {actual} differs from {private.digest}")
    return DecryptedLayer(digest=actual, size=size)


def _options(annotations: Mapping[str, str], keys: DecryptionKeys) -> tuple[PrivateOptions, PublicOptions]:
    if ANNOTATION_PUBOPTS not in annotations:
        raise FormatError("ocicrypt public options", "annotation is missing: no cipher type provided")
    for name in (ANNOTATION_PUBOPTS, ANNOTATION_JWE, ANNOTATION_PROVIDER_AA):
        if name in annotations:
            _check_annotation_size(annotations[name], name)
    public = PublicOptions.from_annotation(annotations[ANNOTATION_PUBOPTS])
    return unwrap_private_options(annotations, keys), public


def decrypt_layer(
    src: BinaryIO,
    dst: ByteSink,
    annotations: Mapping[str, str],
    keys: DecryptionKeys,
    *,
    expected_size: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> DecryptedLayer:
    """Decrypt ``src`` into ``dst``: the layer key is unwrapped first, and the HMAC and plaintext
    digest are checked after the last byte. ``dst`` holds unauthenticated plaintext until this
    returns, so it must be a staging place the caller discards when this raises.
    """
    private, public = _options(annotations, keys)
    return _decrypt_stream(src, dst, private, public, expected_size=expected_size, chunk_size=chunk_size)


def decrypt_layer_to_path(
    src: BinaryIO,
    dest: Path,
    annotations: Mapping[str, str],
    keys: DecryptionKeys,
    *,
    expected_size: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> DecryptedLayer:
    """Decrypt into a temporary file beside ``dest``; rename it to ``dest`` only once verified.

    On any failure nothing is left at ``dest`` (an existing file there is not touched).
    """
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=".coffer-decrypt-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            result = decrypt_layer(
                src, out, annotations, keys, expected_size=expected_size, chunk_size=chunk_size
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return result


def decrypt_layer_to_tempfile(
    src: BinaryIO,
    annotations: Mapping[str, str],
    keys: DecryptionKeys,
    *,
    expected_size: int | None = None,
    chunk_size: int = CHUNK_SIZE,
    tmpdir: Path | None = None,
) -> tuple[IO[bytes], DecryptedLayer]:
    """Decrypt into an anonymous temporary file; return it rewound, only once verified.

    The caller owns (and must close) the returned file. On failure it is closed and gone.
    """
    private, public = _options(annotations, keys)  # unwrap before creating anything
    out = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - handed to the caller on success
    try:
        result = _decrypt_stream(
            src, out, private, public, expected_size=expected_size, chunk_size=chunk_size
        )
        out.flush()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out, result
