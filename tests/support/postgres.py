"""A real, throw-away PostgreSQL server for tests.

``PostgresServer.start()`` runs ``initdb`` and ``postgres`` from the PostgreSQL binaries
(``$COFFER_PG_BINDIR`` when set, else ``/usr/lib/postgresql/<newest>/bin``, else ``PATH``) in a fresh
temporary directory, listening on 127.0.0.1 on a free port (no Unix socket), with password authentication
(SCRAM) for a generated password. PostgreSQL refuses to run as root: when the tests run as root the
server runs as the ``postgres`` account (or ``nobody``) via ``setpriv``. ``stop()`` shuts it down and
removes the directory. Durability settings are relaxed (``fsync=off``): the data is throw-away.

Fixtures (import both into a test module, or list this module in ``pytest_plugins`` of the root
conftest): ``postgres_server`` (session scope, one server per test process, skips with the reason when
a server cannot be started) and ``postgres_url`` (a fresh, empty database per test).
"""

from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer._internal.net import free_port

START_TIMEOUT = 30.0


class PostgresUnavailableError(Exception):
    """A server cannot be started here (the reason is the message)."""


def find_bindir() -> Path:
    configured = os.environ.get("COFFER_PG_BINDIR")
    if configured:  # authoritative when set (also the way to test the skip path)
        bindir = Path(configured)
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
        raise PostgresUnavailableError(f"COFFER_PG_BINDIR={configured} holds no initdb and postgres")
    candidates: list[Path] = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name),
                          reverse=True)
        candidates += [v / "bin" for v in versions]
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(initdb).parent
    raise PostgresUnavailableError("PostgreSQL binaries (initdb, postgres) not found; install postgresql "
                              "or set COFFER_PG_BINDIR")


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailableError("running as root and neither a 'postgres' nor a 'nobody' account exists "
                              "to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.user = "coffer"
        self.password = secrets.token_urlsafe(18)
        self.host = "127.0.0.1"
        self.port = 0
        self.tmpdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._account = _run_as()
        self._lock = threading.Lock()
        self._databases = 0

    # -- lifecycle --------------------------------------------------------------------------------------

    def _command(self, *argv: str) -> list[str]:
        if self._account is None:
            return list(argv)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise PostgresUnavailableError("running as root without setpriv to drop privileges "
                                           "for PostgreSQL")
        return [setpriv, f"--reuid={self._account.pw_uid}", f"--regid={self._account.pw_gid}",
                "--clear-groups", "--", *argv]

    def _env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        if self.tmpdir is not None:
            env["HOME"] = str(self.tmpdir)
        return env

    def start(self) -> PostgresServer:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="coffer-pg-"))
        try:
            self._initdb()
            for _attempt in range(3):
                self.port = free_port()
                if self._launch():
                    return self
            raise PostgresUnavailableError(f"PostgreSQL did not start; log:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _initdb(self) -> None:
        assert self.tmpdir is not None
        if self._account is not None:
            os.chown(self.tmpdir, self._account.pw_uid, self._account.pw_gid)
        pwfile = self.tmpdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._account is not None:
            os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
        pwfile.chmod(0o600)
        result = subprocess.run(
            self._command(str(self.bindir / "initdb"), "-D", str(self.tmpdir / "data"), "-U", self.user,
                          "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                          "--locale=C", "--no-sync"),
            env=self._env(), capture_output=True, timeout=120, check=False)
        pwfile.unlink()
        if result.returncode != 0:
            raise PostgresUnavailableError("initdb failed: "
                                      + (result.stderr or result.stdout).decode(errors="replace")[-2000:])

    def _launch(self) -> bool:
        assert self.tmpdir is not None
        log = open(self.tmpdir / "server.log", "ab")  # noqa: SIM115 - closed after the child inherits it
        try:
            self.process = subprocess.Popen(
                self._command(str(self.bindir / "postgres"), "-D", str(self.tmpdir / "data"),
                              "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                              "-c", "unix_socket_directories=", "-c", "fsync=off",
                              "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                              "-c", "max_connections=200", "-c", "shared_buffers=32MB"),
                env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self._ready():
                return True
            time.sleep(0.1)
        self._terminate()
        return False

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # "fast" shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        with self._lock:
            self._terminate()
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def log_tail(self, size: int = 4000) -> str:
        if self.tmpdir is None or not (self.tmpdir / "server.log").exists():
            return "(no log)"
        return (self.tmpdir / "server.log").read_text(errors="replace")[-size:]

    # -- databases --------------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        import psycopg
        from psycopg import sql

        with self._lock:
            self._databases += 1
            dbname = name or f"coffer_test_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url(dbname)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_shared: PostgresServer | None = None
_shared_failure: str | None = None
_shared_lock = threading.Lock()


def shared_server() -> PostgresServer:
    """The server of this test process, started on first use and stopped at exit; raises
    :class:`PostgresUnavailableError` (every time, with the first reason) when it cannot run here."""
    global _shared, _shared_failure  # noqa: PLW0603 - one server per process
    with _shared_lock:
        if _shared is not None:
            return _shared
        if _shared_failure is not None:
            raise PostgresUnavailableError(_shared_failure)
        try:
            server = PostgresServer().start()
        except (PostgresUnavailableError, OSError, subprocess.SubprocessError) as exc:
            _shared_failure = str(exc) or type(exc).__name__
            raise PostgresUnavailableError(_shared_failure) from exc
        _shared = server
        atexit.register(server.stop)
        return server


def stop_shared_server() -> None:
    global _shared
    with _shared_lock:
        server, _shared = _shared, None
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = shared_server()
    except PostgresUnavailableError as exc:
        pytest.skip(f"no PostgreSQL server for this test: {exc}")
    yield server
    stop_shared_server()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database (dropped after the test)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])
