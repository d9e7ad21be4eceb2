"""The process sandbox backend with a stand-in agent: real namespaces, a private storage tmpfs, the
launch measurement (sample file or swtpm PCR 8), published ports, and cleanup that leaves nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer._internal.net import free_port
from coffer.attestation.binding import pcr8_for_initdata
from coffer.errors import TransportError, UnsupportedError, UsageError
from coffer.policy.initdata import build_initdata
from coffer.sandbox.backend import DEVELOPMENT_LABEL, PortMapping, SandboxSpec
from coffer.sandbox.process import ProcessBackend, SandboxStartError, mounts_under, tpm_available
from coffer.sandbox.state import StateStore
from tests.sandbox.agent_wire import call

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="the process sandbox needs root and unshare (util-linux)")

STANDIN = Path(__file__).with_name("standin_agent.py")
INITDATA = build_initdata("package agent_policy\n\ndefault allow := true\n")


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessBackend]:
    # A short root: unix socket paths are limited to 107 bytes (pytest's tmp_path is too deep).
    root = Path(tempfile.mkdtemp(prefix="cof-"))
    store = StateStore(root)
    yield ProcessBackend(store, agent_command=(sys.executable, str(STANDIN)), start_timeout=20)
    for record in store.records():
        ProcessBackend(store).remove(record, force=True)
    shutil.rmtree(root)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def _assert_nothing_left(backend: ProcessBackend, sandbox_id: str, directory: Path) -> None:
    assert _processes_mentioning(sandbox_id) == []
    assert mounts_under(directory) == []
    assert not any(sandbox_id in line for line in Path("/proc/self/mounts").read_text().splitlines())


def _echo_through(port: int, deadline: float = 10.0) -> bytes:
    """Send b"ping" through the forwarded port, retrying while the inner server is not listening."""
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"ping")
                answer = conn.recv(4)
            if answer:
                return answer
        except OSError:
            pass
        if time.monotonic() > end:
            return b""
        time.sleep(0.05)


def test_sample_sandbox_runs_the_agent_in_its_own_namespaces(backend: ProcessBackend,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    inner_port, host_port = free_port(), free_port()
    monkeypatch.setenv("STANDIN_ECHO_PORT", str(inner_port))
    sandbox = backend.create(SandboxSpec(name="web", initdata=INITDATA, tee="sample",
                                         ports=(PortMapping(host=host_port, container=inner_port),)))
    record = sandbox.record
    assert record.status == "running"
    assert record.effective_status() == "running"
    assert record.tee == "sample"
    assert record.development
    init = record.processes["agent"].pid
    for ns in ("mnt", "pid", "net", "uts", "ipc"):
        assert os.readlink(f"/proc/{init}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # The storage tmpfs exists only in the sandbox's mount namespace.
    storage = str(sandbox.directory / "storage")
    assert any(line.split()[1] == storage for line in Path(f"/proc/{init}/mounts").read_text().splitlines())
    assert mounts_under(sandbox.directory) == []
    details = call(sandbox.agent_socket, "GuestDetailsRequest", {})
    assert details["ok"] is True
    result = details["result"]
    assert result["hostname"] == "web"
    assert result["pid"] != init  # the agent is not the namespace's init: the launcher is
    assert result["storage_mounted"] is True
    assert result["initdata_digest"] == hashlib.sha256(INITDATA).hexdigest()
    assert (sandbox.directory / "initdata.toml").read_bytes() == INITDATA
    # The published port reaches the echo server inside the sandbox's netns (which, like any
    # workload's server, may start listening a moment after the sandbox is up: clients retry).
    assert _echo_through(host_port) == b"ping"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", inner_port)) != 0  # not on the host's loopback
    assert backend.describe(record)["confidentiality"] == DEVELOPMENT_LABEL

    stopped = backend.stop(record)
    assert stopped.status == "exited"
    assert backend.store.load(record.id).effective_status() == "exited"
    _assert_nothing_left(backend, record.id, sandbox.directory)
    assert not sandbox.agent_socket.exists()
    backend.remove(stopped)
    assert not sandbox.directory.exists()


@pytest.mark.skipif(not tpm_available(), reason="swtpm / tpm2-tools not installed")
def test_tpm_sandbox_measures_initdata_into_pcr8_and_stops_its_swtpm(backend: ProcessBackend) -> None:
    sandbox = backend.create(SandboxSpec(name="tpm", initdata=INITDATA, tee="tpm"))
    record = sandbox.record
    tcti = backend.tcti(record)
    assert tcti is not None
    # The stand-in agent refuses to serve unless PCR 8 holds the initdata digest; check it here too.
    out = subprocess.run(["tpm2_pcrread", "sha256:8"], capture_output=True, text=True, check=True,
                         env={**os.environ, "TPM2TOOLS_TCTI": tcti}).stdout
    value = out.strip().rsplit(":", 1)[1].strip().lower().removeprefix("0x")
    assert value == pcr8_for_initdata(hashlib.sha256(INITDATA).digest()).hex()
    swtpm_pid = record.processes["swtpm"].pid
    backend.remove(record, force=True)
    _assert_nothing_left(backend, record.id, sandbox.directory)
    assert not Path(f"/proc/{swtpm_pid}").exists() or not record.processes["swtpm"].alive()


@pytest.mark.skipif(not tpm_available(), reason="swtpm / tpm2-tools not installed")
def test_sha384_initdata_cannot_be_measured_into_the_sha256_bank(backend: ProcessBackend) -> None:
    data = build_initdata("package agent_policy\n", algorithm="sha384")
    with pytest.raises(UnsupportedError, match="sha256"):
        backend.create(SandboxSpec(name="wide", initdata=data, tee="tpm"))
    assert backend.store.records() == []


def test_agent_that_refuses_to_start_leaves_nothing_behind(backend: ProcessBackend) -> None:
    backend.agent_command = (sys.executable, "-c", "import sys; sys.stderr.write('measurement mismatch\\n'); "
                             "sys.exit(1)")
    with pytest.raises(SandboxStartError, match="measurement mismatch"):
        backend.create(SandboxSpec(name="bad", initdata=INITDATA, tee="sample"))
    assert backend.store.records() == []
    assert backend.store.broken() == []


def test_busy_host_port_fails_before_anything_starts(backend: ProcessBackend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransportError, match="cannot listen"):
            backend.create(SandboxSpec(name="busy", initdata=INITDATA, tee="sample",
                                       ports=(PortMapping(host=port, container=80),)))
    assert backend.store.records() == []


def test_killed_agent_shows_dead_and_rm_f_cleans_up(backend: ProcessBackend) -> None:
    sandbox = backend.create(SandboxSpec(name="victim", initdata=INITDATA, tee="sample",
                                         ports=(PortMapping(host=free_port(), container=80),)))
    record = sandbox.record
    os.kill(record.processes["agent"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while backend.store.load(record.id).effective_status() != "dead" and time.monotonic() < deadline:
        os.waitpid(record.processes["unshare"].pid, os.WNOHANG)
        time.sleep(0.05)
    assert backend.store.load(record.id).effective_status() == "dead"
    assert record.processes["forwarder"].alive()  # still there until rm cleans it
    backend.remove(backend.store.load(record.id), force=True)
    _assert_nothing_left(backend, record.id, sandbox.directory)
    assert not sandbox.directory.exists()


def test_running_sandbox_is_not_removed_without_force(backend: ProcessBackend) -> None:
    sandbox = backend.create(SandboxSpec(name="keep", initdata=INITDATA, tee="sample"))
    with pytest.raises(UsageError, match="running"):
        backend.remove(sandbox.record)
    assert backend.is_alive(sandbox.record)
    backend.remove(sandbox.record, force=True)
    _assert_nothing_left(backend, sandbox.record.id, sandbox.directory)


def test_duplicate_name_is_refused_while_the_first_exists(backend: ProcessBackend) -> None:
    backend.create(SandboxSpec(name="one", initdata=INITDATA, tee="sample"))
    with pytest.raises(UsageError, match="already used"):
        backend.create(SandboxSpec(name="one", initdata=INITDATA, tee="sample"))


def test_malformed_initdata_is_refused_before_anything_starts(backend: ProcessBackend) -> None:
    with pytest.raises(Exception, match="initdata"):
        backend.create(SandboxSpec(name="x", initdata=b"version = 'nope'\n", tee="sample"))
    assert backend.store.records() == []


def test_sandbox_processes_keep_bytecode_outside_the_sources(tmp_path: Path) -> None:
    # Where the environment forbids bytecode next to the sources, the agent and forwarders use a
    # cache under $COFFER_CACHE instead of recompiling coffer at every sandbox start.
    env = {"PATH": "/usr/bin", "PYTHONDONTWRITEBYTECODE": "1", "COFFER_CACHE": str(tmp_path / "cache")}
    child = ProcessBackend(StateStore(tmp_path / "s"), env=env)._child_env()
    assert "PYTHONDONTWRITEBYTECODE" not in child
    assert child["PYTHONPYCACHEPREFIX"] == str(tmp_path / "cache" / "pycache")
    # A prefix the user chose, or bytecode allowed, is left as it is.
    chosen = ProcessBackend(StateStore(tmp_path / "s"), env={**env, "PYTHONPYCACHEPREFIX": "/x"})._child_env()
    assert (chosen["PYTHONDONTWRITEBYTECODE"], chosen["PYTHONPYCACHEPREFIX"]) == ("1", "/x")
    allowed = ProcessBackend(StateStore(tmp_path / "s"), env={"PATH": "/usr/bin"})._child_env()
    assert "PYTHONPYCACHEPREFIX" not in allowed
