"""The ``process`` sandbox backend: the guest agent in its own Linux namespaces, on this host's kernel.

A development sandbox: the host kernel and root can read its memory (there is no memory
confidentiality), but everything else about the confidential run is real -- the agent checks the
launch measurement of initdata, attests with a TPM, pulls and decrypts images itself into storage the
host's mount namespace cannot see, and the host only reaches the agent socket and published ports.

Per sandbox (``<state>/sandboxes/<id>/``)::

    state.json           the record (coffer.sandbox.state)
    initdata.toml        the exact initdata bytes; the launch measurement is their digest
    launch-measurement   tee "sample": the digest hex (development only: nothing stops the host
                         from rewriting it; the tpm TEE is the one to use)
    tpm/                 tee "tpm": the swtpm state and its socket swtpm.sock
    storage/             the agent's storage: a tmpfs mounted over it inside the sandbox's mount
                         namespace, so from the host the directory stays empty
    ports/<ctr>.sock     published ports (coffer.sandbox.forward)
    agent.sock           the agent's API
    agent.log            output of the launcher, the agent and the inner forwarder
    launch.json          what the launcher inside the namespaces does

Start: (1) the TEE -- ``tpm``: a swtpm of its own (a copy of one manufactured template TPM: every
sandbox has the same EK, certified by the local CA in ``<state>/tpm-ca``, and its own AK and PCRs),
PCR 8 of the SHA-256 bank extended once with the initdata digest (so PCR 8 = SHA-256(0^32 || digest),
:func:`coffer.attestation.binding.pcr8_for_initdata`). TPM2_PCR_Extend takes a digest of the bank's
size, so this works for ``algorithm = "sha256"`` initdata only; sha384/sha512 initdata is refused for
the tpm TEE (use the sample TEE, or a VM backend whose TEE register is wide enough). ``sample``: the
digest hex in ``launch-measurement``. (2) ``unshare --mount --pid --net --uts --ipc --fork
--mount-proc --propagation private --kill-child`` runs :data:`LAUNCHER` as the new pid namespace's
init: it mounts the storage tmpfs, bind-mounts the image layouts read-only, brings ``lo`` up, sets the
host name, starts the agent and then the inner forwarder (published ports, and the way out to a KBS
on the host's loopback), passes SIGTERM on to the agent, reaps orphans, and exits with the agent.
(3) The host waits for ``agent.sock`` to accept. The host forwarder (the published ports, with the
listening sockets the command already bound, so a busy port fails the command; and the host end of
the way out) is started before (1), so its start overlaps the TPM's and the agent's, and is checked
before the sandbox counts as running.

Stop: SIGTERM to the namespace's init (the agent gets it), SIGKILL after the grace period; when the
init dies the kernel kills everything else in the pid namespace and drops the mount namespace with
its tmpfs. Then the swtpm and the host forwarder. Processes are signalled through pidfds opened after
checking their recorded start time, so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from coffer.errors import CofferError, ConfigError, StorageError, UnsupportedError, UsageError
from coffer.policy import initdata as initdata_mod
from coffer.sandbox import swtpm as swtpm_mod
from coffer.sandbox.backend import DEVELOPMENT_LABEL, Sandbox, SandboxBackend, SandboxSpec
from coffer.sandbox.forward import MAX_UNIX_PATH, bind_tcp
from coffer.sandbox.state import ProcessRef, SandboxRecord, StateStore, new_id, now_iso

AGENT_COMMAND: Final = (sys.executable, "-m", "coffer.guest.agent")
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
LOG_TAIL: Final = 2000
TPM_PCR: Final = 8
# TPM2_GetRandom(8): answered once swtpm has loaded its state.

UNSHARE_FLAGS: Final = ("--mount", "--pid", "--net", "--uts", "--ipc", "--fork", "--mount-proc",
                        "--propagation", "private", "--kill-child")


class SandboxStartError(CofferError):
    """The sandbox could not be started (the message carries the end of the agent's log)."""


# The init of the sandbox's pid namespace. Runs with the project's Python but imports nothing of
# Coffer: it must stay small and obviously correct.
LAUNCHER: Final = r"""
import fcntl, json, os, signal, socket, struct, subprocess, sys
cfg = json.load(open(sys.argv[1]))
def run(*args):
    subprocess.run(list(args), check=True)
opts = "mode=0700" + (",size=" + cfg["storage_size"] if cfg.get("storage_size") else "")
run("mount", "-t", "tmpfs", "-o", opts, "coffer-storage", cfg["storage"])
for path in cfg.get("readonly", []):
    run("mount", "--bind", path, path)
    run("mount", "-o", "remount,bind,ro", path)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
s.close()
socket.sethostname(cfg["hostname"])
# The agent first: its start-up is the long one. One forwarder serves the published ports and the
# way out to the host's loopback (the agent needs that only once it serves requests).
agent = subprocess.Popen(cfg["agent"], stdin=subprocess.DEVNULL)
children = []
if cfg.get("egress") or cfg.get("forward"):
    fwd = [sys.executable, "-m", "coffer.sandbox.forward", "inner"]
    for item in cfg.get("forward", []):
        fwd += ["--map", item]
    for item in cfg.get("egress", []):
        fwd += ["--egress", item]
    children.append(subprocess.Popen(fwd, stdin=subprocess.DEVNULL))
def on_term(signum, frame):
    for child in [agent, *children]:
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(1)
    if pid == agent.pid:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


# --------------------------------------------------------------------------------------------------
# Processes


# Children this process started that may outlive it (coffer run -d). Kept referenced so Popen does
# not complain about a running child when collected; reaped by _reap once they exit.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _adopt(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _CHILDREN[process.pid] = process
    return process


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our exited child (started by this process); else nothing."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_process(ref: ProcessRef, signum: int) -> bool:
    """Send ``signum`` to the recorded process if it is still that process; False if it is gone."""
    try:
        pidfd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd pins the process: checking the start time after opening it rules out pid reuse.
        if not ref.alive():
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def terminate(ref: ProcessRef, *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    if signal_process(ref, signal.SIGTERM):
        _wait_gone(ref, timeout)
    if ref.alive():
        signal_process(ref, signal.SIGKILL)
        _wait_gone(ref, 5.0)
    _reap(ref.pid)


def _wait_gone(ref: ProcessRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(ref.pid)
        if not ref.alive():
            return True
        time.sleep(0.02)
    return not ref.alive()


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` in this mount namespace."""
    prefix = str(directory.resolve())
    out = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2:
            point = fields[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def _bytecode_cache(env: Mapping[str, str]) -> Path:
    """Where sandbox processes keep bytecode: ``$COFFER_CACHE/pycache``, else ``~/.cache/coffer/pycache``."""
    configured = env.get("COFFER_CACHE")
    return (Path(configured) if configured else Path.home() / ".cache" / "coffer") / "pycache"


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(os.fsencode(path))
        except OSError:
            return False
    return True


def tpm_available() -> bool:
    """Whether the tpm TEE can be used here: swtpm and tpm2-tools are installed."""
    return swtpm_mod.available() and shutil.which("tpm2_pcrextend") is not None


# --------------------------------------------------------------------------------------------------
# The backend


class ProcessBackend(SandboxBackend):
    """Sandboxes as namespaced processes on this host (see the module docstring)."""

    name = "process"
    development = True

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        agent_command: Sequence[str] = AGENT_COMMAND,
        start_timeout: float = START_TIMEOUT,
        fresh_tpm: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.store = store if store is not None else StateStore()
        self.agent_command = tuple(agent_command)
        self.start_timeout = start_timeout
        self.fresh_tpm = fresh_tpm
        self.env = env

    # ------------------------------------------------------------------------------------ paths

    def directory(self, record: SandboxRecord) -> Path:
        return self.store.directory(record.id)

    def agent_socket(self, record: SandboxRecord) -> Path:
        return self.directory(record) / "agent.sock"

    def tcti(self, record: SandboxRecord) -> str | None:
        if record.tee != "tpm":
            return None
        return f"swtpm:path={self.directory(record) / 'tpm' / 'swtpm.sock'}"

    def is_alive(self, record: SandboxRecord) -> bool:
        agent = record.agent
        return agent is not None and agent.alive()

    def describe(self, record: SandboxRecord) -> dict[str, Any]:
        directory = self.directory(record)
        return {
            "backend": self.name,
            "isolation": "linux namespaces: mount, pid, net, uts, ipc",
            "development": True,
            "confidentiality": DEVELOPMENT_LABEL,
            "tee": record.tee,
            "tcti": self.tcti(record),
            "directory": str(directory),
            "agent_socket": str(self.agent_socket(record)),
            "processes": {role: {"pid": ref.pid, "alive": ref.alive()}
                          for role, ref in sorted(record.processes.items())},
        }

    # ------------------------------------------------------------------------------------ create

    def _resolve_tee(self, tee: str) -> str:
        if tee == "auto":
            return "tpm" if tpm_available() else "sample"
        if tee == "tpm":
            if not tpm_available():
                raise UnsupportedError("the tpm TEE needs swtpm, swtpm-tools and tpm2-tools "
                                       "(apt-get install swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0); "
                                       "or use --tee sample")
            return tee
        if tee == "sample":
            return tee
        raise UsageError(f"the process backend supports the TEEs tpm and sample, not {tee!r}")

    def create(self, spec: SandboxSpec) -> Sandbox:
        digests = initdata_mod.digests(spec.initdata)  # FormatError for a document no agent would take
        tee = self._resolve_tee(spec.tee)
        if tee == "tpm" and len(digests.digest) != 32:
            raise UnsupportedError(
                f"initdata with algorithm {digests.algorithm} cannot be extended into the TPM's SHA-256 "
                "PCR 8 bank (it takes 32-byte digests): build initdata with sha256, or use --tee sample")
        ports = tuple((p.host, p.container) for p in spec.ports)
        if len({c for _, c in ports}) != len(ports) or len({h for h, _ in ports}) != len(ports):
            raise UsageError("each host port and each container port may be published once")
        record = SandboxRecord(
            id=new_id(), name=spec.name, image=spec.image, status="creating", created=now_iso(), tee=tee,
            backend=self.name, development=True, ports=ports, initdata_digest=digests.digest.hex(),
            extra={"initdata_algorithm": digests.algorithm, "kbs": spec.kbs})
        directory = self.store.directory(record.id)
        for name in ("agent.sock", "tpm/swtpm.sock.ctrl", *(f"ports/{c}.sock" for _, c in ports)):
            if len(os.fsencode(directory / name)) > MAX_UNIX_PATH:
                raise ConfigError(f"the state directory {self.store.root} is too deep for unix socket paths "
                                  f"({MAX_UNIX_PATH} bytes); set COFFER_STATE_DIR to a shorter path")
        listeners = [bind_tcp("127.0.0.1", host) for host, _ in ports]
        try:
            self.store.reserve(record)
            try:
                record = self._start(record, spec, digests.digest, listeners)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._stop_processes(self.store.load(record.id), timeout=2.0)
                with contextlib.suppress(Exception):
                    self.store.delete(record.id)
                raise
        finally:
            for listener in listeners:
                listener.close()
        return Sandbox(record=record, agent_socket=self.agent_socket(record), directory=directory)

    def _start(self, record: SandboxRecord, spec: SandboxSpec, digest: bytes,
               listeners: list[socket.socket]) -> SandboxRecord:
        directory = self.directory(record)
        (directory / "initdata.toml").write_bytes(spec.initdata)
        storage = directory / "storage"
        storage.mkdir(mode=0o700)
        (directory / "ports").mkdir(mode=0o700)
        processes: dict[str, ProcessRef] = {}
        # The agent's network namespace has only lo: a KBS on the host's loopback is reached through
        # a unix socket, the same port number inside (so the URL stays as given).
        egress = _loopback_port(spec.kbs)
        forwarder: subprocess.Popen[bytes] | None = None
        if listeners or egress is not None:
            # Started first and checked later: its interpreter start overlaps the TPM and the agent's.
            forwarder = self._spawn_host_forwarder(directory, record, listeners, egress)
            processes["forwarder"] = ProcessRef.of(forwarder.pid)
            record = record.with_changes(processes=dict(processes))
            self.store.save(record)
        if record.tee == "tpm":
            processes["swtpm"] = self._start_tpm(directory / "tpm", digest)
            record = record.with_changes(processes=dict(processes))
            self.store.save(record)
        else:
            (directory / "launch-measurement").write_text(digest.hex() + "\n")

        agent_args = [*self.agent_command, "--socket", str(self.agent_socket(record)),
                      "--initdata", str(directory / "initdata.toml"), "--storage", str(storage),
                      "--tee", record.tee]
        tcti = self.tcti(record)
        if tcti is not None:
            agent_args += ["--tcti", tcti]
        if spec.kbs:
            agent_args += ["--kbs", spec.kbs]
        if spec.registry_insecure:
            agent_args.append("--registry-insecure")
        readonly = []
        if spec.image_layouts is not None:
            layouts = spec.image_layouts.resolve()
            if not layouts.is_dir():
                raise UsageError(f"image layouts directory {spec.image_layouts} does not exist")
            agent_args += ["--image-layouts", str(layouts)]
            readonly.append(str(layouts))
        launch = {
            "egress": [f"{egress}={directory / 'egress.sock'}"] if egress is not None else [],
            "storage": str(storage),
            "storage_size": str(spec.options.get("storage_size", "")),
            "readonly": readonly,
            "hostname": record.name,
            "forward": [f"{directory / 'ports' / f'{c}.sock'}={c}" for _, c in record.ports],
            "agent": agent_args,
        }
        (directory / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")

        unshare = shutil.which("unshare")
        if unshare is None:
            raise UnsupportedError("unshare (util-linux) is not installed")
        log = open(directory / "agent.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            process = _adopt(subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
                [unshare, *UNSHARE_FLAGS, "--", sys.executable, "-c", LAUNCHER,
                 str(directory / "launch.json")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=self._child_env(), cwd="/"))
        finally:
            log.close()
        processes["unshare"] = ProcessRef.of(process.pid)
        init_pid = self._wait_for(lambda: (_children_of(process.pid) or [0])[0], process,
                                  directory, what="the sandbox's init process")
        processes["agent"] = ProcessRef.of(init_pid)
        record = record.with_changes(processes=dict(processes))
        self.store.save(record)
        if forwarder is not None:
            self._check_ready(forwarder, directory)
        socket_path = self.agent_socket(record)
        self._wait_for(lambda: 1 if _socket_accepts(socket_path) else 0, process, directory,
                       what="the agent socket")
        record = record.with_changes(processes=dict(processes), status="running")
        self.store.save(record)
        return record

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        # The launcher and forwarders import coffer from wherever this process found it.
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # Every sandbox starts a Python agent and forwarders: without bytecode they recompile coffer
        # each time (~0.2 s). Where the environment forbids writing bytecode next to the sources, a
        # cache outside them is used instead (PYTHONPYCACHEPREFIX, under $COFFER_CACHE).
        if env.get("PYTHONDONTWRITEBYTECODE") and not env.get("PYTHONPYCACHEPREFIX"):
            del env["PYTHONDONTWRITEBYTECODE"]
            env["PYTHONPYCACHEPREFIX"] = str(_bytecode_cache(env))
        return env

    def _wait_for(self, probe: Any, process: subprocess.Popen[bytes], directory: Path, *, what: str) -> int:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            value = int(probe())
            if value:
                return value
            if process.poll() is not None:
                tail = _log_tail(directory / "agent.log")
                raise SandboxStartError(
                    f"the sandbox exited (status {process.returncode}) before {what} was ready"
                    + (f"; its log ends with:\n{tail}" if tail else ""))
            time.sleep(0.01)
        tail = _log_tail(directory / "agent.log")
        raise SandboxStartError(f"{what} was not ready after {self.start_timeout:.0f} s"
                                + (f"; the log ends with:\n{tail}" if tail else ""))

    def _template(self) -> Path:
        """A manufactured TPM state to copy (made once per state root, under a lock)."""
        template = self.store.root / "tpm-template"
        if (template / "tpm2-00.permall").exists():
            return template
        import fcntl  # noqa: PLC0415

        self.store.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store.root / ".tpm-template.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (template / "tpm2-00.permall").exists():
                staging = self.store.root / f".tpm-template-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                swtpm_mod.Swtpm(staging, ca_dir=self.store.root / "tpm-ca").manufacture()
                shutil.rmtree(staging / ".setup", ignore_errors=True)
                os.replace(staging, template)
        finally:
            os.close(fd)
        return template

    def _start_tpm(self, tpm_dir: Path, digest: bytes) -> ProcessRef:
        if self.fresh_tpm:
            swtpm_mod.Swtpm(tpm_dir, ca_dir=self.store.root / "tpm-ca").manufacture()
        else:
            tpm_dir.mkdir(mode=0o700)
            shutil.copy2(self._template() / "tpm2-00.permall", tpm_dir / "tpm2-00.permall")
        sock = tpm_dir / "swtpm.sock"
        swtpm = shutil.which("swtpm")
        if swtpm is None:
            raise UnsupportedError("swtpm is not installed")
        log = open(tpm_dir / "swtpm.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            process = _adopt(subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
                [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={tpm_dir}", "--flags",
                 "not-need-init,startup-clear", "--server", f"type=unixio,path={sock}",
                 "--ctrl", f"type=unixio,path={sock}.ctrl"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        finally:
            log.close()
        ref = ProcessRef.of(process.pid)
        deadline = time.monotonic() + 10.0
        while not swtpm_mod.tpm_answers(socket.AF_UNIX, os.fsencode(sock)):
            if process.poll() is not None or time.monotonic() > deadline:
                terminate(ref, timeout=1.0)
                raise SandboxStartError(f"swtpm did not start: {_log_tail(tpm_dir / 'swtpm.log')}")
            time.sleep(0.02)
        # The launch measurement: PCR 8 = SHA-256(0^32 || digest), as a TPM platform measures initdata.
        result = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            [shutil.which("tpm2_pcrextend") or "tpm2_pcrextend", f"{TPM_PCR}:sha256={digest.hex()}"],
            capture_output=True, check=False,
            env={**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={sock}"}, timeout=30)
        if result.returncode != 0:
            terminate(ref, timeout=1.0)
            raise SandboxStartError("tpm2_pcrextend failed: "
                                    + result.stderr.decode(errors="replace")[-500:])
        return ref

    def _spawn_host_forwarder(self, directory: Path, record: SandboxRecord, listeners: list[socket.socket],
                              egress: int | None) -> subprocess.Popen[bytes]:
        """The host side of the published ports (the listening sockets already bound, inherited) and
        of the way out to 127.0.0.1:``egress``; :meth:`_check_ready` waits for it."""
        args = [sys.executable, "-m", "coffer.sandbox.forward", "host"]
        for listener, (_, container) in zip(listeners, record.ports, strict=True):
            args += ["--map", f"{listener.fileno()}={directory / 'ports' / f'{container}.sock'}"]
        if egress is not None:
            args += ["--egress", f"{directory / 'egress.sock'}={egress}"]
        log = open(directory / "forwarder.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            return _adopt(subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                pass_fds=[listener.fileno() for listener in listeners], env=self._child_env(), cwd="/"))
        finally:
            log.close()

    def _check_ready(self, process: subprocess.Popen[bytes], directory: Path) -> None:
        assert process.stdout is not None
        line = _read_line(process.stdout, 10.0)
        process.stdout.close()
        if line != b"ready\n":
            terminate(ProcessRef.of(process.pid), timeout=1.0)
            tail = _log_tail(directory / "forwarder.log")
            raise SandboxStartError(f"the port forwarder did not start: {tail}")

    # ------------------------------------------------------------------------------------ stop

    def _stop_processes(self, record: SandboxRecord, *, timeout: float) -> None:
        for role in ("forwarder", "agent", "unshare", "swtpm", "egress"):
            ref = record.processes.get(role)
            if ref is not None:
                terminate(ref, timeout=timeout if role == "agent" else 3.0)
        directory = self.directory(record)
        for path in [self.agent_socket(record), directory / "egress.sock", *directory.glob("ports/*.sock"),
                     *directory.glob("tpm/swtpm.sock*")]:
            with contextlib.suppress(OSError):
                path.unlink()

    def stop(self, record: SandboxRecord, *, timeout: float = STOP_TIMEOUT) -> SandboxRecord:
        self._stop_processes(record, timeout=timeout)
        if record.status != "exited":
            record = record.with_changes(status="exited")
            self.store.save(record)
        return record

    def remove(self, record: SandboxRecord, *, force: bool = False) -> None:
        if self.is_alive(record) and not force:
            raise UsageError(f"sandbox {record.name} is running: stop it first, or remove with -f")
        self._stop_processes(record, timeout=STOP_TIMEOUT if not force else 2.0)
        directory = self.directory(record)
        left = mounts_under(directory)
        if left:
            raise StorageError(f"sandbox directory {directory} is still mounted at {', '.join(left)}")
        self.store.delete(record.id)


def _loopback_port(url: str | None) -> int | None:
    """The port of an http(s) URL on the host's loopback (127.0.0.1, localhost, ::1), else None."""
    if not url:
        return None
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return parts.port or (443 if parts.scheme == "https" else 80)


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's pipe, or b"" when it does not come in time."""
    import selectors  # noqa: PLC0415

    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    return stream.readline(64)


__all__ = ["LAUNCHER", "ProcessBackend", "SandboxStartError", "mounts_under", "signal_process", "terminate",
           "tpm_available"]
