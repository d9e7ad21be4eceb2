"""The one storage interface of the trust services: a namespaced key-value store with expiry and
compare-and-set, plus an append-only audit log.

Everything the KBS and the attestation service keep (sessions, sealed resources, policies, reference
values, token signing keys) lives in namespaces of this store, so the embedded default (SQLite) and
production (PostgreSQL, shared by several replicas) implement the same small contract, checked by one
conformance test suite. Values are opaque bytes; the layer above decides their encoding (sealed
resources are encrypted before they reach the store).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# Namespaces used by Coffer (a store must accept any name matching [a-z0-9_]{1,64}).
NS_SESSIONS = "kbs_sessions"
NS_RESOURCES = "kbs_resources"
NS_POLICIES = "kbs_policies"
NS_REFERENCE_VALUES = "as_reference_values"
NS_KEYS = "as_keys"


@dataclass(frozen=True, kw_only=True)
class Entry:
    key: str
    value: bytes
    version: int  # increases on every write of this key; the compare-and-set token
    expires_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One release or denial (or admin change). ``claims`` holds the workload's identifying claims
    (TEE, measurement, ...), never secret material."""

    at: datetime
    action: str  # "release", "deny", "attest", "attest_failed", "admin"
    subject: str  # resource path, policy id, ...
    outcome: str  # "allowed", "denied", "ok", "error"
    detail: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    id: int | None = None  # assigned by the store


def audit_filter(
    *, since: Any, until: Any, subject: str | None, action: str | None, placeholder: str
) -> tuple[str, list[Any]]:
    """The WHERE clause (possibly empty) and its parameters for an audit query, shared by the SQL
    stores. Only constant fragments go into the clause; every value is a parameter. ``since`` and
    ``until`` arrive already converted to the backend's time representation (or None)."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, operator, value in (("at", ">=", since), ("at", "<=", until),
                                    ("subject", "=", subject), ("action", "=", action)):
        if value is not None:
            conditions.append(f"{column} {operator} {placeholder}")
            params.append(value)
    return ("WHERE " + " AND ".join(conditions)) if conditions else "", params


class Store(Protocol):
    """Implementations must be safe to call from several threads, and (PostgreSQL) from several
    processes sharing one database. Every method raises :class:`coffer.errors.StorageError` (or a
    subclass) for backend failures, never a driver exception."""

    def get(self, namespace: str, key: str, *, now: datetime) -> Entry | None:
        """The entry, or None when absent or expired at ``now``."""
        ...

    def put(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None) -> Entry:
        """Create or overwrite unconditionally."""
        ...

    def create(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None,
               now: datetime) -> Entry | None:
        """Create only if absent (or expired at ``now``); None if a live entry exists."""
        ...

    def compare_and_set(self, namespace: str, key: str, value: bytes, *, expected_version: int,
                        expires_at: datetime | None = None) -> Entry | None:
        """Overwrite only if the stored version is ``expected_version``; None otherwise."""
        ...

    def delete(self, namespace: str, key: str) -> bool:
        ...

    def list_entries(
        self, namespace: str, *, prefix: str = "", now: datetime, limit: int = 1000
    ) -> list[Entry]:
        """Live entries whose key starts with ``prefix``, ordered by key."""
        ...

    def count(self, namespace: str, *, now: datetime) -> int:
        """Live entries in the namespace."""
        ...

    def purge_expired(self, namespace: str, *, now: datetime) -> int:
        ...

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        ...

    def query_audit(self, *, since: datetime | None = None, until: datetime | None = None,
                    subject: str | None = None, action: str | None = None,
                    limit: int = 1000) -> list[AuditEvent]:
        """Events in time order, filtered."""
        ...

    def close(self) -> None:
        ...


class MemoryStore:
    """An in-process :class:`Store` (tests, and ``coffer attest`` dry runs). Not persistent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], Entry] = {}
        self._audit: list[AuditEvent] = []

    @staticmethod
    def _live(entry: Entry | None, now: datetime) -> Entry | None:
        if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
            return None
        return entry

    def get(self, namespace: str, key: str, *, now: datetime) -> Entry | None:
        with self._lock:
            return self._live(self._data.get((namespace, key)), now)

    def put(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None) -> Entry:
        with self._lock:
            old = self._data.get((namespace, key))
            version = old.version + 1 if old else 1
            entry = Entry(key=key, value=value, version=version, expires_at=expires_at)
            self._data[(namespace, key)] = entry
            return entry

    def create(self, namespace: str, key: str, value: bytes, *, expires_at: datetime | None = None,
               now: datetime) -> Entry | None:
        with self._lock:
            old = self._data.get((namespace, key))
            if self._live(old, now) is not None:
                return None
            version = old.version + 1 if old else 1
            entry = Entry(key=key, value=value, version=version, expires_at=expires_at)
            self._data[(namespace, key)] = entry
            return entry

    def compare_and_set(self, namespace: str, key: str, value: bytes, *, expected_version: int,
                        expires_at: datetime | None = None) -> Entry | None:
        with self._lock:
            old = self._data.get((namespace, key))
            if old is None or old.version != expected_version:
                return None
            entry = Entry(key=key, value=value, version=old.version + 1, expires_at=expires_at)
            self._data[(namespace, key)] = entry
            return entry

    def delete(self, namespace: str, key: str) -> bool:
        with self._lock:
            return self._data.pop((namespace, key), None) is not None

    def list_entries(
        self, namespace: str, *, prefix: str = "", now: datetime, limit: int = 1000
    ) -> list[Entry]:
        with self._lock:
            found = [e for (ns, k), e in self._data.items()
                     if ns == namespace and k.startswith(prefix) and self._live(e, now) is not None]
        return sorted(found, key=lambda e: e.key)[:limit]

    def count(self, namespace: str, *, now: datetime) -> int:
        with self._lock:
            return sum(1 for (ns, _), e in self._data.items()
                       if ns == namespace and self._live(e, now) is not None)

    def purge_expired(self, namespace: str, *, now: datetime) -> int:
        with self._lock:
            dead = [k for k, e in self._data.items() if k[0] == namespace and self._live(e, now) is None]
            for k in dead:
                del self._data[k]
            return len(dead)

    def append_audit(self, event: AuditEvent) -> AuditEvent:
        with self._lock:
            stored = AuditEvent(at=event.at, action=event.action, subject=event.subject,
                                outcome=event.outcome, detail=event.detail, claims=dict(event.claims),
                                id=len(self._audit) + 1)
            self._audit.append(stored)
            return stored

    def query_audit(self, *, since: datetime | None = None, until: datetime | None = None,
                    subject: str | None = None, action: str | None = None,
                    limit: int = 1000) -> list[AuditEvent]:
        with self._lock:
            events = [e for e in self._audit
                      if (since is None or e.at >= since) and (until is None or e.at <= until)
                      and (subject is None or e.subject == subject)
                      and (action is None or e.action == action)]
        return events[:limit]

    def close(self) -> None:
        return None
