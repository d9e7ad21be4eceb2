"""RCAR sessions (``/auth`` → ``/attest`` → resource GETs), kept in the shared store.

A session is created by ``/auth`` with a fresh nonce and lives for a fixed time (5 minutes by default;
attesting does not extend it). ``/attest`` verifies the evidence against the session's nonce and then
moves the session ``authed`` → ``attested`` (storing the token) in one compare-and-set on the version
it read, so across every replica sharing the store a nonce is consumed exactly once: a second
``/attest`` on the same session, or a replay of the same evidence, is refused (concurrent ``/attest``
requests on one session may each run verification, but only one of them gets a token; the caller
records the successful attestation only after this method returned). A failed attestation ends the
session. There is no intermediate "attesting" record: one session write per ``/attest``.

The table is bounded: when ``max_sessions`` live sessions exist, expired ones are purged, and if the
table is still full ``/auth`` is refused (401 ``AttestationError``) instead of growing without limit.
Counting live sessions scans the table, so it is not done on every ``/auth``: the manager keeps the
last exact count plus the sessions it created since, and counts again when that is more than
``IDLE_COUNT_REFRESH_SECONDS`` old while the table is less than ``BUSY_FRACTION`` full, more than
``COUNT_REFRESH_SECONDS`` old above that, and on every ``/auth`` from ``EXACT_COUNT_FRACTION`` of the
bound on. One replica alone therefore never exceeds the bound; replicas sharing a store can overshoot
it only by what the others create within one refresh interval (from less than half full, they would
have to create half the bound within ``IDLE_COUNT_REFRESH_SECONDS`` before this one counts again).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from coffer._internal.clock import as_utc, utc_now
from coffer.errors import ProtocolError
from coffer.kbs.config import DEFAULT_MAX_SESSIONS
from coffer.kbs.protocol import ATTEST_FAILED, SESSION_COOKIE, Attestation, Challenge, Request, make_nonce
from coffer.kbs.store import NS_SESSIONS, Entry, Store

COOKIE_NAME = SESSION_COOKIE
AUTHED = "authed"
ATTESTED = "attested"

# The live-session count is re-read from the store at most this often while the table is far from
# full (counting is a scan of the table, far too slow for every /auth); see SessionManager.
COUNT_REFRESH_SECONDS = 0.5
IDLE_COUNT_REFRESH_SECONDS = 5.0
BUSY_FRACTION = 0.5
EXACT_COUNT_FRACTION = 0.9


@dataclass(frozen=True, kw_only=True)
class Session:
    id: str
    state: str
    tee: str
    version: str
    nonce: str
    extra_params: Any
    created_at: datetime
    expires_at: datetime
    token: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({
            "state": self.state, "tee": self.tee, "version": self.version, "nonce": self.nonce,
            "extra_params": self.extra_params, "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(), "token": self.token,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_entry(cls, entry: Entry) -> Session:
        try:
            raw = json.loads(entry.value)
            return cls(id=entry.key, state=raw["state"], tee=raw["tee"], version=raw["version"],
                       nonce=raw["nonce"], extra_params=raw["extra_params"],
                       created_at=datetime.fromisoformat(raw["created_at"]),
                       expires_at=datetime.fromisoformat(raw["expires_at"]), token=raw.get("token"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError("AttestationError", f"{ATTEST_FAILED}: session record unreadable") from exc


def valid_session_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class SessionManager:
    def __init__(self, store: Store, clock: Callable[[], datetime] = utc_now,
                 timeout: timedelta = timedelta(minutes=5), max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if max_sessions <= 0:
            raise ValueError("max_sessions must be positive")
        self._store = store
        self._clock = clock
        self.timeout = timeout
        self.max_sessions = max_sessions
        self._count_lock = threading.Lock()
        self._live_estimate = 0
        self._counted_at = -float("inf")

    def _now(self) -> datetime:
        return as_utc(self._clock())

    # -- /auth ---------------------------------------------------------------------------------------

    def begin(self, request: Request) -> tuple[str, Challenge]:
        """A new session for ``request``: (cookie value, challenge)."""
        session, challenge = self.begin_session(request)
        return session.id, challenge

    def _admit(self, now: datetime) -> None:
        """Refuse a new session when the table is full (see the module docstring)."""
        tick = time.monotonic()
        with self._count_lock:
            estimate = self._live_estimate
            refresh = (IDLE_COUNT_REFRESH_SECONDS if estimate < self.max_sessions * BUSY_FRACTION
                       else COUNT_REFRESH_SECONDS)
            if tick - self._counted_at < refresh and estimate < self.max_sessions * EXACT_COUNT_FRACTION:
                self._live_estimate += 1
                return
        live = self._store.count(NS_SESSIONS, now=now)
        if live >= self.max_sessions:
            self._store.purge_expired(NS_SESSIONS, now=now)
            live = self._store.count(NS_SESSIONS, now=now)
        with self._count_lock:
            self._live_estimate = live + 1
            self._counted_at = tick
        if live >= self.max_sessions:
            raise ProtocolError("AttestationError",
                                "Attestation error: RCAR handshake Auth failed: too many sessions")

    def begin_session(self, request: Request) -> tuple[Session, Challenge]:
        """Like :meth:`begin`, returning the stored session (for its expiry)."""
        now = self._now()
        self._admit(now)
        challenge = Challenge(nonce=make_nonce(), extra_params="")
        while True:
            session = Session(id=uuid.uuid4().hex, state=AUTHED, tee=request.tee, version=request.version,
                              nonce=challenge.nonce, extra_params=_jsonable(request.extra_params),
                              created_at=now, expires_at=now + self.timeout)
            created = self._store.create(NS_SESSIONS, session.id, session.to_bytes(),
                                         expires_at=session.expires_at, now=now)
            if created is not None:
                return session, challenge

    def expires_at(self, session_id: str) -> datetime | None:
        found = self._load(session_id)
        return found[0].expires_at if found else None

    # -- /attest -------------------------------------------------------------------------------------

    def attest(self, session_id: str, attestation: Attestation,
               verify: Callable[[Session, Attestation], str]) -> str:
        """Check the nonce, consume the session's challenge, run ``verify`` (which returns the token)
        and record the token. Any failure leaves the session unusable."""
        token = self.attest_session(session_id, attestation, verify).token
        assert token is not None
        return token

    def attest_session(self, session_id: str, attestation: Attestation,
                       verify: Callable[[Session, Attestation], str]) -> Session:
        """Like :meth:`attest`, returning the attested session (token and expiry)."""
        found = self._load(session_id)
        if found is None:
            raise ProtocolError("AttestationError", f"{ATTEST_FAILED}: session not found or expired")
        session, entry = found
        if session.state != AUTHED:
            raise ProtocolError("AttestationError",
                                f"{ATTEST_FAILED}: session already used (a challenge is single use)")
        if attestation.runtime_data.nonce != session.nonce:
            raise ProtocolError("AttestationError", f"{ATTEST_FAILED}: nonce does not match the challenge")
        try:
            token = verify(session, attestation)
        except BaseException:
            self._store.delete(NS_SESSIONS, session.id)
            raise
        # One compare-and-set consumes the challenge and records the token: of concurrent /attest
        # requests on this session (each may have verified its evidence), exactly one gets here first.
        done = dataclasses.replace(session, state=ATTESTED, token=token)
        stored = self._store.compare_and_set(NS_SESSIONS, session.id, done.to_bytes(),
                                             expected_version=entry.version,
                                             expires_at=session.expires_at)
        if stored is None:
            raise ProtocolError("AttestationError",
                                f"{ATTEST_FAILED}: session already used (a challenge is single use)")
        return done

    # -- resource requests ---------------------------------------------------------------------------

    def token_for(self, session_id: str) -> str:
        """The token of an attested, unexpired session."""
        found = self._load(session_id)
        if found is None or found[0].state != ATTESTED or not found[0].token:
            raise ProtocolError("TokenNotFound", "Attestation Token not found")
        return found[0].token

    def session(self, session_id: str) -> Session | None:
        found = self._load(session_id)
        return found[0] if found else None

    def sweep(self) -> int:
        """Delete expired sessions (the app runs this periodically)."""
        return self._store.purge_expired(NS_SESSIONS, now=self._now())

    def count(self) -> int:
        return self._store.count(NS_SESSIONS, now=self._now())

    def _load(self, session_id: str) -> tuple[Session, Entry] | None:
        if not valid_session_id(session_id):
            return None
        now = self._now()
        entry = self._store.get(NS_SESSIONS, session_id, now=now)
        if entry is None:
            return None
        session = Session.from_entry(entry)
        if session.expires_at <= now:
            return None
        return session, entry


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)
