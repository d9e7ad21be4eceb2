"""``coffer run``, ``ps``, ``logs``, ``exec``, ``stop``, ``rm``, ``inspect``: confidential containers
the way ``docker run`` users know them.

``coffer run IMAGE [CMD...]`` starts a sandbox (:mod:`coffer.sandbox.process`: the development
backend, no memory confidentiality -- said wherever a sandbox is shown), whose agent pulls, verifies
and decrypts the image itself and runs the container under the workload policy. The policy is
``--policy FILE``, or generated from the arguments (:func:`coffer.policy.generate.generate` on a
one-container pod): exactly this image (pinned by digest), argv, environment and the image's user
and working directory; logs allowed, exec denied. The host then asks the agent for CreateSandbox,
CreateContainer and StartContainer; the agent decides each with the policy. ``CMD`` replaces the
image's Cmd (the Entrypoint stays), as with docker; with ``--policy`` it is the whole argv.

A request the policy refuses prints ``... is blocked by policy: <why>`` and exits 1. Exit status
otherwise: 0 success (``run`` in the foreground: the container's status), 2 usage errors, 3 other
errors.

``$COFFER_AGENT_COMMAND`` replaces the agent command line (development and tests).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import secrets as secrets_mod
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from coffer.cli._output import Output
from coffer.errors import CofferError, UsageError
from coffer.guest.protocol import AgentClient, BlockedByPolicyError
from coffer.policy.model import EnvRule, WorkloadPolicy
from coffer.policy.requests import ContainerSpec, container_request, exec_request, sandbox_request
from coffer.sandbox.backend import DEVELOPMENT_LABEL, PortMapping, SandboxSpec
from coffer.sandbox.process import AGENT_COMMAND, ProcessBackend
from coffer.sandbox.state import SandboxRecord, StateStore

if TYPE_CHECKING:
    # Imported where used: policy generation resolves images (registry client, httpx), which a run
    # with --policy, and ps/rm/logs, never need.
    from coffer.image.models import ImageConfig
    from coffer.policy.generate import ImageResolver, OciLayoutResolver

EXIT_OK: Final = 0
EXIT_BLOCKED: Final = 1
AGENT_COMMAND_ENV: Final = "COFFER_AGENT_COMMAND"
READ_CHUNK: Final = 64 * 1024
POLL_INTERVAL: Final = 0.1
CREATE_TIMEOUT: Final = 300.0  # CreateContainer pulls, verifies and decrypts the image

_EPILOG = f"""\
Sandboxes are development sandboxes ({DEVELOPMENT_LABEL}): the agent, the policy gate, attestation
and guest pull are real, the memory protection of a TEE is not.
Exit status: 0 success, 1 blocked by the policy, 2 usage error, 3 other error.
"""

Handler = Callable[[argparse.Namespace, Output], int]


# --------------------------------------------------------------------------------------------------
# Registration


def register(groups: Any) -> None:
    run = _add(groups, "run", "run a container in a new confidential sandbox", _run)
    run.add_argument("-d", "--detach", action="store_true", help="start and print the sandbox id")
    run.add_argument("--name", help="sandbox name (default: coffer-<random>)")
    run.add_argument("-p", "--publish", action="append", default=[], metavar="HOST:CTR",
                     help="forward 127.0.0.1:HOST to port CTR in the sandbox; repeatable")
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                     help="set a variable (K alone: take it from this environment); repeatable")
    run.add_argument("--policy", type=Path, metavar="FILE",
                     help="workload policy (default: generated from these arguments)")
    run.add_argument("--kbs", metavar="URL", help="KBS the agent attests to for keys and secrets")
    run.add_argument("--tee", choices=("auto", "tpm", "sample"), default="auto",
                     help="launch measurement: a per-sandbox swtpm (tpm) or a file (sample); "
                          "default tpm when swtpm is installed")
    run.add_argument("--insecure", action="store_true",
                     help="allow plain http to a loopback registry (host and agent)")
    run.add_argument("--image-layouts", type=Path, metavar="DIR",
                     help="OCI layout(s) whose index names images by full reference, read instead of "
                          "the registry (given read-only to the agent)")
    run.add_argument("--rm", action="store_true", help="remove the sandbox when the container exits")
    run.add_argument("image", metavar="IMAGE", help="image reference, e.g. registry.example/app:1.0")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="replaces the image's Cmd")

    ps = _add(groups, "ps", "list sandboxes", _ps)
    ps.add_argument("-a", "--all", action="store_true", help="also exited and dead sandboxes")

    logs = _add(groups, "logs", "print a container's output (when the policy allows it)", _logs)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    logs.add_argument("sandbox", metavar="NAME")

    exec_ = _add(groups, "exec", "run a command in a running container (when the policy allows it)", _exec)
    exec_.add_argument("sandbox", metavar="NAME")
    exec_.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")

    stop = _add(groups, "stop", "stop a sandbox (its containers, agent and TPM)", _stop)
    stop.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                      help="grace period before killing")
    stop.add_argument("sandbox", metavar="NAME", nargs="+")

    rm = _add(groups, "rm", "remove stopped sandboxes", _rm)
    rm.add_argument("-f", "--force", action="store_true", help="stop running sandboxes first")
    rm.add_argument("sandbox", metavar="NAME", nargs="+")

    inspect = _add(groups, "inspect", "show a sandbox: state, TEE, initdata digest, event log", _inspect)
    inspect.add_argument("sandbox", metavar="NAME")


def _add(groups: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_blocked_exits_1(handler))
    return parser


def _blocked_exits_1(handler: Handler) -> Handler:
    def wrapped(args: argparse.Namespace, out: Output) -> int:
        try:
            return handler(args, out)
        except BlockedByPolicyError as exc:
            out.error(str(exc), kind="blocked_by_policy")
            return EXIT_BLOCKED
    return wrapped


def _backend() -> ProcessBackend:
    command = os.environ.get(AGENT_COMMAND_ENV)
    return ProcessBackend(StateStore(), agent_command=shlex.split(command) if command else AGENT_COMMAND)


# --------------------------------------------------------------------------------------------------
# Argument parsing


def parse_publish(items: Sequence[str]) -> tuple[PortMapping, ...]:
    """``["8080:80"]`` -> port mappings (host 127.0.0.1 only)."""
    out = []
    for item in items:
        host, sep, container = item.partition(":")
        if not sep or not host.isdigit() or not container.isdigit():
            raise UsageError(f"-p {item!r}: expected HOST:CTR (two port numbers)")
        h, c = int(host), int(container)
        if not (1 <= h <= 65535 and 1 <= c <= 65535):
            raise UsageError(f"-p {item!r}: ports must be 1-65535")
        out.append(PortMapping(host=h, container=c))
    return tuple(out)


def parse_env(items: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``-e K=V`` / ``-e K`` (value from this environment, skipped when unset), in order."""
    source = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name or not all(ch.isalnum() or ch in "_.-" for ch in name) or name[0].isdigit():
            raise UsageError(f"-e {item.split('=', 1)[0]!r}: not a variable name")
        if not sep:
            if name not in source:
                continue
            value = source[name]
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------------
# The policy and the container to ask for


class _LayoutsResolver:
    """Images from OCI layouts: ``DIR`` itself or its sub-directories holding an ``oci-layout``."""

    def __init__(self, directory: Path) -> None:
        from coffer.policy.generate import OciLayoutResolver  # noqa: PLC0415

        candidates = [directory] if (directory / "oci-layout").is_file() else sorted(
            p for p in directory.iterdir() if (p / "oci-layout").is_file())
        if not candidates:
            raise UsageError(f"{directory} holds no OCI layout")
        self.resolvers: list[OciLayoutResolver] = [OciLayoutResolver(path) for path in candidates]

    def resolve(self, reference: str) -> tuple[str, ImageConfig]:
        last: UsageError | None = None
        for resolver in self.resolvers:
            try:
                return resolver.resolve(reference)
            except UsageError as exc:
                last = exc
        assert last is not None
        raise last


def _aa_toml(kbs: str | None) -> str | None:
    """The initdata's attestation-agent config naming the KBS: the agent trusts only that KBS."""
    if kbs is None:
        return None
    from coffer.policy.initdata import aa_toml_for_kbs  # noqa: PLC0415

    return aa_toml_for_kbs(kbs)


def generated_policy(*, name: str, image: str, command: Sequence[str], env: dict[str, str],
                     resolver: ImageResolver,
                     aa_toml: str | None = None) -> tuple[WorkloadPolicy, ContainerSpec, bytes]:
    """A policy allowing exactly this container (logs allowed, exec denied), its spec, its initdata."""
    from coffer.policy.generate import generate_for_run  # noqa: PLC0415

    workload = generate_for_run(name=name, image=image, command=list(command), env=env,
                                image_resolver=resolver, allow_logs=True, aa_toml=aa_toml)
    return workload.policy, workload.specs[0], workload.initdata


def spec_from_policy(policy: WorkloadPolicy, *, image: str, command: Sequence[str],
                     env: dict[str, str]) -> ContainerSpec:
    """The container to request under a given policy: the entry for ``image`` (or the only one), with
    the command line's argv and variables in place of the policy's (the agent then decides)."""
    matches = [c for c in policy.containers if c.image == image]
    if not matches and len(policy.containers) == 1:
        matches = list(policy.containers)
    if not matches:
        raise UsageError(f"the policy has no container for {image!r} (its images: "
                         + ", ".join(c.image for c in policy.containers) + ")")
    chosen = matches[0]
    rules = {r.name: r for r in chosen.env if r.value is not None}
    for key, value in env.items():
        rules[key] = EnvRule(name=key, value=value)
    return ContainerSpec(
        name=chosen.name, image=image, args=tuple(command) if command else chosen.args,
        env=tuple(rules.values()), working_dir=chosen.working_dir, user=chosen.user,
        capabilities=chosen.capabilities, privileged=chosen.privileged,
        no_new_privileges=chosen.no_new_privileges, read_only_root=chosen.read_only_root)


# --------------------------------------------------------------------------------------------------
# run


def _run(args: argparse.Namespace, out: Output) -> int:
    ports = parse_publish(args.publish)
    env = parse_env(args.env)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.policy is not None:
        from coffer.policy import initdata as initdata_mod  # noqa: PLC0415
        from coffer.policy.document import load_policy_file  # noqa: PLC0415
        from coffer.policy.engine import compile_policy  # noqa: PLC0415

        policy = load_policy_file(args.policy)
        spec = spec_from_policy(policy, image=args.image, command=command, env=env)
        initdata = initdata_mod.build_initdata(compile_policy(policy), aa_toml=_aa_toml(args.kbs))
        name = args.name or policy.name
    else:
        from coffer.image.transport import TransportOptions  # noqa: PLC0415
        from coffer.policy.generate import RegistryResolver  # noqa: PLC0415

        name = args.name or f"coffer-{secrets_mod.token_hex(3)}"
        resolver: ImageResolver = (_LayoutsResolver(args.image_layouts) if args.image_layouts is not None
                                   else RegistryResolver(TransportOptions(insecure=args.insecure)))
        policy, spec, initdata = generated_policy(name=name, image=args.image, command=command, env=env,
                                                  resolver=resolver, aa_toml=_aa_toml(args.kbs))
    backend = _backend()
    sandbox = backend.create(SandboxSpec(
        name=name, initdata=initdata, image=spec.image, tee=args.tee, ports=ports, kbs=args.kbs,
        registry_insecure=args.insecure, image_layouts=args.image_layouts))
    record = sandbox.record
    container_id = secrets_mod.token_hex(16)
    try:
        with AgentClient(sandbox.agent_socket) as client:
            client.call("CreateSandboxRequest", sandbox_request(
                name=policy.name, namespace=policy.namespace, sandbox_id=record.id, hostname=name))
            client.call("CreateContainerRequest", container_request(
                container_id=container_id, name=spec.name, image=spec.image, spec=spec, sandbox_id=record.id),
                timeout=CREATE_TIMEOUT)
            record = record.with_changes(container_id=container_id, extra={
                **record.extra, "exec": {"env": spec.env_list(), "cwd": spec.working_dir,
                                         "uid": spec.user.uid, "gid": spec.user.gid,
                                         "additional_gids": list(spec.user.additional_gids)}})
            backend.store.save(record)
            client.call("StartContainerRequest", {"container_id": container_id})
    except BaseException:
        # A sandbox whose container never started is of no use: leave nothing behind.
        backend.remove(record, force=True)
        raise
    if args.detach:
        if out.json_mode:
            out.result({"id": record.id, "name": record.name, "development": True})
        else:
            sys.stdout.write(record.id + "\n")
            sys.stderr.write(f"{record.name}: {DEVELOPMENT_LABEL}\n")
        return EXIT_OK
    try:
        try:
            status = _follow(backend.agent_socket(record), container_id, "", follow=True)
        except BlockedByPolicyError as exc:
            sys.stderr.write(f"coffer: {exc} (waiting for the container to exit)\n")
            status = _wait(backend.agent_socket(record), container_id, "")
    except KeyboardInterrupt:
        status = 130
    backend.stop(backend.store.load(record.id))
    if args.rm:
        backend.remove(backend.store.load(record.id))
    return status


def _follow(socket_path: Path, container_id: str, exec_id: str, *, follow: bool) -> int:
    """Copy stdout/stderr until the process exits (``follow``) or nothing is buffered; exit status."""
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    finished: set[str] = set()
    with AgentClient(socket_path) as client:
        while True:
            got = False
            for stream, sink in streams.items():
                if stream in finished:
                    continue
                result = client.call("ReadStreamRequest", {
                    "container_id": container_id, "exec_id": exec_id, "stream": stream,
                    "max_bytes": READ_CHUNK})
                if result.get("blocked"):
                    raise BlockedByPolicyError("ReadStreamRequest", _explanation(str(result["blocked"])))
                data = _b64(result.get("data", ""))
                if data:
                    got = True
                    sink.write(data)
                    sink.flush()
                if result.get("eof") and not data:
                    finished.add(stream)
            if not follow and not got:
                return EXIT_OK
            if len(finished) == len(streams):
                break
            if not got:
                waited = client.call("WaitProcessRequest", {"container_id": container_id, "exec_id": exec_id,
                                                            "timeout_s": 0})
                if waited.get("exited"):
                    # Drain what was written before the exit, then report its status.
                    follow = False
                    continue
                time.sleep(POLL_INTERVAL)
        waited = client.call("WaitProcessRequest", {"container_id": container_id, "exec_id": exec_id,
                                                    "timeout_s": 30}, timeout=60)
    status = waited.get("status")
    return int(status) & 0xFF if isinstance(status, int) else EXIT_OK


def _wait(socket_path: Path, container_id: str, exec_id: str) -> int:
    with AgentClient(socket_path) as client:
        while True:
            waited = client.call("WaitProcessRequest", {"container_id": container_id, "exec_id": exec_id,
                                                        "timeout_s": 5}, timeout=30)
            if waited.get("exited"):
                status = waited.get("status")
                return int(status) & 0xFF if isinstance(status, int) else EXIT_OK


def _explanation(message: str) -> str:
    return message.split("blocked by policy: ", 1)[-1]


def _b64(text: Any) -> bytes:
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


# --------------------------------------------------------------------------------------------------
# ps, logs, exec, stop, rm, inspect


def _ps(args: argparse.Namespace, out: Output) -> int:
    records = [r for r in StateStore().records()
               if args.all or r.effective_status() in ("running", "creating")]
    rows = [{**r.to_json(), "status": r.effective_status()} for r in records]
    if out.json_mode:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    header = ("SANDBOX ID", "NAME", "IMAGE", "STATUS", "TEE", "PORTS", "CREATED")
    table = [header] + [
        (r.id, r.name, _short(r.image), r.effective_status(), r.tee + (" (dev)" if r.development else ""),
         ", ".join(f"127.0.0.1:{h}->{c}" for h, c in r.ports), r.created) for r in records]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")
    if any(r.development for r in records):
        sys.stdout.write(f"(dev): {DEVELOPMENT_LABEL}\n")
    return EXIT_OK


def _short(image: str) -> str:
    name, sep, digest = image.partition("@")
    return f"{name}@{digest[:19]}" if sep else image


def _running(name: str) -> tuple[ProcessBackend, SandboxRecord]:
    backend = _backend()
    record = backend.store.resolve(name)
    status = record.effective_status()
    if status != "running":
        raise UsageError(f"sandbox {record.name} is {status}")
    if not record.container_id:
        raise UsageError(f"sandbox {record.name} has no container")
    return backend, record


def _logs(args: argparse.Namespace, out: Output) -> int:
    backend, record = _running(args.sandbox)
    _follow(backend.agent_socket(record), record.container_id, "", follow=args.follow)
    return EXIT_OK


def _exec(args: argparse.Namespace, out: Output) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("exec needs a command")
    backend, record = _running(args.sandbox)
    defaults = record.extra.get("exec") or {}
    from coffer.policy.model import User  # noqa: PLC0415

    user = User(uid=int(defaults.get("uid", 0)), gid=int(defaults.get("gid", 0)),
                additional_gids=tuple(int(g) for g in defaults.get("additional_gids", [])))
    exec_id = secrets_mod.token_hex(8)
    params = exec_request(container_id=record.container_id, args=command, exec_id=exec_id,
                          env=list(defaults.get("env", [])), cwd=str(defaults.get("cwd", "/")), user=user)
    with AgentClient(backend.agent_socket(record)) as client:
        exec_id = str(client.call("ExecProcessRequest", params).get("exec_id", exec_id))
    return _follow(backend.agent_socket(record), record.container_id, exec_id, follow=True)


def _stop(args: argparse.Namespace, out: Output) -> int:
    backend = _backend()
    for name in args.sandbox:
        record = backend.store.resolve(name)
        if backend.is_alive(record):
            # Ask the agent to tear its containers down first; the backend kills whatever remains.
            try:
                with AgentClient(backend.agent_socket(record), timeout=args.time) as client:
                    client.call("DestroySandboxRequest", {})
            except CofferError:
                pass
        backend.stop(record, timeout=args.time)
        if not out.json_mode:
            sys.stdout.write(record.name + "\n")
    if out.json_mode:
        out.result({"stopped": list(args.sandbox)})
    return EXIT_OK


def _rm(args: argparse.Namespace, out: Output) -> int:
    backend = _backend()
    for name in args.sandbox:
        record = backend.store.resolve(name)
        backend.remove(record, force=args.force)
        if not out.json_mode:
            sys.stdout.write(record.name + "\n")
    if out.json_mode:
        out.result({"removed": list(args.sandbox)})
    return EXIT_OK


def _inspect(args: argparse.Namespace, out: Output) -> int:
    backend = _backend()
    record = backend.store.resolve(args.sandbox)
    data: dict[str, Any] = {**record.to_json(), "status": record.effective_status()}
    data["host"] = backend.describe(record)
    guest: Any = None
    if record.effective_status() == "running":
        try:
            with AgentClient(backend.agent_socket(record), timeout=10) as client:
                guest = client.call("GuestDetailsRequest", {})
        except CofferError as exc:
            guest = {"error": str(exc)}
    data["guest"] = guest
    if record.development:
        data["notice"] = DEVELOPMENT_LABEL
    out.result(data, title=f"sandbox {record.name} ({record.id})")
    return EXIT_OK
