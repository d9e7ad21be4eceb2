"""``coffer kbs serve --workers 2`` as real processes, the session bound under an /auth flood with the
cached live-session accounting over SQLite, and audit group commit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from coffer._internal.net import free_port
from coffer.errors import ProtocolError, StorageError
from coffer.kbs.app import AuditWriter
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.open_store import sqlite_url
from coffer.kbs.protocol import Request
from coffer.kbs.resources import MasterKey
from coffer.kbs.sessions import SessionManager
from coffer.kbs.store import NS_SESSIONS, AuditEvent
from coffer.kbs.store_sqlite import SqliteStore
from tests.e2e.support import (
    auth_body,
    child_env,
    coffer_command,
    cookie_header,
    sample_attestation,
    session_cookie,
    write_config,
)
from tests.kbs.kbs_app_support import RESOURCE, handshake, make_kbs

REQUEST = Request(version="0.4.0", tee="sample", extra_params={})


def _handshake(url: str) -> None:
    """/auth then /attest, each on a new connection (so the two workers share the work)."""
    key = TeeKeyPair.generate()
    with httpx.Client(base_url=url, timeout=10) as http:
        auth = http.post("/kbs/v0/auth", json=auth_body())
        assert auth.status_code == 200, auth.text
    session = session_cookie(auth)
    with httpx.Client(base_url=url, timeout=10) as http:
        attested = http.post("/kbs/v0/attest", json=sample_attestation(auth.json()["nonce"], key),
                             headers=cookie_header(session))
        assert attested.status_code == 200, attested.text
        assert attested.json()["token"].count(".") == 2


def test_serve_with_two_workers(tmp_path: Path) -> None:
    master = tmp_path / "master.key"
    MasterKey.generate().write(master)
    config = write_config(tmp_path / "kbs.toml", db=sqlite_url(tmp_path / "state" / "state.db"),
                          master_key=master)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*coffer_command(), "kbs", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
             "--workers", "2", "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True,
            env=child_env(state_dir=tmp_path / "state"))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        pids: set[str] = set()
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(10):
                list(pool.map(lambda _: _handshake(url), range(8)))
                pids = set(re.findall(r"coffer\.kbs\[(\d+)\]: auth: new session", log.read_text()))
                if len(pids) >= 2:
                    break
        assert len(pids) == 2, f"handshakes were served by worker processes {pids}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    assert returncode == 0, log.read_text(errors="replace")[-3000:]
    for pid in pids:  # the workers are gone too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "Traceback" not in log.read_text(errors="replace")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_session_table_bounded_under_auth_flood_with_cached_count(tmp_path: Path) -> None:
    """Over SQLite, with the live-session count cached far below the bound and exact near it: one
    replica never grows the table past ``max_sessions``; expired sessions make room again."""
    store = SqliteStore(tmp_path / "state.db")
    clock = Clock()
    try:
        manager = SessionManager(store, clock, max_sessions=40)
        refused = 0
        kinds: set[tuple[str, str]] = set()
        for _ in range(200):
            try:
                manager.begin(REQUEST)
            except ProtocolError as exc:
                kinds.add((exc.kind, exc.detail))
                refused += 1
            assert store.count(NS_SESSIONS, now=clock.now) <= 40
        assert refused == 160
        assert kinds == {("AttestationError",
                          "Attestation error: RCAR handshake Auth failed: too many sessions")}
        clock.now += timedelta(minutes=6)  # all expired: purged when the table is full, room again
        for _ in range(40):
            manager.begin(REQUEST)
        with pytest.raises(ProtocolError, match="too many sessions"):
            manager.begin(REQUEST)
        assert len(store.list_entries(NS_SESSIONS, now=clock.now - timedelta(days=1))) == 40
    finally:
        store.close()


def test_replicas_sharing_a_store_stay_bounded(tmp_path: Path) -> None:
    """Replicas see each other's sessions only when they count: the overshoot is bounded by what the
    others create between two counts (here at most ``EXACT_COUNT_FRACTION`` of the bound)."""
    store = SqliteStore(tmp_path / "state.db")
    clock = Clock()
    try:
        replicas = [SessionManager(store, clock, max_sessions=40) for _ in range(2)]
        refused = 0
        for i in range(400):
            try:
                replicas[i % 2].begin(REQUEST)
            except ProtocolError:
                refused += 1
        assert 40 <= store.count(NS_SESSIONS, now=clock.now) <= 40 + 36
        assert refused >= 400 - 76
    finally:
        store.close()


def test_audit_group_commit_batches_concurrent_events(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    writer = AuditWriter(store)
    at = datetime.now(UTC)

    async def run() -> list[AuditEvent]:
        events = [AuditEvent(at=at, action="release", subject=f"r/t/{i}", outcome="allowed")
                  for i in range(50)]
        stored = await asyncio.gather(*(writer.write(e) for e in events))
        await writer.drain()
        return list(stored)

    try:
        stored = asyncio.run(run())
        assert [e.subject for e in stored] == [f"r/t/{i}" for i in range(50)]
        assert len({e.id for e in stored}) == 50
        assert writer.batches < 50  # several events per commit
        assert [e.subject for e in store.query_audit()] == [f"r/t/{i}" for i in range(50)]
    finally:
        store.close()


def test_audit_failure_reaches_every_waiter(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    writer = AuditWriter(store)
    store.close()

    async def run() -> list[object]:
        event = AuditEvent(at=datetime.now(UTC), action="release", subject="r/t/x", outcome="allowed")
        return list(await asyncio.gather(writer.write(event), writer.write(event), return_exceptions=True))

    results = asyncio.run(run())
    assert all(type(r).__name__ == "StorageError" for r in results)


# -- in-process app: audit before release, readiness text ---------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_release_fails_closed_when_its_audit_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    kbs = make_kbs(allow_all=True)
    async with kbs.client() as client:
        token = await handshake(client, TeeKeyPair.generate())

        def broken(event: AuditEvent) -> AuditEvent:
            raise StorageError("disk full /var/lib/secret-path")

        monkeypatch.setattr(kbs.store, "append_audit", broken)
        response = await client.get(f"/kbs/v0/resource/{RESOURCE}",
                                    headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert "ciphertext" not in response.text
    assert "secret-path" not in response.text


@pytest.mark.anyio
async def test_readyz_does_not_echo_storage_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    kbs = make_kbs()

    def broken(namespace: str, *, now: datetime) -> int:
        raise StorageError("SQLite store: count failed: unable to open /srv/kbs/state.db")

    monkeypatch.setattr(kbs.store, "count", broken)
    async with kbs.client() as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["store"] == "store unavailable"
    assert "/srv/kbs" not in response.text
