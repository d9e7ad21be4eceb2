"""Sandbox records: atomic writes, strict parsing, name reservation, resolution and liveness by
(pid, start time)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UsageError
from coffer.sandbox.state import (
    STATE_DIR_ENV,
    ProcessRef,
    SandboxRecord,
    StateStore,
    default_root,
    new_id,
    now_iso,
    process_start_time,
)


def _record(name: str = "web", **changes: object) -> SandboxRecord:
    base = SandboxRecord(id=new_id(), name=name, image="registry.example/app@sha256:" + "a" * 64,
                         status="running", created=now_iso(), tee="sample", ports=((8080, 80),),
                         processes={"agent": ProcessRef.of(os.getpid())}, container_id="c1",
                         initdata_digest="ab" * 32, extra={"kbs": None})
    return base.with_changes(**changes)


def test_record_round_trips_through_json(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record = _record()
    store.reserve(record)
    loaded = store.load(record.id)
    assert loaded == record
    on_disk = json.loads((store.directory(record.id) / "state.json").read_text())
    assert on_disk["agent_pid"] == os.getpid()
    assert on_disk["development"] is True
    assert not list(store.directory(record.id).glob(".*tmp"))


def test_duplicate_name_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.reserve(_record("web"))
    with pytest.raises(UsageError, match="already used"):
        store.reserve(_record("web"))


@pytest.mark.parametrize("name", ["", "-lead", "a b", "x" * 64, "../etc"])
def test_invalid_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="invalid sandbox name"):
        StateStore(tmp_path).reserve(_record(name))


def test_resolve_by_name_id_and_prefix(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record = _record("web")
    store.reserve(record)
    assert store.resolve("web").id == record.id
    assert store.resolve(record.id).id == record.id
    assert store.resolve(record.id[:6]).id == record.id
    with pytest.raises(UsageError, match="no sandbox"):
        store.resolve("nothing")
    with pytest.raises(UsageError, match="no sandbox"):
        store.resolve(record.id[:3])  # too short to be a prefix


def test_corrupt_record_is_listed_as_broken_not_fatal(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    good = _record("good")
    bad = _record("bad")
    store.reserve(good)
    store.reserve(bad)
    (store.directory(bad.id) / "state.json").write_bytes(b'{"id": "trunc')
    assert [r.name for r in store.records()] == ["good"]
    assert store.broken() == [bad.id]
    with pytest.raises(FormatError):
        store.load(bad.id)
    store.delete(bad.id)
    assert store.broken() == []


def test_truncated_record_is_refused() -> None:
    data = json.dumps(_record().to_json()).encode()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            SandboxRecord.from_json(data[:cut])


def test_oversized_record_is_refused() -> None:
    with pytest.raises(FormatError, match="over"):
        SandboxRecord.from_json(b" " * (1024 * 1024 + 1))


@pytest.mark.parametrize(("key", "value"), [
    ("id", "../../etc"), ("status", "zombie"), ("ports", [{"host": 0, "container": 80}]),
    ("processes", {"agent": {"pid": -1, "start_time": 0}}), ("development", "yes"), ("name", 3),
])
def test_tampered_field_is_refused(key: str, value: object) -> None:
    obj = _record().to_json()
    obj[key] = value
    with pytest.raises(FormatError):
        SandboxRecord.from_json(json.dumps(obj).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_parser_raises_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        SandboxRecord.from_json(data)  # anything else (another CofferError, a crash) fails the test


def test_liveness_uses_start_time_so_a_reused_pid_is_not_ours() -> None:
    me = ProcessRef.of(os.getpid())
    assert me.alive()
    assert not ProcessRef(os.getpid(), me.start_time + 1).alive()


def test_exited_and_zombie_processes_are_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcessRef.of(child.pid)
    deadline = 50
    while deadline and Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        subprocess.run(["sleep", "0.05"], check=True)
        deadline -= 1
    assert not ref.alive()  # a zombie: exited, not yet reaped
    child.wait()
    assert not ref.alive()
    assert process_start_time(child.pid) is None or not ref.alive()


def test_running_record_with_dead_agent_shows_dead(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcessRef.of(child.pid)
    child.wait()
    record = _record(processes={"agent": ref})
    assert record.effective_status() == "dead"
    assert _record().effective_status() == "running"
    assert _record(status="exited").effective_status() == "exited"


def test_state_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv(STATE_DIR_ENV)
    if os.geteuid() == 0:
        assert default_root() == Path("/run/coffer")


def test_save_after_remove_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record = _record()
    store.reserve(record)
    store.delete(record.id)
    with pytest.raises(CofferError, match="removed"):
        store.save(record)
