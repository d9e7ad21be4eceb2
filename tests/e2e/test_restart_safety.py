"""kill -9 of a loaded ``coffer kbs serve`` and a restart on the same state (SQLite, PostgreSQL): nothing
acknowledged is lost and the guests succeed again once the server is back."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from coffer.errors import CofferError
from coffer.guest.attesters import attester_for
from coffer.kbs.client import KbsClient
from coffer.kbs.open_store import sqlite_url
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    KbsProcess,
    admin_get,
    put_resource,
    set_resource_policy,
    state_snapshot,
    write_config,
)

SECRET = b"survives a crash"
RESOURCE = "default/key/durable"
GUESTS = 3
LOAD_BEFORE = 1.0  # seconds of load before the kill
OUTAGE = 0.3  # seconds the server stays dead
LOAD_AFTER = 1.5  # seconds of load after the restart is ready
SETTLE = 0.2  # attempts started this long after readiness must all succeed


@dataclass
class Attempt:
    started: float
    error: str | None


@dataclass
class Load:
    """Guests doing full handshakes + resource fetches in a loop, and an operator writing resources and
    reference values, until stopped. Every outcome is kept with the time its attempt started."""

    url: str
    admin: AdminKey
    stop: threading.Event = field(default_factory=threading.Event)
    attempts: list[Attempt] = field(default_factory=list)
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    acknowledged_svn: list[int] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def guest(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            error: str | None = None
            try:
                with KbsClient(self.url, attester_for("sample"), timeout=5) as client:
                    if client.get_resource(RESOURCE) != SECRET:
                        error = "wrong secret"
            except CofferError as exc:  # TransportError while the server is down, or a refusal
                error = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.attempts.append(Attempt(started, error))
            if error is not None:
                time.sleep(0.05)  # the guest retries

    def operator(self) -> None:
        index = 0
        with httpx.Client(base_url=self.url, headers=self.admin.headers(), timeout=5) as http:
            while not self.stop.is_set():
                path, data = f"crash/written/r{index}", f"value {index}".encode()
                try:
                    if http.post(f"/kbs/v0/resource/{path}", content=data).status_code == 200:
                        self.acknowledged[path] = data
                    answer = http.post("/kbs/v0/reference-value", json={"name": "svn", "values": [index]})
                    if answer.status_code == 200:
                        self.acknowledged_svn.append(index)
                except httpx.HTTPError:
                    time.sleep(0.05)
                index += 1

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self.guest) for _ in range(GUESTS)]
        self.threads.append(threading.Thread(target=self.operator))
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "state" / "state.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.mark.slow
def test_kill9_under_load_loses_nothing(db_url: str, tmp_path: Path, admin_key: AdminKey,
                                        master_key_file: Path, kbs_processes: list[KbsProcess]) -> None:
    db = db_url
    kbs = KbsProcess(write_config(tmp_path / "kbs.toml", db=db, master_key=master_key_file, admin=admin_key))
    kbs_processes.append(kbs)
    kbs.start().wait_ready()
    put_resource(kbs.url, admin_key, RESOURCE, SECRET)
    set_resource_policy(kbs.url, admin_key, SAMPLE_RESOURCE_POLICY)
    for name, values in (("pcr11", ["ab" * 32]), ("measurement", ["cd" * 48]), ("svn", [100000])):
        answer = httpx.post(f"{kbs.url}/kbs/v0/reference-value", headers=admin_key.headers(),
                            json={"name": name, "values": values}, timeout=10)
        assert answer.status_code == 200, answer.text
    before = state_snapshot(kbs.url, admin_key)
    jwks = httpx.get(f"{kbs.url}/.well-known/jwks.json").json()

    load = Load(kbs.url, admin_key).start()
    try:
        time.sleep(LOAD_BEFORE)
        assert kbs.process is not None
        kbs.kill9()
        assert kbs.process.returncode == -9
        killed_at = time.monotonic()
        time.sleep(OUTAGE)
        kbs.start().wait_ready()
        ready_at = time.monotonic()
        time.sleep(LOAD_AFTER)
    finally:
        load.join()

    before_kill = [a for a in load.attempts if a.started < killed_at - 0.5]
    assert before_kill
    assert all(a.error is None for a in before_kill), before_kill[:5]
    settled = [a for a in load.attempts if a.started >= ready_at + SETTLE]
    failures = [a.error for a in settled if a.error is not None]
    assert not failures, failures[:5]
    assert len(settled) >= GUESTS, "the guests did not get through after the restart"

    after = state_snapshot(kbs.url, admin_key)
    assert after["resource_policy"] == before["resource_policy"]
    assert {p: d for p, d in after["resources"].items() if not p.startswith("crash/")} == before["resources"]
    static_before = [rv for rv in before["reference_values"]["reference_values"] if rv["name"] != "svn"]
    static_after = [rv for rv in after["reference_values"]["reference_values"] if rv["name"] != "svn"]
    assert static_after == static_before
    # Every write the server acknowledged before the kill (or after the restart) is there.
    assert len(load.acknowledged) > 3
    for path, data in load.acknowledged.items():
        assert after["resources"].get(path) == hashlib.sha256(data).hexdigest(), path
    svn = admin_get(kbs.url, admin_key, "/kbs/v0/reference-value/svn")
    kept = {record["value"] for record in svn["values"]}
    assert {100000, *load.acknowledged_svn} <= kept
    # The token signing key survived too: tokens issued before the crash stay verifiable.
    assert httpx.get(f"{kbs.url}/.well-known/jwks.json").json() == jwks
