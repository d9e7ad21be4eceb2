"""One conformance suite for every :class:`coffer.kbs.store.Store`: MemoryStore, SQLite and a real
PostgreSQL (skipped with the reason when no server can be started), plus backend-specific checks
(file permissions, WAL, migrations, error translation) and multi-process compare-and-set races."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import ConfigError, StorageError
from coffer.kbs import migrations
from coffer.kbs.open_store import open_store, sqlite_path, sqlite_url
from coffer.kbs.store import NS_SESSIONS, AuditEvent, Entry, MemoryStore, Store
from coffer.kbs.store_postgres import PostgresStore
from coffer.kbs.store_sqlite import SqliteStore
from tests.support.postgres import (  # noqa: F401 - fixtures used by name
    PostgresServer,
    PostgresUnavailableError,
    find_bindir,
    postgres_server,
    postgres_url,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
NS = "test_ns"
OTHER = "other_ns"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str

    def open(self) -> Store:
        return open_store(self.url)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "memory":
        return Backend(name, "memory://")
    if name == "sqlite":
        return Backend(name, sqlite_url(tmp_path / "state" / "state.db"))
    url: str = request.getfixturevalue("postgres_url")
    return Backend(name, url)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    yield opened
    opened.close()


# -- key-value contract ------------------------------------------------------------------------------------


def test_get_of_absent_key_is_none(store: Store) -> None:
    assert store.get(NS, "missing", now=T0) is None


@pytest.mark.parametrize("value", [b"", b"\x00\x01\xff" * 3, os.urandom(1 << 20)],
                         ids=["empty", "binary", "1MiB"])
def test_put_then_get_round_trips_bytes(store: Store, value: bytes) -> None:
    written = store.put(NS, "k", value)
    assert written == Entry(key="k", value=value, version=1, expires_at=None)
    assert store.get(NS, "k", now=T0) == written


def test_every_put_increments_the_version(store: Store) -> None:
    assert [store.put(NS, "k", bytes([i])).version for i in range(4)] == [1, 2, 3, 4]
    got = store.get(NS, "k", now=T0)
    assert got is not None
    assert (got.value, got.version) == (b"\x03", 4)


def test_entry_is_gone_at_and_after_its_expiry(store: Store) -> None:
    store.put(NS, "k", b"v", expires_at=at(10))
    assert store.get(NS, "k", now=at(9.999999)) is not None
    assert store.get(NS, "k", now=at(10)) is None
    assert store.get(NS, "k", now=at(11)) is None


def test_expiry_round_trips_to_the_microsecond_from_any_offset(store: Store) -> None:
    expiry = datetime(2031, 6, 7, 8, 9, 10, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    store.put(NS, "k", b"v", expires_at=expiry)
    got = store.get(NS, "k", now=T0)
    assert got is not None
    assert got.expires_at == expiry
    assert got.expires_at is not None
    assert got.expires_at.utcoffset() is not None


def test_put_clears_a_previous_expiry(store: Store) -> None:
    store.put(NS, "k", b"v", expires_at=at(10))
    store.put(NS, "k", b"w")
    got = store.get(NS, "k", now=at(1000))
    assert got is not None
    assert got.expires_at is None


def test_create_makes_an_absent_entry(store: Store) -> None:
    created = store.create(NS, "k", b"v", expires_at=at(5), now=T0)
    assert created == Entry(key="k", value=b"v", version=1, expires_at=at(5))
    assert store.get(NS, "k", now=T0) == created


def test_create_refuses_when_a_live_entry_exists(store: Store) -> None:
    store.put(NS, "k", b"first", expires_at=at(5))
    assert store.create(NS, "k", b"second", now=at(4)) is None
    got = store.get(NS, "k", now=at(4))
    assert got is not None
    assert got.value == b"first"


def test_create_replaces_an_expired_entry_with_the_next_version(store: Store) -> None:
    store.put(NS, "k", b"old", expires_at=at(5))
    created = store.create(NS, "k", b"new", now=at(5))
    assert created is not None
    assert (created.value, created.version) == (b"new", 2)
    assert store.get(NS, "k", now=at(100)) == created


def test_compare_and_set_with_the_current_version_wins(store: Store) -> None:
    first = store.put(NS, "k", b"a")
    second = store.compare_and_set(NS, "k", b"b", expected_version=first.version, expires_at=at(60))
    assert second == Entry(key="k", value=b"b", version=first.version + 1, expires_at=at(60))
    assert store.get(NS, "k", now=T0) == second


def test_compare_and_set_with_a_stale_version_loses(store: Store) -> None:
    first = store.put(NS, "k", b"a")
    store.put(NS, "k", b"b")
    assert store.compare_and_set(NS, "k", b"c", expected_version=first.version) is None
    got = store.get(NS, "k", now=T0)
    assert got is not None
    assert (got.value, got.version) == (b"b", 2)


def test_compare_and_set_of_an_absent_key_loses(store: Store) -> None:
    assert store.compare_and_set(NS, "nobody", b"x", expected_version=1) is None
    assert store.get(NS, "nobody", now=T0) is None


def test_the_same_version_wins_only_once(store: Store) -> None:
    entry = store.put(NS, "k", b"a")
    assert store.compare_and_set(NS, "k", b"b", expected_version=entry.version) is not None
    assert store.compare_and_set(NS, "k", b"c", expected_version=entry.version) is None


def test_delete_reports_whether_something_was_removed(store: Store) -> None:
    store.put(NS, "k", b"v")
    assert store.delete(NS, "k") is True
    assert store.delete(NS, "k") is False
    assert store.get(NS, "k", now=T0) is None


def test_namespaces_are_isolated(store: Store) -> None:
    store.put(NS, "k", b"mine")
    store.put(OTHER, "k", b"theirs")
    assert store.delete(OTHER, "k")
    got = store.get(NS, "k", now=T0)
    assert got is not None
    assert got.value == b"mine"
    assert store.count(OTHER, now=T0) == 0


def test_list_entries_filters_by_prefix_and_orders_by_key(store: Store) -> None:
    for key in ["b/2", "a/1", "b/1", "b", "bb/1", "c"]:
        store.put(NS, key, key.encode())
    store.put(OTHER, "b/3", b"other namespace")
    assert [e.key for e in store.list_entries(NS, prefix="b/", now=T0)] == ["b/1", "b/2"]
    assert [e.key for e in store.list_entries(NS, now=T0)] == ["a/1", "b", "b/1", "b/2", "bb/1", "c"]
    assert [e.key for e in store.list_entries(NS, now=T0, limit=2)] == ["a/1", "b"]
    assert store.list_entries(NS, prefix="zz", now=T0) == []


def test_list_entries_treats_sql_wildcards_in_prefixes_literally(store: Store) -> None:
    for key in ["a%b", "axb", "a_c", "ayc", "a\\d"]:
        store.put(NS, key, b"")
    assert [e.key for e in store.list_entries(NS, prefix="a%", now=T0)] == ["a%b"]
    assert [e.key for e in store.list_entries(NS, prefix="a_", now=T0)] == ["a_c"]
    assert [e.key for e in store.list_entries(NS, prefix="a\\", now=T0)] == ["a\\d"]


def test_list_entries_orders_by_code_point(store: Store) -> None:
    keys = ["Z", "a", "é", "ß", "日本", "\U0001f512", "A", "~"]
    for key in keys:
        store.put(NS, key, key.encode())
    assert [e.key for e in store.list_entries(NS, now=T0)] == sorted(keys)
    assert [e.key for e in store.list_entries(NS, prefix="日", now=T0)] == ["日本"]


def test_list_entries_skips_expired_entries(store: Store) -> None:
    store.put(NS, "live", b"", expires_at=at(10))
    store.put(NS, "dead", b"", expires_at=at(5))
    store.put(NS, "forever", b"")
    assert [e.key for e in store.list_entries(NS, now=at(7))] == ["forever", "live"]


def test_count_and_purge_expired(store: Store) -> None:
    for i in range(5):
        store.put(NS, f"s{i}", b"", expires_at=at(i))
    store.put(NS, "forever", b"")
    store.put(OTHER, "old", b"", expires_at=at(0))
    assert store.count(NS, now=at(2)) == 3  # s3, s4, forever
    assert store.purge_expired(NS, now=at(2)) == 3  # s0, s1, s2
    assert store.purge_expired(NS, now=at(2)) == 0
    assert store.count(NS, now=T0) == 3
    assert store.count(OTHER, now=T0) == 0
    assert store.purge_expired(OTHER, now=at(1)) == 1


def test_unicode_keys_round_trip(store: Store) -> None:
    key = "repo/тип/\u00e9t\u00e9-\U0001f512"
    store.put(NS_SESSIONS, key, b"v")
    got = store.get(NS_SESSIONS, key, now=T0)
    assert got is not None
    assert got.key == key


# -- audit log ----------------------------------------------------------------------------------------------


def _event(seconds: float, *, action: str = "release", subject: str = "repo/key/1",
           claims: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent(at=at(seconds), action=action, subject=subject, outcome="allowed",
                      detail=f"event at {seconds}", claims=claims or {})


def test_audit_append_assigns_increasing_ids(store: Store) -> None:
    ids = [store.append_audit(_event(i)).id for i in range(3)]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(i or 0 for i in ids)
    assert len(set(ids)) == 3


def test_audit_round_trips_every_field(store: Store) -> None:
    claims = {"tee": "snp", "measurement": "ab" * 48, "nested": {"svn": [1, 2, 3], "debug": False},
              "unicode": "caf\u00e9"}
    stored = store.append_audit(_event(1, claims=claims))
    [got] = store.query_audit()
    assert got == stored
    assert got.claims == claims
    assert got.at == at(1)


def test_audit_query_filters_by_time_subject_and_action(store: Store) -> None:
    store.append_audit(_event(1, subject="a/b/c"))
    store.append_audit(_event(2, subject="a/b/d", action="deny"))
    store.append_audit(_event(3, subject="a/b/c", action="deny"))
    store.append_audit(_event(4, subject="a/b/c"))

    def seconds(events: list[AuditEvent]) -> list[float]:
        return [(e.at - T0).total_seconds() for e in events]

    assert seconds(store.query_audit()) == [1, 2, 3, 4]
    assert seconds(store.query_audit(since=at(2), until=at(3))) == [2, 3]  # both bounds inclusive
    assert seconds(store.query_audit(subject="a/b/c")) == [1, 3, 4]
    assert seconds(store.query_audit(action="deny")) == [2, 3]
    assert seconds(store.query_audit(subject="a/b/c", action="deny", since=at(3))) == [3]
    assert seconds(store.query_audit(limit=2)) == [1, 2]
    assert store.query_audit(subject="nothing") == []


# -- concurrency within one process -------------------------------------------------------------------------


def _cas_increment(store: Store, key: str) -> int:
    """Increment a decimal counter with compare-and-set; returns the number of lost races."""
    lost = 0
    while True:
        current = store.get(NS, key, now=T0)
        assert current is not None
        if store.compare_and_set(NS, key, str(int(current.value) + 1).encode(),
                                 expected_version=current.version) is not None:
            return lost
        lost += 1


def test_threads_incrementing_with_compare_and_set_lose_no_update(store: Store) -> None:
    store.put(NS, "counter", b"0")
    threads, per_thread = 4, 25
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                _cas_increment(store, "counter")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    got = store.get(NS, "counter", now=T0)
    assert got is not None
    assert (got.value, got.version) == (str(threads * per_thread).encode(), threads * per_thread + 1)


def test_threads_racing_to_create_one_key_have_one_winner(store: Store) -> None:
    barrier = threading.Barrier(4)
    won: list[bool] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        barrier.wait(timeout=30)
        result = store.create(NS, "session", str(i).encode(), now=T0) is not None
        with lock:
            won.append(result)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(won) == [False, False, False, True]


# -- model-based check against MemoryStore ------------------------------------------------------------------

_keys = st.sampled_from(["a", "ab", "b", "b/1", "b/2"])
_times = st.integers(min_value=0, max_value=6).map(at)
_expiry = st.none() | _times
_ops = st.one_of(
    st.tuples(st.just("get"), _keys, _times),
    st.tuples(st.just("put"), _keys, st.binary(max_size=4), _expiry),
    st.tuples(st.just("create"), _keys, st.binary(max_size=4), _expiry, _times),
    st.tuples(st.just("cas"), _keys, st.binary(max_size=4), st.integers(0, 4), _expiry),
    st.tuples(st.just("delete"), _keys),
    st.tuples(st.just("list"), st.sampled_from(["", "a", "b/"]), _times, st.integers(0, 4)),
    st.tuples(st.just("count"), _times),
    st.tuples(st.just("purge"), _times),
)


def _apply(store: Store, ns: str, op: tuple[Any, ...]) -> object:
    kind = op[0]
    if kind == "get":
        return store.get(ns, op[1], now=op[2])
    if kind == "put":
        return store.put(ns, op[1], op[2], expires_at=op[3])
    if kind == "create":
        return store.create(ns, op[1], op[2], expires_at=op[3], now=op[4])
    if kind == "cas":
        return store.compare_and_set(ns, op[1], op[2], expected_version=op[3], expires_at=op[4])
    if kind == "delete":
        return store.delete(ns, op[1])
    if kind == "list":
        return store.list_entries(ns, prefix=op[1], now=op[2], limit=op[3])
    if kind == "count":
        return store.count(ns, now=op[1])
    return store.purge_expired(ns, now=op[1])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_ops, max_size=25))
def test_behaves_like_the_memory_store(store: Store, ops: list[tuple[Any, ...]]) -> None:
    model = MemoryStore()
    ns = "model_" + uuid.uuid4().hex[:12]  # a fresh namespace per example on the shared store
    for op in ops:
        assert _apply(store, ns, op) == _apply(model, ns, op), op


# -- SQLite specifics ---------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_creates_state_dir_0700_and_database_0600(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    sq = SqliteStore(state / "state.db")
    try:
        sq.put(NS, "k", b"v")
        assert _mode(tmp_path / "deep") == 0o700
        assert _mode(state) == 0o700
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert _mode(state / name) == 0o600, name
    finally:
        sq.close()


def test_sqlite_tightens_an_existing_world_readable_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    path.chmod(0o644)
    SqliteStore(path).close()
    assert _mode(path) == 0o600


def test_sqlite_runs_wal_with_full_sync_and_a_busy_timeout(tmp_path: Path) -> None:
    sq = SqliteStore(tmp_path / "state.db", busy_timeout=7)
    try:
        def pragma(name: str) -> object:
            return sq._run(name, lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("busy_timeout") == 7000
    finally:
        sq.close()


def test_sqlite_data_survives_reopening(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "state.db")
    first = open_store(url)
    first.put(NS, "k", b"kept", expires_at=at(10))
    first.append_audit(_event(1))
    first.close()
    second = open_store(url)
    try:
        assert second.get(NS, "k", now=T0) == Entry(key="k", value=b"kept", version=1, expires_at=at(10))
        assert len(second.query_audit()) == 1
    finally:
        second.close()


def test_sqlite_records_migrations_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    for _ in range(2):
        SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT version, name FROM coffer_schema_version ORDER BY version").fetchall()
    conn.close()
    assert rows == [(m.version, m.name) for m in migrations.load("sqlite")]


def test_sqlite_refuses_a_database_from_a_newer_coffer(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO coffer_schema_version VALUES (999, 'future', 0)")
    conn.close()
    with pytest.raises(StorageError, match="schema version 999"):
        SqliteStore(path)


def test_sqlite_rejects_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not an SQLite database, just some text" * 100)
    with pytest.raises(StorageError, match="SQLite"):
        SqliteStore(path)


def test_sqlite_reports_an_unusable_path_as_storage_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()
    with pytest.raises(StorageError):
        SqliteStore(tmp_path / "state.db")


def test_sqlite_store_refuses_use_after_close(tmp_path: Path) -> None:
    sq = SqliteStore(tmp_path / "state.db")
    sq.close()
    with pytest.raises(StorageError, match="closed"):
        sq.get(NS, "k", now=T0)


def test_sqlite_closes_connections_of_finished_threads(tmp_path: Path) -> None:
    sq = SqliteStore(tmp_path / "state.db")
    try:
        for _ in range(5):
            worker = threading.Thread(target=sq.put, args=(NS, "k", b"v"))
            worker.start()
            worker.join()
        sq.ping()
        assert len(sq._connections) <= 2
    finally:
        sq.close()


# -- PostgreSQL specifics -----------------------------------------------------------------------------------


def test_postgres_data_survives_reopening_and_migrates_once(postgres_url: str) -> None:  # noqa: F811
    first = PostgresStore(postgres_url)
    first.put(NS, "k", b"kept", expires_at=at(10))
    first.close()
    second = PostgresStore(postgres_url)
    try:
        assert second.get(NS, "k", now=T0) == Entry(key="k", value=b"kept", version=1, expires_at=at(10))
        assert second.schema_version() == migrations.latest_version("postgresql")
    finally:
        second.close()


def test_postgres_replicas_opening_together_migrate_once(postgres_url: str) -> None:  # noqa: F811
    barrier = threading.Barrier(4)
    opened: list[Store] = []
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait(timeout=30)
        try:
            opened.append(open_store(postgres_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    for each in opened:
        each.close()
    assert errors == []
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT version FROM coffer_schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, migrations.latest_version("postgresql") + 1))


def test_postgres_refuses_a_database_from_a_newer_coffer(postgres_url: str) -> None:  # noqa: F811
    PostgresStore(postgres_url).close()
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO coffer_schema_version (version, name) VALUES (999, 'future')")
    with pytest.raises(StorageError, match="schema version 999"):
        PostgresStore(postgres_url)


def test_postgres_unreachable_is_storage_error_without_the_password(postgres_server: PostgresServer) -> None:  # noqa: F811
    url = f"postgresql://coffer:s3cret-pw@127.0.0.1:{_closed_port()}/none?connect_timeout=2"
    with pytest.raises(StorageError) as info:
        open_store(url)
    assert "s3cret-pw" not in str(info.value)
    assert info.value.__cause__ is not None


def test_postgres_wrong_password_is_storage_error(postgres_server: PostgresServer) -> None:  # noqa: F811
    url = postgres_server.url().replace(postgres_server.password, "wrong-password")
    with pytest.raises(StorageError) as info:
        open_store(url)
    assert "wrong-password" not in str(info.value)


def test_postgres_translates_driver_errors_on_bad_values(postgres_url: str) -> None:  # noqa: F811
    pg = PostgresStore(postgres_url)
    try:
        with pytest.raises(StorageError, match="put failed"):
            pg.put(NS, "nul\x00key", b"v")  # PostgreSQL text cannot hold NUL
        pg.put(NS, "fine", b"v")  # the pool recovered
    finally:
        pg.close()


def test_postgres_reads_recover_after_the_server_drops_connections(postgres_url: str) -> None:  # noqa: F811
    pg = PostgresStore(postgres_url, pool_size=2)
    try:
        pg.put(NS, "k", b"v")
        import psycopg

        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        got = pg.get(NS, "k", now=T0)  # retried once on a fresh connection
        assert got is not None
        assert got.value == b"v"
    finally:
        pg.close()


def test_postgres_writes_recover_after_the_server_drops_connections(postgres_url: str) -> None:  # noqa: F811
    pg = PostgresStore(postgres_url, pool_size=4)
    try:
        barrier = threading.Barrier(4)

        def warm() -> None:  # open all four pooled connections
            barrier.wait(timeout=30)
            pg.put(NS, "warm", b"")

        workers = [threading.Thread(target=warm) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        import psycopg

        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        failures = 0
        for i in range(3):
            try:
                pg.put(NS, f"after-{i}", b"v")
            except StorageError:
                failures += 1  # a write on a dead connection fails once (its outcome is unknown)
        assert failures <= 1
        assert pg.get(NS, "after-2", now=T0) is not None
    finally:
        pg.close()


def test_postgres_store_refuses_use_after_close(postgres_url: str) -> None:  # noqa: F811
    pg = PostgresStore(postgres_url)
    pg.close()
    with pytest.raises(StorageError, match="closed"):
        pg.get(NS, "k", now=T0)


def test_postgres_fixture_reports_missing_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COFFER_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresUnavailableError, match="no initdb"):
        find_bindir()


def _closed_port() -> int:
    from coffer._internal.net import free_port

    return free_port()


# -- open_store ---------------------------------------------------------------------------------------------


def test_open_store_memory_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_open_store_refuses_unknown_schemes_without_echoing_the_url() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("mysql://root:hunter2@db/coffer")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError):
        open_store("/var/lib/coffer/state.db")


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///state.db", Path("state.db")),
    ("sqlite:///var/state.db", Path("var/state.db")),
    ("sqlite:////var/lib/coffer/state.db", Path("/var/lib/coffer/state.db")),
])
def test_sqlite_url_paths_follow_the_sqlalchemy_convention(url: str, path: Path) -> None:
    assert sqlite_path(url) == path
    assert sqlite_path(sqlite_url(path)) == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///x.db?mode=ro"])
def test_sqlite_urls_without_a_plain_path_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        sqlite_path(url)


def test_migration_files_split_into_statements() -> None:
    dialects: tuple[migrations.Dialect, ...] = ("sqlite", "postgresql")
    for dialect in dialects:
        loaded = migrations.load(dialect)
        assert [m.version for m in loaded] == list(range(1, len(loaded) + 1))
        for migration in loaded:
            statements = migration.statements()
            assert statements
            assert all(s.endswith(";") for s in statements)


# -- several processes on one database ----------------------------------------------------------------------

ROUNDS = 15
INCREMENTS = 30


def _race_worker(url: str, worker: int, barrier: Any, results: Any) -> None:
    """Child process: race the sibling on compare-and-set and create, then increment a shared counter."""
    try:
        store = open_store(url)
        try:
            for i in range(ROUNDS):
                barrier.wait(timeout=60)
                won = store.compare_and_set(NS, f"race-{i}", f"w{worker}".encode(), expected_version=1)
                results.put(("cas", i, worker, won is not None))
            for i in range(ROUNDS):
                barrier.wait(timeout=60)
                created = store.create(NS, f"new-{i}", f"w{worker}".encode(), now=T0)
                results.put(("create", i, worker, created is not None))
            lost = sum(_cas_increment(store, "counter") for _ in range(INCREMENTS))
            results.put(("counter", lost, worker, True))
        finally:
            store.close()
    except BaseException as exc:
        results.put(("error", repr(exc), worker, False))
        raise


def _race(url: str) -> None:
    setup = open_store(url)
    try:
        for i in range(ROUNDS):
            setup.put(NS, f"race-{i}", b"initial")
        setup.put(NS, "counter", b"0")
    finally:
        setup.close()

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    processes = [ctx.Process(target=_race_worker, args=(url, w, barrier, results)) for w in (0, 1)]
    for process in processes:
        process.start()
    events: list[tuple[str, Any, int, bool]] = []
    expected = 2 * (2 * ROUNDS + 1)
    try:
        while len(events) < expected:
            event = results.get(timeout=120)
            assert event[0] != "error", event
            events.append(event)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():  # pragma: no cover - only on a hang
                process.kill()
    assert [p.exitcode for p in processes] == [0, 0]

    check = open_store(url)
    try:
        for kind, prefix in (("cas", "race-"), ("create", "new-")):
            for i in range(ROUNDS):
                winners = [w for k, r, w, won in events if k == kind and r == i and won]
                assert len(winners) == 1, (kind, i, winners)
                entry = check.get(NS, f"{prefix}{i}", now=T0)
                assert entry is not None
                assert entry.value == f"w{winners[0]}".encode()
                assert entry.version == (2 if kind == "cas" else 1)
        counter = check.get(NS, "counter", now=T0)
        assert counter is not None
        assert counter.value == str(2 * INCREMENTS).encode()
        assert counter.version == 2 * INCREMENTS + 1
    finally:
        check.close()


def test_two_processes_racing_on_sqlite_have_exactly_one_winner(tmp_path: Path) -> None:
    _race(sqlite_url(tmp_path / "state.db"))


def test_two_processes_racing_on_postgres_have_exactly_one_winner(postgres_url: str) -> None:  # noqa: F811
    _race(postgres_url)
