"""A software TPM 2.0 for tests and development: ``swtpm`` on a unix socket or a loopback TCP port.

``swtpm_setup`` manufactures the TPM once per state directory: it creates the RSA and ECC
endorsement keys (persisted at 0x81010001 and 0x81010016) and has ``swtpm_localca`` issue their
certificates, which it stores in the TPM's NV indexes 0x01C00002 (RSA) and 0x01C00016 (ECC), the
places a real TPM's manufacturer uses. The CA lives in a directory of our choosing (never the
system-wide ``/var/lib/swtpm-localca``), so a relying party can trust exactly that CA::

    with Swtpm(tmp / "tpm", ca_dir=tmp / "ca") as tpm:
        attester = TpmAttester(tpm.tcti)
        ...
        tpm.local_ca.certificates()   # DER: the issuing CA, then the root

The process is a child of ours (not daemonised), stopped with SIGTERM on :meth:`Swtpm.stop` or at the
end of the ``with`` block; the sockets live in a private temporary directory removed afterwards.
Needs the Debian packages ``swtpm`` and ``swtpm-tools`` (and ``tpm2-tools`` with
``libtss2-tcti-swtpm0`` for the attester that talks to it).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from coffer.errors import UnsupportedError

EK_CERT_NV_RSA = 0x01C00002
EK_HANDLE_RSA = 0x81010001
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0

# TPM2_GetRandom(8): tag TPM_ST_NO_SESSIONS, size 12, command code 0x17B, bytesRequested 8.
_TPM2_GET_RANDOM_8 = bytes.fromhex("80010000000c0000017b0008")


def tpm_answers(family: int, address: str | bytes | tuple[str, int]) -> bool:
    """Whether the TPM at ``address`` (a unix socket path or a TCP address) answers a command
    (TPM2_GetRandom) with success: swtpm opens its sockets before it has loaded its state."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(2.0)
            conn.connect(address)
            conn.sendall(_TPM2_GET_RANDOM_8)
            header = b""
            while len(header) < 10:
                chunk = conn.recv(10 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[:2] == b"\x80\x01" and header[6:10] == b"\0\0\0\0"


class SwtpmError(RuntimeError):
    """swtpm could not be set up or started (the message carries the end of its log)."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UnsupportedError(f"{name} is not installed (Debian packages: swtpm swtpm-tools)")
    return path


def available() -> bool:
    """Whether swtpm and swtpm_setup are installed (tests skip with a reason when not)."""
    return all(shutil.which(name) for name in ("swtpm", "swtpm_setup", "swtpm_localca"))


@dataclass(frozen=True)
class LocalCa:
    """The ``swtpm_localca`` CA that issued the EK certificates: an issuing CA under a root."""

    directory: Path

    @property
    def root_cert(self) -> Path:
        return self.directory / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_cert(self) -> Path:
        return self.directory / "issuercert.pem"

    def certificates(self) -> list[bytes]:
        """DER certificates of the CA, issuing CA first, then the root."""
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

        out = []
        for path in (self.issuer_cert, self.root_cert):
            out.append(x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER))
        return out


# swtpm_setup runs its own swtpm and exits without reaping it, which leaves a zombie for init.
# Running it under a child-subreaper wrapper lets the wrapper collect every descendant first.
_REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.run(sys.argv[1:], check=False).returncode
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(code)
"""


def _free_port_pair() -> int:
    """A loopback port P such that P and P+1 were both free a moment ago (the swtpm TCTI talks to
    the control channel on P+1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise SwtpmError("no pair of free loopback ports found")


class Swtpm:
    """One software TPM: a state directory, manufactured on first start, served by a child process.

    ``transport`` is ``"unix"`` (a socket in a private temporary directory) or ``"tcp"`` (127.0.0.1,
    a free port and the next one for control). ``ca_dir`` is the local CA's directory (created by
    ``swtpm_localca`` on first use and shareable between TPMs); ``None`` puts it beside the state.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        transport: Literal["unix", "tcp"] = "unix",
        ca_dir: Path | None = None,
        pcr_banks: str = "sha256",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.transport = transport
        self.local_ca = LocalCa(Path(ca_dir) if ca_dir is not None else self.state_dir.parent /
                                f"{self.state_dir.name}-ca")
        self.pcr_banks = pcr_banks
        self._process: subprocess.Popen[bytes] | None = None
        self._sock_dir: Path | None = None
        self._log: IO[bytes] | None = None
        self._port = 0

    # ---------------------------------------------------------------------------------- setup

    @property
    def manufactured(self) -> bool:
        return (self.state_dir / "tpm2-00.permall").exists()

    def manufacture(self) -> None:
        """Run ``swtpm_setup``: EKs, EK certificates from the local CA, platform certificate."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.local_ca.directory.mkdir(parents=True, exist_ok=True)
        conf_dir = self.state_dir / ".setup"
        conf_dir.mkdir(exist_ok=True)
        ca = self.local_ca.directory.resolve()
        (conf_dir / "localca.conf").write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
            f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n")
        (conf_dir / "localca.options").write_text(
            "--platform-manufacturer Coffer\n--platform-version 2.1\n--platform-model swtpm\n")
        (conf_dir / "setup.conf").write_text(
            f"create_certs_tool = {_tool('swtpm_localca')}\n"
            f"create_certs_tool_config = {(conf_dir / 'localca.conf').resolve()}\n"
            f"create_certs_tool_options = {(conf_dir / 'localca.options').resolve()}\n"
            f"active_pcr_banks = {self.pcr_banks}\n")
        result = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            [sys.executable, "-c", _REAPER, _tool("swtpm_setup"), "--tpm2",
             "--tpmstate", str(self.state_dir.resolve()), "--create-ek-cert", "--create-platform-cert",
             "--overwrite",
             "--config", str((conf_dir / "setup.conf").resolve())],
            capture_output=True, timeout=120, check=False)
        if result.returncode != 0 or not self.manufactured:
            tail = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
            raise SwtpmError(f"swtpm_setup failed ({result.returncode}): {tail}")

    # ---------------------------------------------------------------------------------- run

    @property
    def tcti(self) -> str:
        """The TCTI configuration string for tpm2-tools / tpm2-tss (``TPM2TOOLS_TCTI``)."""
        if self._process is None:
            raise SwtpmError("swtpm is not running")
        if self.transport == "unix":
            assert self._sock_dir is not None
            return f"swtpm:path={self._sock_dir / 'tpm'}"
        return f"swtpm:host=127.0.0.1,port={self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Swtpm:
        if self._process is not None:
            return self
        if not self.manufactured:
            self.manufacture()
        last_error = ""
        for _ in range(5):
            try:
                self._launch()
                return self
            except SwtpmError as exc:
                last_error = str(exc)
                self._cleanup_process()
        raise SwtpmError(last_error)

    def _launch(self) -> None:
        swtpm = _tool("swtpm")
        args = [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir.resolve()}",
                "--flags", "not-need-init,startup-clear"]
        if self.transport == "unix":
            # A short private directory: unix socket paths are limited to 107 bytes.
            self._sock_dir = Path(tempfile.mkdtemp(prefix="coffer-swtpm-"))
            sock = self._sock_dir / "tpm"
            args += ["--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl"]
        else:
            self._port = _free_port_pair()
            args += ["--server", f"type=tcp,port={self._port},bindaddr=127.0.0.1",
                     "--ctrl", f"type=tcp,port={self._port + 1},bindaddr=127.0.0.1"]
        self._log = (self.state_dir / "swtpm.log").open("ab")
        self._process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SwtpmError(f"swtpm exited with {self._process.returncode}: {self._log_tail()}")
            if self._ready():
                return
            time.sleep(0.02)
        raise SwtpmError(f"swtpm did not become ready in {_START_TIMEOUT:.0f} s: {self._log_tail()}")

    def _ready(self) -> bool:
        """The sockets exist and the TPM answers a command. swtpm opens its sockets before it has
        loaded its state, so an existing socket alone does not mean the TPM will stay up."""
        if self.transport == "unix":
            assert self._sock_dir is not None
            if not ((self._sock_dir / "tpm").exists() and (self._sock_dir / "tpm.ctrl").exists()):
                return False
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", self._port + 1)) != 0:
                    return False
        return self._answers_get_random()

    def _answers_get_random(self) -> bool:
        if self.transport == "unix":
            assert self._sock_dir is not None
            return tpm_answers(socket.AF_UNIX, str(self._sock_dir / "tpm"))
        return tpm_answers(socket.AF_INET, ("127.0.0.1", self._port))

    def _log_tail(self) -> str:
        try:
            return (self.state_dir / "swtpm.log").read_bytes()[-1500:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period) and remove the sockets."""
        self._cleanup_process()

    def _cleanup_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._cleanup_process()
