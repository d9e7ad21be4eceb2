"""The guest agent (``coffer-agent``): the only trusted component of a sandbox.

At start, before anything is served, :func:`startup_checks` binds the delivered initdata to what the
TEE measured at launch, in numbered steps that fail closed:

1. parse the initdata document (the exact bytes delivered) and take its digest;
2. find the policy (``policy.rego``) in it;
3. read the launch measurement: ``tpm`` -> PCR 8 of the SHA-256 bank; ``sample`` -> the file
   ``<storage>/../launch-measurement`` that the host launcher writes (the digest in hex -- a
   development stand-in that binds nothing, since the host writes it);
4. compare, in constant time: PCR 8 must be SHA-256(0^32 || digest), the sample file the digest;
5. when the policy names the TEE types it may run on (``attestation.tee``), this sandbox's TEE must
   be one of them (a host cannot start a ``tpm`` workload as ``sample``, whose launch measurement is
   a file the host writes).

Any failure is a :class:`~coffer.errors.VerificationError` naming the step; :func:`main` logs it and
exits 1 without opening the socket. The policy is then loaded into a
:class:`~coffer.policy.engine.PolicyEngine` and the initdata digest is the first runtime
measurement.

:class:`Agent` answers requests of the wire protocol (:mod:`coffer.guest.protocol`). Every request
is validated, decided by the policy, and only then dispatched to the
:class:`~coffer.guest.runtime.ContainerRuntime`. A denial is ``PERMISSION_DENIED`` with ``"<Name> is
blocked by policy: <reasons>"``, except ReadStream, which like Kata's agent answers with no data
(and ``eof``, so a host reading logs stops) and names the refusal in ``blocked``. SetPolicy is
always refused. Every exception becomes an error response; the agent never dies of its input.

Threads: the policy engine is bound to the thread that created it, so :meth:`Agent.serve` runs the
decision loop on the calling thread (the one that built the engine) and serves connections on
others, which hand each request to that loop through a queue. Runtime calls run on the loop too, so
they are serialised with the decisions, except WaitProcess: it may block for its whole timeout, so
after its (always-allowing) decision it runs on the connection's own thread.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from coffer.attestation.binding import MAX_INITDATA_BYTES, pcr8_for_initdata
from coffer.errors import (
    CofferError,
    CollateralError,
    ConfigError,
    FormatError,
    ProtocolError,
    TransportError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from coffer.guest import protocol
from coffer.guest.measure import Measurer, SampleRegister, TpmRegister, read_pcr8
from coffer.guest.protocol import FrameError
from coffer.guest.runtime import ContainerRuntime, NotFoundError
from coffer.policy.document import parse_policy
from coffer.policy.engine import Decision, PolicyEngine, policy_data, split_policy
from coffer.policy.initdata import InitData, InitDataDigests, digests, parse_initdata_document
from coffer.policy.model import WorkloadPolicy

if TYPE_CHECKING:
    from coffer.kbs.client import KbsClient

log = logging.getLogger(__name__)

TEES: Final = ("tpm", "sample")
LAUNCH_MEASUREMENT: Final = "launch-measurement"
MAX_CONNECTIONS: Final = 64
MAX_MESSAGE: Final = 4000
_POLL: Final = 0.2

#: Methods answered by the runtime, by the name of the ContainerRuntime method.
_RUNTIME_METHODS: Final = {
    "CreateContainerRequest": "create_container",
    "StartContainerRequest": "start_container",
    "ExecProcessRequest": "exec_process",
    "ReadStreamRequest": "read_stream",
    "WriteStreamRequest": "write_stream",
    "CloseStdinRequest": "close_stdin",
    "WaitProcessRequest": "wait_process",
    "SignalProcessRequest": "signal_process",
    "RemoveContainerRequest": "remove_container",
    "ListContainersRequest": "list_containers",
    "DestroySandboxRequest": "destroy",
}
_BLOCKING: Final = frozenset({"WaitProcessRequest"})
_SET_POLICY_REFUSED: Final = "SetPolicy is always denied: the policy is fixed at launch by initdata"
_PRECONDITION_ERRORS: Final = (VerificationError, FormatError, ProtocolError, ConfigError, UnsupportedError,
                               CollateralError)


# --------------------------------------------------------------------------------------------------
# Startup checks


@dataclass(frozen=True)
class VerifiedInitData:
    """Initdata whose digest matched the launch measurement."""

    document: InitData
    digests: InitDataDigests
    policy: str


def _refuse(tee: str, step: int, name: str, reason: str) -> VerificationError:
    return VerificationError(tee, step, name, reason)


def _sample_measurement(path: Path, tee: str) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(1025)
    except OSError as exc:
        raise _refuse(tee, 3, "read launch measurement",
                      f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    text = raw.decode("ascii", errors="replace").strip().lower()
    if len(raw) > 1024 or not text or len(text) % 2 or any(c not in "0123456789abcdef" for c in text):
        raise _refuse(tee, 3, "read launch measurement", f"{path} does not hold a digest in hex")
    return bytes.fromhex(text)


def startup_checks(
    initdata: bytes,
    tee: str,
    *,
    storage: Path,
    tcti: str | None = None,
    pcr8_reader: Callable[[str | None], bytes] = read_pcr8,
) -> VerifiedInitData:
    """Check ``initdata`` against the TEE's launch measurement (steps in the module docstring);
    VerificationError naming the failed step otherwise."""
    try:
        document = parse_initdata_document(initdata)
        found = digests(initdata)
    except CofferError as exc:
        raise _refuse(tee, 1, "parse initdata", str(exc)) from None
    policy = document.policy
    if policy is None:
        raise _refuse(tee, 2, "find policy", "initdata carries no policy.rego")
    if tee == "tpm":
        try:
            measured = pcr8_reader(tcti)
        except CofferError as exc:
            raise _refuse(tee, 3, "read launch measurement", f"PCR 8: {exc}") from None
        expected = pcr8_for_initdata(found.digest)
        what = "PCR 8"
    elif tee == "sample":
        measured = _sample_measurement(storage.parent / LAUNCH_MEASUREMENT, tee)
        expected = found.digest
        what = "the sample launch measurement"
    else:
        raise _refuse(tee, 3, "read launch measurement",
                      f"TEE {tee!r} is not supported here (one of {', '.join(TEES)})")
    if not hmac.compare_digest(measured, expected):
        raise _refuse(tee, 4, "compare initdata digest",
                      f"{what} is {measured.hex()}, but the delivered initdata "
                      f"({found.algorithm} {found.digest.hex()}) needs {expected.hex()}: the initdata was "
                      "changed after launch or belongs to another sandbox")
    allowed = _policy_tees(policy)
    if allowed and tee not in allowed:
        raise _refuse(tee, 5, "check TEE against policy",
                      f"the policy runs only on {', '.join(allowed)}, and this sandbox's TEE is {tee!r}")
    return VerifiedInitData(document=document, digests=found, policy=policy)


def _policy_tees(policy: str) -> tuple[str, ...]:
    """The TEE types the policy names (``attestation.tee`` of its data); () when it names none, or
    when its data is not in the compiled shape (the engine then refuses it when it loads)."""
    try:
        _, data = split_policy(policy)
    except CofferError:
        return ()
    attestation = data.get("attestation")
    tees = attestation.get("tee") if isinstance(attestation, dict) else None
    if not isinstance(tees, list):
        return ()
    return tuple(str(t) for t in tees)


_CONTAINER_KEYS: Final = ("name", "image", "args", "env", "working_dir", "user", "capabilities",
                          "no_new_privileges", "privileged", "read_only_root", "mounts", "allow", "secrets",
                          "signature")
_ALLOW_KEYS: Final = ("exec", "exec_patterns", "logs", "stdin", "copy_files")
_MOUNT_KEYS: Final = ("destination", "type", "source", "options")


def workload_policy_from_rego(text: str) -> WorkloadPolicy:
    """The workload policy document inside a delivered ``policy.rego`` (for the runtime, which needs
    images, signatures and secrets), checked to compile back to the very data the engine decides
    with; FormatError otherwise."""
    _, data = split_policy(text)
    try:
        doc: dict[str, Any] = {k: data[k] for k in ("version", "name", "attestation", "debug")}
        if data.get("namespace") is not None:
            doc["namespace"] = data["namespace"]
        containers = []
        for c in data["containers"]:
            obj = {k: c[k] for k in _CONTAINER_KEYS if k in c}
            obj["env"] = c["env_rules"]
            obj["allow"] = {k: c["allow"][k] for k in _ALLOW_KEYS}
            obj["mounts"] = [{k: m[k] for k in _MOUNT_KEYS} for m in c["mounts"]]
            containers.append(obj)
        doc["containers"] = containers
    except (KeyError, TypeError) as exc:
        raise FormatError("policy.rego", f"policy_data lacks the policy document ({exc})") from None
    policy = parse_policy(json.dumps(doc).encode("utf-8"), source="policy.rego")
    if json.loads(json.dumps(policy_data(policy))) != data:
        raise FormatError("policy.rego", "policy_data is not the compiled form of a policy document")
    return policy


# --------------------------------------------------------------------------------------------------
# The agent


def _trim(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def error_for(method: str, exc: BaseException) -> tuple[str, str]:
    """The wire code and message for an exception raised while serving ``method``. Only Coffer
    errors' messages are passed on (they never carry secrets); any other is named by type."""
    if isinstance(exc, NotFoundError):
        return protocol.NOT_FOUND, _trim(str(exc))
    if isinstance(exc, UsageError):
        return protocol.INVALID_ARGUMENT, _trim(str(exc))
    if isinstance(exc, TransportError):
        return protocol.UNAVAILABLE, _trim(str(exc))
    if isinstance(exc, _PRECONDITION_ERRORS):
        return protocol.FAILED_PRECONDITION, _trim(str(exc))
    if isinstance(exc, CofferError):
        return protocol.INTERNAL, _trim(str(exc))
    return protocol.INTERNAL, f"{method} failed: internal error ({type(exc).__name__})"


@dataclass
class Call:
    """An admitted request, to run after its decision (on the loop, or on the connection's thread)."""

    request_id: int
    method: str
    run_result: Callable[[], dict[str, Any]]
    blocking: bool = False
    on_error: Callable[[], object] | None = None

    def run(self) -> dict[str, Any]:
        try:
            result = self.run_result()
        except Exception as exc:
            if self.on_error is not None:
                self.on_error()
            code, message = error_for(self.method, exc)
            if code == protocol.INTERNAL:
                log.error("%s (request %d) failed: %s", self.method, self.request_id,
                          message if isinstance(exc, CofferError) else type(exc).__name__)
            return protocol.error_response(self.request_id, code, message)
        untrusted: object = result
        if not isinstance(untrusted, dict):
            log.error("%s returned %s, not an object", self.method, type(untrusted).__name__)
            return protocol.error_response(self.request_id, protocol.INTERNAL,
                                           f"{self.method} failed: internal error (bad result)")
        return protocol.ok_response(self.request_id, result)


def _linger(conn: socket.socket) -> None:
    """Half-close and discard what the peer still sends (bounded). Closing with unread input would
    reset the connection and could destroy the error response before the peer reads it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(_POLL)
        discarded = 0
        deadline = time.monotonic() + 1.0
        while discarded <= protocol.MAX_FRAME and time.monotonic() < deadline:
            chunk = conn.recv(64 * 1024)
            if not chunk:
                break
            discarded += len(chunk)


@dataclass
class _Job:
    message: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: dict[str, Any] | Call | None = None


@dataclass
class _Serving:
    """What the threads of one :meth:`Agent.serve` share."""

    jobs: queue.Queue[_Job]
    slots: threading.BoundedSemaphore
    conns: set[socket.socket] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)


class Agent:
    """Decides and answers agent requests.

    ``engine`` decides (use it only on its own thread: :meth:`handle` and :meth:`serve` must run
    there), ``runtime`` acts, ``measurement`` holds the event log and register, ``tee`` names the TEE,
    ``claims`` returns the latest attestation claims (or None) for GuestDetails.
    """

    def __init__(self, initdata: bytes, engine: PolicyEngine, runtime: ContainerRuntime,
                 measurement: Measurer, tee: str, *,
                 claims: Callable[[], Mapping[str, Any] | None] | None = None) -> None:
        document = parse_initdata_document(initdata)
        self._digest = digests(initdata)
        self._debug = False
        if document.policy is not None:
            _, data = split_policy(document.policy)
            self._debug = data.get("debug") is True
        self._engine = engine
        self._runtime = runtime
        self._measurer = measurement
        self._tee = tee
        self._claims = claims
        self._stop = threading.Event()
        self._sandbox_id: str | None = None

    @property
    def policy_debug(self) -> bool:
        return self._debug

    # -- one request -------------------------------------------------------------------------------

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The response to one request object (on the engine's thread). Never raises."""
        step = self.admit(request)
        return step.run() if isinstance(step, Call) else step

    def admit(self, request: Mapping[str, Any]) -> dict[str, Any] | Call:
        """Validate and decide a request: a final response (errors, denials, answers of the agent's
        own) or the :class:`Call` to run. Never raises."""
        request_id: int | None = None
        try:
            parsed = protocol.parse_request(request)
            request_id = parsed.id
            return self._admit(parsed)
        except FrameError as exc:
            return protocol.error_response(exc.request_id, exc.kind, _trim(exc.detail))
        except Exception as exc:
            method = str(request.get("method"))[:80] if isinstance(request, Mapping) else "request"
            code, message = error_for(method, exc)
            log.error("admitting %s failed: %s", method, type(exc).__name__)
            return protocol.error_response(request_id, code, message)

    def _decide(self, method: str, params: Mapping[str, Any]) -> Decision:
        try:
            return self._engine.decide(method, params)
        except Exception as exc:  # fail closed: a broken engine allows nothing
            log.error("policy engine failed on %s: %s", method, type(exc).__name__)
            return Decision(method, False, (f"{method}: policy evaluation failed",), None)

    def _admit(self, request: protocol.Request) -> dict[str, Any] | Call:
        method, params = request.method, request.params
        decision = self._decide(method, params)
        if method == "SetPolicyRequest" and decision.allowed:
            log.error("the policy allowed SetPolicy; refusing it anyway")
            decision = Decision(method, False, (_SET_POLICY_REFUSED,), None)
        if not decision.allowed:
            reasons = "; ".join(r.rstrip(".") for r in decision.reasons) or "no rule allows it"
            message = _trim(protocol.blocked_message(method, reasons))
            log.info("%s", message)
            if method == "ReadStreamRequest":
                return protocol.ok_response(request.id, {"data": "", "eof": True, "blocked": message})
            return protocol.error_response(request.id, protocol.PERMISSION_DENIED, message)
        if method == "GuestDetailsRequest":
            return Call(request.id, method, self.guest_details)
        if method == "CreateSandboxRequest":
            sandbox_id = params.get("sandbox_id")
            self._sandbox_id = sandbox_id if isinstance(sandbox_id, str) else None
            return protocol.ok_response(request.id, {})
        target = _RUNTIME_METHODS.get(method)
        if target is None:
            return protocol.error_response(request.id, protocol.FAILED_PRECONDITION,
                                           f"{method} is not supported by this agent")
        function: Callable[[Mapping[str, Any]], dict[str, Any]] = getattr(self._runtime, target)
        on_error = None
        container_id = params.get("container_id")
        if method == "CreateContainerRequest" and isinstance(container_id, str):
            # The allowed decision recorded the container in the policy state; a container that was
            # never made must not stay there (an exec could otherwise be tied to a later one).
            def on_error() -> object:
                return self._decide("RemoveContainerRequest", {"container_id": container_id})
        return Call(request.id, method, lambda: function(params), blocking=method in _BLOCKING,
                    on_error=on_error)

    def guest_details(self) -> dict[str, Any]:
        claims = None
        if self._claims is not None:
            found = self._claims()
            claims = dict(found) if found is not None else None
        return {
            "tee": self._tee,
            "initdata_digest": self._digest.digest.hex(),
            "policy_debug": self._debug,
            "event_log": self._measurer.event_log,
            "register": self._measurer.register_info(),
            "claims": claims,
        }

    # -- the server --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Make :meth:`serve` return (from any thread or a signal handler)."""
        self._stop.set()

    def serve(self, socket_path: Path | str, *, ready: Callable[[], None] | None = None,
              max_connections: int = MAX_CONNECTIONS) -> None:
        """Serve the unix socket until :meth:`shutdown`; decisions run on the calling thread.

        The socket is created with mode 0600 (a stale socket file at the path is replaced; any other
        file is refused) and removed on return. ``ready`` is called once it accepts connections."""
        path = Path(socket_path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise UsageError(f"{path} exists and is not a socket")
            path.unlink()
        serving = _Serving(jobs=queue.Queue(), slots=threading.BoundedSemaphore(max_connections))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(path))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
            finally:
                os.umask(old_umask)
            listener.listen(16)
            listener.settimeout(_POLL)
            acceptor = threading.Thread(target=self._accept_loop, args=(listener, serving),
                                        name="agent-accept", daemon=True)
            acceptor.start()
            if ready is not None:
                ready()
            self._work_loop(serving.jobs)
        finally:
            self._stop.set()
            listener.close()
            with contextlib.suppress(OSError):
                path.unlink()
            with serving.lock:
                for conn in serving.conns:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                threads = list(serving.threads)
            for thread in threads:
                thread.join(timeout=2.0)
            self._drain(serving.jobs)

    def _drain(self, jobs: queue.Queue[_Job]) -> None:
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            job.outcome = protocol.error_response(None, protocol.UNAVAILABLE, "the agent is shutting down")
            job.done.set()

    def _work_loop(self, jobs: queue.Queue[_Job]) -> None:
        while not self._stop.is_set():
            try:
                job = jobs.get(timeout=_POLL)
            except queue.Empty:
                continue
            try:
                outcome = self.admit(job.message)
                if isinstance(outcome, Call) and not outcome.blocking:
                    outcome = outcome.run()
            except Exception as exc:  # admit and run never raise; this is the last line of defence
                log.error("request loop: %s", type(exc).__name__)
                outcome = protocol.error_response(None, protocol.INTERNAL, "internal error")
            job.outcome = outcome
            job.done.set()

    def _accept_loop(self, listener: socket.socket, serving: _Serving) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not serving.slots.acquire(blocking=False):
                log.warning("refusing a connection: too many connections open")
                conn.close()
                continue
            conn.settimeout(None)
            thread = threading.Thread(target=self._connection, args=(conn, serving),
                                      name="agent-conn", daemon=True)
            with serving.lock:
                serving.conns.add(conn)
                serving.threads[:] = [t for t in serving.threads if t.is_alive()]
                serving.threads.append(thread)
            thread.start()

    def _submit(self, jobs: queue.Queue[_Job], message: dict[str, Any]) -> dict[str, Any]:
        job = _Job(message)
        jobs.put(job)
        while not job.done.wait(_POLL):
            if self._stop.is_set() and not job.done.is_set():
                return protocol.error_response(None, protocol.UNAVAILABLE, "the agent is shutting down")
        outcome = job.outcome
        if isinstance(outcome, Call):
            return outcome.run()
        assert outcome is not None
        return outcome

    def _connection(self, conn: socket.socket, serving: _Serving) -> None:
        try:
            while not self._stop.is_set():
                try:
                    payload = protocol.read_frame(conn)
                except FrameError as exc:  # oversized or truncated: answer if we can, then close
                    with contextlib.suppress(CofferError):
                        protocol.write_frame(conn, protocol.error_response(None, exc.kind, exc.detail))
                    _linger(conn)
                    return
                except TransportError:
                    return
                if payload is None:
                    return
                try:
                    message = protocol.decode_message(payload)
                except FrameError as exc:
                    response = protocol.error_response(None, exc.kind, exc.detail)
                else:
                    response = self._submit(serving.jobs, message)
                try:
                    protocol.write_frame(conn, response)
                except FrameError as exc:  # the result does not fit a frame or is not JSON
                    log.error("response not sendable: %s", exc.detail)
                    protocol.write_frame(conn, protocol.error_response(
                        response.get("id"), protocol.INTERNAL, "the response could not be encoded"))
        except TransportError:
            return
        except Exception as exc:  # a connection's failure must not reach the other connections
            log.error("connection handler: %s", type(exc).__name__)
        finally:
            with serving.lock:
                serving.conns.discard(conn)
            conn.close()
            serving.slots.release()


# --------------------------------------------------------------------------------------------------
# The command


def _plain_http_transport(url: str) -> Any:
    """For an ``http://`` KBS: an httpx transport without a TLS context. The default one loads the
    CA bundle (tens of milliseconds at every start) for TLS that plain http never uses; the client
    follows no redirects, so it never leaves that origin. None (the default transport, verifying)
    for any other scheme."""
    if not url.lower().startswith("http://"):
        return None
    import httpx  # noqa: PLC0415

    return httpx.HTTPTransport(verify=False)


class EarlyAttestation:
    """The KBS handshake run on a thread as soon as the launch checks passed and initdata is measured,
    so that the first layer key or secret does not wait for the TPM quote and the KBS round trips.

    It attests exactly what the first key request would have attested (the runtime register holds
    only the InitData event until a pulled image is measured). It is an optimisation only: a failure
    is logged, and the client attests again when a key or secret is needed, reporting the error
    there. Every user of the client calls :meth:`wait` first: the client is not shared between
    threads.
    """

    def __init__(self, client: KbsClient) -> None:
        self._client = client
        self._thread = threading.Thread(target=self._run, name="early-attestation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._client.attest()
        except Exception as exc:  # retried (and reported) by the first key or secret request
            log.info("attestation at start-up failed, retried when a key is needed: %s",
                     exc if isinstance(exc, CofferError) else type(exc).__name__)

    def wait(self) -> None:
        self._thread.join()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coffer-agent", description="Coffer's guest agent.")
    parser.add_argument("--socket", required=True, type=Path, help="unix socket to serve the host on")
    parser.add_argument("--initdata", required=True, type=Path, help="the initdata document as delivered")
    parser.add_argument("--storage", required=True, type=Path, help="private container storage")
    parser.add_argument("--tee", required=True, choices=TEES)
    parser.add_argument("--tcti", default=None, help="TPM TCTI (tee tpm), e.g. swtpm:path=...")
    parser.add_argument("--kbs", default=None, help="KBS URL for layer keys and secrets")
    parser.add_argument("--registry-insecure", action="store_true", help="plain HTTP / unverified TLS")
    parser.add_argument("--image-layouts", type=Path, default=None,
                        help="host-provided read-only OCI layouts tried before the registry")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _read_initdata(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_INITDATA_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read initdata {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_INITDATA_BYTES:
        raise FormatError("initdata", f"over {MAX_INITDATA_BYTES} bytes")
    return raw


def trusted_kbs(initdata: bytes, requested: str | None) -> str | None:
    """The KBS the workload's owner named in the measured initdata (``aa.toml``/``cdh.toml``).

    The host's ``--kbs`` may only repeat it: a host-chosen KBS could hand the workload secrets of the
    host's choosing, so a different one, or one when the initdata names none, refuses the start.
    """
    from coffer.policy.initdata import kbs_url, parse_initdata_document  # noqa: PLC0415

    named = kbs_url(parse_initdata_document(initdata))
    if requested and requested.rstrip("/") != (named or "").rstrip("/"):
        where = f"names {named}" if named else "names no KBS"
        raise UsageError(f"--kbs {requested} is not the workload's KBS (the measured initdata {where})")
    return named


def _build(args: argparse.Namespace) -> tuple[bytes, Agent, ContainerRuntime]:
    from coffer.attestation.binding import InitData as BindingInitData  # noqa: PLC0415
    from coffer.guest.attesters import attester_for  # noqa: PLC0415
    from coffer.guest.containers import RuncRuntime  # noqa: PLC0415
    from coffer.image.keys import AttestedKekLookup  # noqa: PLC0415
    from coffer.image.ocicrypt import DecryptionKeys  # noqa: PLC0415
    from coffer.image.transport import TransportOptions  # noqa: PLC0415
    from coffer.kbs.client import KbsClient, token_claims  # noqa: PLC0415

    raw = _read_initdata(args.initdata)
    verified = startup_checks(raw, args.tee, storage=args.storage, tcti=args.tcti)
    log.info("initdata %s %s matches the launch measurement", verified.digests.algorithm,
             verified.digests.digest.hex())
    engine = PolicyEngine(verified.policy)
    policy = workload_policy_from_rego(verified.policy)
    register = TpmRegister(args.tcti) if args.tee == "tpm" else SampleRegister()
    register.reset()
    measurer = Measurer(register)
    measurer.record("InitData", {"algorithm": verified.digests.algorithm,
                                 "digest": verified.digests.digest.hex()})
    client: KbsClient | None = None
    keys: DecryptionKeys | None = None
    early: EarlyAttestation | None = None
    kbs = trusted_kbs(raw, args.kbs)
    if kbs is not None:
        options = {"tcti": args.tcti} if args.tee == "tpm" else {}
        client = KbsClient(kbs, attester_for(args.tee, **options),
                           init_data=BindingInitData(format="toml", body=raw.decode("utf-8")),
                           transport=_plain_http_transport(kbs))
        pending = early = EarlyAttestation(client)
        lookup = AttestedKekLookup(client)

        def kek_for(kid: str) -> bytes | None:
            pending.wait()
            return lookup(kid)

        keys = DecryptionKeys(kek_for=kek_for)
    shared = client

    def kbs_factory() -> KbsClient:
        assert shared is not None
        if early is not None:
            early.wait()
        return shared

    def claims() -> dict[str, Any] | None:
        if shared is None or shared.token is None:
            return None
        return token_claims(shared.token)

    runtime = RuncRuntime(args.storage, policy, TransportOptions(insecure=args.registry_insecure),
                          args.image_layouts, keys, kbs_factory if client is not None else None, measurer)
    agent = Agent(raw, engine, runtime, measurer, args.tee, claims=claims)
    return raw, agent, runtime


def main(argv: Sequence[str] | None = None) -> int:
    """``coffer-agent``: check initdata, then serve until SIGTERM/SIGINT. Exit 1 when refusing."""
    args = _parser().parse_args(argv)
    # httpx imports its command-line client (click, rich, pygments) when present; the agent never
    # uses it, and those imports are a large share of the agent's start-up. A None entry makes that
    # optional import fail, which httpx handles.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _, agent, runtime = _build(args)
    except (CofferError, OSError) as exc:
        log.error("refusing to start: %s", exc)
        print(f"coffer-agent: refusing to start: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.serve(args.socket, ready=lambda: log.info("serving on %s", args.socket))
    except CofferError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        try:
            runtime.destroy()
        except CofferError as exc:
            log.warning("removing containers at exit: %s", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
