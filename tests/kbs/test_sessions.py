"""RCAR sessions: nonce single use, expiry, bounded table, sharing between replicas."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from coffer.errors import ProtocolError, VerificationError
from coffer.kbs.protocol import Attestation, Request, RuntimeData, TeeEvidence
from coffer.kbs.sessions import ATTESTED, Session, SessionManager
from coffer.kbs.store import NS_SESSIONS, MemoryStore

PUBKEY = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AA", "y": "BB"}
REQUEST = Request(version="0.4.0", tee="sample", extra_params={"supported-hash-algorithms": ["sha384"]})


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def attestation(nonce: str) -> Attestation:
    return Attestation(init_data=None, runtime_data=RuntimeData(nonce=nonce, tee_pubkey=PUBKEY),
                       tee_evidence=TeeEvidence(primary_evidence={"svn": "1"}, additional_evidence=""))


def ok_verify(session: Session, att: Attestation) -> str:
    return f"token-for-{session.id}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> SessionManager:
    return SessionManager(MemoryStore(), clock)


def test_begin_creates_session_with_fresh_nonce(manager: SessionManager, clock: Clock) -> None:
    sid, challenge = manager.begin(REQUEST)
    sid2, challenge2 = manager.begin(REQUEST)
    assert len(sid) == 32
    assert int(sid, 16) >= 0
    assert sid != sid2
    assert challenge.nonce != challenge2.nonce
    assert len(base64.b64decode(challenge.nonce, validate=True)) == 32
    assert challenge.extra_params == ""
    session = manager.session(sid)
    assert session is not None
    assert session.tee == "sample"
    assert session.nonce == challenge.nonce
    assert manager.expires_at(sid) == clock.now + timedelta(minutes=5)


def test_attest_then_token(manager: SessionManager) -> None:
    sid, challenge = manager.begin(REQUEST)
    with pytest.raises(ProtocolError) as info:
        manager.token_for(sid)
    assert info.value.kind == "TokenNotFound"
    assert manager.attest(sid, attestation(challenge.nonce), ok_verify) == f"token-for-{sid}"
    assert manager.token_for(sid) == f"token-for-{sid}"
    session = manager.session(sid)
    assert session is not None
    assert session.state == ATTESTED


def test_rejects_second_attest_on_same_session(manager: SessionManager) -> None:
    sid, challenge = manager.begin(REQUEST)
    manager.attest(sid, attestation(challenge.nonce), ok_verify)
    with pytest.raises(ProtocolError, match="single use") as info:
        manager.attest(sid, attestation(challenge.nonce), ok_verify)
    assert info.value.kind == "AttestationError"


def test_rejects_nonce_of_another_session(manager: SessionManager) -> None:
    sid, _ = manager.begin(REQUEST)
    _, other = manager.begin(REQUEST)
    calls: list[str] = []

    def verify(session: Session, att: Attestation) -> str:
        calls.append(session.id)
        return "t"

    with pytest.raises(ProtocolError, match="nonce does not match"):
        manager.attest(sid, attestation(other.nonce), verify)
    assert calls == []


def test_failed_verification_ends_session(manager: SessionManager) -> None:
    sid, challenge = manager.begin(REQUEST)

    def refuse(session: Session, att: Attestation) -> str:
        raise VerificationError("sample", 2, "check report data", "mismatch")

    with pytest.raises(VerificationError):
        manager.attest(sid, attestation(challenge.nonce), refuse)
    assert manager.session(sid) is None
    with pytest.raises(ProtocolError, match="not found"):
        manager.attest(sid, attestation(challenge.nonce), ok_verify)


def test_rejects_expired_session(manager: SessionManager, clock: Clock) -> None:
    sid, challenge = manager.begin(REQUEST)
    clock.advance(minutes=5, seconds=1)
    with pytest.raises(ProtocolError, match="not found or expired"):
        manager.attest(sid, attestation(challenge.nonce), ok_verify)


def test_token_expires_with_session_not_extended(manager: SessionManager, clock: Clock) -> None:
    sid, challenge = manager.begin(REQUEST)
    clock.advance(minutes=4)
    manager.attest(sid, attestation(challenge.nonce), ok_verify)
    assert manager.expires_at(sid) == clock.now + timedelta(minutes=1)
    clock.advance(minutes=1)
    with pytest.raises(ProtocolError) as info:
        manager.token_for(sid)
    assert info.value.kind == "TokenNotFound"


@pytest.mark.parametrize("bad", ["", "x" * 32, "ABCDEF" * 6, "0" * 31, "../../etc/passwd"])
def test_rejects_malformed_session_id(manager: SessionManager, bad: str) -> None:
    with pytest.raises(ProtocolError):
        manager.token_for(bad)
    with pytest.raises(ProtocolError):
        manager.attest(bad, attestation("n"), ok_verify)


def test_table_is_bounded_under_auth_flood(clock: Clock) -> None:
    store = MemoryStore()
    manager = SessionManager(store, clock, max_sessions=5)
    for _ in range(5):
        manager.begin(REQUEST)
    with pytest.raises(ProtocolError, match="too many sessions") as info:
        manager.begin(REQUEST)
    assert info.value.kind == "AttestationError"
    assert store.count(NS_SESSIONS, now=clock.now) == 5
    clock.advance(minutes=6)  # all expired: room again, and the expired rows go when the table fills
    for _ in range(5):
        manager.begin(REQUEST)
    with pytest.raises(ProtocolError, match="too many sessions"):
        manager.begin(REQUEST)
    assert store.count(NS_SESSIONS, now=clock.now) == 5
    stored_rows = store.list_entries(NS_SESSIONS, now=clock.now - timedelta(days=1))
    assert len(stored_rows) == 5


def test_sweep_removes_expired(clock: Clock) -> None:
    manager = SessionManager(MemoryStore(), clock, timeout=timedelta(seconds=10))
    manager.begin(REQUEST)
    manager.begin(REQUEST)
    clock.advance(seconds=11)
    manager.begin(REQUEST)
    assert manager.sweep() == 2
    assert manager.count() == 1


def test_replicas_share_sessions(clock: Clock) -> None:
    store = MemoryStore()
    a, b = SessionManager(store, clock), SessionManager(store, clock)
    sid, challenge = a.begin(REQUEST)
    token = b.attest(sid, attestation(challenge.nonce), ok_verify)
    assert a.token_for(sid) == token
    with pytest.raises(ProtocolError, match="single use"):
        a.attest(sid, attestation(challenge.nonce), ok_verify)


def test_concurrent_attest_consumes_nonce_once(clock: Clock) -> None:
    manager = SessionManager(MemoryStore(), clock)
    sid, challenge = manager.begin(REQUEST)
    results: list[str] = []
    errors: list[Exception] = []
    start = threading.Barrier(8)

    def slow_verify(session: Session, att: Attestation) -> str:
        time.sleep(0.05)
        return "the-token"

    def run() -> None:
        start.wait()
        try:
            results.append(manager.attest(sid, attestation(challenge.nonce), slow_verify))
        except ProtocolError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["the-token"]
    assert len(errors) == 7


def test_session_record_does_not_store_evidence_or_key(manager: SessionManager, clock: Clock) -> None:
    sid, challenge = manager.begin(REQUEST)
    manager.attest(sid, attestation(challenge.nonce), ok_verify)
    entry = MemoryStore.get(manager._store, NS_SESSIONS, sid, now=clock.now)  # type: ignore[arg-type]
    assert entry is not None
    assert b"primary_evidence" not in entry.value
    assert b"ECDH" not in entry.value
