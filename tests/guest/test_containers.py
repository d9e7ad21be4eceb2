"""The guest container runtime with real runc: pull from a host layout, verify, decrypt, run, remove.

The runc tests need root and /usr/sbin/runc (and /bin/busybox for the image); they are skipped
otherwise. Secret delivery and the output buffers are also tested without runc.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, ProtocolError, UsageError, VerificationError
from coffer.guest import bundle
from coffer.guest.containers import RingBuffer, RuncRuntime, find_in_layouts, pinned_reference
from coffer.guest.runtime import NotFoundError
from coffer.guest.secrets import SecretDelivery, deliver_secrets
from coffer.image import ocicrypt
from coffer.image.signing import SigningKey
from coffer.image.transport import TransportOptions
from coffer.policy.model import ContainerPolicy, Secret, SignatureRequirement, WorkloadPolicy
from tests.guest import support_images as images
from tests.guest.test_bundle import oci_params

RUNC = Path("/usr/sbin/runc")

needs_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not RUNC.exists() or not images.busybox_available(),
    reason="needs root, /usr/sbin/runc and /bin/busybox (busybox-static)",
)


# --------------------------------------------------------------------------------------------------
# Helpers


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, operation: str, content: dict[str, Any]) -> None:
        self.events.append((operation, content))

    def operations(self) -> list[str]:
        return [op for op, _ in self.events]


def make_policy(image: str, *, secrets: tuple[Secret, ...] = (), signature_keys: tuple[str, ...] = ()
                ) -> WorkloadPolicy:
    container = ContainerPolicy(
        name="app", image=image, args=("/bin/sh",), secrets=secrets,
        signature=SignatureRequirement(keys=signature_keys) if signature_keys else None,
    )
    return WorkloadPolicy(name="web", containers=(container,))


def make_runtime(tmp_path: Path, image: str, layouts: Path, *, keys: ocicrypt.DecryptionKeys | None = None,
                 secrets: tuple[Secret, ...] = (), signature_keys: tuple[str, ...] = (),
                 fetch: Any = None, recorder: Recorder | None = None) -> RuncRuntime:
    return RuncRuntime(
        tmp_path / "storage", make_policy(image, secrets=secrets, signature_keys=signature_keys),
        TransportOptions(insecure=True, timeout=2), layouts, keys, None, recorder or Recorder(),
        secret_fetch=fetch, resolv_conf=b"",
    )


def create_params(container_id: str, image: str, args: list[str], **kw: Any) -> dict[str, Any]:
    return {"container_id": container_id, "name": "app", "image": image, "OCI": oci_params(args=args, **kw)}


def read_until(runtime: RuncRuntime, container_id: str, exec_id: str, expected: bytes,
               *, stream: str = "stdout", timeout: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = runtime.read_stream({"container_id": container_id, "exec_id": exec_id, "stream": stream,
                                      "max_bytes": 65536})
        data += base64.b64decode(answer["data"])
        if expected in data or answer["eof"]:
            break
        time.sleep(0.01)
    return data


def run_to_end(runtime: RuncRuntime, container_id: str) -> tuple[int | None, bytes]:
    runtime.start_container({"container_id": container_id})
    waited = runtime.wait_process({"container_id": container_id, "exec_id": "", "timeout_s": 10})
    assert waited["exited"]
    output = read_until(runtime, container_id, "", b"\x00never")
    return waited["status"], output


def assert_nothing_left(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    assert list((storage / "containers").iterdir()) == []
    assert list((storage / "runc").iterdir()) == []
    with open("/proc/self/mountinfo") as handle:
        assert str(storage) not in handle.read()


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory: pytest.TempPathFactory) -> images.BuiltImage:
    if not images.busybox_available():
        pytest.skip("busybox-static is not installed")
    return images.busybox_layout(tmp_path_factory.mktemp("layouts") / "busybox")


@pytest.fixture
def runtime_cleanup() -> Iterator[list[RuncRuntime]]:
    made: list[RuncRuntime] = []
    yield made
    for runtime in made:
        runtime.destroy()


# --------------------------------------------------------------------------------------------------
# Lifecycle with real runc


@needs_runc
def test_create_start_read_exec_signal_remove(tmp_path: Path, plain_image: images.BuiltImage,
                                              runtime_cleanup: list[RuncRuntime]) -> None:
    recorder = Recorder()
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent, recorder=recorder)
    runtime_cleanup.append(runtime)
    params = create_params("c1", plain_image.reference, ["/bin/sh", "-c", "echo hello; sleep 30"])
    assert runtime.create_container(params) == {"container_id": "c1"}
    listed = runtime.list_containers({})["containers"]
    assert [(c["container_id"], c["name"], c["status"]) for c in listed] == [("c1", "app", "created")]

    pid = runtime.start_container({"container_id": "c1"})["pid"]
    assert isinstance(pid, int)
    assert b"hello\n" in read_until(runtime, "c1", "", b"hello\n")
    assert runtime.list_containers({})["containers"][0]["status"] == "running"

    exec_params = {"container_id": "c1", "exec_id": "e1",
                   "process": {"Args": ["cat", "/etc/hostname"], "Env": ["PATH=/bin"], "Cwd": "/",
                               "User": {"UID": 0, "GID": 0, "AdditionalGids": []}, "Terminal": False,
                               "Capabilities": None}}
    assert runtime.exec_process(exec_params) == {"exec_id": "e1"}
    assert runtime.wait_process({"container_id": "c1", "exec_id": "e1", "timeout_s": 10}) == \
        {"exited": True, "status": 0}
    assert read_until(runtime, "c1", "e1", b"web\n") == b"web\n"

    assert runtime.wait_process({"container_id": "c1", "exec_id": "", "timeout_s": 0}) == \
        {"exited": False, "status": None}
    runtime.signal_process({"container_id": "c1", "exec_id": "", "signal": 9})
    assert runtime.wait_process({"container_id": "c1", "exec_id": "", "timeout_s": 10}) == \
        {"exited": True, "status": 137}
    assert runtime.list_containers({})["containers"][0]["status"] == "stopped"

    # The image was measured by its digest, the container by the hash of its OCI parameters.
    assert recorder.events == [
        ("PullImage", {"image": plain_image.reference, "digest": plain_image.digest}),
        ("CreateContainer", {"container_id": "c1", "name": "app",
                             "config_sha256": bundle.config_sha256(params["OCI"])}),
    ]
    assert runtime.remove_container({"container_id": "c1"}) == {}
    assert runtime.list_containers({}) == {"containers": []}
    assert_nothing_left(tmp_path)
    with pytest.raises(NotFoundError):
        runtime.start_container({"container_id": "c1"})


@needs_runc
def test_stdin_reaches_the_process(tmp_path: Path, plain_image: images.BuiltImage,
                                   runtime_cleanup: list[RuncRuntime]) -> None:
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent)
    runtime_cleanup.append(runtime)
    runtime.create_container(create_params("cat", plain_image.reference, ["/bin/cat"]))
    runtime.start_container({"container_id": "cat"})
    written = runtime.write_stream({"container_id": "cat", "exec_id": "",
                                    "data": base64.b64encode(b"ping\n").decode()})
    assert written == {"len": 5}
    runtime.close_stdin({"container_id": "cat", "exec_id": ""})
    assert runtime.wait_process({"container_id": "cat", "exec_id": "", "timeout_s": 10}) == \
        {"exited": True, "status": 0}
    assert read_until(runtime, "cat", "", b"ping\n") == b"ping\n"
    runtime.remove_container({"container_id": "cat"})
    assert_nothing_left(tmp_path)


@needs_runc
def test_non_root_user_and_exit_status(tmp_path: Path, plain_image: images.BuiltImage,
                                       runtime_cleanup: list[RuncRuntime]) -> None:
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent)
    runtime_cleanup.append(runtime)
    runtime.create_container(create_params("u", plain_image.reference,
                                           ["/bin/sh", "-c", "id -u; echo oops >&2; exit 3"],
                                           uid=65534, gid=65534))
    status, output = run_to_end(runtime, "u")
    assert status == 3
    assert output == b"65534\n"
    assert read_until(runtime, "u", "", b"oops\n", stream="stderr") == b"oops\n"


@needs_runc
def test_exec_into_a_created_container_is_refused(tmp_path: Path, plain_image: images.BuiltImage,
                                                 runtime_cleanup: list[RuncRuntime]) -> None:
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent)
    runtime_cleanup.append(runtime)
    runtime.create_container(create_params("c", plain_image.reference, ["/bin/true"]))
    with pytest.raises(UsageError, match="not running"):
        runtime.exec_process({"container_id": "c", "exec_id": "e",
                              "process": {"Args": ["true"], "User": {"UID": 0, "GID": 0}}})
    with pytest.raises(UsageError, match="already exists"):
        runtime.create_container(create_params("c", plain_image.reference, ["/bin/true"]))
    runtime.destroy()
    assert_nothing_left(tmp_path)


# --------------------------------------------------------------------------------------------------
# Protected images


@needs_runc
def test_encrypted_image_decrypts_and_runs(tmp_path: Path, plain_image: images.BuiltImage,
                                           runtime_cleanup: list[RuncRuntime]) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = images.encrypt_layout(plain_image, tmp_path / "layouts" / "enc", key.public_key())
    assert encrypted.digest != plain_image.digest
    runtime = make_runtime(tmp_path, encrypted.reference, tmp_path / "layouts",
                           keys=ocicrypt.DecryptionKeys(private_keys=(key,)))
    runtime_cleanup.append(runtime)
    runtime.create_container(create_params("enc", encrypted.reference, ["/bin/cat", "/app/hello.txt"]))
    status, output = run_to_end(runtime, "enc")
    assert (status, output) == (0, b"hello from the image\n")


@needs_runc
def test_encrypted_image_without_the_key_is_refused(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = images.encrypt_layout(plain_image, tmp_path / "layouts" / "enc", key.public_key())
    recorder = Recorder()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runtime = make_runtime(tmp_path, encrypted.reference, tmp_path / "layouts",
                           keys=ocicrypt.DecryptionKeys(private_keys=(other,)), recorder=recorder)
    with pytest.raises(CofferError):
        runtime.create_container(create_params("enc", encrypted.reference, ["/bin/true"]))
    assert recorder.events == []
    assert runtime.list_containers({}) == {"containers": []}
    assert_nothing_left(tmp_path)


@needs_runc
def test_tampered_layer_is_refused_and_leaves_nothing(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    tampered = images.copy_layout(plain_image, tmp_path / "layouts" / "tampered")
    images.tamper_last_layer(tampered)
    recorder = Recorder()
    runtime = make_runtime(tmp_path, tampered.reference, tmp_path / "layouts", recorder=recorder)
    with pytest.raises(FormatError, match=r"digest|size"):
        runtime.create_container(create_params("t", tampered.reference, ["/bin/true"]))
    assert recorder.events == []  # neither pulled nor created
    with pytest.raises(NotFoundError):
        runtime.start_container({"container_id": "t"})
    assert_nothing_left(tmp_path)


@needs_runc
def test_unsigned_image_is_refused_when_the_policy_requires_a_signature(
        tmp_path: Path, plain_image: images.BuiltImage) -> None:
    key = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent,
                           signature_keys=(key.public_key.to_pem().decode(),))
    with pytest.raises(VerificationError, match="no cosign signature") as info:
        runtime.create_container(create_params("s", plain_image.reference, ["/bin/true"]))
    assert info.value.step == 3
    assert_nothing_left(tmp_path)


@needs_runc
def test_signature_by_another_key_is_refused(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    signed = images.copy_layout(plain_image, tmp_path / "layouts" / "signed")
    images.sign_layout(signed, SigningKey(ec.generate_private_key(ec.SECP256R1())))
    wanted = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    runtime = make_runtime(tmp_path, signed.reference, tmp_path / "layouts",
                           signature_keys=(wanted.public_key.to_pem().decode(),))
    with pytest.raises(VerificationError) as info:
        runtime.create_container(create_params("s", signed.reference, ["/bin/true"]))
    assert info.value.step == 4
    assert_nothing_left(tmp_path)


@needs_runc
def test_signed_image_runs(tmp_path: Path, plain_image: images.BuiltImage,
                           runtime_cleanup: list[RuncRuntime]) -> None:
    signed = images.copy_layout(plain_image, tmp_path / "layouts" / "signed")
    key = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    images.sign_layout(signed, key)
    runtime = make_runtime(tmp_path, signed.untagged, tmp_path / "layouts",
                           signature_keys=(key.public_key.to_pem().decode(),))
    runtime_cleanup.append(runtime)
    runtime.create_container(create_params("s", signed.untagged, ["/bin/echo", "signed"]))
    assert run_to_end(runtime, "s") == (0, b"signed\n")


# --------------------------------------------------------------------------------------------------
# Secrets


@needs_runc
def test_secrets_are_delivered_as_file_and_env(tmp_path: Path, plain_image: images.BuiltImage,
                                               runtime_cleanup: list[RuncRuntime]) -> None:
    values = {"kbs:///default/secret/db": b"hunter2", "kbs:///default/secret/tls": b"-----PEM-----\n"}
    fetched: list[str] = []

    def fetch(resource: str) -> bytes:
        fetched.append(resource)
        return values[resource]

    secrets = (Secret(resource="kbs:///default/secret/db", env="DB_PASSWORD"),
               Secret(resource="kbs:///default/secret/tls", file="/run/secrets/tls.pem"))
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent, secrets=secrets,
                           fetch=fetch)
    runtime_cleanup.append(runtime)
    script = ('echo "$DB_PASSWORD"; cat /run/secrets/tls.pem; stat -c "%a %u" /run/secrets/tls.pem; '
              'echo x > /run/secrets/tls.pem || echo readonly')
    runtime.create_container(create_params("sec", plain_image.reference, ["/bin/sh", "-c", script],
                                           uid=65534, gid=65534))
    status, output = run_to_end(runtime, "sec")
    assert status == 0
    assert output.decode().split("\n")[:4] == ["hunter2", "-----PEM-----", "400 65534", "readonly"]
    assert fetched == ["kbs:///default/secret/db", "kbs:///default/secret/tls"]
    runtime.remove_container({"container_id": "sec"})
    assert_nothing_left(tmp_path)


@needs_runc
def test_refused_secret_release_leaves_nothing(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    def fetch(resource: str) -> bytes:
        raise ProtocolError("PolicyDeny", f"release of {resource} denied")

    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent,
                           secrets=(Secret(resource="kbs:///default/secret/db", env="DB"),), fetch=fetch)
    with pytest.raises(ProtocolError, match="PolicyDeny"):
        runtime.create_container(create_params("sec", plain_image.reference, ["/bin/true"]))
    assert_nothing_left(tmp_path)


def test_secret_files_are_0400_and_owned_by_the_container_user(tmp_path: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    delivery = deliver_secrets(
        (Secret(resource="kbs:///r/t/a", file="/run/a"), Secret(resource="kbs:///r/t/b", env="B")),
        {"kbs:///r/t/a": b"file-secret", "kbs:///r/t/b": b"env-secret"}.__getitem__,
        tmp_path / "secrets", uid=uid, gid=gid)
    assert delivery.env == ("B=env-secret",)
    [mount] = delivery.mounts
    assert mount.destination == "/run/a"
    info = mount.source.stat()
    assert stat.S_IMODE(info.st_mode) == 0o400
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert mount.source.read_bytes() == b"file-secret"
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert "env-secret" not in repr(delivery)


def test_non_utf8_env_secret_error_does_not_show_the_value(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as info:
        deliver_secrets((Secret(resource="kbs:///r/t/a", env="A"),), lambda _: b"\xffsecretvalue",
                        tmp_path / "s", uid=0, gid=0)
    assert "secretvalue" not in str(info.value)
    assert "kbs:///r/t/a" in str(info.value)


def test_secret_with_both_env_and_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exactly one"):
        deliver_secrets((Secret(resource="kbs:///r/t/a", env="A", file="/a"),), lambda _: b"x",
                        tmp_path / "s", uid=0, gid=0)


def test_no_secrets_means_no_directory(tmp_path: Path) -> None:
    assert deliver_secrets((), lambda _: b"", tmp_path / "s", uid=0, gid=0) == SecretDelivery()
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# References, layouts and buffers (no runc)


def test_tag_only_reference_is_refused() -> None:
    with pytest.raises(UsageError, match="not pinned by digest"):
        pinned_reference("registry.example/app:1.0")


def test_image_other_than_the_policys_is_refused(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, "registry.example/app@sha256:" + "a" * 64, tmp_path)
    for image in ("registry.example/app@sha256:" + "b" * 64, "registry.example/other@sha256:" + "a" * 64):
        with pytest.raises(UsageError, match="not the image the policy pins"):
            runtime.create_container(create_params("c", image, ["/bin/true"]))


def test_tag_only_image_in_create_is_refused(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, "registry.example/app:1.0", tmp_path)
    with pytest.raises(UsageError, match="not pinned by digest"):
        runtime.create_container(create_params("c", "registry.example/app:1.0", ["/bin/true"]))
    assert list((tmp_path / "storage" / "containers").iterdir()) == []


def test_container_missing_from_the_policy_is_refused(tmp_path: Path) -> None:
    image = "registry.example/app@sha256:" + "a" * 64
    runtime = make_runtime(tmp_path, image, tmp_path)
    params = create_params("c", image, ["/bin/true"])
    params["name"] = "other"
    with pytest.raises(UsageError, match="no container named"):
        runtime.create_container(params)


def test_bad_container_id_is_refused(tmp_path: Path) -> None:
    image = "registry.example/app@sha256:" + "a" * 64
    runtime = make_runtime(tmp_path, image, tmp_path)
    with pytest.raises(UsageError, match="container_id"):
        runtime.create_container(create_params("../escape", image, ["/bin/true"]))


def test_layout_with_another_digest_is_not_used(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    other = "sha256:" + "b" * 64
    ref = pinned_reference(f"{images.IMAGE_NAME}:{images.TAG}@{other}")
    assert find_in_layouts(plain_image.layout.parent, ref, ref.familiar) is None
    found = find_in_layouts(plain_image.layout.parent, pinned_reference(plain_image.reference),
                            plain_image.reference)
    assert found is not None
    assert found[1].digest == plain_image.digest


def test_ring_buffer_keeps_the_newest_bytes() -> None:
    ring = RingBuffer(capacity=8)
    ring.feed(b"0123456789")
    ring.feed(b"ab")
    assert ring.dropped == 4
    assert ring.read(3) == (b"456", False)
    ring.close()
    assert ring.read(100) == (b"789ab", True)
    assert ring.read(100) == (b"", True)


def test_unknown_container_is_not_found(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, "registry.example/app@sha256:" + "a" * 64, tmp_path)
    for call in (runtime.start_container, runtime.remove_container):
        with pytest.raises(NotFoundError):
            call({"container_id": "nope"})
    with pytest.raises(NotFoundError):
        runtime.read_stream({"container_id": "nope", "exec_id": "", "stream": "stdout"})


def test_storage_dirs_are_private(tmp_path: Path) -> None:
    make_runtime(tmp_path, "registry.example/app@sha256:" + "a" * 64, tmp_path)
    for name in ("runc", "containers"):
        assert stat.S_IMODE((tmp_path / "storage" / name).stat().st_mode) == 0o700
    shutil.rmtree(tmp_path / "storage")


# --------------------------------------------------------------------------------------------------
# Registry pull (no host layout)


@needs_runc
def test_pull_from_a_registry_by_digest(tmp_path: Path, plain_image: images.BuiltImage,
                                        runtime_cleanup: list[RuncRuntime]) -> None:
    from coffer.image.locations import open_destination
    from coffer.image.pipeline import copy_image
    from coffer.image.reference import OciLayoutRef
    from coffer.image.transport import OciLayoutSource
    from tests.support.registry import running_registry

    with running_registry(tmp_path / "registry") as server:
        options = TransportOptions(insecure=True, timeout=5)
        with OciLayoutSource(OciLayoutRef(path=plain_image.layout, tag=images.TAG)) as source, \
                open_destination(f"docker://{server.host}/coffer/busybox:1.0", options) as destination:
            copy_image(source, destination)
            destination.commit()
        image = f"{server.host}/coffer/busybox@{plain_image.digest}"
        runtime = RuncRuntime(tmp_path / "storage", make_policy(image), options, None, None, None, Recorder(),
                              resolv_conf=b"")
        runtime_cleanup.append(runtime)
        runtime.create_container(create_params("r", image, ["/bin/cat", "/app/hello.txt"]))
        assert run_to_end(runtime, "r") == (0, b"hello from the image\n")

        missing = f"{server.host}/coffer/busybox@sha256:{'c' * 64}"
        with pytest.raises(UsageError, match="not the image the policy pins"):
            runtime.create_container(create_params("m", missing, ["/bin/true"]))
        other = RuncRuntime(tmp_path / "other", make_policy(missing), options, None, None, None, Recorder(),
                            resolv_conf=b"")
        with pytest.raises(CofferError):
            other.create_container(create_params("m", missing, ["/bin/true"]))
        assert list((tmp_path / "other" / "containers").iterdir()) == []


@needs_runc
def test_runc_failure_is_reported_and_leaves_nothing(tmp_path: Path, plain_image: images.BuiltImage) -> None:
    from coffer.guest.containers import ContainerRuntimeError

    recorder = Recorder()
    runtime = make_runtime(tmp_path, plain_image.reference, plain_image.layout.parent, recorder=recorder)
    with pytest.raises(ContainerRuntimeError, match=r"runc create failed: .*no-such-program"):
        runtime.create_container(create_params("bad", plain_image.reference, ["/bin/no-such-program"]))
    assert runtime.list_containers({}) == {"containers": []}
    assert_nothing_left(tmp_path)


_junk = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | \
    st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["create_container", "start_container", "exec_process", "read_stream",
                               "write_stream", "close_stdin", "wait_process", "signal_process",
                               "remove_container"]),
       params=st.dictionaries(st.sampled_from(["container_id", "exec_id", "name", "image", "OCI", "stream",
                                               "max_bytes", "data", "timeout_s", "signal", "process"]),
                              _junk, max_size=6))
def test_malformed_params_raise_only_typed_errors(tmp_path: Path, method: str,
                                                  params: dict[str, Any]) -> None:
    runtime = make_runtime(tmp_path, "registry.example/app@sha256:" + "a" * 64, tmp_path / "none")
    with contextlib.suppress(CofferError):
        getattr(runtime, method)(params)
    assert list((tmp_path / "storage" / "containers").iterdir()) == []
