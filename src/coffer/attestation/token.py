"""EAR attestation tokens: ES256 JWTs signed by the attestation service, and their verification.

The signing key (ECDSA P-256) lives in the shared store (namespace ``as_keys``), so every replica
signs with the same key and publishes the same JWKS; the first replica to need it generates it
(create-if-absent, so a race leaves exactly one key). The JWS header names the key by ``kid`` (its
RFC 7638 thumbprint) and, as Trustee does, carries the public ``jwk``; a verifier never trusts that
header key by itself, only keys it was configured with.

The TEE's public key (the one resources are wrapped to) is read from the token at Trustee's EAR path
``submods.cpu0["ear.veraison.annotated-evidence"].runtime_data_claims["tee-pubkey"]``
(:func:`tee_pubkey_from_claims`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from coffer._internal.clock import as_utc, utc_now
from coffer.errors import ProtocolError, StorageError
from coffer.kbs.store import NS_KEYS, Store

SIGNING_KEY_NAME = "ear-signing-key"
ALG = "ES256"
MAX_TOKEN_BYTES = 256 * 1024
_COORD = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str = "token") -> bytes:
    if not isinstance(text, str) or any(c in text for c in "+/= \n"):
        raise ProtocolError("TokenVerifierError", f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("TokenVerifierError", f"{what} is not base64url") from exc
    # The decoder skips characters outside the alphabet and ignores the unused low bits of the last
    # character: accept only the one canonical spelling, so a token has a single string form.
    if b64url(raw) != text:
        raise ProtocolError("TokenVerifierError", f"{what} is not canonical base64url")
    return raw


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The JWK of a P-256 public key, with ``kid`` = RFC 7638 thumbprint and ``alg`` ES256."""
    numbers = key.public_numbers()
    x = b64url(numbers.x.to_bytes(_COORD, "big"))
    y = b64url(numbers.y.to_bytes(_COORD, "big"))
    thumbprint = b64url(hashlib.sha256(_compact({"crv": "P-256", "kty": "EC", "x": x, "y": y})).digest())
    return {"kty": "EC", "crv": "P-256", "alg": ALG, "use": "sig", "kid": thumbprint, "x": x, "y": y}


def _key_from_jwk(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey | None:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or jwk.get("alg", ALG) != ALG:
        return None
    try:
        x = int.from_bytes(b64url_decode(str(jwk["x"]), "JWK x"), "big")
        y = int.from_bytes(b64url_decode(str(jwk["y"]), "JWK y"), "big")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except (KeyError, ValueError, ProtocolError):
        return None


class TokenSigner:
    """Issues ES256 JWTs with the attestation service's key (persisted in ``store``)."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utc_now,
                 key_name: str = SIGNING_KEY_NAME) -> None:
        self._store = store
        self._clock = clock
        self._key_name = key_name
        self._lock = threading.Lock()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._jwk: dict[str, str] | None = None
        self._header: bytes = b""

    def _load(self) -> ec.EllipticCurvePrivateKey:
        key = self._key
        if key is not None:
            return key
        with self._lock:
            if self._key is not None:
                return self._key
            now = self._clock()
            entry = self._store.get(NS_KEYS, self._key_name, now=now)
            if entry is None:
                fresh = ec.generate_private_key(ec.SECP256R1())
                pem = fresh.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
                if self._store.create(NS_KEYS, self._key_name, pem, now=now) is None:
                    entry = self._store.get(NS_KEYS, self._key_name, now=now)  # another replica won
                    if entry is None:
                        raise StorageError("token signing key vanished while being created")
            raw = entry.value if entry is not None else pem
            try:
                loaded = serialization.load_pem_private_key(raw, password=None)
            except ValueError as exc:
                raise StorageError("the stored token signing key does not load") from exc
            if not (isinstance(loaded, ec.EllipticCurvePrivateKey)
                    and isinstance(loaded.curve, ec.SECP256R1)):
                raise StorageError("the stored token signing key is not ECDSA P-256")
            jwk = public_jwk(loaded.public_key())
            self._jwk = jwk
            header = {"alg": ALG, "typ": "JWT", "kid": jwk["kid"],
                      "jwk": {k: jwk[k] for k in ("kty", "crv", "alg", "x", "y")}}
            self._header = b64url(_compact(header)).encode("ascii")
            self._key = loaded
            return loaded

    def public_jwk(self) -> dict[str, str]:
        self._load()
        assert self._jwk is not None
        return dict(self._jwk)

    def jwks(self) -> dict[str, Any]:
        """``{"keys": [public JWK]}`` for ``/.well-known/jwks.json``."""
        return {"keys": [self.public_jwk()]}

    def issue(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` as a compact JWS (ES256, raw r||s signature)."""
        key = self._load()
        signing_input = self._header + b"." + b64url(_compact(claims)).encode("ascii")
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")
        return (signing_input + b"." + b64url(signature).encode("ascii")).decode("ascii")


class TokenVerifier:
    """Verifies ES256 tokens against trusted public keys (a JWKS ``{"keys": [...]}``, a list of JWKs
    or one JWK). Only EC P-256 keys are used; a header ``jwk`` is honoured only when it is one of them.
    ``leeway_seconds`` tolerates clock skew for ``exp``/``iat``/``nbf``."""

    def __init__(self, jwks: Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
                 leeway_seconds: int = 0) -> None:
        listed: Any = list(jwks) if not isinstance(jwks, Mapping) else jwks.get("keys", [jwks])
        if not isinstance(listed, list):
            raise ProtocolError("TokenVerifierError", "JWKS 'keys' must be a list")
        self._keys: list[tuple[str | None, ec.EllipticCurvePublicKey, str]] = []
        for jwk in listed:
            if not isinstance(jwk, Mapping):
                continue
            key = _key_from_jwk(jwk)
            if key is None:
                continue
            thumb = public_jwk(key)["kid"]
            kid = jwk.get("kid")
            self._keys.append((kid if isinstance(kid, str) else None, key, thumb))
        self._leeway = leeway_seconds

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def _candidates(self, header: Mapping[str, Any]) -> list[ec.EllipticCurvePublicKey]:
        kid = header.get("kid")
        if isinstance(kid, str):
            found = [k for key_id, k, thumb in self._keys if kid in (key_id, thumb)]
            if found:
                return found
        jwk = header.get("jwk")
        if isinstance(jwk, Mapping):
            key = _key_from_jwk(jwk)
            if key is not None:
                thumb = public_jwk(key)["kid"]
                found = [k for _, k, t in self._keys if t == thumb]
                if found:
                    return found
        if isinstance(kid, str) or isinstance(jwk, Mapping):
            raise ProtocolError("TokenVerifierError", "the token is signed by a key that is not trusted")
        return [k for _, k, _ in self._keys]

    def verify(self, token: str, *, now: datetime) -> dict[str, Any]:
        """The token's claims, after checking the algorithm (ES256 only), the signature by a
        trusted key, ``exp`` (required) and ``iat``/``nbf`` against ``now``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise ProtocolError("TokenVerifierError", "token missing or too large")
        parts = token.strip().split(".")
        if len(parts) != 3:
            raise ProtocolError("TokenVerifierError", "the token is not a compact JWS")
        header = _json_object(b64url_decode(parts[0], "token header"), "token header")
        if header.get("alg") != ALG:
            raise ProtocolError("TokenVerifierError", f"token algorithm {header.get('alg')!r} is not {ALG}")
        if "crit" in header:
            raise ProtocolError("TokenVerifierError", "critical token header extensions are not supported")
        signature = b64url_decode(parts[2], "token signature")
        if len(signature) != 2 * _COORD:
            raise ProtocolError("TokenVerifierError", "ES256 signature must be 64 bytes")
        if not self._keys:
            raise ProtocolError("TokenVerifierError", "no trusted token keys are configured")
        der = encode_dss_signature(int.from_bytes(signature[:_COORD], "big"),
                                   int.from_bytes(signature[_COORD:], "big"))
        signing_input = (parts[0] + "." + parts[1]).encode("ascii")
        for key in self._candidates(header):
            try:
                key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
                break
            except InvalidSignature:
                continue
        else:
            raise ProtocolError("TokenVerifierError", "token signature does not verify")
        claims = _json_object(b64url_decode(parts[1], "token payload"), "token payload")
        moment = as_utc(now).timestamp()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise ProtocolError("TokenVerifierError", "token has no numeric exp")
        if moment >= exp + self._leeway:
            raise ProtocolError("TokenVerifierError", "token expired")
        iat = claims.get("iat")
        if iat is not None and (not _is_number(iat) or iat > moment + self._leeway):
            raise ProtocolError("TokenVerifierError", "token issued in the future")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > moment + self._leeway):
            raise ProtocolError("TokenVerifierError", "token not valid yet")
        return claims


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("TokenVerifierError", f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("TokenVerifierError", f"{what} is not a JSON object")
    return doc


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a token WITHOUT checking anything (for display only)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ProtocolError("TokenVerifierError", "the token is not a compact JWS")
    return _json_object(b64url_decode(parts[1], "token payload"), "token payload")


# JSON pointers Trustee's KBS tries, in order, to find the TEE key in a token.
_TEE_PUBKEY_PATHS: tuple[tuple[str, ...], ...] = (
    ("submods", "cpu0", "ear.veraison.annotated-evidence", "runtime_data_claims", "tee-pubkey"),
    ("tdx", "attester_runtime_data", "tee-pubkey"),
    ("tdx", "attester_user_data", "tee-pubkey"),
    ("customized_claims", "runtime_data", "tee-pubkey"),
    ("tee-pubkey",),
)


def tee_pubkey_from_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The TEE public key (JWK) a verified token carries; TokenVerifierError when there is none."""
    for path in _TEE_PUBKEY_PATHS:
        node: Any = claims
        for step in path:
            if not isinstance(node, Mapping) or step not in node:
                node = None
                break
            node = node[step]
        if isinstance(node, Mapping):
            return dict(node)
    raise ProtocolError("TokenVerifierError", "the token carries no tee-pubkey")
