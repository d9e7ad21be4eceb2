"""The KBS admin API: who may change resources, policies and reference values, and the routes doing it.

Authentication is a bearer JWT (``Authorization: Bearer <token>``) signed by one of the admin public
keys of the configuration: Ed25519 keys verify ``EdDSA`` tokens, EC P-256 keys verify ``ES256`` tokens
(raw ``r || s`` JOSE signatures). The check is strict:

* the token is three base64url segments without padding, at most :data:`MAX_TOKEN_BYTES` long, whose
  header and payload are JSON objects without duplicate keys;
* ``alg`` must be one the key accepts (``none``, HMAC and everything else is refused); a ``crit``
  header is refused since no extension is understood;
* ``exp`` is required; ``nbf`` and ``iat`` are checked when present, with :data:`LEEWAY`; a token
  may not live longer than the configured maximum lifetime;
* ``role`` is required and must be one of :data:`ROLES`;
* ``iss`` must equal the configured issuer and ``aud`` must contain the configured audience, when
  those are configured.

A failed authentication answers 401 with the Trustee error type ``AdminAuthAccess`` (and a
``WWW-Authenticate`` header). An authentic token whose role may not call the endpoint answers 403 with
the same error type. Without an ``[admin]`` configuration (or without keys) every admin request is
refused: there is no "insecure allow all" mode.

Authorisation: role ``read-only`` may only read (GET/HEAD); every role is further limited by the
configured path ACLs (regexes matched in full against the request path only; the query string never
takes part, so ``?x=/dev`` cannot satisfy an ACL meant for a path). Without configured ACLs the
defaults are :data:`DEFAULT_ACLS`: ``admin`` everything under ``/kbs/v0/``, ``read-only`` everything
except the plaintext of resources.

Routes (all JSON unless noted; resource bodies are raw bytes)::

    POST|PUT /kbs/v0/resource/<repo>/<type>/<tag>   store a resource (raw body, as Trustee's kbs-client)
    DELETE   /kbs/v0/resource/<repo>/<type>/<tag>   delete it
    GET      /kbs/v0/resources                      {"resources": [paths]}
    GET      /kbs/v0/resources/<repo>/<type>/<tag>  the plaintext (application/octet-stream)
    POST     /kbs/v0/resource-policy                {"policy": b64url(rego)}
    GET      /kbs/v0/resource-policy                {"policy_id", "type", "default", "policy": b64url(rego)}
    POST     /kbs/v0/attestation-policy             {"type": "rego", "policy_id", "policy": b64url(rego)}
    GET      /kbs/v0/attestation-policy             {"policies": {id: "built-in" | "stored"}}
    GET      /kbs/v0/attestation-policy/<id>        {"policy_id", "type", "policy": b64url(rego)}
    POST     /kbs/v0/reference-value                an RVPS message, or {"name", "values", "provenance",
                                                    "expires"}
    GET      /kbs/v0/reference-value[/<name>]       all reference values, or one
    DELETE   /kbs/v0/reference-value/<name>         delete it (?value=V: only that value)
    GET      /kbs/v0/audit                          ?since=&until=&resource=&action=&limit= -> {"events"}

Errors: 400 malformed request, 401 not authenticated, 403 not allowed, 404 absent, 413 too large,
each with a Trustee ErrorInformation body.

Guests read resources with ``GET /kbs/v0/resource/...`` (attestation token, JWE answer); the admin
read of a resource is therefore on the separate ``/kbs/v0/resources/...`` collection.

Every change made through this API is written to the audit log (action ``admin``) with the caller's
role, subject and key id; resource contents and policies never are.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coffer._internal.clock import as_utc, parse_reference_time, utc_now
from coffer._internal.encoding import b64_decode, load_json_object
from coffer.attestation.reference_values import ReferenceValues
from coffer.errors import (
    ConfigError,
    FormatError,
    ProtocolError,
    UsageError,
    VerificationError,
)
from coffer.kbs.config import AdminConfig
from coffer.kbs.protocol import ERROR_TYPE_PREFIX, parse_resource_path
from coffer.kbs.store import AuditEvent, Store

ROLE_ADMIN = "admin"
ROLE_READ_ONLY = "read-only"
ROLES = (ROLE_ADMIN, ROLE_READ_ONLY)
READ_METHODS = frozenset({"GET", "HEAD"})

MAX_TOKEN_BYTES = 8192
_MAX_NUMERIC_DATE = 2**35  # about the year 3058
LEEWAY = timedelta(seconds=30)

DEFAULT_ACLS: tuple[tuple[str, str], ...] = (
    (ROLE_ADMIN, r"^/kbs/v0/.+$"),
    (ROLE_READ_ONLY, r"^/kbs/v0/(?!resources/).+$"),
)

# Algorithms each key type verifies. "Ed25519" is the fully specified name of RFC 9864.
_ED25519_ALGS = frozenset({"EdDSA", "Ed25519"})
_P256_ALGS = frozenset({"ES256"})
_B64URL = re.compile(r"\A[A-Za-z0-9_-]*\Z")

AdminPublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
AdminPrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------------------------------
# Errors


class AdminAuthError(ProtocolError):
    """An admin request was refused. ``status`` is 401 (not authenticated) or 403 (not allowed)."""

    def __init__(self, detail: str, *, status: int = 401) -> None:
        super().__init__("AdminAuthAccess", detail)
        self.status = status


# --------------------------------------------------------------------------------------------------
# Keys and compact JWS


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_strict(segment: str, what: str) -> bytes:
    """Decode unpadded base64url; reject any other alphabet, padding and non-canonical tail bits."""
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise AdminAuthError(f"admin token {what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AdminAuthError(f"admin token {what} is not unpadded base64url") from exc
    if _b64url(raw) != segment:
        raise AdminAuthError(f"admin token {what} is not canonical base64url")
    return raw


def key_algorithms(key: AdminPublicKey) -> frozenset[str]:
    """The JWS ``alg`` values a configured admin key verifies."""
    if isinstance(key, Ed25519PublicKey):
        return _ED25519_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return _P256_ALGS
    raise ConfigError("admin keys must be Ed25519 (EdDSA) or EC P-256 (ES256)")


def load_admin_public_key(pem: bytes, source: str = "admin public key") -> AdminPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{source}: not a PEM public key") from exc
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"{source}: admin keys must be Ed25519 (EdDSA) or EC P-256 (ES256)")


def load_admin_private_key(pem: bytes, source: str = "admin private key") -> AdminPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{source}: not an unencrypted PEM private key") from exc
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UsageError(f"{source}: admin keys must be Ed25519 (EdDSA) or EC P-256 (ES256)")


def generate_admin_key(kind: str = "ed25519") -> AdminPrivateKey:
    """A new admin signing key: ``ed25519`` (EdDSA tokens) or ``p256`` (ES256 tokens)."""
    if kind == "ed25519":
        return Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise UsageError(f"unknown admin key kind {kind!r} (ed25519 or p256)")


def public_jwk(key: AdminPublicKey) -> dict[str, str]:
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    numbers = key.public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big"))}


def key_thumbprint(key: AdminPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default ``kid`` of admin tokens."""
    jwk = public_jwk(key)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode("ascii"))
    return _b64url(digest.finalize())


def _signature_valid(key: AdminPublicKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey) and alg in _ED25519_ALGS:
            if len(signature) != 64:
                return False
            key.verify(signature, signing_input)
            return True
        if isinstance(key, ec.EllipticCurvePublicKey) and alg == "ES256":
            if len(signature) != 64:
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
            return True
    except InvalidSignature:
        return False
    return False


def sign_jwt(private_key: AdminPrivateKey, claims: Mapping[str, Any], *, kid: str | None = None) -> str:
    """A compact JWS over ``claims``: EdDSA for Ed25519 keys, ES256 (raw r||s) for P-256 keys."""
    alg = "EdDSA" if isinstance(private_key, Ed25519PrivateKey) else "ES256"
    header: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode())
                     + "." + _b64url(json.dumps(dict(claims), separators=(",", ":")).encode()))
    if isinstance(private_key, Ed25519PrivateKey):
        signature = private_key.sign(signing_input.encode("ascii"))
    else:
        der = private_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + "." + _b64url(signature)


def mint_admin_token(private_key: AdminPrivateKey, *, role: str, now: datetime | None = None,
                     ttl: timedelta = timedelta(hours=1), issuer: str | None = None,
                     audience: str | Sequence[str] | None = None, subject: str | None = None,
                     kid: str | None = None) -> str:
    """An admin token for ``role`` valid for ``ttl``; ``kid`` defaults to the key's thumbprint."""
    if role not in ROLES:
        raise UsageError(f"unknown admin role {role!r} (one of {', '.join(ROLES)})")
    if ttl <= timedelta(0):
        raise UsageError("admin token lifetime must be positive")
    issued = as_utc(now or utc_now())
    claims: dict[str, Any] = {"role": role, "iat": int(issued.timestamp()),
                              "nbf": int(issued.timestamp()),
                              "exp": int((issued + ttl).timestamp())}
    if issuer:
        claims["iss"] = issuer
    if subject:
        claims["sub"] = subject
    if audience:
        claims["aud"] = audience if isinstance(audience, str) else list(audience)
    return sign_jwt(private_key, claims, kid=kid or key_thumbprint(private_key.public_key()))


# --------------------------------------------------------------------------------------------------
# Authentication and authorisation


@dataclass(frozen=True, kw_only=True)
class AdminIdentity:
    """Who an accepted admin token speaks for (identifying, never secret)."""

    role: str
    key_id: str
    subject: str | None = None
    issuer: str | None = None
    expires_at: datetime | None = None

    def audit_claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "key_id": self.key_id}
        if self.subject is not None:
            out["sub"] = self.subject
        if self.issuer is not None:
            out["iss"] = self.issuer
        return out


@dataclass(frozen=True)
class _Key:
    id: str
    thumbprint: str
    key: AdminPublicKey
    algorithms: frozenset[str]


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> datetime | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise AdminAuthError(f"admin token has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdminAuthError(f"admin token claim {name!r} is not a NumericDate")
    if not 0 <= value <= _MAX_NUMERIC_DATE:  # keeps the leeway arithmetic inside datetime's range
        raise AdminAuthError(f"admin token claim {name!r} is out of range")
    return datetime.fromtimestamp(value, UTC)


class AdminAuth:
    """Checks admin bearer tokens against the ``[admin]`` configuration (``None``: refuse all)."""

    def __init__(self, config: AdminConfig | None, *, leeway: timedelta = LEEWAY) -> None:
        self.config = config
        self.leeway = leeway
        keys: list[_Key] = []
        for item in config.keys if config else ():
            key = load_admin_public_key(item.public_key_pem, item.source or f"admin key {item.id}")
            keys.append(_Key(item.id, key_thumbprint(key), key, key_algorithms(key)))
        self._keys = tuple(keys)
        pairs = [(acl.role, acl.allowed_endpoints) for acl in config.acls] if config else []
        acls: list[tuple[str, re.Pattern[str]]] = []
        for role, pattern in pairs or DEFAULT_ACLS:
            if not pattern.startswith("^/kbs") or not pattern.endswith("$"):
                raise ConfigError(f"admin ACL for role {role!r} must start with '^/kbs' and end with '$'")
            try:
                acls.append((role, re.compile(pattern)))
            except re.error as exc:
                raise ConfigError(f"admin ACL for role {role!r}: bad regex: {exc}") from exc
        self._acls = tuple(acls)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None, *, now: datetime) -> AdminIdentity:
        """Verify the ``Authorization`` header value; raise :class:`AdminAuthError` (401) otherwise."""
        if not self._keys:
            raise AdminAuthError("admin API disabled: no admin keys configured")
        if not authorization:
            raise AdminAuthError("admin token missing (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AdminAuthError("admin token missing (Authorization: Bearer <token>)")
        return self.verify_token(token, now=now)

    def verify_token(self, token: str, *, now: datetime) -> AdminIdentity:
        if len(token) > MAX_TOKEN_BYTES:
            raise AdminAuthError("admin token too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise AdminAuthError("admin token is not a compact JWS")
        header = self._json_segment(parts[0], "header")
        payload = _b64url_strict(parts[1], "payload")
        signature = _b64url_strict(parts[2], "signature")

        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AdminAuthError("admin token header has no 'alg'")
        if alg.lower() == "none":
            raise AdminAuthError("unsigned admin tokens are refused")
        if "crit" in header:
            raise AdminAuthError("admin token header 'crit' is not supported")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() not in ("JWT", "APPLICATION/JWT")):
            raise AdminAuthError("admin token 'typ' is not JWT")
        candidates = [k for k in self._keys if alg in k.algorithms]
        if not candidates:
            raise AdminAuthError(f"admin token algorithm {alg!r} is not accepted by any admin key")
        kid = header.get("kid")
        if isinstance(kid, str):
            named = [k for k in candidates if kid in (k.id, k.thumbprint)]
            candidates = named or candidates
        signing_input = (parts[0] + "." + parts[1]).encode("ascii")
        signer = next((k for k in candidates if _signature_valid(k.key, alg, signing_input, signature)), None)
        if signer is None:
            raise AdminAuthError("admin token signature does not verify with any admin key")

        claims = self._json_bytes(payload, "payload")
        return self._check_claims(claims, signer, now=as_utc(now))

    def _check_claims(self, claims: Mapping[str, Any], signer: _Key, *, now: datetime) -> AdminIdentity:
        assert self.config is not None
        exp = _numeric_date(claims, "exp", required=True)
        assert exp is not None
        nbf = _numeric_date(claims, "nbf", required=False)
        iat = _numeric_date(claims, "iat", required=False)
        if now >= exp + self.leeway:
            raise AdminAuthError("admin token expired")
        if nbf is not None and now < nbf - self.leeway:
            raise AdminAuthError("admin token not valid yet (nbf)")
        if iat is not None and iat > now + self.leeway:
            raise AdminAuthError("admin token issued in the future (iat)")
        start = iat or nbf or now
        if exp - start > self.config.max_token_lifetime:
            raise AdminAuthError("admin token lifetime exceeds the configured maximum")

        issuer = claims.get("iss")
        if issuer is not None and not isinstance(issuer, str):
            raise AdminAuthError("admin token claim 'iss' is not a string")
        if self.config.issuer is not None and issuer != self.config.issuer:
            raise AdminAuthError("admin token issuer is not the configured one")
        if self.config.audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if self.config.audience not in audiences:
                raise AdminAuthError("admin token audience does not include the configured one")
        subject = claims.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise AdminAuthError("admin token claim 'sub' is not a string")

        role = claims.get("role")
        if not isinstance(role, str) or not role:
            raise AdminAuthError("admin token has no 'role' claim")
        if role not in ROLES:
            raise AdminAuthError(f"admin token role {role!r} is not one of {', '.join(ROLES)}", status=403)
        return AdminIdentity(role=role, key_id=signer.id, subject=subject, issuer=issuer, expires_at=exp)

    def authorize(self, identity: AdminIdentity, method: str, target: str) -> None:
        """Raise :class:`AdminAuthError` (403) unless ``identity`` may call ``method target``.

        ACLs are matched against the path alone: anything from a ``?`` on is dropped first."""
        if identity.role == ROLE_READ_ONLY and method.upper() not in READ_METHODS:
            raise AdminAuthError("role 'read-only' may not change anything", status=403)
        path = target.split("?", 1)[0]
        if not any(role == identity.role and pattern.fullmatch(path) for role, pattern in self._acls):
            raise AdminAuthError(f"role {identity.role!r} may not call this endpoint", status=403)

    def check(self, *, method: str, target: str, authorization: str | None, now: datetime) -> AdminIdentity:
        identity = self.authenticate(authorization, now=now)
        self.authorize(identity, method, target)
        return identity

    @staticmethod
    def _json_bytes(raw: bytes, what: str) -> dict[str, Any]:
        try:
            return load_json_object(raw, f"admin token {what}", max_bytes=MAX_TOKEN_BYTES)
        except FormatError as exc:
            raise AdminAuthError(f"admin token {what} is not a JSON object") from exc

    def _json_segment(self, segment: str, what: str) -> dict[str, Any]:
        return self._json_bytes(_b64url_strict(segment, what), what)


# --------------------------------------------------------------------------------------------------
# Routes

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_AUDIT_EVENTS = 10_000
DEFAULT_ATTESTATION_POLICY_ID = "default_cpu"
_CHALLENGE = 'Bearer realm="coffer-kbs-admin"'
_POLICY_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


class _HttpError(Exception):
    """An admin request that cannot be served: answered with ``status`` and an ErrorInformation body."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


def error_response(status: int, kind: str, detail: str, *,
                   headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"type": ERROR_TYPE_PREFIX + kind, "detail": detail}, status_code=status,
                        headers=dict(headers or {}))


class _AttestationAdmin(Protocol):
    """What the admin routes use of :class:`coffer.attestation.service.AttestationService`."""

    @property
    def reference_values(self) -> ReferenceValues: ...

    def set_policy(self, policy_id: str, rego_text: str) -> None: ...

    def get_policy(self, policy_id: str) -> str | None: ...

    def list_policies(self) -> dict[str, str]: ...


class _ResourcesAdmin(Protocol):
    def put(self, path: str, data: bytes) -> None: ...

    def get(self, path: str) -> bytes | None: ...

    def delete(self, path: str) -> bool: ...

    def list(self) -> list[str]: ...


class _ResourcePolicyAdmin(Protocol):
    def get(self) -> str: ...

    def set(self, text: str) -> None: ...

    def is_default(self) -> bool: ...


def _b64_text(value: Any, what: str) -> str:
    """Decode a base64url (or standard base64) policy string to UTF-8 text."""
    if not isinstance(value, str) or not value:
        raise _HttpError(400, "SerdeError", f"{what} must be a non-empty base64url string")
    try:
        return b64_decode(value, what).decode("utf-8")
    except FormatError as exc:
        raise _HttpError(400, "SerdeError", f"{what} is not base64url") from exc
    except UnicodeDecodeError as exc:
        raise _HttpError(400, "SerdeError", f"{what} is not UTF-8 text") from exc


def _time_param(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return parse_reference_time(value)
    except UsageError as exc:
        raise _HttpError(400, "SerdeError", f"query parameter {name!r} is not an ISO-8601 time") from exc


def audit_event_json(event: AuditEvent) -> dict[str, Any]:
    return {"id": event.id, "at": as_utc(event.at).isoformat().replace("+00:00", "Z"),
            "action": event.action, "subject": event.subject, "outcome": event.outcome,
            "detail": event.detail, "claims": event.claims}


Handler = Callable[[Request, AdminIdentity], Awaitable[Response]]


class _AdminApi:
    def __init__(self, *, store: Store, attestation: _AttestationAdmin, resources: _ResourcesAdmin,
                 auth: AdminAuth, clock: Callable[[], datetime], resource_policy: _ResourcePolicyAdmin,
                 max_body_bytes: int) -> None:
        self.store = store
        self.attestation = attestation
        self.resources = resources
        self.auth = auth
        self.clock = clock
        self.resource_policy = resource_policy
        self.max_body_bytes = max_body_bytes

    # -- plumbing ------------------------------------------------------------------------------------

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            target = request.scope["path"]  # ACLs match the path only, never the query string
            try:
                identity = self.auth.authenticate(request.headers.get("authorization"), now=self.clock())
            except AdminAuthError as exc:
                headers = {"WWW-Authenticate": _CHALLENGE} if exc.status == 401 else None
                return error_response(exc.status, exc.kind, exc.detail, headers=headers)
            try:
                self.auth.authorize(identity, request.method, target)
            except AdminAuthError as exc:  # authentic but not allowed: worth a line in the audit log
                await self.audit(identity, request.scope["path"], f"{request.method} refused: {exc.detail}",
                                 outcome="denied")
                return error_response(exc.status, exc.kind, exc.detail)
            try:
                return await handler(request, identity)
            except _HttpError as exc:
                return error_response(exc.status, exc.kind, exc.detail)
            except ProtocolError as exc:  # bad resource path, policy that does not compile...
                return error_response(400, exc.kind, exc.detail)
            except UsageError as exc:
                return error_response(400, "SerdeError", str(exc))
            except FormatError as exc:
                return error_response(400, "SerdeError", str(exc))
        return endpoint

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _HttpError(413, "SerdeError", f"request body exceeds {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _HttpError(413, "SerdeError", f"request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(self, request: Request, what: str) -> dict[str, Any]:
        raw = await self.body(request)
        try:
            return load_json_object(raw, what, max_bytes=self.max_body_bytes)
        except FormatError as exc:
            raise _HttpError(400, "SerdeError", str(exc)) from exc

    async def audit(self, identity: AdminIdentity, subject: str, detail: str, outcome: str = "ok") -> None:
        event = AuditEvent(at=self.clock(), action="admin", subject=subject, outcome=outcome, detail=detail,
                           claims=identity.audit_claims())
        await run_in_threadpool(self.store.append_audit, event)

    @staticmethod
    def resource_path(request: Request) -> str:
        path = str(request.path_params.get("path", ""))
        repo, kind, tag = parse_resource_path(path)
        return f"{repo}/{kind}/{tag}"

    # -- resources -----------------------------------------------------------------------------------

    async def resource_put(self, request: Request, identity: AdminIdentity) -> Response:
        path = self.resource_path(request)
        data = await self.body(request)
        await run_in_threadpool(self.resources.put, path, data)
        await self.audit(identity, path, "resource set")
        return Response(status_code=200)

    async def resource_delete(self, request: Request, identity: AdminIdentity) -> Response:
        path = self.resource_path(request)
        deleted = await run_in_threadpool(self.resources.delete, path)
        if not deleted:
            raise _HttpError(404, "PluginInternalError", "Plugin resource not found")
        await self.audit(identity, path, "resource deleted")
        return Response(status_code=200)

    async def resource_list(self, request: Request, identity: AdminIdentity) -> Response:
        paths = await run_in_threadpool(self.resources.list)
        return JSONResponse({"resources": paths})

    async def resource_read(self, request: Request, identity: AdminIdentity) -> Response:
        path = self.resource_path(request)
        data = await run_in_threadpool(self.resources.get, path)
        if data is None:
            raise _HttpError(404, "PluginInternalError", "Plugin resource not found")
        await self.audit(identity, path, "resource read by admin")
        return Response(data, media_type="application/octet-stream",
                        headers={"Cache-Control": "no-store"})

    # -- policies ------------------------------------------------------------------------------------

    async def resource_policy_set(self, request: Request, identity: AdminIdentity) -> Response:
        body = await self.json_body(request, "resource policy request")
        text = _b64_text(body.get("policy"), "policy")
        self.resource_policy.set(text)
        await self.audit(identity, "resource-policy", "resource policy set")
        return Response(status_code=200)

    async def resource_policy_get(self, request: Request, identity: AdminIdentity) -> Response:
        text = await run_in_threadpool(self.resource_policy.get)
        default = await run_in_threadpool(self.resource_policy.is_default)
        return JSONResponse({"policy_id": "resource-policy", "type": "rego", "default": default,
                             "policy": _b64url(text.encode("utf-8"))})

    async def attestation_policy_set(self, request: Request, identity: AdminIdentity) -> Response:
        body = await self.json_body(request, "attestation policy request")
        kind = body.get("type", "rego")
        if kind != "rego":
            raise _HttpError(400, "PolicyEngineError", "only Rego attestation policies are supported")
        policy_id = body.get("policy_id", DEFAULT_ATTESTATION_POLICY_ID)
        if not isinstance(policy_id, str) or not _POLICY_ID.match(policy_id):
            raise _HttpError(400, "SerdeError", "policy_id must be 1-64 characters of [A-Za-z0-9_.-]")
        text = _b64_text(body.get("policy"), "policy")
        try:
            self.attestation.set_policy(policy_id, text)  # on the loop thread, as above
        except (ProtocolError, FormatError, UsageError, VerificationError, ConfigError) as exc:
            raise _HttpError(400, "PolicyEngineError", _message(exc)) from exc
        await self.audit(identity, f"attestation-policy/{policy_id}", "attestation policy set")
        return Response(status_code=200)

    async def attestation_policy_list(self, request: Request, identity: AdminIdentity) -> Response:
        policies = await run_in_threadpool(self.attestation.list_policies)
        return JSONResponse({"policies": policies})

    async def attestation_policy_get(self, request: Request, identity: AdminIdentity) -> Response:
        policy_id = str(request.path_params["policy_id"])
        if not _POLICY_ID.match(policy_id):
            raise _HttpError(400, "SerdeError", "policy_id must be 1-64 characters of [A-Za-z0-9_.-]")
        try:
            text = await run_in_threadpool(self.attestation.get_policy, policy_id)
        except (ProtocolError, ConfigError, UsageError) as exc:
            raise _HttpError(404, "PolicyEngineError", _message(exc)) from exc
        if text is None:
            raise _HttpError(404, "PolicyEngineError", f"no attestation policy {policy_id!r}")
        return JSONResponse({"policy_id": policy_id, "type": "rego", "policy": _b64url(text.encode("utf-8"))})

    # -- reference values ----------------------------------------------------------------------------

    async def reference_value_add(self, request: Request, identity: AdminIdentity) -> Response:
        body = await self.json_body(request, "reference value request")
        registry = self.attestation.reference_values
        who = identity.subject or identity.key_id
        try:
            if "version" in body or "payload" in body:  # a Trustee RVPS message
                added = await run_in_threadpool(
                    lambda: registry.ingest_rvps(body, source=f"admin:{who}"))
            else:
                added = [await run_in_threadpool(lambda: self._add_typed(registry, body, identity))]
        except (FormatError, UsageError) as exc:
            raise _HttpError(400, "RvpsError", str(exc)) from exc
        for rv in added:
            await self.audit(identity, f"reference-value/{rv.name}", "reference value added")
        return JSONResponse({"reference_values": [rv.to_dict() for rv in added]})

    @staticmethod
    def _add_typed(registry: ReferenceValues, body: Mapping[str, Any], identity: AdminIdentity) -> Any:
        unknown = sorted(set(body) - {"name", "values", "provenance", "expires"})
        if unknown:
            raise _HttpError(400, "RvpsError", f"unknown field(s) {', '.join(unknown)}")
        name = body.get("name")
        values = body.get("values")
        if not isinstance(name, str):
            raise _HttpError(400, "RvpsError", "'name' must be a string")
        if not isinstance(values, list) or not values:
            raise _HttpError(400, "RvpsError", "'values' must be a non-empty list")
        provenance: dict[str, Any] = {"source": "admin", **identity.audit_claims()}
        note = body.get("provenance")
        if isinstance(note, str):
            provenance["note"] = note
        elif isinstance(note, Mapping):
            provenance = {**{str(k): v for k, v in note.items()}, **provenance}
        elif note is not None:
            raise _HttpError(400, "RvpsError", "'provenance' must be a string or an object")
        expires = body.get("expires")
        if expires is not None and not isinstance(expires, str):
            raise _HttpError(400, "RvpsError", "'expires' must be an ISO-8601 time")
        expires_at = parse_reference_time(expires) if expires else None
        return registry.add(name, values, provenance=provenance, expires_at=expires_at)

    async def reference_value_list(self, request: Request, identity: AdminIdentity) -> Response:
        values = await run_in_threadpool(self.attestation.reference_values.list)
        return JSONResponse({"reference_values": [rv.to_dict() for rv in values]})

    async def reference_value_get(self, request: Request, identity: AdminIdentity) -> Response:
        name = str(request.path_params.get("name", ""))
        try:
            found = await run_in_threadpool(self.attestation.reference_values.get, name)
        except FormatError as exc:
            raise _HttpError(400, "RvpsError", str(exc)) from exc
        if found is None:
            raise _HttpError(404, "RvpsError", f"no reference value {name!r}")
        return JSONResponse(found.to_dict())

    async def reference_value_delete(self, request: Request, identity: AdminIdentity) -> Response:
        name = str(request.path_params.get("name", ""))
        value = request.query_params.get("value")
        try:
            removed = await run_in_threadpool(self.attestation.reference_values.delete, name, value)
        except FormatError as exc:
            raise _HttpError(400, "RvpsError", str(exc)) from exc
        if not removed:
            suffix = " with that value" if value else ""
            raise _HttpError(404, "RvpsError", f"no reference value {name!r}{suffix}")
        await self.audit(identity, f"reference-value/{name}",
                         "reference value deleted" if value is None else "one reference value removed")
        return Response(status_code=200)

    # -- audit ---------------------------------------------------------------------------------------

    async def audit_query(self, request: Request, identity: AdminIdentity) -> Response:
        since = _time_param(request, "since")
        until = _time_param(request, "until")
        resource = request.query_params.get("resource") or None
        action = request.query_params.get("action") or None
        limit_text = request.query_params.get("limit", "1000")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_AUDIT_EVENTS:
            raise _HttpError(400, "SerdeError", f"limit must be an integer in 1..{MAX_AUDIT_EVENTS}")

        def query() -> list[AuditEvent]:
            return self.store.query_audit(since=since, until=until, subject=resource, action=action,
                                          limit=int(limit_text))

        events = await run_in_threadpool(query)
        return JSONResponse({"events": [audit_event_json(e) for e in events]})


def _message(exc: Exception) -> str:
    if isinstance(exc, ProtocolError):
        return exc.detail
    return str(exc)


def admin_routes(*, store: Store, attestation: _AttestationAdmin, resources: _ResourcesAdmin,
                 auth: AdminAuth, clock: Callable[[], datetime] = utc_now,
                 resource_policy: _ResourcePolicyAdmin | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> list[Route]:
    """The admin routes, each behind :class:`AdminAuth`. ``resource_policy`` defaults to the
    store-backed :class:`coffer.kbs.resource_policy.ResourcePolicy` every replica reads."""
    if resource_policy is None:
        from coffer.kbs.resource_policy import ResourcePolicy  # noqa: PLC0415  (loads regorus)

        resource_policy = ResourcePolicy(store, clock=clock)
    api = _AdminApi(store=store, attestation=attestation, resources=resources, auth=auth, clock=clock,
                    resource_policy=resource_policy, max_body_bytes=max_body_bytes)
    g = api.guarded
    prefix = "/kbs/v0"
    return [
        Route(f"{prefix}/resource/{{path:path}}", g(api.resource_put), methods=["POST", "PUT"]),
        Route(f"{prefix}/resource/{{path:path}}", g(api.resource_delete), methods=["DELETE"]),
        Route(f"{prefix}/resources", g(api.resource_list), methods=["GET"]),
        Route(f"{prefix}/resources/{{path:path}}", g(api.resource_read), methods=["GET"]),
        Route(f"{prefix}/resource-policy", g(api.resource_policy_set), methods=["POST"]),
        Route(f"{prefix}/resource-policy", g(api.resource_policy_get), methods=["GET"]),
        Route(f"{prefix}/attestation-policy", g(api.attestation_policy_set), methods=["POST"]),
        Route(f"{prefix}/attestation-policy", g(api.attestation_policy_list), methods=["GET"]),
        Route(f"{prefix}/attestation-policy/{{policy_id}}", g(api.attestation_policy_get), methods=["GET"]),
        Route(f"{prefix}/reference-value", g(api.reference_value_add), methods=["POST"]),
        Route(f"{prefix}/reference-value", g(api.reference_value_list), methods=["GET"]),
        Route(f"{prefix}/reference-value/{{name}}", g(api.reference_value_get), methods=["GET"]),
        Route(f"{prefix}/reference-value/{{name}}", g(api.reference_value_delete), methods=["DELETE"]),
        Route(f"{prefix}/audit", g(api.audit_query), methods=["GET"]),
    ]
