"""The production :class:`~coffer.kbs.store.Store`: PostgreSQL, shared by several KBS replicas.

Every operation is a single statement in autocommit mode, so the conditional writes are atomic across
processes: ``compare_and_set`` is an ``UPDATE ... WHERE version = $expected`` (under READ COMMITTED a
concurrent updater waits for the row lock and then re-checks the version, so exactly one of two racing
writers wins) and ``create`` is an ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``.

Connections come from a small thread-safe pool opened lazily. A connection that fails is discarded;
read-only operations are retried once on a fresh connection (a replica survives a database restart),
writes are not (their outcome would be unknown), they raise :class:`~coffer.errors.StorageError`.

Migrations run on open under a transaction-scoped advisory lock, so replicas starting together apply
each one exactly once. The connection URL is never put into an error message (it may hold a password).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import psycopg

from coffer._internal.clock import as_utc
from coffer._internal.encoding import to_jsonable
from coffer.errors import StorageError
from coffer.kbs import migrations
from coffer.kbs.store import AuditEvent, Entry, audit_filter

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

# Key of the advisory lock serialising migrations ("coffer" in ASCII).
MIGRATION_LOCK = 0x636F66666572
_DRIVER_ERRORS = (psycopg.Error, UnicodeError, OverflowError, ValueError)


class PostgresStore:
    """A :class:`~coffer.kbs.store.Store` in a PostgreSQL database given by a libpq URL."""

    def __init__(self, url: str, *, pool_size: int = 8, acquire_timeout: float = 30.0,
                 connect_timeout: int = 10) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._url = url
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False
        try:
            self._schema_version = self._run("migrate", self._migrate, retry=False)
        except BaseException:
            self.close()
            raise

    # -- pool ----------------------------------------------------------------------------------------------

    def _connect(self) -> Connection:
        conn: Connection = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout)
        try:
            conn.execute("SET TIME ZONE 'UTC'")
        except BaseException:
            conn.close()
            raise
        return conn

    def _acquire(self) -> Connection:
        if self._closed:
            raise StorageError("the PostgreSQL store is closed")
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise StorageError("PostgreSQL store: no free database connection "
                               f"within {self._acquire_timeout:g} s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            return conn if conn is not None else self._connect()
        except BaseException:
            self._slots.release()
            raise

    def _release(self, conn: Connection, *, healthy: bool) -> None:
        stale: list[Connection] = []
        try:
            keep = healthy and not conn.closed and not conn.broken
            with self._lock:
                if keep and not self._closed:
                    self._idle.append(conn)
                    return
                if conn.broken:
                    # The server went away (restart, failover, terminated backends): the idle
                    # connections are most likely dead too, so start afresh rather than fail once each.
                    stale, self._idle = self._idle, []
            conn.close()
            for other in stale:
                other.close()
        finally:
            self._slots.release()

    def _run(self, what: str, action: Callable[[Connection], T], *, retry: bool) -> T:
        """Run ``action`` on a pooled connection, translating driver errors; ``retry`` (read-only
        actions only) tries once more on a fresh connection after a connection-level failure."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                conn = self._acquire()
            except StorageError:
                raise
            except _DRIVER_ERRORS as exc:
                raise StorageError(f"PostgreSQL store: cannot connect ({what}): {_describe(exc)}") from exc
            healthy = False
            try:
                result = action(conn)
                healthy = True
                return result
            except StorageError:
                healthy = not conn.broken
                raise
            except psycopg.OperationalError as exc:
                if attempt + 1 < attempts and (conn.broken or conn.closed):
                    continue
                raise StorageError(f"PostgreSQL store: {what} failed: {_describe(exc)}") from exc
            except _DRIVER_ERRORS as exc:
                healthy = not conn.broken and not conn.closed
                raise StorageError(f"PostgreSQL store: {what} failed: {_describe(exc)}") from exc
            finally:
                self._release(conn, healthy=healthy)
        raise AssertionError("unreachable")  # pragma: no cover

    def _migrate(self, conn: Connection) -> int:
        available = migrations.load("postgresql")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS coffer_schema_version ("
                         "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                         "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = conn.execute("SELECT max(version) FROM coffer_schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > len(available):
                raise StorageError(f"the database has schema version {current}, newer than this Coffer "
                                   f"supports ({len(available)}); upgrade Coffer")
            for migration in available[current:]:
                for statement in migration.statements():
                    conn.execute(statement.encode())
                conn.execute("INSERT INTO coffer_schema_version (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
        return max(current, len(available))

    # -- extras (not part of the Store protocol) ---------------------------------------------------------

    def schema_version(self) -> int:
        def action(conn: Connection) -> int:
            row = conn.execute("SELECT max(version) FROM coffer_schema_version").fetchone()
            return int(row[0]) if row and row[0] is not None else 0
        return self._run("schema version", action, retry=True)

    def ping(self) -> None:
        """Raise :class:`StorageError` unless the database answers (readiness probes)."""
        self._run("ping", lambda conn: conn.execute("SELECT 1").fetchall(), retry=True)

    # -- Store -------------------------------------------------------------------------------------------

    def get(self, namespace: str, key: str, *, now: datetime) -> Entry | None:
        def action(conn: Connection) -> Entry | None:
            row = conn.execute(
                "SELECT key, value, version, expires_at FROM coffer_kv "
                "WHERE namespace = %s AND key = %s AND (expires_at IS NULL OR expires_at > %s)",
                (namespace, key, as_utc(now))).fetchone()
            return _entry(row) if row else None
        return self._run("get", action, retry=True)

    def put(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None) -> Entry:
        def action(conn: Connection) -> Entry:
            row = conn.execute(
                "INSERT INTO coffer_kv (namespace, key, value, version, expires_at) "
                "VALUES (%s, %s, %s, 1, %s) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "version = coffer_kv.version + 1, expires_at = excluded.expires_at "
                "RETURNING version",
                (namespace, key, bytes(value), _utc_or_none(expires_at))).fetchone()
            if row is None:  # pragma: no cover - an upsert always returns its row
                raise StorageError("PostgreSQL store: put returned no row")
            return Entry(key=key, value=bytes(value), version=int(row[0]), expires_at=expires_at)
        return self._run("put", action, retry=False)

    def create(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None,
               now: datetime) -> Entry | None:
        def action(conn: Connection) -> Entry | None:
            row = conn.execute(
                "INSERT INTO coffer_kv (namespace, key, value, version, expires_at) "
                "VALUES (%s, %s, %s, 1, %s) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "version = coffer_kv.version + 1, expires_at = excluded.expires_at "
                "WHERE coffer_kv.expires_at IS NOT NULL AND coffer_kv.expires_at <= %s "
                "RETURNING version",
                (namespace, key, bytes(value), _utc_or_none(expires_at), as_utc(now))).fetchone()
            if row is None:
                return None
            return Entry(key=key, value=bytes(value), version=int(row[0]), expires_at=expires_at)
        return self._run("create", action, retry=False)

    def compare_and_set(self, namespace: str, key: str, value: bytes, *, expected_version: int,
                        expires_at: datetime | None = None) -> Entry | None:
        def action(conn: Connection) -> Entry | None:
            row = conn.execute(
                "UPDATE coffer_kv SET value = %s, version = version + 1, expires_at = %s "
                "WHERE namespace = %s AND key = %s AND version = %s RETURNING version",
                (bytes(value), _utc_or_none(expires_at), namespace, key, expected_version)).fetchone()
            if row is None:
                return None
            return Entry(key=key, value=bytes(value), version=int(row[0]), expires_at=expires_at)
        return self._run("compare-and-set", action, retry=False)

    def delete(self, namespace: str, key: str) -> bool:
        def action(conn: Connection) -> bool:
            cursor = conn.execute("DELETE FROM coffer_kv WHERE namespace = %s AND key = %s", (namespace, key))
            return cursor.rowcount > 0
        return self._run("delete", action, retry=False)

    def list_entries(self, namespace: str, *, prefix: str = "", now: datetime,
                     limit: int = 1000) -> list[Entry]:
        def action(conn: Connection) -> list[Entry]:
            rows = conn.execute(
                "SELECT key, value, version, expires_at FROM coffer_kv "
                "WHERE namespace = %s AND key >= %s AND starts_with(key, %s) "
                "AND (expires_at IS NULL OR expires_at > %s) ORDER BY key LIMIT %s",
                (namespace, prefix, prefix, as_utc(now), max(limit, 0))).fetchall()
            return [_entry(row) for row in rows]
        return self._run("list", action, retry=True)

    def count(self, namespace: str, *, now: datetime) -> int:
        def action(conn: Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM coffer_kv "
                "WHERE namespace = %s AND (expires_at IS NULL OR expires_at > %s)",
                (namespace, as_utc(now))).fetchone()
            return int(row[0]) if row else 0
        return self._run("count", action, retry=True)

    def purge_expired(self, namespace: str, *, now: datetime) -> int:
        def action(conn: Connection) -> int:
            cursor = conn.execute("DELETE FROM coffer_kv WHERE namespace = %s AND expires_at <= %s",
                                  (namespace, as_utc(now)))
            return max(cursor.rowcount, 0)
        return self._run("purge", action, retry=False)

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        claims = dict(event.claims)
        encoded = json.dumps(to_jsonable(claims), ensure_ascii=False, sort_keys=True)

        def action(conn: Connection) -> AuditEvent:
            row = conn.execute(
                "INSERT INTO coffer_audit (at, action, subject, outcome, detail, claims) "
                "VALUES (%s, %s, %s, %s, %s, %s::json) RETURNING id",
                (as_utc(event.at), event.action, event.subject, event.outcome, event.detail,
                 encoded)).fetchone()
            if row is None:  # pragma: no cover - an insert always returns its row
                raise StorageError("PostgreSQL store: audit append returned no row")
            return AuditEvent(at=event.at, action=event.action, subject=event.subject, outcome=event.outcome,
                              detail=event.detail, claims=claims, id=int(row[0]))
        return self._run("audit append", action, retry=False)

    def query_audit(self, *, since: datetime | None = None, until: datetime | None = None,
                    subject: str | None = None, action: str | None = None,
                    limit: int = 1000) -> list[AuditEvent]:
        where, params = audit_filter(
            since=None if since is None else as_utc(since),
            until=None if until is None else as_utc(until),
            subject=subject, action=action, placeholder="%s")
        query = ("SELECT id, at, action, subject, outcome, detail, claims::text FROM coffer_audit "  # noqa: S608
                 + where + " ORDER BY at, id LIMIT %s")
        params.append(max(limit, 0))

        def run(conn: Connection) -> list[AuditEvent]:
            return [AuditEvent(id=int(row[0]), at=as_utc(row[1]), action=row[2], subject=row[3],
                               outcome=row[4], detail=row[5], claims=json.loads(row[6]))
                    for row in conn.execute(query.encode(), params).fetchall()]
        return self._run("audit query", run, retry=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _entry(row: tuple[Any, ...]) -> Entry:
    expires_at = row[3]
    return Entry(key=row[0], value=bytes(row[1]), version=int(row[2]),
                 expires_at=None if expires_at is None else as_utc(expires_at))


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def _describe(exc: BaseException) -> str:
    """The driver's message, first line only (libpq appends hints and context on further lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
