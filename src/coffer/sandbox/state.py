"""Sandbox records on disk: one directory per sandbox, its ``state.json``, and liveness checks.

Layout (``$COFFER_STATE_DIR``, default ``/run/coffer`` as root, else ``$XDG_RUNTIME_DIR/coffer``)::

    sandboxes/.lock               flock held while a record is read-modified-written
    sandboxes/<id>/state.json     the record (atomic replace: never half-written)
    sandboxes/<id>/agent.sock ... what the backend puts there (see coffer.sandbox.process)

The record is written before anything is started and after every change, so a CLI that crashes
half-way leaves a record that ``coffer ps`` shows and ``coffer rm -f`` cleans. Processes are recorded
as (pid, start time): a pid alone may be reused by an unrelated process after ours died, the start
time (``/proc/<pid>/stat`` field 22, clock ticks since boot) tells them apart.

Status as shown: ``creating`` (being started), ``running`` (the agent is alive), ``exited`` (stopped
on purpose), ``dead`` (recorded as running but the agent is gone: crashed or killed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from coffer.errors import ConfigError, FormatError, StorageError, UsageError

STATE_DIR_ENV: Final = "COFFER_STATE_DIR"
STATE_FILE: Final = "state.json"
MAX_STATE_BYTES: Final = 1024 * 1024
ID_BYTES: Final = 6  # 12 hex characters: short paths (unix socket paths are limited to 107 bytes)
STATUSES: Final = ("creating", "running", "exited", "dead")
_STORED_STATUSES: Final = ("creating", "running", "exited")
_ID_RE: Final = re.compile(r"[0-9a-f]{12}")
_NAME_RE: Final = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


def default_root() -> Path:
    """Where sandbox state lives: ``$COFFER_STATE_DIR``, ``/run/coffer`` as root, else the runtime dir."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/coffer")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "coffer"
    raise ConfigError(f"no place for sandbox state: set ${STATE_DIR_ENV} or $XDG_RUNTIME_DIR")


def valid_name(name: str) -> bool:
    """Sandbox names as docker allows container names: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``, 1-63 chars."""
    return _NAME_RE.fullmatch(name) is not None


# --------------------------------------------------------------------------------------------------
# Processes


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it start past the last ")".
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else None


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such process."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22 of /proc/<pid>/stat; fields[0] is field 3
    except ValueError:
        return None


@dataclass(frozen=True)
class ProcessRef:
    """A process as (pid, start time); it is alive only while both still match and it is no zombie."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        start = process_start_time(pid)
        if start is None:
            raise StorageError(f"process {pid} is gone before it could be recorded")
        return cls(pid, start)

    def alive(self) -> bool:
        fields = _stat_fields(self.pid)
        if fields is None or len(fields) < 20:
            return False
        if fields[0] in ("Z", "X", "x"):
            return False
        return fields[19] == str(self.start_time)

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}


# --------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True, kw_only=True)
class SandboxRecord:
    """What is known about one sandbox. ``processes`` maps a role (``agent``, ``unshare``, ``swtpm``,
    ``forwarder``) to the process; ``ports`` are (host port, container port) pairs."""

    id: str
    name: str
    image: str = ""
    status: str = "creating"
    created: str = ""
    tee: str = "sample"
    backend: str = "process"
    development: bool = True
    ports: tuple[tuple[int, int], ...] = ()
    processes: Mapping[str, ProcessRef] = field(default_factory=dict)
    container_id: str = ""
    initdata_digest: str = ""
    #: The agent's (TEE's) tcti, the KBS and anything else a backend wants to remember.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def agent(self) -> ProcessRef | None:
        return self.processes.get("agent")

    def effective_status(self) -> str:
        """The stored status corrected by liveness: a "running" sandbox whose agent is gone is dead."""
        if self.status == "running":
            agent = self.agent
            return "running" if agent is not None and agent.alive() else "dead"
        return self.status

    def with_changes(self, **changes: Any) -> SandboxRecord:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        agent = self.agent
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "status": self.status,
            "created": self.created,
            "tee": self.tee,
            "backend": self.backend,
            "development": self.development,
            "ports": [{"host": h, "container": c} for h, c in self.ports],
            "agent_pid": agent.pid if agent is not None else None,
            "processes": {role: ref.to_json() for role, ref in sorted(self.processes.items())},
            "container_id": self.container_id,
            "initdata_digest": self.initdata_digest,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: bytes) -> SandboxRecord:
        """Parse a ``state.json`` (strictly: anything unexpected is a FormatError)."""
        if len(data) > MAX_STATE_BYTES:
            raise FormatError("sandbox state", f"over {MAX_STATE_BYTES} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise FormatError("sandbox state", f"not JSON ({exc.__class__.__name__})") from exc
        if not isinstance(obj, dict):
            raise FormatError("sandbox state", "not a JSON object")
        sandbox_id = _get(obj, "id", str)
        if not _ID_RE.fullmatch(sandbox_id):
            raise FormatError("sandbox state", "id is not 12 lower-case hex characters")
        name = _get(obj, "name", str)
        if not valid_name(name):
            raise FormatError("sandbox state", "name is not a valid sandbox name")
        status = _get(obj, "status", str)
        if status not in _STORED_STATUSES:
            raise FormatError("sandbox state", f"unknown status {status[:40]!r}")
        ports = []
        for item in _get(obj, "ports", list):
            if not isinstance(item, dict):
                raise FormatError("sandbox state", "a port is not an object")
            ports.append((_port(item.get("host")), _port(item.get("container"))))
        processes = {}
        for role, ref in _get(obj, "processes", dict).items():
            if not isinstance(ref, dict):
                raise FormatError("sandbox state", f"process {role[:40]!r} is not an object")
            processes[role] = ProcessRef(_int(ref.get("pid"), 1, 2**22),
                                         _int(ref.get("start_time"), 0, 2**63))
        extra = _get(obj, "extra", dict)
        return cls(
            id=sandbox_id, name=name, image=_get(obj, "image", str), status=status,
            created=_get(obj, "created", str), tee=_get(obj, "tee", str), backend=_get(obj, "backend", str),
            development=_get(obj, "development", bool), ports=tuple(ports), processes=processes,
            container_id=_get(obj, "container_id", str), initdata_digest=_get(obj, "initdata_digest", str),
            extra=extra)


def _get(obj: Mapping[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise FormatError("sandbox state", f"{key} is missing or not a {kind.__name__}")
    return value


def _int(value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FormatError("sandbox state", f"expected an integer in [{low}, {high}]")
    return value


def _port(value: Any) -> int:
    return _int(value, 1, 65535)


def new_id() -> str:
    return secrets.token_hex(ID_BYTES)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# The store


class StateStore:
    """The sandbox records under one state root."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.sandboxes = self.root / "sandboxes"

    def _ensure(self) -> None:
        try:
            self.sandboxes.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the state directory {self.sandboxes}: {exc.strerror}") from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock over all records (held briefly: read-modify-write, name reservation)."""
        self._ensure()
        fd = os.open(self.sandboxes / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def directory(self, sandbox_id: str) -> Path:
        if not _ID_RE.fullmatch(sandbox_id):
            raise UsageError(f"{sandbox_id!r} is not a sandbox id")
        return self.sandboxes / sandbox_id

    def reserve(self, record: SandboxRecord) -> Path:
        """Create the sandbox's directory and first record; the name must be unused."""
        if not valid_name(record.name):
            raise UsageError(f"invalid sandbox name {record.name!r} (letters, digits, _ . -; at most 63)")
        with self.lock():
            for other in self.records():
                if other.name == record.name:
                    raise UsageError(f"the name {record.name!r} is already used by sandbox {other.id} "
                                     f"({other.effective_status()}); remove it first (coffer rm)")
            directory = self.directory(record.id)
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError as exc:
                raise StorageError(f"sandbox directory {directory} already exists") from exc
            self._write(record)
        return directory

    def _write(self, record: SandboxRecord) -> None:
        directory = self.directory(record.id)
        tmp = directory / f".{STATE_FILE}.tmp"
        data = (json.dumps(record.to_json(), indent=2) + "\n").encode()
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, directory / STATE_FILE)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(f"cannot write the state of sandbox {record.id}: {exc.strerror}") from exc

    def save(self, record: SandboxRecord) -> None:
        with self.lock():
            if not self.directory(record.id).is_dir():
                raise StorageError(f"sandbox {record.id} was removed")
            self._write(record)

    def load(self, sandbox_id: str) -> SandboxRecord:
        path = self.directory(sandbox_id) / STATE_FILE
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError as exc:
            raise UsageError(f"no sandbox {sandbox_id}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        record = SandboxRecord.from_json(data)
        if record.id != sandbox_id:
            raise FormatError("sandbox state", f"{path} names sandbox {record.id}")
        return record

    def records(self) -> list[SandboxRecord]:
        """Every readable record, oldest first (unreadable ones are skipped: see :meth:`broken`)."""
        records = []
        for sandbox_id in self._ids():
            try:
                records.append(self.load(sandbox_id))
            except (FormatError, UsageError, StorageError):
                continue
        return sorted(records, key=lambda r: (r.created, r.id))

    def broken(self) -> list[str]:
        """Ids of sandbox directories whose record cannot be read."""
        out = []
        for sandbox_id in self._ids():
            try:
                self.load(sandbox_id)
            except (FormatError, UsageError, StorageError):
                out.append(sandbox_id)
        return out

    def _ids(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.sandboxes))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.sandboxes}: {exc.strerror}") from exc
        return [n for n in names if _ID_RE.fullmatch(n) and (self.sandboxes / n).is_dir()]

    def resolve(self, name_or_id: str) -> SandboxRecord:
        """A sandbox by name, full id or unique id prefix (at least 4 characters)."""
        records = self.records()
        for record in records:
            if name_or_id in (record.name, record.id):
                return record
        if len(name_or_id) >= 4:
            matches = [r for r in records if r.id.startswith(name_or_id)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(f"{name_or_id!r} matches several sandboxes: "
                                 + ", ".join(r.id for r in matches))
        raise UsageError(f"no sandbox named {name_or_id!r}")

    def delete(self, sandbox_id: str) -> None:
        """Remove the sandbox directory (the backend has stopped everything and unmounted first)."""
        import shutil  # noqa: PLC0415

        directory = self.directory(sandbox_id)
        with self.lock():
            try:
                shutil.rmtree(directory)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise StorageError(f"cannot remove {directory}: {exc.strerror}") from exc
