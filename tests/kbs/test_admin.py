"""Admin API: bearer-JWT authentication (EdDSA/ES256), roles and ACLs, the admin routes, and the
``coffer kbs admin`` / ``coffer kbs audit`` commands."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from coffer._internal.net import free_port
from coffer.attestation.reference_values import ReferenceValues
from coffer.cli import _kbs_admin
from coffer.cli._output import Output
from coffer.errors import CofferError, ConfigError, ProtocolError, UsageError
from coffer.kbs.admin import (
    AdminAuth,
    AdminAuthError,
    AdminIdentity,
    admin_routes,
    key_thumbprint,
    mint_admin_token,
    sign_jwt,
)
from coffer.kbs.config import AdminAcl, AdminConfig, AdminKey
from coffer.kbs.resource_policy import ResourcePolicy
from coffer.kbs.resources import MasterKey, ResourceStore
from coffer.kbs.store import NS_RESOURCES, MemoryStore

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ERR = "https://github.com/confidential-containers/kbs/errors/"
ALLOW_ALL = ("package policy\n\nimport rego.v1\n\ndefault allow := false\n\n"
             "allow if data.plugin == \"resource\"\n")


def _pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return (_b64u(json.dumps(header).encode()) + "." + _b64u(json.dumps(claims).encode())
            + "." + _b64u(signature))


def _claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"role": "admin", "iat": int(NOW.timestamp()) - 10,
                            "exp": int(NOW.timestamp()) + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def ed_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def config(ed_key: Ed25519PrivateKey, p256_key: ec.EllipticCurvePrivateKey) -> AdminConfig:
    return AdminConfig(keys=(AdminKey(id="ops", public_key_pem=_pem(ed_key)),
                             AdminKey(id="ci", public_key_pem=_pem(p256_key))))


@pytest.fixture(scope="module")
def auth(config: AdminConfig) -> AdminAuth:
    return AdminAuth(config)


def _reason(auth: AdminAuth, token: str, now: datetime = NOW) -> AdminAuthError:
    with pytest.raises(AdminAuthError) as caught:
        auth.verify_token(token, now=now)
    return caught.value


# --------------------------------------------------------------------------------------------------
# Token verification


def test_accepts_eddsa_and_es256_tokens(auth: AdminAuth, ed_key: Ed25519PrivateKey,
                                        p256_key: ec.EllipticCurvePrivateKey) -> None:
    ed = auth.verify_token(mint_admin_token(ed_key, role="admin", now=NOW, subject="alice"), now=NOW)
    assert (ed.role, ed.key_id, ed.subject) == ("admin", "ops", "alice")
    es = auth.verify_token(mint_admin_token(p256_key, role="read-only", now=NOW), now=NOW)
    assert (es.role, es.key_id) == ("read-only", "ci")
    assert es.expires_at == NOW + timedelta(hours=1)


def test_authenticate_reads_the_bearer_header(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    token = mint_admin_token(ed_key, role="admin", now=NOW)
    assert auth.authenticate(f"Bearer {token}", now=NOW).role == "admin"
    assert auth.authenticate(f"bearer  {token} ", now=NOW).role == "admin"
    for header in (None, "", "Bearer", f"Basic {token}", token):
        with pytest.raises(AdminAuthError, match="missing"):
            auth.authenticate(header, now=NOW)


def test_rejects_alg_none(auth: AdminAuth) -> None:
    token = _raw_token({"alg": "none", "typ": "JWT"}, _claims(), b"")
    assert "unsigned" in _reason(auth, token).detail
    token = _raw_token({"alg": "NONE"}, _claims(), b"")
    assert "unsigned" in _reason(auth, token).detail


def test_rejects_hs256_signed_with_the_public_key(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    header = _b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64u(json.dumps(_claims()).encode())
    mac = hmac.new(_pem(ed_key), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    error = _reason(auth, f"{header}.{payload}.{_b64u(mac)}")
    assert "not accepted" in error.detail
    assert error.status == 401


def test_rejects_alg_not_matching_the_key_type(auth: AdminAuth, p256_key: ec.EllipticCurvePrivateKey) -> None:
    token = mint_admin_token(p256_key, role="admin", now=NOW)
    _header, payload, sig = token.split(".")
    relabelled = _b64u(json.dumps({"alg": "EdDSA", "kid": "ci"}).encode())
    assert "signature" in _reason(auth, f"{relabelled}.{payload}.{sig}").detail


def test_rejects_flipped_signature_byte(auth: AdminAuth, ed_key: Ed25519PrivateKey,
                                        p256_key: ec.EllipticCurvePrivateKey) -> None:
    for key in (ed_key, p256_key):
        header, payload, sig = mint_admin_token(key, role="admin", now=NOW).split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
        raw[5] ^= 1
        assert "signature" in _reason(auth, f"{header}.{payload}.{_b64u(bytes(raw))}").detail


def test_rejects_altered_payload(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    header, _, sig = mint_admin_token(ed_key, role="read-only", now=NOW).split(".")
    forged = _b64u(json.dumps(_claims(role="admin")).encode())
    assert "signature" in _reason(auth, f"{header}.{forged}.{sig}").detail


def test_rejects_token_of_an_unknown_key(auth: AdminAuth) -> None:
    other = Ed25519PrivateKey.generate()
    assert "signature" in _reason(auth, mint_admin_token(other, role="admin", now=NOW)).detail


def test_rejects_der_encoded_es256_signature(auth: AdminAuth, p256_key: ec.EllipticCurvePrivateKey) -> None:
    header = _b64u(json.dumps({"alg": "ES256"}).encode())
    payload = _b64u(json.dumps(_claims()).encode())
    der = p256_key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    assert "signature" in _reason(auth, f"{header}.{payload}.{_b64u(der)}").detail


def test_kid_naming_another_key_does_not_help(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    token = mint_admin_token(other, role="admin", now=NOW, kid="ops")
    assert "signature" in _reason(auth, token).detail
    # a kid naming the configured id or thumbprint selects that key
    for kid in ("ops", key_thumbprint(ed_key.public_key())):
        token = mint_admin_token(ed_key, role="admin", now=NOW, kid=kid)
        assert auth.verify_token(token, now=NOW).key_id == "ops"


@pytest.mark.parametrize(("claims", "reason"), [
    (_claims(exp=None), "no 'exp'"),
    (_claims(exp="tomorrow"), "NumericDate"),
    (_claims(exp=True), "NumericDate"),
    (_claims(exp=int(NOW.timestamp()) - 31), "expired"),
    (_claims(nbf=int(NOW.timestamp()) + 31), "not valid yet"),
    (_claims(iat=int(NOW.timestamp()) + 31), "future"),
    (_claims(exp=int(NOW.timestamp()) + 25 * 3600), "lifetime"),
    (_claims(exp=253402300799), "out of range"),
    (_claims(exp=10**30), "out of range"),
    (_claims(nbf=-62135596800), "out of range"),
    (_claims(role=None), "no 'role'"),
    (_claims(role=["admin"]), "no 'role'"),
    (_claims(sub=5), "'sub'"),
    (_claims(iss=5), "'iss'"),
])
def test_rejects_bad_claims(auth: AdminAuth, ed_key: Ed25519PrivateKey, claims: dict[str, Any],
                            reason: str) -> None:
    error = _reason(auth, sign_jwt(ed_key, claims))
    assert reason in error.detail
    assert error.status == 401


def test_leeway_accepts_small_clock_skew(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    stamp = int(NOW.timestamp())
    token = sign_jwt(ed_key, _claims(exp=stamp - 20, nbf=stamp + 20, iat=stamp + 20))
    assert auth.verify_token(token, now=NOW).role == "admin"


def test_unknown_role_is_forbidden(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    error = _reason(auth, sign_jwt(ed_key, _claims(role="root")))
    assert error.status == 403


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda t: t + "=", id="padding"),
    pytest.param(lambda t: t.replace(".", "..", 1), id="four-segments"),
    pytest.param(lambda t: t.rsplit(".", 1)[0], id="two-segments"),
    pytest.param(lambda t: "+" + t[1:], id="std-base64-char"),
    pytest.param(lambda t: t + "A" * 9000, id="oversized"),
])
def test_rejects_malformed_compact_form(auth: AdminAuth, ed_key: Ed25519PrivateKey,
                                        mutate: Callable[[str], str]) -> None:
    _reason(auth, mutate(mint_admin_token(ed_key, role="admin", now=NOW)))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), segments=st.lists(st.binary(max_size=120), min_size=3, max_size=3))
def test_random_tokens_only_raise_admin_auth_error(config: AdminConfig, text: str,
                                                   segments: list[bytes]) -> None:
    auth = AdminAuth(config)
    for token in (text, ".".join(_b64u(part) for part in segments)):
        with pytest.raises(AdminAuthError):
            auth.verify_token(token, now=NOW)


def test_rejects_non_canonical_base64_tail_bits(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    header, payload, sig = mint_admin_token(ed_key, role="admin", now=NOW).split(".")
    # 64-byte signature -> 86 chars; the last char carries 2 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tweaked = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert "canonical" in _reason(auth, f"{header}.{payload}.{tweaked}").detail


def test_rejects_duplicate_claim_keys(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    header = _b64u(b'{"alg":"EdDSA"}')
    exp = int(NOW.timestamp()) + 60
    payload = _b64u(f'{{"role":"read-only","role":"admin","exp":{exp}}}'.encode())
    sig = ed_key.sign(f"{header}.{payload}".encode())
    assert "JSON object" in _reason(auth, f"{header}.{payload}.{_b64u(sig)}").detail


def test_rejects_crit_header_and_wrong_typ(auth: AdminAuth, ed_key: Ed25519PrivateKey) -> None:
    for header in ({"alg": "EdDSA", "crit": ["exp"]}, {"alg": "EdDSA", "typ": "at+jwt"}):
        head = _b64u(json.dumps(header).encode())
        payload = _b64u(json.dumps(_claims()).encode())
        sig = ed_key.sign(f"{head}.{payload}".encode())
        _reason(auth, f"{head}.{payload}.{_b64u(sig)}")


def test_issuer_and_audience_enforced_when_configured(ed_key: Ed25519PrivateKey) -> None:
    strict = AdminAuth(AdminConfig(keys=(AdminKey(id="ops", public_key_pem=_pem(ed_key)),),
                                   issuer="coffer-admin", audience="coffer-kbs"))
    good = mint_admin_token(ed_key, role="admin", now=NOW, issuer="coffer-admin",
                            audience=["x", "coffer-kbs"])
    assert strict.verify_token(good, now=NOW).issuer == "coffer-admin"
    assert strict.verify_token(mint_admin_token(ed_key, role="admin", now=NOW, issuer="coffer-admin",
                                                audience="coffer-kbs"), now=NOW)
    assert "issuer" in _reason(strict, mint_admin_token(ed_key, role="admin", now=NOW,
                                                         audience="coffer-kbs")).detail
    assert "issuer" in _reason(strict, mint_admin_token(ed_key, role="admin", now=NOW, issuer="evil",
                                                         audience="coffer-kbs")).detail
    assert "audience" in _reason(strict, mint_admin_token(ed_key, role="admin", now=NOW,
                                                           issuer="coffer-admin")).detail


def test_no_admin_config_refuses_everything(ed_key: Ed25519PrivateKey) -> None:
    token = mint_admin_token(ed_key, role="admin", now=NOW)
    for auth in (AdminAuth(None), AdminAuth(AdminConfig(keys=()))):
        assert not auth.enabled
        with pytest.raises(AdminAuthError, match="disabled"):
            auth.authenticate(f"Bearer {token}", now=NOW)


def test_bad_key_configuration_fails_at_start() -> None:
    rsa_pem = b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ConfigError):
        AdminAuth(AdminConfig(keys=(AdminKey(id="x", public_key_pem=rsa_pem),)))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="P-256"):
        AdminAuth(AdminConfig(keys=(AdminKey(id="x", public_key_pem=_pem(p384)),)))
    with pytest.raises(ConfigError, match="start"):
        AdminAuth(AdminConfig(keys=(), acls=(AdminAcl(role="admin", allowed_endpoints=".*"),)))


def test_jwcrypto_tokens_verify_and_ours_verify_in_jwcrypto(auth: AdminAuth, ed_key: Ed25519PrivateKey,
                                                            p256_key: ec.EllipticCurvePrivateKey) -> None:
    jwk_mod = pytest.importorskip("jwcrypto.jwk")
    jwt_mod = pytest.importorskip("jwcrypto.jwt")
    for key, alg in ((ed_key, "EdDSA"), (p256_key, "ES256")):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        jwk = jwk_mod.JWK.from_pem(pem)
        theirs = jwt_mod.JWT(header={"alg": alg, "typ": "JWT"}, claims=_claims(sub="jwcrypto"))
        theirs.make_signed_token(jwk)
        assert auth.verify_token(theirs.serialize(), now=NOW).subject == "jwcrypto"
        ours = mint_admin_token(key, role="admin", now=datetime.now(UTC))
        checked = jwt_mod.JWT(jwt=ours, key=jwk, algs=[alg])
        assert json.loads(checked.claims)["role"] == "admin"


# --------------------------------------------------------------------------------------------------
# Authorisation


def _identity(role: str) -> AdminIdentity:
    return AdminIdentity(role=role, key_id="ops")


def test_default_acls(auth: AdminAuth) -> None:
    auth.authorize(_identity("admin"), "POST", "/kbs/v0/resource/a/b/c")
    auth.authorize(_identity("admin"), "GET", "/kbs/v0/resources/a/b/c")
    auth.authorize(_identity("read-only"), "GET", "/kbs/v0/resources")
    auth.authorize(_identity("read-only"), "GET", "/kbs/v0/audit?resource=a/b/c")
    with pytest.raises(AdminAuthError, match="read-only") as caught:
        auth.authorize(_identity("read-only"), "POST", "/kbs/v0/resource-policy")
    assert caught.value.status == 403
    with pytest.raises(AdminAuthError, match="may not call"):
        auth.authorize(_identity("read-only"), "GET", "/kbs/v0/resources/a/b/c")  # plaintext
    with pytest.raises(AdminAuthError):
        auth.authorize(_identity("admin"), "GET", "/other")


def test_configured_acls_replace_the_defaults(ed_key: Ed25519PrivateKey) -> None:
    limited = AdminAuth(AdminConfig(keys=(AdminKey(id="ops", public_key_pem=_pem(ed_key)),), acls=(
        AdminAcl(role="admin", allowed_endpoints=r"^/kbs/v0/resource/team-a/.+$"),
        AdminAcl(role="read-only", allowed_endpoints=r"^/kbs/v0/audit(\?.*)?$"))))
    limited.authorize(_identity("admin"), "POST", "/kbs/v0/resource/team-a/key/one")
    with pytest.raises(AdminAuthError):
        limited.authorize(_identity("admin"), "POST", "/kbs/v0/resource/team-b/key/one")
    with pytest.raises(AdminAuthError):
        limited.authorize(_identity("admin"), "POST", "/kbs/v0/resource-policy")
    limited.authorize(_identity("read-only"), "GET", "/kbs/v0/audit?since=x")
    with pytest.raises(AdminAuthError):
        limited.authorize(_identity("read-only"), "GET", "/kbs/v0/resources")


# --------------------------------------------------------------------------------------------------
# Routes


class FakeAttestation:
    """The AttestationService surface the admin routes use."""

    def __init__(self, store: MemoryStore, clock: Callable[[], datetime]) -> None:
        self.reference_values = ReferenceValues(store, clock=clock)
        self.policies: dict[str, str] = {}

    def set_policy(self, policy_id: str, rego_text: str) -> None:
        if "package policy" not in rego_text:
            raise ProtocolError("PolicyEngineError", "policy does not compile")
        self.policies[policy_id] = rego_text

    def get_policy(self, policy_id: str) -> str | None:
        return self.policies.get(policy_id)

    def list_policies(self) -> dict[str, str]:
        return {"default": "built-in", **dict.fromkeys(self.policies, "stored")}


class AsgiBridge(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app (starlette's TestClient wants httpx2)."""

    def __init__(self, app: Starlette) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def forward() -> httpx.Response:
            inner = httpx.Request(request.method, request.url, headers=request.headers,
                                  content=request.read())
            answer = await self._inner.handle_async_request(inner)
            body = await answer.aread()
            return httpx.Response(answer.status_code, headers=answer.headers, content=body)

        return self._loop.run_until_complete(forward())

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        self._loop.close()


class Kbs:
    def __init__(self, config: AdminConfig) -> None:
        self.now = NOW
        self.store = MemoryStore()
        self.resources = ResourceStore(self.store, MasterKey.generate())
        self.attestation = FakeAttestation(self.store, lambda: self.now)
        self.resource_policy = ResourcePolicy(self.store, clock=lambda: self.now)
        self.app = Starlette(routes=admin_routes(store=self.store, attestation=self.attestation,
                                                 resources=self.resources, auth=AdminAuth(config),
                                                 clock=lambda: self.now, resource_policy=self.resource_policy,
                                                 max_body_bytes=4096))
        self.bridge = AsgiBridge(self.app)

    def client(self, base_url: str = "http://kbs") -> httpx.Client:
        return httpx.Client(transport=self.bridge, base_url=base_url)


@pytest.fixture
def kbs(config: AdminConfig) -> Iterator[Kbs]:
    service = Kbs(config)
    yield service
    service.bridge.shutdown()


@pytest.fixture
def client(kbs: Kbs) -> Iterator[httpx.Client]:
    with kbs.client() as test_client:
        yield test_client


def _h(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, role: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_admin_token(key, role=role, now=NOW, subject='alice')}"}


def test_unauthenticated_requests_get_401_with_trustee_body(client: httpx.Client) -> None:
    for method, path in (("POST", "/kbs/v0/resource/a/b/c"), ("GET", "/kbs/v0/resources"),
                         ("POST", "/kbs/v0/resource-policy"), ("GET", "/kbs/v0/audit"),
                         ("DELETE", "/kbs/v0/reference-value/x")):
        response = client.request(method, path, headers={"Authorization": "Bearer e30.e30.AA"})
        assert response.status_code == 401, path
        assert response.json()["type"] == ERR + "AdminAuthAccess"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_expired_token_is_401(client: httpx.Client, kbs: Kbs, ed_key: Ed25519PrivateKey) -> None:
    headers = _h(ed_key)
    kbs.now = NOW + timedelta(hours=2)
    assert client.get("/kbs/v0/resources", headers=headers).status_code == 401


def test_resource_round_trip_sealed_and_audited(client: httpx.Client, kbs: Kbs,
                                                ed_key: Ed25519PrivateKey) -> None:
    secret = b"correct horse battery staple"
    put = client.post("/kbs/v0/resource/repo/key/one", content=secret, headers=_h(ed_key))
    assert put.status_code == 200
    stored = kbs.store.get(NS_RESOURCES, "repo/key/one", now=NOW)
    assert stored is not None
    assert secret not in stored.value
    assert client.get("/kbs/v0/resources", headers=_h(ed_key)).json() == {"resources": ["repo/key/one"]}
    got = client.get("/kbs/v0/resources/repo/key/one", headers=_h(ed_key))
    assert got.content == secret
    assert got.headers["content-type"] == "application/octet-stream"
    assert client.delete("/kbs/v0/resource/repo/key/one", headers=_h(ed_key)).status_code == 200
    missing = client.delete("/kbs/v0/resource/repo/key/one", headers=_h(ed_key))
    assert missing.status_code == 404
    assert client.get("/kbs/v0/resources/repo/key/one", headers=_h(ed_key)).status_code == 404
    events = kbs.store.query_audit(subject="repo/key/one")
    assert [e.detail for e in events] == ["resource set", "resource read by admin", "resource deleted"]
    assert all(e.action == "admin" and e.claims == {"role": "admin", "key_id": "ops", "sub": "alice"}
               for e in events)
    assert all(b"horse" not in json.dumps(e.claims).encode() and "horse" not in e.detail for e in events)


def test_read_only_role(client: httpx.Client, kbs: Kbs, p256_key: ec.EllipticCurvePrivateKey) -> None:
    kbs.resources.put("repo/key/one", b"s")
    ro = _h(p256_key, "read-only")
    assert client.get("/kbs/v0/resources", headers=ro).status_code == 200
    for method, path in (("POST", "/kbs/v0/resource/repo/key/two"),
                         ("DELETE", "/kbs/v0/resource/repo/key/one"),
                         ("GET", "/kbs/v0/resources/repo/key/one")):
        response = client.request(method, path, headers=ro, content=b"x" if method == "POST" else None)
        assert response.status_code == 403, path
        assert response.json()["type"] == ERR + "AdminAuthAccess"
    assert kbs.resources.list() == ["repo/key/one"]
    refusals = kbs.store.query_audit(action="admin")
    assert [(e.subject, e.outcome) for e in refusals] == [
        ("/kbs/v0/resource/repo/key/two", "denied"), ("/kbs/v0/resource/repo/key/one", "denied"),
        ("/kbs/v0/resources/repo/key/one", "denied")]
    assert refusals[0].claims["role"] == "read-only"


def test_acls_match_the_path_not_the_query_string(ed_key: Ed25519PrivateKey) -> None:
    # An ACL for ".../dev" paths used to be satisfied by any path with "?x=/dev" appended.
    limited = Kbs(AdminConfig(keys=(AdminKey(id="ops", public_key_pem=_pem(ed_key)),), acls=(
        AdminAcl(role="admin", allowed_endpoints=r"^/kbs/v0/resource/.*/dev$"),)))
    try:
        limited.resources.put("default/key/one", b"original")
        with limited.client() as c:
            for method, target in (("POST", "/kbs/v0/resource/default/key/one?x=/dev"),
                                   ("PUT", "/kbs/v0/resource/default/key/one?/dev"),
                                   ("DELETE", "/kbs/v0/resource/default/key/one?/dev")):
                response = c.request(method, target, content=b"evil" if method != "DELETE" else None,
                                     headers=_h(ed_key))
                assert response.status_code == 403, target
            assert limited.resources.get("default/key/one") == b"original"
            allowed = c.post("/kbs/v0/resource/default/key/dev?anything", content=b"ok", headers=_h(ed_key))
            assert allowed.status_code == 200
    finally:
        limited.bridge.shutdown()
    auth = AdminAuth(AdminConfig(keys=(AdminKey(id="ops", public_key_pem=_pem(ed_key)),), acls=(
        AdminAcl(role="admin", allowed_endpoints=r"^/kbs/v0/resource/.*/dev$"),)))
    with pytest.raises(AdminAuthError):
        auth.authorize(_identity("admin"), "POST", "/kbs/v0/resource/default/key/one?x=/dev")


def test_guest_resource_get_is_not_an_admin_route(client: httpx.Client, ed_key: Ed25519PrivateKey) -> None:
    assert client.get("/kbs/v0/resource/repo/key/one", headers=_h(ed_key)).status_code == 405


@pytest.mark.parametrize("path", ["a/b", "a/b/c/d", ".a/b/c", "a/b/c%20d"])
def test_bad_resource_path_is_400(client: httpx.Client, ed_key: Ed25519PrivateKey, path: str) -> None:
    response = client.post(f"/kbs/v0/resource/{path}", content=b"x", headers=_h(ed_key))
    assert response.status_code == 400
    assert response.json()["type"] == ERR + "PluginInternalError"


def test_oversized_body_is_413(client: httpx.Client, ed_key: Ed25519PrivateKey) -> None:
    response = client.post("/kbs/v0/resource/a/b/c", content=b"x" * 5000, headers=_h(ed_key))
    assert response.status_code == 413


def _b64_policy(text: str) -> str:
    return _b64u(text.encode())


def test_resource_policy_set_and_get(client: httpx.Client, kbs: Kbs, ed_key: Ed25519PrivateKey) -> None:
    first = client.get("/kbs/v0/resource-policy", headers=_h(ed_key)).json()
    assert first["default"] is True
    bad = client.post("/kbs/v0/resource-policy", json={"policy": _b64_policy("package policy\nallow if {")},
                      headers=_h(ed_key))
    assert bad.status_code == 400
    assert bad.json()["type"] == ERR + "PolicyEngineError"
    ok = client.post("/kbs/v0/resource-policy", json={"policy": _b64_policy(ALLOW_ALL)}, headers=_h(ed_key))
    assert ok.status_code == 200
    got = client.get("/kbs/v0/resource-policy", headers=_h(ed_key)).json()
    assert got["default"] is False
    # the engine compiled by the admin route is usable on the app's thread (regorus engines are
    # bound to the thread that made them)
    assert kbs.resource_policy.allows({"submods": {}}, resource_path=("a", "b", "c"))
    assert base64.urlsafe_b64decode(got["policy"] + "==").decode() == ALLOW_ALL
    for body in ({}, {"policy": 5}, {"policy": "!!"}):
        assert client.post("/kbs/v0/resource-policy", json=body, headers=_h(ed_key)).status_code == 400
    assert client.post("/kbs/v0/resource-policy", content=b"{", headers=_h(ed_key)).status_code == 400


def test_attestation_policy_set_and_get(client: httpx.Client, kbs: Kbs, ed_key: Ed25519PrivateKey) -> None:
    rego = "package policy\n"
    body = {"type": "rego", "policy_id": "default_cpu", "policy": _b64_policy(rego)}
    assert client.post("/kbs/v0/attestation-policy", json=body, headers=_h(ed_key)).status_code == 200
    assert kbs.attestation.policies == {"default_cpu": rego}
    got = client.get("/kbs/v0/attestation-policy/default_cpu", headers=_h(ed_key)).json()
    assert got["policy_id"] == "default_cpu"
    listed = client.get("/kbs/v0/attestation-policy", headers=_h(ed_key)).json()
    assert listed == {"policies": {"default": "built-in", "default_cpu": "stored"}}
    assert client.get("/kbs/v0/attestation-policy/other", headers=_h(ed_key)).status_code == 404
    for bad in ({**body, "type": "opa"}, {**body, "policy_id": "../x"},
                {**body, "policy": _b64_policy("nonsense")}):
        response = client.post("/kbs/v0/attestation-policy", json=bad, headers=_h(ed_key))
        assert response.status_code == 400, bad


def test_reference_values(client: httpx.Client, kbs: Kbs, ed_key: Ed25519PrivateKey) -> None:
    measurement = "ab" * 48
    added = client.post("/kbs/v0/reference-value", headers=_h(ed_key), json={
        "name": "measurement", "values": [measurement.upper()], "provenance": "release 1.2",
        "expires": "2026-06-01T00:00:00Z"})
    assert added.status_code == 200, added.text
    record = added.json()["reference_values"][0]["values"][0]
    assert record["value"] == measurement
    assert record["provenance"]["note"] == "release 1.2"
    assert record["provenance"]["sub"] == "alice"
    assert record["expires_at"] == "2026-06-01T00:00:00Z"

    payload = base64.b64encode(json.dumps({"svn": ["1"]}).encode()).decode()
    rvps = client.post("/kbs/v0/reference-value", headers=_h(ed_key),
                       json={"version": "0.1.0", "type": "sample", "payload": payload})
    assert rvps.status_code == 200, rvps.text
    names = [rv["name"] for rv in client.get("/kbs/v0/reference-value", headers=_h(ed_key)).json()
             ["reference_values"]]
    assert names == ["measurement", "svn"]
    assert client.get("/kbs/v0/reference-value/svn", headers=_h(ed_key)).json()["values"][0]["value"] == 1

    for bad in ({"name": "measurement", "values": ["abcd"]}, {"name": "measurement", "values": []},
                {"name": "measurement", "values": [measurement], "colour": "red"},
                {"version": "9.9", "type": "sample", "payload": payload},
                {"name": "measurement", "values": [measurement], "expires": "2020-01-01T00:00:00Z"}):
        response = client.post("/kbs/v0/reference-value", json=bad, headers=_h(ed_key))
        assert response.status_code == 400, bad
        assert response.json()["type"] == ERR + "RvpsError"

    assert client.delete("/kbs/v0/reference-value/svn", headers=_h(ed_key)).status_code == 200
    assert client.get("/kbs/v0/reference-value/svn", headers=_h(ed_key)).status_code == 404
    assert client.delete("/kbs/v0/reference-value/svn", headers=_h(ed_key)).status_code == 404
    assert [e.subject for e in kbs.store.query_audit(action="admin")] == [
        "reference-value/measurement", "reference-value/svn", "reference-value/svn"]


def test_audit_query(client: httpx.Client, kbs: Kbs, ed_key: Ed25519PrivateKey,
                     p256_key: ec.EllipticCurvePrivateKey) -> None:
    for minute, path in enumerate(("a/b/c", "a/b/d", "a/b/c")):
        kbs.now = NOW + timedelta(minutes=minute)
        client.post(f"/kbs/v0/resource/{path}", content=b"v", headers=_h(ed_key))
    ro = _h(p256_key, "read-only")
    everything = client.get("/kbs/v0/audit", headers=ro).json()["events"]
    assert [e["subject"] for e in everything] == ["a/b/c", "a/b/d", "a/b/c"]
    assert everything[0]["at"] == "2026-03-01T12:00:00Z"
    only_c = client.get("/kbs/v0/audit", params={"resource": "a/b/c"}, headers=ro).json()["events"]
    assert len(only_c) == 2
    later = client.get("/kbs/v0/audit", params={"since": "2026-03-01T12:01:00Z"}, headers=ro).json()["events"]
    assert [e["subject"] for e in later] == ["a/b/d", "a/b/c"]
    span = {"since": "2026-03-01T12:00:30Z", "until": "2026-03-01T12:01:30Z"}
    window = client.get("/kbs/v0/audit", params=span, headers=ro).json()["events"]
    assert [e["subject"] for e in window] == ["a/b/d"]
    assert len(client.get("/kbs/v0/audit", params={"limit": "1"}, headers=ro).json()["events"]) == 1
    for params in ({"since": "yesterday"}, {"limit": "0"}, {"limit": "x"}):
        assert client.get("/kbs/v0/audit", params=params, headers=ro).status_code == 400


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    from coffer.cli import _Parser

    parser = _Parser(prog="coffer")
    groups = parser.add_subparsers(dest="group", parser_class=_Parser)
    _kbs_admin.register(groups)
    return parser


def run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    code: int = args.handler(args, Output(json_mode="--json" in argv))
    return code


def test_register_joins_an_existing_kbs_group() -> None:
    from coffer.cli import _Parser

    parser = _Parser(prog="coffer")
    groups = parser.add_subparsers(dest="group", parser_class=_Parser)
    kbs = groups.add_parser("kbs")
    kbs.add_subparsers(dest="kbs_command").add_parser("serve")
    _kbs_admin.register(groups)
    assert parser.parse_args(["kbs", "admin", "keygen"]).handler is _kbs_admin.run_keygen
    assert parser.parse_args(["kbs", "audit", "--kbs", "http://x"]).handler is _kbs_admin.run_audit


@pytest.mark.parametrize("admin_first", [True, False])
def test_register_with_the_server_commands_in_either_order(admin_first: bool) -> None:
    from coffer.cli import _kbs, _Parser

    parser = _Parser(prog="coffer")
    groups = parser.add_subparsers(dest="group", parser_class=_Parser)
    for module in ((_kbs_admin, _kbs) if admin_first else (_kbs, _kbs_admin)):
        module.register(groups)
    assert parser.parse_args(["kbs", "serve"]).handler is _kbs.run_serve
    assert parser.parse_args(["kbs", "admin", "resource", "list"]).handler is _kbs_admin.run_resource_list


def test_keygen_and_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["kbs", "admin", "keygen", "--out-dir", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    private = tmp_path / "admin.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="exists"):
        run_cli(["kbs", "admin", "keygen", "--out-dir", str(tmp_path)])

    pem = (tmp_path / "admin.pub").read_bytes()
    auth = AdminAuth(AdminConfig(keys=(AdminKey(id="admin", public_key_pem=pem),)))
    assert run_cli(["kbs", "admin", "token", "--key", str(private), "--role", "read-only",
                    "--ttl", "10m"]) == 0
    token = capsys.readouterr().out.strip()
    identity = auth.verify_token(token, now=datetime.now(UTC))
    assert identity.role == "read-only"
    assert identity.expires_at is not None
    assert identity.expires_at - datetime.now(UTC) <= timedelta(minutes=10)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": info["kid"]}

    assert run_cli(["kbs", "admin", "keygen", "--out-dir", str(tmp_path), "--name", "ci",
                    "--kind", "p256"]) == 0
    capsys.readouterr()
    out_file = tmp_path / "token"
    assert run_cli(["kbs", "admin", "token", "--key", str(tmp_path / "ci.key"), "--role", "admin",
                    "--out", str(out_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == out_file.read_text().strip()
    assert json.loads(base64.urlsafe_b64decode(out_file.read_text().split(".")[0] + "=="))["alg"] == "ES256"

    with pytest.raises(UsageError, match="duration"):
        run_cli(["kbs", "admin", "token", "--key", str(private), "--role", "admin", "--ttl", "soon"])
    with pytest.raises(UsageError, match="private key"):
        run_cli(["kbs", "admin", "token", "--key", str(tmp_path / "admin.pub"), "--role", "admin"])


@pytest.fixture
def cli_kbs(kbs: Kbs, ed_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> Kbs:
    """The CLI's HTTP client replaced by an in-process client of the admin app."""
    monkeypatch.setattr(_kbs_admin, "_http_client",
                        lambda args: kbs.client(_kbs_admin._base_url(args)))
    monkeypatch.setenv(_kbs_admin.TOKEN_ENV, mint_admin_token(ed_key, role="admin", now=NOW))
    monkeypatch.setenv(_kbs_admin.URL_ENV, "http://kbs.test")
    return kbs


def test_cli_resources(cli_kbs: Kbs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00top secret\xff")
    assert run_cli(["kbs", "admin", "resource", "put", "kbs:///repo/key/one", str(secret), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 12
    assert run_cli(["kbs", "admin", "resource", "list"]) == 0
    assert capsys.readouterr().out == "repo/key/one\n"

    assert run_cli(["kbs", "admin", "resource", "get", "repo/key/one", "--json"]) == 0
    shown = capsys.readouterr().out
    assert "top secret" not in shown
    assert json.loads(shown)["size"] == 12
    copy = tmp_path / "copy.bin"
    assert run_cli(["kbs", "admin", "resource", "get", "repo/key/one", "--out", str(copy)]) == 0
    assert copy.read_bytes() == secret.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600

    assert run_cli(["kbs", "admin", "resource", "delete", "repo/key/one"]) == 0
    with pytest.raises(ProtocolError, match="404"):
        run_cli(["kbs", "admin", "resource", "delete", "repo/key/one"])
    with pytest.raises(UsageError, match="REPO/TYPE/TAG"):
        run_cli(["kbs", "admin", "resource", "put", "repo/key", str(secret)])


def test_cli_policies_reference_values_and_audit(cli_kbs: Kbs, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rego = tmp_path / "p.rego"
    rego.write_text(ALLOW_ALL)
    assert run_cli(["kbs", "admin", "policy", "set", "resource", str(rego)]) == 0
    capsys.readouterr()
    assert run_cli(["kbs", "admin", "policy", "get", "resource"]) == 0
    assert capsys.readouterr().out == ALLOW_ALL
    assert run_cli(["kbs", "admin", "policy", "set", "attestation", str(rego), "--id", "default_cpu"]) == 0
    assert cli_kbs.attestation.policies["default_cpu"] == ALLOW_ALL
    capsys.readouterr()
    assert run_cli(["kbs", "admin", "policy", "get", "attestation", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == ALLOW_ALL

    assert run_cli(["kbs", "admin", "reference-value", "add", "mr_td", "cd" * 48, "--provenance", "build 7",
                    "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference_values"][0]["name"] == "mr_td"
    rvps = tmp_path / "rvps.json"
    payload = base64.b64encode(json.dumps({"launch_digest": ["00ff"]}).encode()).decode()
    rvps.write_text(json.dumps({"version": "0.1.0", "type": "sample", "payload": payload}))
    assert run_cli(["kbs", "admin", "reference-value", "add", "--rvps", str(rvps)]) == 0
    capsys.readouterr()
    assert run_cli(["kbs", "admin", "reference-value", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["reference_values"]
    assert [rv["name"] for rv in listed] == ["launch_digest", "mr_td"]
    assert run_cli(["kbs", "admin", "reference-value", "delete", "mr_td"]) == 0
    with pytest.raises(ProtocolError, match="RvpsError"):
        run_cli(["kbs", "admin", "reference-value", "add", "mr_td", "zz"])
    capsys.readouterr()

    assert run_cli(["kbs", "audit", "--json", "--since", "2026-03-01T00:00:00Z"]) == 0
    events = json.loads(capsys.readouterr().out)["events"]
    assert [e["subject"] for e in events] == ["resource-policy", "attestation-policy/default_cpu",
                                              "reference-value/mr_td", "reference-value/launch_digest",
                                              "reference-value/mr_td"]
    assert run_cli(["kbs", "audit", "--resource", "resource-policy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "admin ok resource-policy (resource policy set) role=admin" in lines[0]


def test_cli_needs_token_and_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(_kbs_admin.TOKEN_ENV, raising=False)
    monkeypatch.delenv(_kbs_admin.URL_ENV, raising=False)
    with pytest.raises(UsageError, match="no admin token"):
        run_cli(["kbs", "admin", "resource", "list", "--kbs", "http://127.0.0.1:9"])
    with pytest.raises(UsageError, match="no KBS URL"):
        run_cli(["kbs", "admin", "resource", "list", "--token", "x"])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        run_cli(["kbs", "admin", "resource", "list", "--token-file", str(empty), "--kbs", "http://x"])


def test_cli_over_real_http(kbs: Kbs, ed_key: Ed25519PrivateKey, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The admin commands against the routes served by uvicorn on 127.0.0.1."""
    uvicorn = pytest.importorskip("uvicorn")
    kbs.now = datetime.now(UTC)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(kbs.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        token_file = tmp_path / "token"
        token_file.write_text(mint_admin_token(ed_key, role="admin") + "\n")
        url = f"http://127.0.0.1:{port}"
        secret = tmp_path / "s"
        secret.write_bytes(b"s3cret")
        common = ["--kbs", url, "--token-file", str(token_file)]
        assert run_cli(["kbs", "admin", "resource", "put", "r/t/x", str(secret), *common]) == 0
        capsys.readouterr()
        assert run_cli(["kbs", "admin", "resource", "list", *common, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"resources": ["r/t/x"]}
        assert kbs.resources.get("r/t/x") == b"s3cret"
        with pytest.raises(ProtocolError, match="401"):
            run_cli(["kbs", "admin", "resource", "list", "--kbs", url, "--token", "bad.token.x"])
        with pytest.raises(CofferError, match="failed"):
            run_cli(["kbs", "admin", "resource", "list", "--kbs", f"http://127.0.0.1:{free_port()}",
                     "--token", "x", "--timeout", "2"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------
# Mounted in the full KBS app


def test_admin_api_in_the_kbs_app(config: AdminConfig, ed_key: Ed25519PrivateKey) -> None:
    """Through ``build_app``: an admin stores a resource and opens the resource policy; a sample
    guest then attests and receives it; the audit log holds both sides."""
    from coffer.kbs.config import KbsConfig
    from coffer.kbs.jwe import TeeKeyPair
    from tests.kbs.kbs_app_support import auth_body, make_kbs, sample_attestation

    full = make_kbs(config=KbsConfig(admin=config))
    bridge = AsgiBridge(full.app)
    admin_headers = {"Authorization": f"Bearer {mint_admin_token(ed_key, role='admin', now=full.clock.now)}"}
    try:
        with httpx.Client(transport=bridge, base_url="http://kbs") as client:
            stored = client.post("/kbs/v0/resource/team/key/disk", content=b"disk-key", headers=admin_headers)
            assert stored.status_code == 200, stored.text
            policy = client.post("/kbs/v0/resource-policy", json={"policy": _b64_policy(ALLOW_ALL)},
                                 headers=admin_headers)
            assert policy.status_code == 200, policy.text
            builtin = client.get("/kbs/v0/attestation-policy/default_cpu", headers=admin_headers)
            assert builtin.status_code == 200, builtin.text
            assert "package policy" in base64.urlsafe_b64decode(builtin.json()["policy"] + "==").decode()
            assert client.get("/kbs/v0/resources", headers={}).status_code == 401

            key = TeeKeyPair.generate()
            challenge = client.post("/kbs/v0/auth", json=auth_body())
            assert challenge.status_code == 200, challenge.text
            token = client.post("/kbs/v0/attest", json=sample_attestation(challenge.json()["nonce"], key))
            assert token.status_code == 200, token.text
            released = client.get("/kbs/v0/resource/team/key/disk")
            assert released.status_code == 200, released.text
            assert key.decrypt(released.json()) == b"disk-key"

            events = client.get("/kbs/v0/audit", params={"resource": "team/key/disk"},
                                headers=admin_headers).json()["events"]
            assert [(e["action"], e["outcome"]) for e in events] == [("admin", "ok"), ("release", "allowed")]
    finally:
        bridge.shutdown()
