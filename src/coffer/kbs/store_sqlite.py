"""The embedded :class:`~coffer.kbs.store.Store`: one SQLite file in the server's state directory.

Durability: the database runs in WAL mode with ``synchronous=FULL``, so a write the store has returned
from survives a crash of the process or of the machine (every commit is fsynced, except those of
session records, see ``SqliteStore._write``). Each thread gets its
own connection (SQLite connections are not meant to be shared); writers serialise on SQLite's database
lock, waiting up to ``busy_timeout`` seconds, which also makes several processes on one file safe
(every conditional write is one statement, so compare-and-set is atomic across processes too).

The state directory is created ``0700`` and the database file ``0600`` (SQLite gives its ``-wal`` and
``-shm`` files the mode of the database): the store holds sealed resources and the token signing key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from coffer._internal.clock import as_utc
from coffer._internal.encoding import to_jsonable
from coffer.errors import StorageError
from coffer.kbs import migrations
from coffer.kbs.store import NS_SESSIONS, AuditEvent, Entry, audit_filter

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Namespaces whose writes are not fsynced on their own (see SqliteStore._write).
RELAXED_NAMESPACES = frozenset({NS_SESSIONS})
_DRIVER_ERRORS = (sqlite3.Error, OSError, UnicodeError, OverflowError, ValueError)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch (naive times are taken as UTC)."""
    delta = as_utc(moment) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class SqliteStore:
    """A :class:`~coffer.kbs.store.Store` in one SQLite database file (created if absent)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._closed = False
        self._manual_checkpoints = False
        self._thread_write_lock = threading.Lock()
        self._lock_fd: int | None = None
        try:
            _prepare_file(self._path)
            self._lock_fd = os.open(self._path.with_name(self._path.name + "-writer.lock"),
                                    os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create the SQLite database {self._path}: "
                               f"{exc.strerror or exc}") from exc
        try:
            self._schema_version = self._run("migrate", self._migrate)
        except BaseException:
            self.close()
            raise

    # -- connections ---------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    def _open_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA trusted_schema = OFF")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError("the SQLite store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._open_connection()
        if self._manual_checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        with self._lock:
            if self.closed:  # closed by another thread while this one was connecting
                conn.close()
                raise StorageError("the SQLite store is closed")
            # Connections of threads that have ended are closed here, so a server whose thread pool
            # churns does not accumulate open files.
            for thread in [t for t in self._connections if not t.is_alive()]:
                self._connections.pop(thread).close()
            self._connections[threading.current_thread()] = conn
        self._local.conn = conn
        return conn

    def _write(self, what: str, action: Callable[[sqlite3.Connection], T], namespace: str = "") -> T:
        """Run a writing statement holding the cross-process writer lock. Writers of several processes
        queue on an flock instead of SQLite's busy handler, which sleeps in steps of milliseconds.

        Session records (short-lived, re-creatable by a new handshake) are committed without an fsync
        of their own (``synchronous=NORMAL``): they survive a crash of the process, and become durable
        against a machine crash with the next fully synchronous commit (resources, keys, policies,
        audit events), which fsyncs the write-ahead log they are in."""
        relaxed = namespace in RELAXED_NAMESPACES

        def run(conn: sqlite3.Connection) -> T:
            if not relaxed:
                return action(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                return action(conn)
            finally:
                conn.execute("PRAGMA synchronous = FULL")

        with self._writer_lock():
            return self._run(what, run)

    @contextlib.contextmanager
    def _writer_lock(self) -> Any:
        fd = self._lock_fd
        with self._thread_write_lock:
            if fd is None:
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _run(self, what: str, action: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return action(self._connection())
        except StorageError:
            raise
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"SQLite store: {what} failed: {exc}") from exc

    def _migrate(self, conn: sqlite3.Connection) -> int:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StorageError(f"SQLite store: cannot enable WAL journal mode on {self._path}")
        available = migrations.load("sqlite")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS coffer_schema_version ("
                         "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM coffer_schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > len(available):
                raise StorageError(f"the database {self._path} has schema version {current}, newer than "
                                   f"this Coffer supports ({len(available)}); upgrade Coffer")
            for migration in available[current:]:
                for statement in migration.statements():
                    conn.execute(statement)
                conn.execute("INSERT INTO coffer_schema_version (version, name, applied_at) "
                             "VALUES (?, ?, ?)",
                             (migration.version, migration.name, to_micros(datetime.now(UTC))))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return max(current, len(available))

    # -- extras (not part of the Store protocol) ---------------------------------------------------------

    def schema_version(self) -> int:
        def action(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(version) FROM coffer_schema_version").fetchone()
            return int(row[0]) if row and row[0] is not None else 0
        return self._run("schema version", action)

    def checkpoint(self) -> None:
        """Copy the write-ahead log back into the database (a PASSIVE checkpoint: never waits for
        readers or writers). The first call turns off SQLite's automatic checkpoint for this store's
        connections, so from then on the caller runs it (the KBS app does, every second, in a worker
        thread) and no request pays for a checkpoint inside its commit."""
        if not self._manual_checkpoints:
            self._manual_checkpoints = True
            with self._lock:
                connections = list(self._connections.values())
            for conn in connections:  # connections of other threads: the pragma only sets a field
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._run("checkpoint", lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    def ping(self) -> None:
        """Raise :class:`StorageError` unless the database answers (readiness probes)."""
        self._run("ping", lambda conn: conn.execute("SELECT 1").fetchall())

    # -- Store -----------------------------------------------------------------------------------------

    def get(self, namespace: str, key: str, *, now: datetime) -> Entry | None:
        def action(conn: sqlite3.Connection) -> Entry | None:
            rows = conn.execute(
                "SELECT key, value, version, expires_at FROM coffer_kv "
                "WHERE namespace = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, key, to_micros(now))).fetchall()
            return _entry(rows[0]) if rows else None
        return self._run("get", action)

    def put(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None) -> Entry:
        def action(conn: sqlite3.Connection) -> Entry:
            rows = conn.execute(
                "INSERT INTO coffer_kv (namespace, key, value, version, expires_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "version = coffer_kv.version + 1, expires_at = excluded.expires_at "
                "RETURNING version",
                (namespace, key, bytes(value), _micros_or_none(expires_at))).fetchall()
            return Entry(key=key, value=bytes(value), version=int(rows[0][0]), expires_at=expires_at)
        return self._write("put", action, namespace)

    def create(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None,
               now: datetime) -> Entry | None:
        def action(conn: sqlite3.Connection) -> Entry | None:
            # One statement: an expired entry is replaced (its version continues), a live one is kept.
            rows = conn.execute(
                "INSERT INTO coffer_kv (namespace, key, value, version, expires_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "version = coffer_kv.version + 1, expires_at = excluded.expires_at "
                "WHERE coffer_kv.expires_at IS NOT NULL AND coffer_kv.expires_at <= ? "
                "RETURNING version",
                (namespace, key, bytes(value), _micros_or_none(expires_at), to_micros(now))).fetchall()
            if not rows:
                return None
            return Entry(key=key, value=bytes(value), version=int(rows[0][0]), expires_at=expires_at)
        return self._write("create", action, namespace)

    def compare_and_set(self, namespace: str, key: str, value: bytes, *, expected_version: int,
                        expires_at: datetime | None = None) -> Entry | None:
        def action(conn: sqlite3.Connection) -> Entry | None:
            rows = conn.execute(
                "UPDATE coffer_kv SET value = ?, version = version + 1, expires_at = ? "
                "WHERE namespace = ? AND key = ? AND version = ? RETURNING version",
                (bytes(value), _micros_or_none(expires_at), namespace, key, expected_version)).fetchall()
            if not rows:
                return None
            return Entry(key=key, value=bytes(value), version=int(rows[0][0]), expires_at=expires_at)
        return self._write("compare-and-set", action, namespace)

    def delete(self, namespace: str, key: str) -> bool:
        def action(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM coffer_kv WHERE namespace = ? AND key = ?", (namespace, key))
            return cursor.rowcount > 0
        return self._write("delete", action, namespace)

    def list_entries(self, namespace: str, *, prefix: str = "", now: datetime,
                     limit: int = 1000) -> list[Entry]:
        def action(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                "SELECT key, value, version, expires_at FROM coffer_kv "
                "WHERE namespace = ? AND key >= ? AND substr(key, 1, ?) = ? "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY key LIMIT ?",
                (namespace, prefix, len(prefix), prefix, to_micros(now), max(limit, 0))).fetchall()
            return [_entry(row) for row in rows]
        return self._run("list", action)

    def count(self, namespace: str, *, now: datetime) -> int:
        def action(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM coffer_kv "
                "WHERE namespace = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, to_micros(now))).fetchone()
            return int(row[0]) if row else 0
        return self._run("count", action)

    def purge_expired(self, namespace: str, *, now: datetime) -> int:
        def action(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("DELETE FROM coffer_kv WHERE namespace = ? AND expires_at <= ?",
                                  (namespace, to_micros(now)))
            return max(cursor.rowcount, 0)
        return self._write("purge", action, namespace)

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        return self.append_audit_batch([event])[0]

    def append_audit_batch(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Append several events in one transaction: one commit (one fsync of the write-ahead log)
        for the whole batch. The KBS groups the audit events of concurrent requests this way (group
        commit), so each request still waits for its own event to be durable before it answers."""
        rows_in = [(event, dict(event.claims)) for event in events]
        encoded = [json.dumps(to_jsonable(claims), ensure_ascii=False, sort_keys=True)
                   for _, claims in rows_in]

        def action(conn: sqlite3.Connection) -> list[AuditEvent]:
            stored: list[AuditEvent] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for (event, claims), text in zip(rows_in, encoded, strict=True):
                    rows = conn.execute(
                        "INSERT INTO coffer_audit (at, action, subject, outcome, detail, claims) "
                        "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                        (to_micros(event.at), event.action, event.subject, event.outcome, event.detail,
                         text)).fetchall()
                    stored.append(AuditEvent(at=event.at, action=event.action, subject=event.subject,
                                              outcome=event.outcome, detail=event.detail, claims=claims,
                                              id=int(rows[0][0])))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return stored
        if not rows_in:
            return []
        return self._write("audit append", action)

    def query_audit(self, *, since: datetime | None = None, until: datetime | None = None,
                    subject: str | None = None, action: str | None = None,
                    limit: int = 1000) -> list[AuditEvent]:
        where, params = audit_filter(
            since=None if since is None else to_micros(since),
            until=None if until is None else to_micros(until),
            subject=subject, action=action, placeholder="?")
        query = ("SELECT id, at, action, subject, outcome, detail, claims FROM coffer_audit "  # noqa: S608
                 + where + " ORDER BY at, id LIMIT ?")
        params.append(max(limit, 0))

        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            return [AuditEvent(id=int(row[0]), at=from_micros(int(row[1])), action=row[2], subject=row[3],
                               outcome=row[4], detail=row[5], claims=json.loads(row[6]))
                    for row in conn.execute(query, params).fetchall()]
        return self._run("audit query", run)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections.values())
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        with self._thread_write_lock:
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        self._local = threading.local()


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(key=row[0], value=bytes(row[1]), version=int(row[2]),
                 expires_at=None if row[3] is None else from_micros(int(row[3])))


def _micros_or_none(moment: datetime | None) -> int | None:
    return None if moment is None else to_micros(moment)


def _prepare_file(path: Path) -> None:
    """Create missing parent directories 0700 and the database file 0600 (tightening an existing file)."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists() and stat.S_IMODE(sidecar.stat().st_mode) & 0o077:
            os.chmod(sidecar, 0o600)
