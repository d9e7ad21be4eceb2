"""The development trust setup of the quickstart and the end-to-end tests: a local KBS and a trusted
sandbox TPM.

:func:`start_kbs` runs ``coffer kbs serve`` as a child process on 127.0.0.1 (a free port) with its
state, a generated master key and a generated admin key under a work directory; the
:class:`LocalKbs` it returns holds an admin token (never shown in its ``repr``) and talks to the
admin API.

:func:`trust_sandbox_tpm` makes the process backend's TPM template trustworthy to that KBS:

1. the template (``<state root>/tpm-template``, the manufactured swtpm state every sandbox's TPM is a
   copy of) gets an attestation key created under its EK and *persisted* (handle 0x81010002), so
   every sandbox copy quotes with that same AK;
2. the AK is enrolled by credential activation: the EK certificate is checked against the template's
   local CA (``<state root>/tpm-ca``), a secret is encrypted to the EK bound to the AK's name, and only
   the TPM holding both keys recovers it;
3. the trusted AK and the PCR values a freshly started copy shows are registered as reference values
   (``trusted_ak``, ``pcr0``-``pcr7`` and ``pcr9``-``pcr16``). PCR 8 is left out: it holds the
   sandbox's launch measurement of initdata, which the attestation service checks against the
   initdata itself; PCR 23 (the agent's runtime measurements) is left out too, since it changes with
   every image pulled.

The KBS keeps its DEFAULT resource policy (release to affirming evidence only), so keys reach exactly
the sandboxes whose TPM is the trusted template's copy, with firmware PCRs as registered and initdata
as launched. This is development trust: the local CA and the template live on the same host as the
sandboxes, and a host administrator can use both.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import httpx
from cryptography.hazmat.primitives import serialization

from coffer._internal.net import free_port
from coffer.errors import ConfigError, TransportError, UnsupportedError
from coffer.kbs.admin import generate_admin_key, mint_admin_token
from coffer.kbs.admin_client import AdminClient
from coffer.kbs.resources import MasterKey
from coffer.sandbox import swtpm as swtpm_mod
from coffer.sandbox.process import ProcessBackend, tpm_available
from coffer.sandbox.state import StateStore

KBS_READY_TIMEOUT: Final = 30.0
KBS_STOP_TIMEOUT: Final = 10.0
#: PCRs registered as reference values: everything a fresh sandbox TPM shows before the launch
#: measurement, except 8 (initdata, checked by the attestation service) and 17-23 (locality and
#: debug PCRs; 23 carries the agent's runtime measurements).
REGISTERED_PCRS: Final = (*range(8), *range(9, 17))
TEMPLATE_DIR: Final = "tpm-template"
CA_DIR: Final = "tpm-ca"
DEFAULT_RESOURCE_POLICY_NOTE: Final = "default (releases to affirming evidence only)"

# Variables of the operator's shell that must not reach the KBS process.
_SCRUBBED: Final = ("COFFER_KBS_MASTER_KEY", "COFFER_KBS_ADMIN_TOKEN", "COFFER_KBS_URL", "TPM2TOOLS_TCTI")


def coffer_command() -> list[str]:
    """How to run the ``coffer`` CLI as a child, with the interpreter running this process."""
    return [sys.executable, "-c", "import sys; from coffer.cli import main; sys.exit(main())"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without KBS secrets of the operator's shell, plus ``extra``; ``coffer`` is
    importable from wherever this process imported it."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------------
# The KBS


@dataclass
class LocalKbs:
    """A ``coffer kbs serve`` child process and the admin access to it."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    _token: str = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_file(self) -> Path:
        """A file (mode 0600) holding the admin token, for ``--admin-token-file``."""
        return self.directory / "admin.token"

    def admin(self) -> AdminClient:
        return AdminClient(self._token, base_url=self.url)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    # -- admin API ----------------------------------------------------------------------------------

    def add_reference_value(self, name: str, values: list[str], provenance: str) -> None:
        with self.admin() as admin:
            admin.request("POST", "/kbs/v0/reference-value",
                          json_body={"name": name, "values": values, "provenance": provenance})

    def reference_values(self) -> Any:
        with self.admin() as admin:
            return admin.request("GET", "/kbs/v0/reference-value").json()

    def set_resource_policy(self, rego: str) -> None:
        encoded = base64.urlsafe_b64encode(rego.encode()).rstrip(b"=").decode()
        with self.admin() as admin:
            admin.request("POST", "/kbs/v0/resource-policy", json_body={"policy": encoded})

    def resource_policy(self) -> dict[str, Any]:
        with self.admin() as admin:
            body: dict[str, Any] = admin.request("GET", "/kbs/v0/resource-policy").json()
        return body

    def put_resource(self, path: str, data: bytes) -> None:
        with self.admin() as admin:
            admin.put_resource(path, data)

    def audit(self, **query: str) -> list[dict[str, Any]]:
        with self.admin() as admin:
            answer = admin.request("GET", "/kbs/v0/audit", params=query)
        events: list[dict[str, Any]] = answer.json()["events"]
        return events

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=KBS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=KBS_STOP_TIMEOUT)

    def __enter__(self) -> LocalKbs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def start_kbs(directory: Path, *, port: int | None = None, log_level: str = "warning",
              ready_timeout: float = KBS_READY_TIMEOUT) -> LocalKbs:
    """Start a KBS with its state in ``directory`` (created; reused when it exists) and wait until
    it is ready. Its admin key is generated here and its token minted for 12 hours."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    master = directory / "master.key"
    if not master.exists():
        MasterKey.generate().write(master)
    admin_key = generate_admin_key("ed25519")
    public = directory / "admin.pub"
    public.write_bytes(admin_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = mint_admin_token(admin_key, role="admin", ttl=timedelta(hours=12), subject="coffer-quickstart")
    port = port or free_port()
    config = directory / "kbs.toml"
    config.write_text("\n".join([
        f'db = "sqlite:///{directory / "state" / "state.db"}"',
        f'state_dir = "{directory / "state"}"',
        "[master_key]", f'file = "{master}"',
        "[admin]", "[[admin.keys]]", 'id = "quickstart"', f'public_key = "{public}"', ""]))
    log = directory / "kbs.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            [*coffer_command(), "kbs", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
             "--log-level", log_level],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            env=child_env({"COFFER_KBS_STATE_DIR": str(directory / "state")}), start_new_session=True)
    kbs = LocalKbs(directory=directory, port=port, process=process, log=log, _token=token)
    _write_private(kbs.token_file, token.encode() + b"\n")
    try:
        _wait_ready(kbs, ready_timeout)
    except BaseException:
        kbs.stop()
        raise
    return kbs


def _wait_ready(kbs: LocalKbs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if kbs.process.poll() is not None:
            raise TransportError(f"the KBS exited with status {kbs.process.returncode}: {kbs.log_tail()}")
        try:
            if httpx.get(f"{kbs.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TransportError(f"the KBS was not ready after {timeout:.0f} s: {kbs.log_tail()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# The sandbox TPM


@dataclass(frozen=True)
class TpmTrust:
    """What :func:`trust_sandbox_tpm` registered."""

    template: Path
    ak_spki: bytes
    pcrs: dict[int, bytes]
    ak_created: bool

    def to_json(self) -> dict[str, Any]:
        return {"template": str(self.template), "ak_spki_sha256": _sha256_hex(self.ak_spki),
                "ak_created": self.ak_created,
                "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())}}


def _sha256_hex(data: bytes) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _template_lock(root: Path) -> Iterator[None]:
    # The backend takes this lock while it manufactures the template; holding it while the AK is
    # added keeps a sandbox start from copying a half-written state.
    fd = os.open(root / ".tpm-template.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prepare_tpm_template(state_root: Path) -> tuple[Path, bytes, dict[int, bytes], bool]:
    """Manufacture the backend's template TPM (if needed), persist an AK in it and read what a fresh
    copy shows: (template dir, AK SubjectPublicKeyInfo DER, PCR values, whether the AK was new)."""
    from coffer.guest.attesters.tpm import AK_HANDLE, TpmAttester, enroll_by_activation  # noqa: PLC0415

    if not tpm_available():
        raise UnsupportedError("the tpm TEE needs swtpm, swtpm-tools and tpm2-tools "
                               "(apt-get install swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0)")
    backend = ProcessBackend(StateStore(state_root))
    template: Path = backend._template()
    with _template_lock(state_root):
        tpm = swtpm_mod.Swtpm(template, ca_dir=state_root / CA_DIR)
        with tpm:
            attester = TpmAttester(tpm.tcti, pcrs=REGISTERED_PCRS)
            created = AK_HANDLE not in attester.tools.persistent_handles()
            ak_spki = enroll_by_activation(attester, ca_certs=tpm.local_ca.certificates())
            if ak_spki != attester.ak_public():
                raise ConfigError("the enrolled AK is not the template's persisted AK")
            pcrs = dict(zip(attester.pcrs, attester.read_pcrs(), strict=True))
        # swtpm keeps NV (the persisted AK) in tpm2-00.permall, the one file sandboxes copy.
        for leftover in ("swtpm.log", "tpm2-00.volatilestate"):
            with contextlib.suppress(OSError):
                (template / leftover).unlink()
    return template, ak_spki, pcrs, created


def trust_sandbox_tpm(kbs: LocalKbs, state_root: Path) -> TpmTrust:
    """Make the sandboxes of ``state_root`` trusted by ``kbs`` (see the module docstring)."""
    template, ak_spki, pcrs, created = prepare_tpm_template(state_root)
    kbs.add_reference_value("trusted_ak", [ak_spki.hex()],
                            "credential activation against the sandbox TPM template's EK certificate "
                            f"(local CA {state_root / CA_DIR})")
    for index, value in sorted(pcrs.items()):
        kbs.add_reference_value(f"pcr{index}", [value.hex()],
                                "a fresh copy of the sandbox TPM template (before the launch measurement)")
    return TpmTrust(template=template, ak_spki=ak_spki, pcrs=pcrs, ak_created=created)


# --------------------------------------------------------------------------------------------------
# The guest's way to the KBS


#: Run inside the sandbox's namespaces in place of the agent command to demonstrate "the host changed
#: the policy after launch": replaces the initdata file the agent reads, then execs the agent (which
#: keeps the process id the launcher waits for and signals). The way to a loopback KBS is the
#: process backend's own egress relay.
AGENT_WRAPPER: Final = r"""
import os, shutil, sys
args = sys.argv[1:]
split = args.index("--")
options, agent = args[:split], args[split + 1:]
if options[:1] == ["--swap-initdata"]:
    shutil.copyfile(options[1], agent[agent.index("--initdata") + 1])
os.execv(agent[0], agent)
"""

AGENT_MODULE_COMMAND: Final = (sys.executable, "-m", "coffer.guest.agent")


def agent_command(directory: Path, *, swap_initdata: Path | None = None) -> str:
    """A ``$COFFER_AGENT_COMMAND``: the plain agent, or the agent behind :data:`AGENT_WRAPPER` when
    initdata is to be swapped."""
    import shlex  # noqa: PLC0415

    if swap_initdata is None:
        return shlex.join(AGENT_MODULE_COMMAND)
    wrapper = directory / "agent-wrapper.py"
    if not wrapper.exists() or wrapper.read_text() != AGENT_WRAPPER:
        wrapper.write_text(AGENT_WRAPPER)
    return shlex.join([sys.executable, str(wrapper), "--swap-initdata", str(swap_initdata), "--",
                       *AGENT_MODULE_COMMAND])


# --------------------------------------------------------------------------------------------------
# Both


@dataclass
class DevTrust:
    """A KBS trusting the sandboxes of one state root (the process backend relays a loopback KBS
    into each sandbox)."""

    kbs: LocalKbs
    tpm: TpmTrust
    state_root: Path

    def env(self, extra: Mapping[str, str] | None = None, *,
            swap_initdata: Path | None = None) -> dict[str, str]:
        """The environment for ``coffer`` commands on these sandboxes."""
        return child_env({"COFFER_STATE_DIR": str(self.state_root),
                          "COFFER_AGENT_COMMAND": agent_command(self.state_root, swap_initdata=swap_initdata),
                          **(extra or {})})

    def stop(self) -> None:
        self.kbs.stop()


def setup_dev_trust(work_dir: Path, state_root: Path) -> DevTrust:
    """Start a KBS under ``work_dir/kbs`` and make the TPM template of ``state_root`` trusted."""
    kbs = start_kbs(work_dir / "kbs")
    try:
        tpm = trust_sandbox_tpm(kbs, state_root)
    except BaseException:
        kbs.stop()
        raise
    return DevTrust(kbs=kbs, tpm=tpm, state_root=state_root)


__all__ = [
    "AGENT_WRAPPER",
    "REGISTERED_PCRS",
    "DevTrust",
    "LocalKbs",
    "TpmTrust",
    "agent_command",
    "child_env",
    "coffer_command",
    "prepare_tpm_template",
    "setup_dev_trust",
    "start_kbs",
    "trust_sandbox_tpm",
]
