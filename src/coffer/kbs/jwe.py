"""JWE (RFC 7516) as the KBS wraps resources to a guest's ephemeral key: flattened JSON, A256GCM
content encryption, key management ECDH-ES+A256KW (P-256, P-521) or RSA-OAEP-256.

The KBS side is :func:`encrypt`; the guest side is :class:`TeeKeyPair` (generate, publish the JWK in
the attestation, :meth:`TeeKeyPair.decrypt` the answer).

Interop detail that decides whether a real guest can decrypt: Trustee's guest does not use the
received ``protected`` string for the GCM additional data, it re-serializes the parsed header. So
the header is emitted exactly as Trustee emits it: compact JSON, ``alg`` then ``enc`` then the other
members in sorted order, nested objects with sorted keys, ASCII only.

Failures raise ``ProtocolError("JweError", ...)``; messages never contain key or payload bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from coffer.errors import ProtocolError

ALG_ECDH_ES_A256KW: Final = "ECDH-ES+A256KW"
ALG_RSA_OAEP_256: Final = "RSA-OAEP-256"
ENC_A256GCM: Final = "A256GCM"

KeyKind = Literal["ec-p256", "ec-p521", "rsa-oaep-256"]
KEY_KINDS: Final[tuple[str, ...]] = get_args(KeyKind)

_CEK_BYTES: Final = 32
_IV_BYTES: Final = 12
_TAG_BYTES: Final = 16
_KEK_BITS: Final = 256
_RSA_BITS: Final = 3072
_RSA_MIN_BITS: Final = 2048
_RSA_MAX_BITS: Final = 16384
_MAX_JWE_MEMBER: Final = 64 * 1024 * 1024
_B64URL: Final = re.compile(r"\A[A-Za-z0-9_-]*\Z")


@dataclass(frozen=True)
class _Curve:
    name: str  # JOSE "crv"
    curve: type[ec.EllipticCurve]
    size: int  # coordinate length in bytes


_CURVES: Final = {
    "P-256": _Curve("P-256", ec.SECP256R1, 32),
    "P-521": _Curve("P-521", ec.SECP521R1, 66),
}
_CURVE_BY_SECG: Final = {"secp256r1": _CURVES["P-256"], "secp521r1": _CURVES["P-521"]}
_KIND_CURVE: Final = {"ec-p256": "P-256", "ec-p521": "P-521"}


def _fail(reason: str) -> ProtocolError:
    return ProtocolError("JweError", reason)


def b64url(data: bytes) -> str:
    """Base64url without padding (every binary JOSE member)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: Any, field: str) -> bytes:
    """Strict base64url without padding; ``field`` names the member in the error."""
    if not isinstance(text, str) or not _B64URL.match(text) or len(text) % 4 == 1:
        raise _fail(f"`{field}` is not base64url without padding")
    if len(text) > _MAX_JWE_MEMBER:
        raise _fail(f"`{field}` is too large")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex rules these out
        raise _fail(f"`{field}` is not base64url") from exc


def _uint_b64url(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(length, "big"))


def concat_kdf(shared_secret: bytes, *, algorithm: str, key_bits: int,
               apu: bytes = b"", apv: bytes = b"") -> bytes:
    """Concat KDF of NIST SP 800-56A as JWA (RFC 7518 §4.6.2) uses it, with SHA-256.

    OtherInfo = AlgorithmID ‖ PartyUInfo ‖ PartyVInfo ‖ SuppPubInfo, the first three each prefixed by
    their 32-bit big-endian length, SuppPubInfo being the key length in bits (32-bit big-endian).
    """
    def prefixed(value: bytes) -> bytes:
        return len(value).to_bytes(4, "big") + value

    other_info = (prefixed(algorithm.encode("ascii")) + prefixed(apu) + prefixed(apv)
                  + key_bits.to_bytes(4, "big"))
    return ConcatKDFHash(hashes.SHA256(), key_bits // 8, other_info).derive(shared_secret)


def protected_header(alg: str, enc: str, extras: Mapping[str, Any] | None = None) -> str:
    """The ``protected`` member: base64url of the header in Trustee's canonical form."""
    parts = [f'"alg":{json.dumps(alg)}', f'"enc":{json.dumps(enc)}']
    for name in sorted(extras or {}):
        if name in ("alg", "enc"):
            raise ValueError("alg and enc are not extra header members")
        value = json.dumps((extras or {})[name], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        parts.append(f"{json.dumps(name)}:{value}")
    return b64url(("{" + ",".join(parts) + "}").encode("ascii"))


def _ec_public_from_jwk(jwk: Mapping[str, Any], what: str) -> tuple[_Curve, ec.EllipticCurvePublicKey]:
    crv = jwk.get("crv")
    curve = _CURVES.get(crv) if isinstance(crv, str) else None
    if curve is None:
        raise _fail(f"{what}: unsupported EC curve (P-256 and P-521 are supported)")
    x = b64url_decode(jwk.get("x"), f"{what} x")
    y = b64url_decode(jwk.get("y"), f"{what} y")
    if len(x) != curve.size or len(y) != curve.size:
        raise _fail(f"{what}: {curve.name} coordinates must be {curve.size} bytes")
    try:
        key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                            curve.curve()).public_key()
    except ValueError as exc:
        raise _fail(f"{what}: point is not on {curve.name}") from exc
    return curve, key


def _ec_public_jwk(key: ec.EllipticCurvePublicKey, curve: _Curve) -> dict[str, str]:
    numbers = key.public_numbers()
    return {"crv": curve.name, "kty": "EC", "x": _uint_b64url(numbers.x, curve.size),
            "y": _uint_b64url(numbers.y, curve.size)}


def _rsa_public_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    n = int.from_bytes(b64url_decode(jwk.get("n"), "tee-pubkey n"), "big")
    e = int.from_bytes(b64url_decode(jwk.get("e"), "tee-pubkey e"), "big")
    if not _RSA_MIN_BITS <= n.bit_length() <= _RSA_MAX_BITS:
        raise _fail(f"tee-pubkey: RSA modulus must have {_RSA_MIN_BITS} to {_RSA_MAX_BITS} bits")
    if e < 3 or e % 2 == 0 or e >= n:
        raise _fail("tee-pubkey: invalid RSA public exponent")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise _fail("tee-pubkey: invalid RSA public key") from exc


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _seal(plaintext: bytes, cek: bytes, protected: str, encrypted_key: bytes) -> dict[str, str]:
    iv = os.urandom(_IV_BYTES)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {
        "protected": protected,
        "encrypted_key": b64url(encrypted_key),
        "iv": b64url(iv),
        "ciphertext": b64url(sealed[:-_TAG_BYTES]),
        "tag": b64url(sealed[-_TAG_BYTES:]),
    }


def encrypt(plaintext: bytes, tee_pubkey: Mapping[str, Any]) -> dict[str, str]:
    """Wrap ``plaintext`` to the guest key ``tee_pubkey`` (a JWK as sent in the attestation).

    Returns the flattened JSON serialization Trustee sends (members ``protected``, ``encrypted_key``,
    ``iv``, ``ciphertext``, ``tag``; no ``aad``). Any key other than EC P-256/P-521 with
    ``ECDH-ES+A256KW`` or RSA with ``RSA-OAEP-256`` is refused with ``JweError``.
    """
    if not isinstance(tee_pubkey, Mapping):
        raise _fail("tee-pubkey is not a JWK object")
    kty, alg = tee_pubkey.get("kty"), tee_pubkey.get("alg")
    cek = os.urandom(_CEK_BYTES)
    if kty == "EC" and alg == ALG_ECDH_ES_A256KW:
        curve, peer = _ec_public_from_jwk(tee_pubkey, "tee-pubkey")
        ephemeral = ec.generate_private_key(curve.curve())
        shared = ephemeral.exchange(ec.ECDH(), peer)
        kek = concat_kdf(shared, algorithm=ALG_ECDH_ES_A256KW, key_bits=_KEK_BITS)
        protected = protected_header(ALG_ECDH_ES_A256KW, ENC_A256GCM,
                                     {"epk": _ec_public_jwk(ephemeral.public_key(), curve)})
        return _seal(plaintext, cek, protected, aes_key_wrap(kek, cek))
    if kty == "RSA" and alg == ALG_RSA_OAEP_256:
        public = _rsa_public_from_jwk(tee_pubkey)
        protected = protected_header(ALG_RSA_OAEP_256, ENC_A256GCM)
        return _seal(plaintext, cek, protected, public.encrypt(cek, _oaep()))
    raise _fail("unsupported tee-pubkey: expected EC P-256/P-521 with ECDH-ES+A256KW or RSA with "
                "RSA-OAEP-256")


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    aad: bytes
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes


def _json_header(raw: bytes, what: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(f"{what} is not JSON") from exc
    if not isinstance(header, dict):
        raise _fail(f"{what} is not a JSON object")
    return header


def _parse(jwe: Mapping[str, Any]) -> _Parsed:
    """Accept the flattened serialization (what Trustee sends) and the general one with a single
    recipient; unprotected members are merged into the header, and must not repeat a name."""
    if not isinstance(jwe, Mapping):
        raise _fail("JWE is not a JSON object")
    encrypted_key_member = jwe.get("encrypted_key")
    recipient_header: Any = jwe.get("header")
    if "recipients" in jwe:
        recipients = jwe["recipients"]
        if not isinstance(recipients, list) or len(recipients) != 1 or not isinstance(recipients[0], dict):
            raise _fail("only a single recipient is supported")
        if "header" in jwe or "encrypted_key" in jwe:
            raise _fail("`recipients` mixed with flattened members")
        encrypted_key_member = recipients[0].get("encrypted_key")
        recipient_header = recipients[0].get("header")
    protected = jwe.get("protected")
    header = _json_header(b64url_decode(protected, "protected"), "protected header")
    for extra in (jwe.get("unprotected"), recipient_header):
        if extra is None:
            continue
        if not isinstance(extra, dict):
            raise _fail("unprotected header is not a JSON object")
        if set(extra) & set(header):
            raise _fail("header member repeated between protected and unprotected headers")
        header = {**header, **extra}
    if header.get("enc") != ENC_A256GCM:
        raise _fail("unsupported content encryption (A256GCM is required)")
    for unsupported in ("zip", "crit"):
        if unsupported in header:
            raise _fail(f"header member `{unsupported}` is not supported")
    assert isinstance(protected, str)  # b64url_decode checked it
    aad = protected.encode("ascii")
    if "aad" in jwe:
        extra_aad = jwe["aad"]
        if not isinstance(extra_aad, str) or not _B64URL.match(extra_aad):
            raise _fail("`aad` is not base64url")
        aad += b"." + extra_aad.encode("ascii")
    iv = b64url_decode(jwe.get("iv"), "iv")
    tag = b64url_decode(jwe.get("tag"), "tag")
    if len(iv) != _IV_BYTES:
        raise _fail("A256GCM needs a 96-bit iv")
    if len(tag) != _TAG_BYTES:
        raise _fail("A256GCM needs a 128-bit tag")
    return _Parsed(header=header, aad=aad, encrypted_key=b64url_decode(encrypted_key_member, "encrypted_key"),
                   iv=iv, ciphertext=b64url_decode(jwe.get("ciphertext"), "ciphertext"), tag=tag)


class TeeKeyPair:
    """The guest's ephemeral key pair: its public JWK goes into the attestation's runtime data (and
    hence into the TEE report), its private half decrypts the resources the KBS releases."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            curve = _CURVE_BY_SECG.get(private_key.curve.name)
            if curve is None:
                raise _fail("unsupported EC curve for a TEE key (P-256 and P-521 are supported)")
            self._curve: _Curve | None = curve
            self.kind: KeyKind = "ec-p256" if curve.name == "P-256" else "ec-p521"
        elif isinstance(private_key, rsa.RSAPrivateKey):
            if private_key.key_size < _RSA_MIN_BITS:
                raise _fail(f"RSA TEE keys need at least {_RSA_MIN_BITS} bits")
            self._curve = None
            self.kind = "rsa-oaep-256"
        else:
            raise TypeError("TeeKeyPair needs an EC or RSA private key")
        self._key = private_key

    @classmethod
    def generate(cls, kind: KeyKind = "ec-p256") -> TeeKeyPair:
        if kind == "rsa-oaep-256":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS))
        if kind not in _KIND_CURVE:
            raise ValueError(f"unknown TEE key kind {kind!r} (one of {', '.join(KEY_KINDS)})")
        return cls(ec.generate_private_key(_CURVES[_KIND_CURVE[kind]].curve()))

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        return self._key

    def public_jwk(self) -> dict[str, str]:
        """The guest form Trustee's guest sends: EC ``{kty, crv, alg, x, y}``, RSA ``{kty, alg, n, e}``."""
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            assert self._curve is not None
            numbers = self._key.public_key().public_numbers()
            return {"kty": "EC", "crv": self._curve.name, "alg": ALG_ECDH_ES_A256KW,
                    "x": _uint_b64url(numbers.x, self._curve.size),
                    "y": _uint_b64url(numbers.y, self._curve.size)}
        rsa_numbers = self._key.public_key().public_numbers()
        return {"kty": "RSA", "alg": ALG_RSA_OAEP_256, "n": _uint_b64url(rsa_numbers.n),
                "e": _uint_b64url(rsa_numbers.e)}

    def decrypt(self, jwe: Mapping[str, Any]) -> bytes:
        """Open a flattened-JSON JWE addressed to this key. The GCM additional data is the received
        ``protected`` string (plus ``.aad`` when present), as RFC 7516 says."""
        parsed = _parse(jwe)
        alg = parsed.header.get("alg")
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            assert self._curve is not None
            if alg != ALG_ECDH_ES_A256KW:
                raise _fail("JWE alg does not match this EC key (ECDH-ES+A256KW expected)")
            epk = parsed.header.get("epk")
            if not isinstance(epk, dict) or epk.get("kty") != "EC":
                raise _fail("protected header has no EC `epk`")
            curve, peer = _ec_public_from_jwk(epk, "epk")
            if curve is not self._curve:
                raise _fail("epk curve does not match this key")
            apu = b64url_decode(parsed.header["apu"], "apu") if "apu" in parsed.header else b""
            apv = b64url_decode(parsed.header["apv"], "apv") if "apv" in parsed.header else b""
            kek = concat_kdf(self._key.exchange(ec.ECDH(), peer), algorithm=ALG_ECDH_ES_A256KW,
                             key_bits=_KEK_BITS, apu=apu, apv=apv)
            try:
                cek = aes_key_unwrap(kek, parsed.encrypted_key)
            except (InvalidUnwrap, ValueError) as exc:
                raise _fail("content key does not unwrap (not addressed to this key, or altered)") from exc
        else:
            if alg != ALG_RSA_OAEP_256:
                raise _fail("JWE alg does not match this RSA key (RSA-OAEP-256 expected)")
            try:
                cek = self._key.decrypt(parsed.encrypted_key, _oaep())
            except ValueError as exc:
                raise _fail("content key does not decrypt (not addressed to this key, or altered)") from exc
        if len(cek) != _CEK_BYTES:
            raise _fail("A256GCM needs a 256-bit content key")
        try:
            return AESGCM(cek).decrypt(parsed.iv, parsed.ciphertext + parsed.tag, parsed.aad)
        except InvalidTag as exc:
            raise _fail("authentication tag does not match (ciphertext or header altered)") from exc
