"""The Trustee KBS protocol over real HTTP against ``coffer kbs serve`` processes: the exact JSON and
cookie a client sees through uvicorn, and every refusal with Trustee's status and error type.

tests/kbs/test_app_*.py check most of these rules in-process (ASGI, a fake clock); here they are
checked on the wire of a real server configured from a file (short session timeout, small session
table), plus the cases only a real deployment has: a cookie jar honouring the cookie's attributes,
tokens of another KBS process with its own signing key, evidence bound to another TEE key, and the
session table under an /auth flood.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.open_store import open_store, sqlite_url
from coffer.kbs.resources import MasterKey
from coffer.kbs.store import NS_SESSIONS
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    KbsProcess,
    assert_error,
    audit_events,
    auth_body,
    cookie_header,
    flip_char,
    put_resource,
    sample_attestation,
    session_cookie,
    tamper_payload,
    write_config,
)

SECRET = b"negative-tests secret"
RESOURCE = "default/key/one"
FORBIDDEN = "forbidden/key/one"
SHORT_TIMEOUT = 2  # seconds, the short server's session lifetime
MAX_SESSIONS = 6  # the short server's session table size
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
COOKIE = re.compile(r"kbs-session-id=([0-9a-f]{32}); Expires=([^;]+ GMT); Path=/kbs; HttpOnly")


@dataclass
class Server:
    process: KbsProcess
    admin: AdminKey
    db: str

    @property
    def url(self) -> str:
        return self.process.url

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


def _server(base: Path, admin: AdminKey, *, session_timeout: int | None = None,
            max_sessions: int | None = None) -> Iterator[Server]:
    base.mkdir(parents=True)
    master = base / "master.key"
    MasterKey.generate().write(master)
    db = sqlite_url(base / "state" / "state.db")
    process = KbsProcess(write_config(base / "kbs.toml", db=db, master_key=master, admin=admin,
                                      resource_policy=SAMPLE_RESOURCE_POLICY,
                                      session_timeout=session_timeout, max_sessions=max_sessions))
    try:
        process.start().wait_ready()
        for path in (RESOURCE, FORBIDDEN):
            put_resource(process.url, admin, path, SECRET)
        yield Server(process, admin, db)
    finally:
        process.stop()
    assert not process.running


@pytest.fixture(scope="module")
def module_admin(tmp_path_factory: pytest.TempPathFactory) -> AdminKey:
    return AdminKey.create(tmp_path_factory.mktemp("admin"))


@pytest.fixture(scope="module")
def kbs(tmp_path_factory: pytest.TempPathFactory, module_admin: AdminKey) -> Iterator[Server]:
    """Default sessions (5 minutes, 10000)."""
    yield from _server(tmp_path_factory.mktemp("kbs") / "main", module_admin)


@pytest.fixture(scope="module")
def short_kbs(tmp_path_factory: pytest.TempPathFactory, module_admin: AdminKey) -> Iterator[Server]:
    """Another KBS (its own signing key) with short sessions and a small session table."""
    yield from _server(tmp_path_factory.mktemp("kbs") / "short", module_admin,
                       session_timeout=SHORT_TIMEOUT, max_sessions=MAX_SESSIONS)


def _auth(http: httpx.Client) -> tuple[str, str]:
    """(session id, nonce) of a new session."""
    answer = http.post("/kbs/v0/auth", json=auth_body())
    assert answer.status_code == 200, answer.text
    return session_cookie(answer), answer.json()["nonce"]


def _attest(http: httpx.Client, session: str, body: dict[str, object]) -> httpx.Response:
    return http.post("/kbs/v0/attest", json=body, headers=cookie_header(session))


def _token(server: Server, key: TeeKeyPair) -> str:
    with server.http() as http:
        session, nonce = _auth(http)
        answer = _attest(http, session, sample_attestation(nonce, key))
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["token"]
    return token


def _bearer(server: Server, token: str, path: str = RESOURCE) -> httpx.Response:
    return httpx.get(f"{server.url}/kbs/v0/resource/{path}", headers={"Authorization": f"Bearer {token}"},
                     timeout=10)


def _unused_bit_set(last: str) -> str:
    """The last character of a 64-byte base64url value with its (unused) lowest bit flipped."""
    return _B64URL[_B64URL.index(last) ^ 1]


def _b64url_json(segment: str) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


# --------------------------------------------------------------------------------------------------
# What a well-behaved client sees


def test_challenge_token_and_jwe_shapes_and_cookie_attributes(kbs: Server) -> None:
    key = TeeKeyPair.generate()
    with kbs.http() as http:
        asked_at = datetime.now(UTC)
        auth = http.post("/kbs/v0/auth", json=auth_body())
        assert auth.status_code == 200
        assert auth.headers["content-type"] == "application/json"
        challenge = auth.json()
        assert set(challenge) == {"nonce", "extra-params"}
        assert challenge["extra-params"] == ""
        assert len(base64.b64decode(challenge["nonce"], validate=True)) == 32
        cookies = auth.headers.get_list("set-cookie")
        assert len(cookies) == 1
        match = COOKIE.fullmatch(cookies[0])
        assert match, cookies[0]
        session, expires = match.group(1), parsedate_to_datetime(match.group(2))
        assert abs(expires - (asked_at + timedelta(minutes=5))) < timedelta(seconds=5)

        # A standard cookie jar sends the cookie back by itself (Path=/kbs covers /kbs/v0/attest).
        attest = http.post("/kbs/v0/attest", json=sample_attestation(challenge["nonce"], key))
        assert attest.status_code == 200, attest.text
        assert attest.headers["content-type"] == "application/json"
        assert set(attest.json()) == {"token"}
        again = COOKIE.fullmatch(attest.headers["set-cookie"])
        assert again
        assert again.group(1) == session
        assert parsedate_to_datetime(again.group(2)) == expires  # attesting does not extend the session
        header, _, _ = attest.json()["token"].split(".")
        assert _b64url_json(header)["alg"] == "ES256"

        resource = http.get(f"/kbs/v0/resource/{RESOURCE}")
    assert resource.status_code == 200, resource.text
    jwe = resource.json()
    assert set(jwe) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    protected = _b64url_json(jwe["protected"])
    assert list(protected)[:2] == ["alg", "enc"]
    assert (protected["alg"], protected["enc"]) == ("ECDH-ES+A256KW", "A256GCM")
    assert key.decrypt(jwe) == SECRET


# --------------------------------------------------------------------------------------------------
# /auth and /attest refusals


@pytest.mark.parametrize("version", ["0.1.0", "0.3.0", "1.0.0"])
def test_version_mismatch_is_401_attestation_error(kbs: Server, version: str) -> None:
    with kbs.http() as http:
        answer = http.post("/kbs/v0/auth", json=auth_body(version=version))
    assert_error(answer, 401, "AttestationError")
    assert "set-cookie" not in answer.headers


def test_second_attest_on_a_session_is_refused_and_the_first_token_stays(kbs: Server) -> None:
    key = TeeKeyPair.generate()
    with kbs.http() as http:
        session, nonce = _auth(http)
        body = sample_attestation(nonce, key)
        assert _attest(http, session, body).status_code == 200
        replay = _attest(http, session, body)
        assert "single use" in assert_error(replay, 401, "AttestationError")
        fresh = _attest(http, session, sample_attestation(nonce, TeeKeyPair.generate()))
        assert_error(fresh, 401, "AttestationError")
        # The replays did not hijack the session: its resource is still wrapped to the first key.
        resource = http.get(f"/kbs/v0/resource/{RESOURCE}", headers=cookie_header(session))
    assert resource.status_code == 200
    assert key.decrypt(resource.json()) == SECRET


def test_evidence_of_another_session_is_refused(kbs: Server) -> None:
    key = TeeKeyPair.generate()
    with kbs.http() as http:
        session_a, nonce_a = _auth(http)
        session_b, _nonce_b = _auth(http)
        # A's runtime data (nonce and evidence) sent on B: the nonce is not B's challenge.
        answer = _attest(http, session_b, sample_attestation(nonce_a, key))
        assert "nonce" in assert_error(answer, 401, "AttestationError")
        # B's nonce named, but the evidence binds A's nonce: the report data does not match.
        session_c, nonce_c = _auth(http)
        answer = _attest(http, session_c, sample_attestation(nonce_c, key, bound_nonce=nonce_a))
        assert "report data" in assert_error(answer, 401, "AttestationError")
        # A failed attestation ends its session; A itself was not consumed by the attacks.
        assert_error(_attest(http, session_c, sample_attestation(nonce_c, key)), 401, "AttestationError")
        assert _attest(http, session_a, sample_attestation(nonce_a, key)).status_code == 200


def test_evidence_bound_to_another_tee_key_is_refused(kbs: Server) -> None:
    """An attacker replaces the tee-pubkey of a genuine attestation with its own key."""
    genuine, attacker = TeeKeyPair.generate(), TeeKeyPair.generate()
    with kbs.http() as http:
        session, nonce = _auth(http)
        answer = _attest(http, session, sample_attestation(nonce, attacker, bound_key=genuine))
    assert "report data" in assert_error(answer, 401, "AttestationError")


# --------------------------------------------------------------------------------------------------
# Resource requests


def test_tampered_bearer_tokens_are_401_token_verifier_error(kbs: Server) -> None:
    key, attacker = TeeKeyPair.generate(), TeeKeyPair.generate()
    token = _token(kbs, key)
    header, payload, signature = token.split(".")
    cpu0_path = _b64url_json(payload)["submods"]
    assert isinstance(cpu0_path, dict)
    submods = json.loads(json.dumps(cpu0_path))
    evidence = submods["cpu0"]["ear.veraison.annotated-evidence"]
    evidence["runtime_data_claims"]["tee-pubkey"] = attacker.public_jwk()
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    forged = {
        "changed signature byte": f"{header}.{payload}.{flip_char(signature, 20)}",
        # Same signature bytes, another spelling: the last character's unused low bits set.
        "non-canonical signature": f"{header}.{payload}.{signature[:-1]}{_unused_bit_set(signature[-1])}",
        "attacker key in payload": tamper_payload(token, {"submods": submods}),
        "exp pushed back": tamper_payload(token, {"exp": 4102444800}),
        "alg none": f"{none_header}.{payload}.",
        "not a JWS": "not-a-token",
    }
    for name, bad in forged.items():
        answer = _bearer(kbs, bad)
        assert answer.status_code == 401, (name, answer.text)
        assert_error(answer, 401, "TokenVerifierError")
    genuine = _bearer(kbs, token)
    assert genuine.status_code == 200
    assert key.decrypt(genuine.json()) == SECRET


def test_token_of_another_kbs_is_401_token_verifier_error(kbs: Server, short_kbs: Server) -> None:
    key = TeeKeyPair.generate()
    foreign = _token(short_kbs, key)
    assert _bearer(short_kbs, foreign).status_code == 200  # valid where it was issued
    assert_error(_bearer(kbs, foreign), 401, "TokenVerifierError")


def test_resource_policy_denial_is_401_policy_deny(kbs: Server) -> None:
    token = _token(kbs, TeeKeyPair.generate())
    assert_error(_bearer(kbs, token, FORBIDDEN), 401, "PolicyDeny")
    denials = audit_events(kbs.url, kbs.admin, resource=FORBIDDEN, action="deny")
    assert denials
    assert denials[-1]["claims"]["tee"] == "sample"


def test_unknown_resource_and_bad_paths(kbs: Server) -> None:
    token = _token(kbs, TeeKeyPair.generate())
    assert_error(_bearer(kbs, token, "default/key/absent"), 401, "PluginInternalError")
    assert_error(_bearer(kbs, token, "default/key"), 401, "PluginInternalError")
    assert_error(_bearer(kbs, token, "default/key/one/extra"), 401, "PluginInternalError")
    with kbs.http() as http:
        assert_error(http.get("/kbs/v0/resource/" + RESOURCE), 401, "TokenNotFound")
        assert_error(http.get("/kbs/v0/resource/" + RESOURCE, headers=cookie_header("0" * 32)),
                     401, "TokenNotFound")
        assert_error(http.get("/kbs/v0/no-such-plugin/x"), 404, "PluginNotFound")


# --------------------------------------------------------------------------------------------------
# Session lifetime and the bounded session table (short server, configured from the file)


def test_expired_sessions_and_auth_flood(short_kbs: Server) -> None:
    key = TeeKeyPair.generate()
    with short_kbs.http() as http:
        attested, nonce = _auth(http)
        token_answer = _attest(http, attested, sample_attestation(nonce, key))
        assert token_answer.status_code == 200
        token = token_answer.json()["token"]
        pending, pending_nonce = _auth(http)
        cookie = COOKIE.fullmatch(token_answer.headers["set-cookie"])
        assert cookie

    def auth_once(_: int) -> httpx.Response:
        return httpx.post(f"{short_kbs.url}/kbs/v0/auth", json=auth_body(), timeout=10)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(auth_once, range(3 * MAX_SESSIONS)))
    accepted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(accepted) <= MAX_SESSIONS - 2  # two sessions of ours were already live
    assert len(refused) >= 2 * MAX_SESSIONS
    for answer in refused:
        assert "too many sessions" in assert_error(answer, 401, "AttestationError")
    store = open_store(short_kbs.db)
    try:
        assert store.count(NS_SESSIONS, now=datetime.now(UTC)) <= MAX_SESSIONS
    finally:
        store.close()

    time.sleep(SHORT_TIMEOUT + 0.3)
    with short_kbs.http() as http:
        # The challenge of an expired session cannot be answered any more ...
        expired = _attest(http, pending, sample_attestation(pending_nonce, key))
        assert "expired" in assert_error(expired, 401, "AttestationError")
        # ... an expired session no longer carries its token (re-attest) ...
        assert_error(http.get(f"/kbs/v0/resource/{RESOURCE}", headers=cookie_header(attested)),
                     401, "TokenNotFound")
        # ... while the token itself lives its own lifetime as a bearer credential,
        assert _bearer(short_kbs, token).status_code == 200
        # and the table has room again.
        assert http.post("/kbs/v0/auth", json=auth_body()).status_code == 200
