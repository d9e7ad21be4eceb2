"""Service endpoints of the app: health, readiness, OpenAPI, JWKS, error bodies for unknown paths."""

from __future__ import annotations

import base64
import re

import pytest
from starlette.routing import Route

from coffer.attestation.service import AttestationService
from coffer.evidence.collateral import NoCollateral
from coffer.kbs.app import OPENAPI_PATH, build_app, openapi_document
from coffer.kbs.config import KbsConfig
from coffer.kbs.resources import MasterKey, ResourceStore
from coffer.kbs.store import MemoryStore
from tests.kbs.kbs_app_support import assert_error, make_kbs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_healthz_and_readyz() -> None:
    async with make_kbs().client() as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok", "master_key": "ok", "token_signer": "ok"}


async def test_readyz_reports_wrong_master_key() -> None:
    store = MemoryStore()
    ResourceStore(store, MasterKey.generate()).put("a/b/c", b"x")
    app = build_app(KbsConfig(), store=store,
                    attestation=AttestationService(store, collateral=NoCollateral()),
                    resources=ResourceStore(store, MasterKey.generate()))
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["master_key"] == "wrong master key"


async def test_jwks_is_the_attestation_service_key_set() -> None:
    kbs = make_kbs()
    async with kbs.client() as client:
        response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json() == kbs.attestation.jwks()
    (key,) = response.json()["keys"]
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert "d" not in key


async def test_openapi_served_at_stable_path() -> None:
    async with make_kbs().client() as client:
        response = await client.get(OPENAPI_PATH)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document == openapi_document()


def _template(path: str) -> str:
    path = path.replace("{path:path}", "{repository}/{type}/{tag}")
    return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)


def test_openapi_covers_every_route() -> None:
    kbs = make_kbs()
    documented = {(method.upper(), path) for path, item in openapi_document()["paths"].items()
                  for method in item if method != "parameters"}
    served: set[tuple[str, str]] = set()
    for route in kbs.app.routes:
        assert isinstance(route, Route)
        if route.path == "/kbs/v0/{rest:path}":
            continue  # the catch-all answering PluginNotFound / InvalidRequestPath
        for method in route.methods or ():
            if method != "HEAD":
                served.add((method, _template(route.path)))
    assert served - documented == set()
    assert documented - served == set()


def test_openapi_error_responses_use_error_information() -> None:
    for item in openapi_document()["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if (status.startswith(("4", "5")) and status != "503") or status == "401":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorInformation"}


async def test_unknown_paths_answer_error_information() -> None:
    async with make_kbs().client() as client:
        unknown = await client.get("/nothing/here")
        wrong_method = await client.put("/kbs/v0/auth")
        get_attest = await client.get("/kbs/v0/attest")
        wrong_service_method = await client.post("/healthz")
    assert_error(unknown, 404, "InvalidRequestPath")
    assert_error(wrong_method, 404, "InvalidRequestPath")
    assert_error(get_attest, 404, "InvalidRequestPath")
    assert_error(wrong_service_method, 405, "InvalidRequestPath")


async def test_admin_api_refused_without_admin_configuration() -> None:
    async with make_kbs().client() as client:
        put = await client.post("/kbs/v0/resource/default/key/new", content=b"value")
        policy = await client.get("/kbs/v0/resource-policy")
    assert_error(put, 401, "AdminAuthAccess")
    assert_error(policy, 401, "AdminAuthAccess")


async def test_build_app_loads_master_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = MasterKey.generate()
    monkeypatch.setenv("COFFER_KBS_MASTER_KEY", key.hex())
    store = MemoryStore()
    ResourceStore(store, key).put("a/b/c", b"x")
    attestation = AttestationService(store, collateral=NoCollateral())
    app = build_app(KbsConfig(), store=store, attestation=attestation)
    assert app.state.kbs.resources.get("a/b/c") == b"x"


async def test_admin_put_then_guest_fetch_through_one_app() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from coffer.kbs.admin import mint_admin_token
    from coffer.kbs.config import AdminConfig, AdminKey
    from coffer.kbs.jwe import TeeKeyPair
    from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY
    from tests.kbs.kbs_app_support import handshake

    admin_key = Ed25519PrivateKey.generate()
    pem = admin_key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    kbs = make_kbs(config=KbsConfig(admin=AdminConfig(keys=(AdminKey(id="ops", public_key_pem=pem),))))
    token = mint_admin_token(admin_key, role="admin", now=kbs.clock.now)
    headers = {"authorization": f"Bearer {token}"}
    async with kbs.client() as admin:
        put = await admin.post("/kbs/v0/resource/team/key/fresh", content=b"fresh-secret", headers=headers)
        assert put.status_code == 200, put.text
        policy = base64.urlsafe_b64encode(ALLOW_ALL_RESOURCE_POLICY.encode()).rstrip(b"=").decode()
        set_policy = await admin.post("/kbs/v0/resource-policy", json={"policy": policy}, headers=headers)
        assert set_policy.status_code == 200, set_policy.text
    key = TeeKeyPair.generate()
    async with kbs.client() as guest:
        await handshake(guest, key)
        response = await guest.get("/kbs/v0/resource/team/key/fresh")
    assert response.status_code == 200, response.text
    assert key.decrypt(response.json()) == b"fresh-secret"
    assert kbs.store.query_audit(action="admin")
