"""The guest's container runtime: pull, verify, decrypt and unpack images itself, run them with runc.

:class:`RuncRuntime` implements :class:`coffer.guest.runtime.ContainerRuntime` for the agent, after
the policy gate has allowed a request. For ``CreateContainerRequest`` it

1. finds the container's policy by name and refuses an image reference not pinned by digest;
2. opens the image: first the host-provided read-only OCI layouts (a layout holding an entry with
   the pinned digest), else the registry by digest. The source is pinned to that descriptor, so
   whatever the host changes afterwards, only the pinned manifest's content is read;
3. verifies the cosign signature when the container's policy asks for one (a ``sigstoreSigned``
   requirement built from the policy's keys, identity = the image reference);
4. unpacks it with the layer keys into ``<storage>/containers/<id>/rootfs`` (every blob digest-checked,
   encrypted layers authenticated before use; a refused image leaves nothing behind);
5. measures ``PullImage`` and ``CreateContainer``, delivers the policy's secrets
   (:mod:`coffer.guest.secrets`), writes the runc bundle (:mod:`coffer.guest.bundle`) and runs
   ``runc create`` with the process's stdio connected to pipes the guest drains into bounded
   buffers (1 MiB per stream, oldest bytes dropped first).

runc keeps its state under ``<storage>/runc`` (``--root``), so states are private to the sandbox.
The runtime makes its process a child subreaper, so container and exec processes, which runc
detaches, are reparented to it and their exit statuses can be collected. Any failure while creating
a container removes everything made for it; the container never starts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import hmac
import json
import logging
import os
import re
import secrets as _secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from coffer.errors import CofferError, UsageError, VerificationError
from coffer.guest import bundle
from coffer.guest.runtime import ContainerRuntime, NotFoundError
from coffer.guest.secrets import (
    SecretDelivery,
    SecretDeliveryError,
    SecretFetch,
    deliver_secrets,
    kbs_fetcher,
)
from coffer.image import ocicrypt, trust_policy
from coffer.image.layout import REF_NAME, OciLayout
from coffer.image.locations import open_source
from coffer.image.models import Descriptor
from coffer.image.pipeline import unpack_from_source
from coffer.image.reference import OciLayoutRef, RegistryRef, parse_registry_name
from coffer.image.signing import load_public_key
from coffer.image.transport import ImageSource, OciLayoutSource, TransportOptions
from coffer.kbs.client import KbsClient
from coffer.policy.model import ContainerPolicy, WorkloadPolicy

log = logging.getLogger(__name__)

RUNC: Final = "/usr/sbin/runc"
STREAM_CAPACITY: Final = 1024 * 1024
MAX_READ_BYTES: Final = 512 * 1024
DEFAULT_READ_BYTES: Final = 64 * 1024
MAX_WAIT_SECONDS: Final = 3600.0
RUNC_TIMEOUT: Final = 60.0
REMOVE_WAIT_SECONDS: Final = 5.0
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PR_SET_CHILD_SUBREAPER: Final = 36
TEE: Final = "image"

#: ``measurer(operation, content)``: record a runtime measurement (``PullImage``, ``CreateContainer``).
Measurer = Callable[[str, dict[str, Any]], None]


class ContainerRuntimeError(CofferError):
    """runc failed, or the runtime's own storage did (the message names the step, never a secret)."""


class StateError(UsageError):
    """The request does not fit the container's state (start twice, exec into a stopped one...)."""


# --------------------------------------------------------------------------------------------------
# Buffered output


class RingBuffer:
    """At most ``capacity`` bytes of a stream; when full, the oldest bytes are dropped."""

    def __init__(self, capacity: int = STREAM_CAPACITY) -> None:
        self._capacity = capacity
        self._data = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            self._data += chunk
            excess = len(self._data) - self._capacity
            if excess > 0:
                del self._data[:excess]
                self.dropped += excess

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def read(self, max_bytes: int) -> tuple[bytes, bool]:
        """Up to ``max_bytes`` (removed from the buffer), and whether the stream has ended and is empty."""
        with self._lock:
            data = bytes(self._data[:max_bytes])
            del self._data[:max_bytes]
            return data, self._closed and not self._data


def _drain(fd: int, buffer: RingBuffer) -> None:
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buffer.feed(chunk)
    finally:
        buffer.close()
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class _Process:
    """A container's main process or an exec'd one, as seen by the guest."""

    stdin: int | None
    stdout: RingBuffer
    stderr: RingBuffer
    readers: list[threading.Thread]
    pid: int | None = None
    status: int | None = None
    exited: bool = False
    # wait_process runs beside the other calls: one reaper at a time, or a status could be lost.
    _reap_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = None

    def poll(self) -> bool:
        """Collect the exit status if the process has ended (it is ours: we are its subreaper)."""
        with self._reap_lock:
            return self._poll_locked()

    def _poll_locked(self) -> bool:
        if self.exited or self.pid is None:
            return self.exited
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (no subreaper): all we can learn is whether it still exists.
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.exited, self.status = True, None
            except PermissionError:
                pass
            return self.exited
        if pid == 0:
            return False
        code = os.waitstatus_to_exitcode(wait_status)
        self.exited, self.status = True, (128 - code if code < 0 else code)
        return True


@dataclass
class _Container:
    container_id: str
    name: str
    image: str
    directory: Path
    main: _Process
    status: str = "created"  # created → running → stopped
    execs: dict[str, _Process] = field(default_factory=dict)

    def current_status(self) -> str:
        if self.main.poll():
            return "stopped"
        return self.status


# --------------------------------------------------------------------------------------------------
# Image sources


class _PinnedSource(ImageSource):
    """A source whose root is fixed to a checked descriptor (later changes at the host are ignored)."""

    def __init__(self, inner: ImageSource, root: Descriptor) -> None:
        self.name = inner.name
        self._inner = inner
        self._root = root

    def root(self) -> Descriptor:
        return self._root

    def resolve_tag(self, tag: str) -> Descriptor | None:
        return self._inner.resolve_tag(tag)

    def read_document(self, descriptor: Descriptor, limit: int) -> bytes:
        return self._inner.read_document(descriptor, limit)

    def iter_blob(self, descriptor: Descriptor) -> Iterator[bytes]:
        return self._inner.iter_blob(descriptor)

    def close(self) -> None:
        self._inner.close()


def pinned_reference(image: str) -> RegistryRef:
    """The policy/request image reference, which must carry a digest (a tag alone is refused)."""
    text = image.removeprefix("docker://")
    ref = parse_registry_name(text, default_tag=False)
    if ref.digest is None:
        raise UsageError(f"image {image[:200]!r} is not pinned by digest (NAME@sha256:...): a tag can move")
    return ref


def _check_policy_image(image: str, policy: ContainerPolicy) -> None:
    """Defence in depth behind the policy engine: the same repository and digest as the policy pins."""
    wanted, got = pinned_reference(policy.image), pinned_reference(image)
    assert wanted.digest is not None
    assert got.digest is not None
    if wanted.name != got.name or not hmac.compare_digest(wanted.digest.encode(), got.digest.encode()):
        raise UsageError(
            f"image {image[:200]!r} is not the image the policy pins for container {policy.name}")


def _layout_dirs(root: Path) -> list[Path]:
    if (root / "oci-layout").is_file():
        return [root]
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and (p / "oci-layout").is_file())
    except OSError:
        return []


def find_in_layouts(layouts: Path, ref: RegistryRef, image: str) -> tuple[Path, Descriptor] | None:
    """The first layout (and its index entry) holding the pinned digest.

    Entries named like the reference (``ref.name`` = the reference text or its tag) are preferred,
    but only the digest decides: an entry of another digest is a different image.
    """
    assert ref.digest is not None
    names = {image, image.removeprefix("docker://"), ref.familiar, *([ref.tag] if ref.tag else [])}
    for path in _layout_dirs(layouts):
        try:
            entries = OciLayout.open(path).read_index().manifests
        except CofferError as exc:
            log.warning("skipping image layout %s: %s", path, exc)
            continue
        matching = [e for e in entries if hmac.compare_digest(e.digest.encode(), ref.digest.encode())]
        matching.sort(key=lambda e: e.annotations.get(REF_NAME) not in names)
        if matching:
            return path, matching[0]
    return None


def _signature_policy(container: ContainerPolicy) -> trust_policy.Policy:
    assert container.signature is not None
    keys = tuple(load_public_key(pem.encode(), f"signature key {n + 1} of container {container.name}")
                 for n, pem in enumerate(container.signature.keys))
    requirement = trust_policy.SigstoreSigned(
        keys=keys,
        key_sources=tuple(f"policy key {n + 1}" for n in range(len(keys))),
        signed_identity=trust_policy.SignedIdentity(type="matchRepoDigestOrExact"),
    )
    return trust_policy.Policy(default=(requirement,))


# --------------------------------------------------------------------------------------------------
# Parameters


def _param_str(params: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = params.get(key)
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > 4096:
        raise UsageError(f"{key} must be a non-empty string")
    return value


def _param_id(params: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = params.get(key, "" if allow_empty else None)
    if allow_empty and value == "":
        return ""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise UsageError(f"{key} must be 1-64 letters, digits, '.', '_' or '-' (not starting with a symbol)")
    return value


def _hostname_for(name: str) -> str:
    text = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")[:63]
    return text or "coffer"


def _read_resolv_conf() -> bytes:
    try:
        with open("/etc/resolv.conf", "rb") as handle:
            return handle.read(64 * 1024)
    except OSError:
        return b""


def set_child_subreaper() -> bool:
    """Make this process the reaper of orphaned descendants (runc detaches container processes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# The runtime


class RuncRuntime(ContainerRuntime):
    """Containers of one sandbox, run by runc from images the guest pulled itself.

    ``storage`` is the guest's private storage (never visible to the host); ``image_layouts`` an
    optional host-provided read-only directory of OCI layouts tried before the registry;
    ``key_lookup`` the layer keys (JWE private keys and/or KBS KEKs); ``kbs_client`` makes the KBS
    client the secrets are fetched with (``secret_fetch`` replaces it, for tests); ``measurer``
    records the runtime measurements.
    """

    def __init__(  # noqa: PLR0917 - the agent's construction order, fixed by the brief
        self,
        storage: Path,
        policy: WorkloadPolicy,
        image_options: TransportOptions,
        image_layouts: Path | None,
        key_lookup: ocicrypt.DecryptionKeys | None,
        kbs_client: Callable[[], KbsClient] | None,
        measurer: Measurer,
        *,
        secret_fetch: SecretFetch | None = None,
        hostname: str | None = None,
        runc: str = RUNC,
        resolv_conf: bytes | None = None,
    ) -> None:
        self._storage = storage.resolve()
        self._policy = policy
        self._image_options = image_options
        self._image_layouts = image_layouts
        self._keys = key_lookup
        self._fetch: SecretFetch | None = secret_fetch
        if self._fetch is None and kbs_client is not None:
            self._fetch = kbs_fetcher(kbs_client)
        self._measure = measurer
        self._hostname = bundle.check_hostname(hostname or _hostname_for(policy.name))
        self._runc = runc
        self._resolv_conf = _read_resolv_conf() if resolv_conf is None else resolv_conf
        # cgroups are global to the machine: a random prefix keeps sandboxes' container ids apart.
        self._cgroup_prefix = "coffer-" + _secrets.token_hex(6)
        self._containers: dict[str, _Container] = {}
        self._lock = threading.RLock()
        self._runc_root = self._storage / "runc"
        self._containers_dir = self._storage / "containers"
        for path in (self._storage, self._runc_root, self._containers_dir, bundle.shared_dir(self._storage)):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.subreaper = set_child_subreaper()

    # -- helpers -----------------------------------------------------------------------------------

    def _runc_cmd(self, directory: Path, *args: str) -> list[str]:
        return [self._runc, "--root", str(self._runc_root), "--log", str(directory / "runc.log"),
                "--log-format", "json", *args]

    def _runc_error(self, directory: Path, what: str, output: bytes = b"") -> ContainerRuntimeError:
        message = ""
        with contextlib.suppress(OSError):
            for line in (directory / "runc.log").read_text(errors="replace").splitlines()[-20:]:
                with contextlib.suppress(ValueError, AttributeError):
                    entry = json.loads(line)
                    if entry.get("level") in ("error", "fatal"):
                        message = str(entry.get("msg", ""))
        if not message:
            message = output.decode(errors="replace").strip()[-500:]
        return ContainerRuntimeError(f"runc {what} failed: {message or 'no reason given'}")

    def _run(self, directory: Path, what: str, *args: str, check: bool = True) -> bool:
        try:
            done = subprocess.run(self._runc_cmd(directory, *args), stdin=subprocess.DEVNULL,  # noqa: S603
                                  capture_output=True, timeout=RUNC_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ContainerRuntimeError(f"runc {what} failed: {exc}") from exc
        if done.returncode != 0:
            if check:
                raise self._runc_error(directory, what, done.stderr)
            return False
        return True

    def _spawn(self, directory: Path, what: str, uid: int, gid: int, *args: str) -> _Process:
        """Run a detaching runc command with fresh stdio pipes; the readers start once it succeeds."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
        try:
            for fd in theirs:
                # A non-root process may reopen its stdio through /proc/self/fd (nginx's /dev/stdout).
                os.fchown(fd, uid, gid)
            try:
                done = subprocess.run(self._runc_cmd(directory, *args), stdin=in_r, stdout=out_w,  # noqa: S603
                                      stderr=err_w, timeout=RUNC_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ContainerRuntimeError(f"runc {what} failed: {exc}") from exc
            if done.returncode != 0:
                raise self._runc_error(directory, what)
        except BaseException:
            for fd in ours + theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        out, err = RingBuffer(), RingBuffer()
        readers = [threading.Thread(target=_drain, args=(fd, buf), daemon=True, name=f"runc-{what}-stream")
                   for fd, buf in ((out_r, out), (err_r, err))]
        for reader in readers:
            reader.start()
        os.set_blocking(in_w, False)
        return _Process(stdin=in_w, stdout=out, stderr=err, readers=readers)

    def _get(self, params: Mapping[str, Any]) -> _Container:
        container_id = _param_id(params, "container_id")
        container = self._containers.get(container_id)
        if container is None:
            raise NotFoundError(f"no container {container_id}")
        return container

    def _process(self, params: Mapping[str, Any]) -> tuple[_Container, _Process]:
        container = self._get(params)
        exec_id = _param_id(params, "exec_id", allow_empty=True)
        if exec_id == "":
            return container, container.main
        process = container.execs.get(exec_id)
        if process is None:
            raise NotFoundError(f"no process {exec_id} in container {container.container_id}")
        return container, process

    def _container_policy(self, name: str) -> ContainerPolicy:
        for container in self._policy.containers:
            if container.name == name:
                return container
        raise UsageError(f"no container named {name[:80]!r} in the policy")

    # -- image ------------------------------------------------------------------------------------

    def _open_image(self, ref: RegistryRef, image: str) -> ImageSource:
        """The pinned source: a host-provided layout holding the digest, else the registry."""
        assert ref.digest is not None
        if self._image_layouts is not None:
            found = find_in_layouts(self._image_layouts, ref, image)
            if found is not None:
                path, entry = found
                return _PinnedSource(OciLayoutSource(OciLayoutRef(path=path)), entry)
        source = open_source(ref, self._image_options)
        try:
            root = source.root()
            if not hmac.compare_digest(root.digest.encode(), ref.digest.encode()):
                raise VerificationError(
                    TEE, 2, "resolve the manifest digest",
                    f"{source.name} resolved to {root.digest}, not the pinned {ref.digest}")
        except BaseException:
            source.close()
            raise
        return _PinnedSource(source, root)

    def _pull(self, container: ContainerPolicy, image: str, rootfs: Path) -> str:
        ref = pinned_reference(image)
        with self._open_image(ref, image) as source:
            if container.signature is not None:
                trust_policy.verify_image(_signature_policy(container), ref, source, identity=ref.familiar)
            result = unpack_from_source(source, rootfs, keys=self._keys)
        return result.manifest.digest

    # -- the ContainerRuntime interface ------------------------------------------------------------

    def create_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        container_id = _param_id(params, "container_id")
        name = _param_str(params, "name")
        image = _param_str(params, "image")
        oci = params.get("OCI")
        if not isinstance(oci, Mapping):
            raise UsageError("OCI must be an object")
        with self._lock:
            directory = self._containers_dir / container_id
            if container_id in self._containers or directory.exists():
                raise StateError(f"container {container_id} already exists")
            policy = self._container_policy(name)
            _check_policy_image(image, policy)
            directory.mkdir(mode=0o700)
            try:
                container = self._create(container_id, name=name, image=image, oci=oci, policy=policy,
                                         directory=directory)
            except BaseException:
                self._discard(container_id, directory)
                raise
            self._containers[container_id] = container
        return {"container_id": container_id}

    def _create(self, container_id: str, *, name: str, image: str, oci: Mapping[str, Any],
                policy: ContainerPolicy, directory: Path) -> _Container:
        rootfs = directory / "rootfs"
        etc_dir = directory / "etc"
        common: dict[str, Any] = {"storage": self._storage, "etc_dir": etc_dir, "hostname": self._hostname,
                                  "cgroups_path": f"/{self._cgroup_prefix}-{container_id}"}
        # Check the request before the (costly) pull; the secrets are added afterwards.
        config = bundle.build_config(oci, rootfs, **common)
        user = config["process"]["user"]
        config_hash = bundle.config_sha256(oci)

        digest = self._pull(policy, image, rootfs)
        self._measure("PullImage", {"image": image, "digest": digest})

        delivery = SecretDelivery()
        if policy.secrets:
            if self._fetch is None:
                raise SecretDeliveryError(f"container {name} needs secrets but the guest has no KBS")
            delivery = deliver_secrets(policy.secrets, self._fetch, directory / "secrets",
                                       uid=user["uid"], gid=user["gid"])
        bundle.write_etc_files(etc_dir, self._hostname, self._resolv_conf)
        config = bundle.build_config(oci, rootfs, **common, extra_env=delivery.env,
                                     extra_mounts=delivery.mounts)
        bundle.write_bundle(directory, config)
        self._measure("CreateContainer", {"container_id": container_id, "name": name,
                                          "config_sha256": config_hash})
        pid_file = directory / "pid"
        main = self._spawn(directory, "create", user["uid"], user["gid"], "create", "--bundle",
                           str(directory), "--pid-file", str(pid_file), container_id)
        container = _Container(container_id=container_id, name=name, image=image, directory=directory,
                               main=main)
        try:
            main.pid = int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            self._teardown(container)
            raise ContainerRuntimeError(f"runc create left no pid for {container_id}") from exc
        log.info("created container %s (%s) from %s", container_id, name, image)
        return container

    def _discard(self, container_id: str, directory: Path) -> None:
        """Remove whatever a failed create made (runc state, bundle, rootfs, secrets)."""
        if (self._runc_root / container_id).exists():
            self._run(directory, "delete", "delete", "--force", container_id, check=False)
        shutil.rmtree(directory, ignore_errors=True)

    def start_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            container = self._get(params)
            if container.status != "created" or container.main.poll():
                raise StateError(f"container {container.container_id} is {container.current_status()}, "
                                 "not created")
            self._run(container.directory, "start", "start", container.container_id)
            container.status = "running"
            return {"pid": container.main.pid}

    def exec_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            container = self._get(params)
            exec_id = _param_id(params, "exec_id")
            if exec_id in container.execs:
                raise StateError(f"process {exec_id} already exists in container {container.container_id}")
            if container.current_status() != "running":
                raise StateError(f"container {container.container_id} is {container.current_status()}, "
                                 "not running")
            process_obj = params.get("process")
            if not isinstance(process_obj, Mapping):
                raise UsageError("process must be an object")
            spec = bundle.process_json(process_obj)
            spec_path = container.directory / f"exec-{exec_id}.json"
            pid_file = container.directory / f"exec-{exec_id}.pid"
            bundle.write_json(spec_path, spec)
            try:
                process = self._spawn(container.directory, "exec", spec["user"]["uid"], spec["user"]["gid"],
                                      "exec", "--detach", "--process", str(spec_path), "--pid-file",
                                      str(pid_file), container.container_id)
                process.pid = int(pid_file.read_text().strip())
            except (OSError, ValueError) as exc:
                raise ContainerRuntimeError(f"runc exec left no pid for {exec_id}") from exc
            finally:
                spec_path.unlink(missing_ok=True)
            container.execs[exec_id] = process
            return {"exec_id": exec_id}

    def read_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _, process = self._process(params)
        stream = params.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise UsageError("stream must be stdout or stderr")
        max_bytes = params.get("max_bytes", DEFAULT_READ_BYTES)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise UsageError("max_bytes must be a non-negative integer")
        buffer = process.stdout if stream == "stdout" else process.stderr
        data, eof = buffer.read(min(max_bytes, MAX_READ_BYTES))
        return {"data": base64.b64encode(data).decode("ascii"), "eof": eof}

    def write_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _, process = self._process(params)
        encoded = params.get("data")
        if not isinstance(encoded, str):
            raise UsageError("data must be base64 text")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UsageError("data is not valid base64") from exc
        if process.stdin is None:
            raise StateError("the process's stdin is closed")
        written = 0
        deadline = time.monotonic() + 1.0
        view = memoryview(data)
        while view and time.monotonic() < deadline:
            try:
                n = os.write(process.stdin, view)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            except BrokenPipeError:
                process.close_stdin()
                raise StateError("the process no longer reads its stdin") from None
            written += n
            view = view[n:]
        return {"len": written}

    def close_stdin(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _, process = self._process(params)
        process.close_stdin()
        return {}

    def wait_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _, process = self._process(params)
        timeout = params.get("timeout_s", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise UsageError("timeout_s must be a non-negative number")
        deadline = time.monotonic() + min(float(timeout), MAX_WAIT_SECONDS)
        delay = 0.005
        while not process.poll():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"exited": False, "status": None}
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        return {"exited": True, "status": process.status}

    def signal_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        container, process = self._process(params)
        number = params.get("signal")
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 64:
            raise UsageError("signal must be a signal number between 1 and 64")
        if process.poll() or process.pid is None:
            return {}
        if process is container.main:
            if not self._run(container.directory, "kill", "kill", container.container_id, str(number),
                             check=False) and not process.poll():
                raise self._runc_error(container.directory, "kill")
        else:
            # The process is ours until reaped, so its pid cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, number)
        return {}

    def remove_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            container = self._get(params)
            self._teardown(container)
            del self._containers[container.container_id]
        return {}

    def _teardown(self, container: _Container) -> None:
        directory = container.directory
        if not container.main.poll():
            self._run(directory, "kill", "kill", container.container_id, "KILL", check=False)
        self._run(directory, "delete", "delete", "--force", container.container_id, check=False)
        processes = [container.main, *container.execs.values()]
        deadline = time.monotonic() + REMOVE_WAIT_SECONDS
        for process in processes:
            while not process.poll() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not process.exited and process.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGKILL)
            process.close_stdin()
            for reader in process.readers:
                reader.join(timeout=1.0)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise ContainerRuntimeError(f"could not remove the files of container {container.container_id}")

    def list_containers(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            return {"containers": [
                {"container_id": c.container_id, "name": c.name, "image": c.image,
                 "status": c.current_status(), "pid": c.main.pid}
                for c in self._containers.values()
            ]}

    def destroy(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            for container_id in list(self._containers):
                container = self._containers.pop(container_id)
                try:
                    self._teardown(container)
                except CofferError as exc:
                    log.warning("removing container %s: %s", container_id, exc)
        return {}
