"""The confidential run end to end, with everything real: a KBS process, per-sandbox swtpm TPMs whose
template AK was enrolled by credential activation, images built from Debian packages, encrypted with
KBS-held keys and cosign-signed, ``coffer run`` sandboxes whose agent attests, pulls, verifies,
decrypts and starts the unmodified applications under runc.

One KBS, TPM template and set of protected images serve the whole module (per xdist worker). Each
negative test checks the same three things: ``coffer run`` fails, the sandbox is gone (the container
never started), and the error says why.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from coffer._internal.net import free_port
from coffer.errors import CofferError, UnsupportedError
from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import sha256_digest
from coffer.policy.document import dump_policy
from coffer.policy.model import WorkloadPolicy
from coffer.quickstart import images
from coffer.quickstart.demo import (
    check_app,
    image_reference,
    key_uri,
    policy_initdata,
    preflight,
    protect_command,
    run_coffer,
    run_policy,
    sandbox_names,
    swapped_initdata,
    tamper_layer,
    write_signing_key,
)
from coffer.quickstart.trust import DevTrust, setup_dev_trust
from coffer.sandbox.process import mounts_under

APPS = ("nginx", "redis", "memcached", "python")
DENY_ALL = """package policy

import rego.v1

default allow := false
"""


def _preflight_reason() -> str | None:
    try:
        preflight()
    except UnsupportedError as exc:
        return str(exc)
    return None


_SKIP = _preflight_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@dataclass
class World:
    work: Path
    trust: DevTrust
    env: dict[str, str]
    built: dict[str, images.BuildResult]
    protected: Path
    sign_key: Path
    public_key: bytes
    password_file: Path
    policies: dict[str, WorkloadPolicy]

    def policy_file(self, app: str, policy: WorkloadPolicy | None = None, *, name: str | None = None) -> Path:
        path = self.work / "policies" / f"{name or app}-{secrets.token_hex(3)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dump_policy(policy or self.policies[app]))
        return path

    def pinned(self, app: str) -> str:
        return self.policies[app].containers[0].image

    def protect(self, source: Path, tag: str, destination: Path, reference: str, *, key: str,
                sign: bool = True) -> str:
        args = protect_command(source, tag, destination, reference, key=key, kbs=self.trust.kbs.url,
                               token_file=self.trust.kbs.token_file,
                               sign_key=self.sign_key if sign else None,
                               password_file=self.password_file if sign else None)
        out = json.loads(run_coffer(args, env=self.env).stdout)
        digest: str = (out["reference_values"]["manifest_digest"] if sign else out["digest"])
        return digest

    def run(self, name: str, app: str, *, layouts: Path | None = None, policy: Path | None = None,
            image: str | None = None, command: list[str] | None = None, ports: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        args = ["run", "-d", "--name", name, "--kbs", self.trust.kbs.url,
                "--image-layouts", str(layouts or self.protected),
                "--policy", str(policy or self.policy_file(app)), image or self.pinned(app)]
        for port in ports or []:
            args[2:2] = ["-p", port]
        args += command or []
        return run_coffer(args, env=env or self.env, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("confidential-run")
    state = Path(tempfile.mkdtemp(prefix="cof-"))  # short: unix socket paths
    built: dict[str, images.BuildResult] = {}
    for app in APPS:
        try:
            built[app] = images.build_image_detailed(app, work / "images")
        except CofferError as exc:
            shutil.rmtree(state, ignore_errors=True)
            pytest.skip(f"cannot build the sample image {app}: {exc}")
    trust = setup_dev_trust(work, state)
    env = trust.env()
    try:
        sign_key, public_key, password_file = write_signing_key(work / "keys")
        protected = work / "protected"
        world = World(work=work, trust=trust, env=env, built=built, protected=protected, sign_key=sign_key,
                      public_key=public_key.read_bytes(), password_file=password_file, policies={})
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda app: world.protect(built[app].layout, built[app].tag, protected / app,
                                                    image_reference(app), key=key_uri(app)), APPS))
        for app in APPS:
            world.policies[app] = run_policy(app, image_reference(app), protected / app,
                                             public_key=world.public_key)
        yield world
    finally:
        try:
            names = sandbox_names(env)
            if names:
                run_coffer(["rm", "-f", *names], env=env, timeout=120)
            assert sandbox_names(env) == []
            assert mounts_under(state) == []
        finally:
            trust.stop()
            shutil.rmtree(state, ignore_errors=True)


def _assert_refused(world: World, done: subprocess.CompletedProcess[str], name: str, *why: str) -> str:
    """``coffer run`` failed, left no sandbox, and its error contains every word of ``why``."""
    message = done.stderr + done.stdout
    assert done.returncode != 0, message
    assert name not in sandbox_names(world.env), f"sandbox {name} was left behind"
    for word in why:
        assert word in message, f"{word!r} not in: {message[-2000:]}"
    return message


def _remove(world: World, *names: str) -> None:
    run_coffer(["rm", "-f", *names], env=world.env, timeout=120)


# --------------------------------------------------------------------------------------------------
# The four apps


def test_four_protected_apps_answer_real_clients_and_exec_is_blocked(world: World) -> None:
    ports = {app: free_port() for app in APPS}
    names = [f"ok-{app}" for app in APPS]
    try:
        for app, name in zip(APPS, names, strict=True):
            done = world.run(name, app, ports=[f"{ports[app]}:{images.APPS[app].port}"])
            assert done.returncode == 0, done.stderr
        assert check_app("nginx", ports["nginx"]).startswith("GET / HTTP/1.1 200")
        assert "+PONG" in check_app("redis", ports["redis"])
        assert "STORED" in check_app("memcached", ports["memcached"])
        assert '"app": "coffer-sample"' in check_app("python", ports["python"])

        blocked = run_coffer(["exec", "ok-nginx", "--", "/usr/sbin/nginx", "-v"], env=world.env, check=False)
        assert blocked.returncode == 1
        assert "ExecProcessRequest is blocked by policy" in blocked.stderr

        inspected = json.loads(run_coffer(["inspect", "ok-redis", "--json"], env=world.env).stdout)
        guest = inspected["guest"]
        assert guest["tee"] == "tpm"
        cpu0 = guest["claims"]["submods"]["cpu0"]
        assert cpu0["ear.status"] == "affirming"
        assert cpu0["ear.veraison.annotated-evidence"]["tpm"]["ak_trusted"] is True
        operations = [e["operation"] for e in guest["event_log"]]
        assert operations == ["InitData", "PullImage", "CreateContainer"]
        assert guest["event_log"][1]["content"]["digest"] == world.pinned("redis").split("@", 1)[1]
        assert (guest["register"]["kind"], guest["register"]["index"]) == ("pcr", 23)
        released = {e["subject"] for e in world.trust.kbs.audit(action="release")}
        assert {f"default/key/{app}" for app in APPS} <= released
    finally:
        _remove(world, *names)


# --------------------------------------------------------------------------------------------------
# Refusals


def test_tampered_layer_is_refused(world: World) -> None:
    layouts = world.work / "tampered"
    shutil.copytree(world.protected / "nginx", layouts / "nginx")
    layer = tamper_layer(layouts / "nginx", image_reference("nginx"))
    done = world.run("bad-tampered", "nginx", layouts=layouts)
    _assert_refused(world, done, "bad-tampered", layer, "digest")


def test_layer_wrapped_with_another_key_than_the_kbs_releases_is_refused(world: World) -> None:
    layouts = world.work / "wrong-key"
    reference = "coffer.local/demo/nginx-wrong-key:1"
    resource = "default/key/nginx-wrong-key"
    nginx = world.built["nginx"]
    world.protect(nginx.layout, nginx.tag, layouts / "nginx", reference, key=f"kbs:///{resource}")
    # The KBS now holds another key under the path the layers name: unwrapping must fail.
    world.trust.kbs.put_resource(resource, secrets.token_bytes(32))
    policy = run_policy("wrong-key", reference, layouts / "nginx", public_key=world.public_key)
    done = world.run("bad-wrong-key", "nginx", layouts=layouts, policy=world.policy_file("nginx", policy),
                     image=policy.containers[0].image)
    message = _assert_refused(world, done, "bad-wrong-key")
    assert any(word in message.lower() for word in ("unwrap", "authenticat", "decrypt")), message


def test_unsigned_image_under_a_policy_requiring_a_signature_is_refused(world: World) -> None:
    layouts = world.work / "unsigned"
    reference = "coffer.local/demo/redis-unsigned:1"
    redis = world.built["redis"]
    world.protect(redis.layout, redis.tag, layouts / "redis", reference, key=key_uri("redis"), sign=False)
    policy = run_policy("unsigned", reference, layouts / "redis", public_key=world.public_key)
    done = world.run("bad-unsigned", "redis", layouts=layouts, policy=world.policy_file("redis", policy),
                     image=policy.containers[0].image)
    message = _assert_refused(world, done, "bad-unsigned")
    assert "signature" in message.lower(), message


def test_command_other_than_the_policy_pins_is_blocked(world: World) -> None:
    done = world.run("bad-command", "memcached", command=["/bin/sh", "-c", "cat /etc/shadow"])
    _assert_refused(world, done, "bad-command", "CreateContainerRequest is blocked by policy")


def test_image_digest_other_than_the_policy_pins_is_blocked(world: World) -> None:
    # The redis policy with the nginx image (both in the offered layouts).
    done = world.run("bad-digest", "redis", image=world.pinned("nginx"))
    _assert_refused(world, done, "bad-digest", "blocked by policy")


def test_initdata_changed_by_the_host_after_launch_is_refused(world: World) -> None:
    permissive = run_policy("nginx", image_reference("nginx"), world.protected / "nginx",
                            public_key=world.public_key, allow_exec=(("/bin/sh",),))
    env = world.trust.env(swap_initdata=swapped_initdata(world.work, policy_initdata(permissive)))
    done = world.run("bad-initdata", "nginx", env=env)
    _assert_refused(world, done, "bad-initdata", "refusing to start", "PCR 8", "step 4")


def test_kbs_refusing_the_key_release_is_refused(world: World) -> None:
    kbs = world.trust.kbs
    original = kbs.resource_policy()
    import base64

    text = base64.urlsafe_b64decode(original["policy"] + "=" * (-len(original["policy"]) % 4)).decode()
    kbs.set_resource_policy(DENY_ALL)
    try:
        done = world.run("bad-release", "memcached")
        message = _assert_refused(world, done, "bad-release")
        assert "default/key/memcached" in message, message
        assert "PolicyDeny" in message, message
    finally:
        kbs.set_resource_policy(text)
    denied = [e for e in kbs.audit(action="deny") if e["subject"] == "default/key/memcached"]
    assert denied, "the KBS did not record the denial"


# --------------------------------------------------------------------------------------------------
# Host-visible paths


def _marker_image(world: World, marker: bytes, destination: Path) -> str:
    """The Python sample image plus an uncompressed layer holding /marker, in a new layout."""
    source = world.built["python"].layout
    shutil.copytree(source, destination)
    layout = OciLayout.open(destination)
    entry = layout.resolve("python")
    manifest = json.loads(layout.blob_path(entry.digest).read_bytes())
    config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("marker")
        info.size, info.mode = len(marker), 0o644
        tar.addfile(info, io.BytesIO(marker))
    layer = buffer.getvalue()
    layer_desc = layout.write_bytes(layer, media.OCI_LAYER_TAR)
    config["rootfs"]["diff_ids"].append(sha256_digest(layer))
    raw_config = json.dumps(config).encode()
    config_desc = layout.write_bytes(raw_config, media.OCI_CONFIG)
    manifest["config"] = {"mediaType": media.OCI_CONFIG, "digest": config_desc.digest,
                          "size": config_desc.size}
    manifest["layers"].append({"mediaType": media.OCI_LAYER_TAR, "digest": layer_desc.digest,
                               "size": layer_desc.size})
    manifest_desc = layout.write_bytes(json.dumps(manifest).encode(), media.OCI_MANIFEST)
    layout.set_ref(manifest_desc, "marker")
    return "marker"


def _files_containing(needle: bytes, roots: list[Path], skip: set[Path]) -> list[Path]:
    found = []
    for root in roots:
        for directory, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(directory)
            dirnames[:] = [d for d in dirnames if here / d not in skip]
            for name in filenames:
                path = here / name
                try:
                    if not path.is_file() or path.is_symlink():
                        continue
                    size = path.stat().st_size
                    if size < len(needle) or size > 1024 * 1024 * 1024:
                        continue
                    with path.open("rb") as handle, \
                            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        if data.find(needle) >= 0:
                            found.append(path)
                except (OSError, ValueError):
                    continue
    return found


def test_no_decrypted_byte_reaches_host_visible_paths(world: World) -> None:
    marker = secrets.token_hex(32).encode()  # 32 random bytes, as text so a leak in any form shows
    plain = world.work / "marker-plain"
    tag = _marker_image(world, marker, plain)
    layouts = world.work / "marker"
    reference = "coffer.local/demo/marker:1"
    world.protect(plain, tag, layouts / "marker", reference, key="kbs:///default/key/marker")
    shutil.rmtree(plain)  # the owner's plaintext build is not part of the host running the sandbox
    reader = ("/usr/bin/python3", "-c", "print(open('/marker').read())")
    policy = run_policy("marker", reference, layouts / "marker", public_key=world.public_key,
                        allow_exec=(reader,))
    done = world.run("marker", "python", layouts=layouts, policy=world.policy_file("python", policy),
                     image=policy.containers[0].image)
    assert done.returncode == 0, done.stderr
    try:
        # Positive control: the decrypted file is there, inside the sandbox.
        deadline = time.monotonic() + 10
        while True:
            inside = run_coffer(["exec", "marker", "--", *reader], env=world.env, check=False)
            if marker.decode() in inside.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert marker.decode() in inside.stdout, inside.stderr
        state = world.trust.state_root
        roots = [state, world.work, Path("/tmp")]
        if Path("/run/coffer").is_dir():
            roots.append(Path("/run/coffer"))
        leaks = _files_containing(marker, roots, skip={Path("/tmp/.X11-unix")})
        assert leaks == [], f"decrypted bytes on the host: {leaks}"
        storage = list(state.glob("sandboxes/*/storage"))
        assert storage
        assert all(not any(p.iterdir()) for p in storage), "sandbox storage visible from the host"
    finally:
        _remove(world, "marker")
    assert _files_containing(marker, [world.trust.state_root, world.work], skip=set()) == []
