"""Resource release over the in-process app: token sources, policy, JWE, audit, never leaking secrets."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest

from coffer.attestation.token import TokenSigner
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.store import MemoryStore
from tests.kbs.kbs_app_support import (
    RESOURCE,
    SECRET,
    assert_error,
    auth_body,
    handshake,
    make_kbs,
)

pytestmark = pytest.mark.anyio
URL = f"/kbs/v0/resource/{RESOURCE}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p521", "rsa-oaep-256"])
async def test_releases_resource_as_jwe_to_tee_key(kind: Any) -> None:
    kbs = make_kbs(allow_all=True)
    key = TeeKeyPair.generate(kind)
    async with kbs.client() as client:
        await handshake(client, key)
        response = await client.get(URL)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    jwe = response.json()
    assert set(jwe) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    header = json.loads(base64.urlsafe_b64decode(jwe["protected"] + "=" * (-len(jwe["protected"]) % 4)))
    assert list(header)[:2] == ["alg", "enc"]
    assert header["enc"] == "A256GCM"
    assert key.decrypt(jwe) == SECRET


async def test_releases_with_bearer_token_alone() -> None:
    kbs = make_kbs(allow_all=True)
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        token = await handshake(client, key)
    async with kbs.client() as fresh:  # no session cookie
        response = await fresh.get(URL, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert key.decrypt(response.json()) == SECRET


async def test_release_is_audited_with_identifying_claims() -> None:
    kbs = make_kbs(allow_all=True)
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        await handshake(client, key)
        await client.get(URL)
    events = kbs.store.query_audit(action="release", subject=RESOURCE)
    assert len(events) == 1
    event = events[0]
    assert event.outcome == "allowed"
    assert event.claims["tee"] == "sample"
    assert len(event.claims["tee_pubkey_thumbprint"]) == 64
    assert "ear.status" in event.claims
    assert "exp" in event.claims
    assert SECRET.hex() not in json.dumps(event.claims)


async def test_default_policy_denies_sample_evidence() -> None:
    kbs = make_kbs()
    async with kbs.client() as client:
        await handshake(client, TeeKeyPair.generate())
        response = await client.get(URL)
    body = assert_error(response, 401, "PolicyDeny")
    assert body["detail"] == "Access denied by policy"
    denied = kbs.store.query_audit(action="deny", subject=RESOURCE)
    assert len(denied) == 1
    assert denied[0].claims["tee"] == "sample"
    assert denied[0].detail == "resource policy"


async def test_rejects_request_without_token() -> None:
    async with make_kbs(allow_all=True).client() as client:
        response = await client.get(URL)
    assert_error(response, 401, "TokenNotFound")


async def test_rejects_cookie_of_unattested_session() -> None:
    async with make_kbs(allow_all=True).client() as client:
        await client.post("/kbs/v0/auth", json=auth_body())
        response = await client.get(URL)
    assert_error(response, 401, "TokenNotFound")


async def test_rejects_non_bearer_authorization() -> None:
    async with make_kbs(allow_all=True).client() as client:
        response = await client.get(URL, headers={"authorization": "Basic dXNlcjpwdw=="})
    assert_error(response, 401, "TokenNotFound")


async def test_rejects_token_signed_by_untrusted_key() -> None:
    kbs = make_kbs(allow_all=True)
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        token = await handshake(client, key)
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    forged = TokenSigner(MemoryStore()).issue(payload)
    async with kbs.client() as client:
        response = await client.get(URL, headers={"authorization": f"Bearer {forged}"})
    assert_error(response, 401, "TokenVerifierError")


async def test_rejects_token_with_flipped_signature_byte() -> None:
    kbs = make_kbs(allow_all=True)
    async with kbs.client() as client:
        token = await handshake(client, TeeKeyPair.generate())
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 1
    bad = f"{head}.{body}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"
    async with kbs.client() as client:
        response = await client.get(URL, headers={"authorization": f"Bearer {bad}"})
    assert_error(response, 401, "TokenVerifierError")


async def test_rejects_expired_token() -> None:
    kbs = make_kbs(allow_all=True)
    async with kbs.client() as client:
        token = await handshake(client, TeeKeyPair.generate())
        kbs.clock.advance(minutes=6)
        by_cookie = await client.get(URL)
        by_bearer = await client.get(URL, headers={"authorization": f"Bearer {token}"})
    assert_error(by_cookie, 401, "TokenNotFound")
    assert_error(by_bearer, 401, "TokenVerifierError")


async def test_missing_resource_is_401_plugin_internal_error() -> None:
    kbs = make_kbs(allow_all=True)
    async with kbs.client() as client:
        await handshake(client, TeeKeyPair.generate())
        response = await client.get("/kbs/v0/resource/default/key/absent")
    assert_error(response, 401, "PluginInternalError")
    assert kbs.store.query_audit(action="deny", subject="default/key/absent")


@pytest.mark.parametrize("path", ["a/b", "a/b/c/d", "a/.b/c", "a/b/c%00", "-/b/.."])
async def test_bad_resource_path_is_401_plugin_internal_error(path: str) -> None:
    async with make_kbs(allow_all=True).client() as client:
        response = await client.get(f"/kbs/v0/resource/{path}")
    assert_error(response, 401, "PluginInternalError")


async def test_unknown_plugin_is_404() -> None:
    async with make_kbs().client() as client:
        response = await client.get("/kbs/v0/nebula-ca/credential")
    assert_error(response, 404, "PluginNotFound")


async def test_policy_sees_query_string() -> None:
    kbs = make_kbs()
    kbs.policy.set('package policy\nimport rego.v1\ndefault allow := false\n'
                   'allow if data.query.purpose == "boot"\n')
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        await handshake(client, key)
        denied = await client.get(URL, params={"purpose": "other"})
        allowed = await client.get(URL, params={"purpose": "boot"})
    assert_error(denied, 401, "PolicyDeny")
    assert key.decrypt(allowed.json()) == SECRET


async def test_secret_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kbs = make_kbs(allow_all=True)
    async with kbs.client() as client:
        await handshake(client, TeeKeyPair.generate())
        await client.get(URL)
        await client.get("/kbs/v0/resource/default/key/absent")
    text = caplog.text
    assert "released" in text
    for form in (SECRET, SECRET.hex().encode(), base64.b64encode(SECRET), kbs.master_key.hex().encode()):
        assert form.decode("latin-1") not in text
    for event in kbs.store.query_audit():
        dumped = json.dumps(event.claims) + event.detail
        assert SECRET.hex() not in dumped
        assert kbs.master_key.hex() not in dumped
