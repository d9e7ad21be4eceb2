"""The RCAR handshake over the in-process app: /auth, /attest, cookies, 401 semantics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import pytest

from coffer.attestation.token import TokenVerifier, tee_pubkey_from_claims
from coffer.kbs.config import KbsConfig
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.store import NS_SESSIONS
from tests.kbs.kbs_app_support import assert_error, auth_body, handshake, make_kbs, sample_attestation

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_auth_returns_challenge_and_session_cookie() -> None:
    kbs = make_kbs()
    async with kbs.client() as client:
        response = await client.post("/kbs/v0/auth", json=auth_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"nonce", "extra-params"}
    assert body["extra-params"] == ""
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", body["nonce"])
    cookie = response.headers["set-cookie"]
    match = re.match(r"kbs-session-id=([0-9a-f]{32}); Expires=([^;]+);", cookie)
    assert match, cookie
    assert parsedate_to_datetime(match.group(2)) == kbs.clock.now + KbsConfig().session_timeout


async def test_attest_returns_token_bound_to_tee_key() -> None:
    kbs = make_kbs()
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        token = await handshake(client, key)
        jwks = (await client.get("/.well-known/jwks.json")).json()
    claims = TokenVerifier(jwks).verify(token, now=kbs.clock.now)
    assert tee_pubkey_from_claims(claims) == key.public_jwk()
    assert "sample" in claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
    events = kbs.store.query_audit(action="attest")
    assert len(events) == 1
    assert events[0].claims["tee"] == "sample"


async def test_rejects_protocol_version_mismatch() -> None:
    async with make_kbs().client() as client:
        response = await client.post("/kbs/v0/auth", json=auth_body(version="0.1.1"))
    body = assert_error(response, 401, "AttestationError")
    assert "Version Mismatch" in body["detail"]


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b'{"version":"0.4.0"}',
                                     b'{"version":"0.4.0","tee":"nope","extra-params":""}'])
async def test_rejects_malformed_auth_body(payload: bytes) -> None:
    async with make_kbs().client() as client:
        response = await client.post("/kbs/v0/auth", content=payload)
    assert_error(response, 401, "AttestationError")


async def test_rejects_attest_without_cookie() -> None:
    async with make_kbs().client() as client:
        response = await client.post("/kbs/v0/attest", json={})
    body = assert_error(response, 401, "AttestationError")
    assert "cookie not found" in body["detail"]


@pytest.mark.parametrize("cookie", ["0" * 32, "not-a-session", ""])
async def test_rejects_attest_with_unknown_session(cookie: str) -> None:
    async with make_kbs().client() as client:
        response = await client.post("/kbs/v0/attest", json={},
                                     headers={"cookie": f"kbs-session-id={cookie}"})
    assert_error(response, 401, "AttestationError")


async def test_rejects_second_attest_on_session() -> None:
    kbs = make_kbs()
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        challenge = (await client.post("/kbs/v0/auth", json=auth_body())).json()
        body = sample_attestation(challenge["nonce"], key)
        assert (await client.post("/kbs/v0/attest", json=body)).status_code == 200
        again = await client.post("/kbs/v0/attest", json=body)
    assert_error(again, 401, "AttestationError")


async def test_rejects_nonce_not_from_this_session() -> None:
    kbs = make_kbs()
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        await client.post("/kbs/v0/auth", json=auth_body())
        response = await client.post("/kbs/v0/attest",
                                     json=sample_attestation("AAAA" * 11, key))
    body = assert_error(response, 401, "AttestationError")
    assert "nonce" in body["detail"]


async def test_rejects_evidence_from_another_session() -> None:
    kbs = make_kbs()
    key = TeeKeyPair.generate()
    async with kbs.client() as first, kbs.client() as second:
        old = (await first.post("/kbs/v0/auth", json=auth_body())).json()["nonce"]
        new = (await second.post("/kbs/v0/auth", json=auth_body())).json()["nonce"]
        # evidence binds the first session's nonce, but is sent in the second session
        response = await second.post("/kbs/v0/attest", json=sample_attestation(new, key, bound_nonce=old))
    body = assert_error(response, 401, "AttestationError")
    assert "report data" in body["detail"]
    failed = kbs.store.query_audit(action="attest_failed")
    assert len(failed) == 1
    assert failed[0].outcome == "error"


async def test_rejects_attest_after_session_expiry() -> None:
    kbs = make_kbs()
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        nonce = (await client.post("/kbs/v0/auth", json=auth_body())).json()["nonce"]
        kbs.clock.advance(minutes=5, seconds=1)
        response = await client.post("/kbs/v0/attest", json=sample_attestation(nonce, key))
    assert_error(response, 401, "AttestationError")


async def test_rejects_malformed_attest_body() -> None:
    kbs = make_kbs()
    async with kbs.client() as client:
        await client.post("/kbs/v0/auth", json=auth_body())
        response = await client.post("/kbs/v0/attest", content=b'{"runtime-data": 5}')
    assert_error(response, 401, "AttestationError")


async def test_session_table_bounded_under_auth_flood() -> None:
    kbs = make_kbs(config=KbsConfig(max_sessions=3))
    async with kbs.client() as client:
        for _ in range(3):
            assert (await client.post("/kbs/v0/auth", json=auth_body())).status_code == 200
        refused = await client.post("/kbs/v0/auth", json=auth_body())
        body = assert_error(refused, 401, "AttestationError")
        assert "too many sessions" in body["detail"]
        kbs.clock.advance(minutes=6)
        assert (await client.post("/kbs/v0/auth", json=auth_body())).status_code == 200


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_rejects_oversized_body() -> None:
    kbs = make_kbs(config=KbsConfig(max_body_bytes=1000))
    async with kbs.client() as client:
        response = await client.post("/kbs/v0/auth", content=b"{" + b" " * 2000 + b"}")
        chunked = await client.post("/kbs/v0/auth", content=_chunks([b"{", b" " * 2000, b"}"]))
    assert_error(response, 413, "SerdeError")
    assert_error(chunked, 413, "SerdeError")


async def test_unsupported_tee_fails_at_attest() -> None:
    kbs = make_kbs()
    async with kbs.client() as client:
        nonce = (await client.post("/kbs/v0/auth", json=auth_body(tee="cca"))).json()["nonce"]
        response = await client.post("/kbs/v0/attest", json=sample_attestation(nonce, TeeKeyPair.generate()))
    assert_error(response, 401, "AttestationError")


async def test_rejects_oversized_extra_params_without_storing_a_session() -> None:
    # /auth used to keep up to 2 MiB of extra-params per session in the shared store.
    kbs = make_kbs()
    big = {"version": "0.4.0", "tee": "sample", "extra-params": "A" * (2 * 1024 * 1024 - 100)}
    async with kbs.client() as client:
        response = await client.post("/kbs/v0/auth", json=big)
    body = assert_error(response, 401, "AttestationError")
    assert "extra-params" in body["detail"]
    assert kbs.store.list_entries(NS_SESSIONS, now=kbs.clock()) == []


async def test_rejects_deeply_nested_init_data_with_401_not_500() -> None:
    kbs = make_kbs(allow_all=True)
    key = TeeKeyPair.generate()
    async with kbs.client() as client:
        challenge = await client.post("/kbs/v0/auth", json=auth_body())
        attestation = sample_attestation(challenge.json()["nonce"], key)
        attestation["init-data"] = {"format": "toml", "body": "a = " + "[" * 5000 + "]" * 5000 + "\n"}
        response = await client.post("/kbs/v0/attest", json=attestation)
    assert_error(response, 401, "AttestationError")
