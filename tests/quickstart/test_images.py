"""The quickstart's sample images: built from real Debian packages, reproducible, cached, and running.

Packages are downloaded once into the user's cache (``$COFFER_CACHE`` or ``~/.cache/coffer``); the
tests skip with the reason when apt cannot resolve or download them. Each image is then unpacked
with Coffer's own unpacker and started with ``runc`` in its own network namespace, where a real
client (HTTP GET, Redis PING, Memcached ``version``) is run through ``nsenter``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, ConfigError, FormatError, TransportError, UsageError
from coffer.image.layout import OciLayout
from coffer.image.models import ImageConfig
from coffer.image.pipeline import unpack_from_source
from coffer.image.reference import OciLayoutRef
from coffer.image.transport import OciLayoutSource, no_progress
from coffer.quickstart import images
from coffer.quickstart.images import APPS, Package, build_image, build_image_detailed

CACHE = images.default_cache()


def _build_or_skip(app: str, dest: Path, cache: Path = CACHE) -> images.BuildResult:
    try:
        return build_image_detailed(app, dest, cache=cache)
    except (ConfigError, TransportError) as exc:
        pytest.skip(f"apt cannot provide the Debian packages of {app}: {exc}")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, images.BuildResult]:
    dest = tmp_path_factory.mktemp("images")
    return {app: _build_or_skip(app, dest) for app in APPS}


# --------------------------------------------------------------------------------------------------
# Building


def test_every_app_builds_a_three_layer_oci_image(built: dict[str, images.BuildResult]) -> None:
    base_digests = set()
    for app, result in built.items():
        layout = OciLayout.open(result.layout)
        entry = layout.resolve(app)
        assert entry.digest == result.manifest_digest
        assert entry.platform is not None
        assert entry.platform.os == "linux"
        manifest = layout.read_manifest(entry)
        config = layout.read_config(manifest.config)
        assert len(manifest.layers) == 3 == len(config.diff_ids)
        for layer in manifest.layers:
            layout.verify_blob(layer)
        base_digests.add(manifest.layers[0].digest)
        spec = APPS[app]
        assert config.cmd == spec.cmd
        assert config.user == spec.user
        raw = json.loads(config.raw)
        assert raw["config"]["ExposedPorts"] == {f"{spec.port}/tcp": {}}
        assert "libc6=" in config.labels["dev.coffer.quickstart.packages"]
    # The base layer is one blob shared by every image.
    assert len(base_digests) == 1


def test_rebuilding_from_an_empty_cache_gives_the_same_digests(
    built: dict[str, images.BuildResult], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # Reuse the downloaded packages, nothing else: the layers and the layout are made again.
    (cache / "debs").symlink_to(CACHE / "debs", target_is_directory=True)
    again = build_image_detailed("python", tmp_path / "out", cache=cache)
    assert not again.cached
    assert again.manifest_digest == built["python"].manifest_digest


def test_cached_build_returns_in_under_a_second(built: dict[str, images.BuildResult], tmp_path: Path) -> None:
    for app in APPS:
        started = time.monotonic()
        result = build_image_detailed(app, tmp_path, cache=CACHE)
        assert time.monotonic() - started < 1.0, app
        assert result.cached
        assert result.manifest_digest == built[app].manifest_digest
        # Into an existing, up-to-date destination it is a no-op.
        started = time.monotonic()
        assert build_image(app, tmp_path, cache=CACHE) == tmp_path / app
        assert time.monotonic() - started < 0.5


def test_tampered_copy_does_not_reach_the_cache(built: dict[str, images.BuildResult], tmp_path: Path) -> None:
    first = build_image("memcached", tmp_path, cache=CACHE)
    layout = OciLayout.open(first)
    manifest = layout.read_manifest(layout.resolve("memcached"))
    blob = layout.blob_path(manifest.layers[2].digest)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    other = build_image("memcached", tmp_path / "again", cache=CACHE)
    OciLayout.open(other).verify_blob(manifest.layers[2])


def test_unknown_app_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown sample app"):
        build_image("postgres", tmp_path, cache=tmp_path)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Parsing apt's output (pure)

DEPENDS = """nginx
  Depends: libc6
  Depends: nginx-common
 |Depends: dpkg
  Depends: install-info
  Depends: <awk>
    mawk
    original-awk
nginx-common
 |Depends: debconf
  Depends: <debconf-2.0>
    debconf
    cdebconf
libc6
  Depends: libgcc-s1
libgcc-s1
  PreDepends: libc6
mawk
  Depends: libc6
original-awk
<debconf-2.0>
debconf
  PreDepends: perl-base
perl-base
install-info
  Depends: libc6
"""


def test_closure_follows_depends_and_skips_maintainer_script_helpers() -> None:
    graph = images.parse_apt_depends(DEPENDS)
    assert graph["nginx"] == [["libc6"], ["nginx-common"], ["dpkg", "install-info"], ["mawk", "original-awk"]]
    assert images.closure(graph, ["nginx"]) == ["libc6", "libgcc-s1", "mawk", "nginx", "nginx-common"]
    assert images.closure(graph, ["nginx"], frozenset()) == [
        "debconf", "install-info", "libc6", "libgcc-s1", "mawk", "nginx", "nginx-common", "perl-base"]


def test_unknown_root_package_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not known to apt"):
        images.closure(images.parse_apt_depends(DEPENDS), ["no-such-package"])


SHOW = """Package: libc6
Version: 2.36-9+deb12u14
Architecture: amd64
Size: 2758948
SHA256: {h}
Description: GNU C Library
 continued: line

Package: libc6
Version: 2.36-9
Architecture: amd64
Size: 1
SHA256: {h}
"""


def test_apt_show_gives_the_first_candidate() -> None:
    found = images.parse_apt_show(SHOW.format(h="ab" * 32))
    assert found["libc6"] == Package(name="libc6", version="2.36-9+deb12u14", architecture="amd64",
                                     sha256="ab" * 32, size=2758948)
    assert found["libc6"].filename == "libc6_2.36-9+deb12u14_amd64.deb"
    assert Package(name="x", version="1:2", architecture="all", sha256="0" * 64, size=1).filename == (
        "x_1%3a2_all.deb")


def test_malformed_sha256_in_apt_show_is_refused() -> None:
    with pytest.raises(FormatError, match="SHA256"):
        images.parse_apt_show(SHOW.format(h="zz" * 32))


def test_package_version_with_a_slash_is_refused() -> None:
    with pytest.raises(FormatError, match="unusable"):
        Package.from_obj({"name": "libc6", "version": "../../x", "architecture": "amd64",
                          "sha256": "0" * 64, "size": 1})


@given(st.text(max_size=400))
@settings(max_examples=150, deadline=None)
def test_apt_output_parsers_raise_only_typed_errors(text: str) -> None:
    try:
        graph = images.parse_apt_depends(text)
        images.parse_apt_show(text)
        for name in list(graph)[:3]:
            images.closure(graph, [name])
    except CofferError:
        pass


def test_layer_writer_is_deterministic_and_sorted(tmp_path: Path) -> None:
    files = [images.FileEntry(path="b/x", content=b"x"), images.FileEntry(path="a"),
             images.FileEntry(path="b/y/z", content=b"zz", mode=0o755, uid=7, gid=8)]
    results = []
    for n in range(2):
        entries: dict[str, images._Entry] = {}
        images._add_files(entries, list(reversed(files)) if n else files)
        results.append(images.write_layer(entries, tmp_path / f"l{n}.tar.gz"))
    assert results[0] == results[1]
    assert (tmp_path / "l0.tar.gz").read_bytes() == (tmp_path / "l1.tar.gz").read_bytes()
    import tarfile

    with tarfile.open(tmp_path / "l0.tar.gz") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["a", "b", "b/x", "b/y", "b/y/z"]
    assert {m.mtime for m in members} == {images.EPOCH}
    assert (members[4].uid, members[4].gid, members[4].mode) == (7, 8, 0o755)


def test_nginx_config_renders_the_port() -> None:
    assert "listen 8081 default_server;" in images.nginx_config(8081)
    with pytest.raises(UsageError):
        images.nginx_config(0)


# --------------------------------------------------------------------------------------------------
# Running under runc

RUNC = shutil.which("runc")
NSENTER = shutil.which("nsenter")
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID", "CAP_SETUID",
        "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_AUDIT_WRITE", "CAP_SYS_CHROOT"]


def _bundle(layout: Path, app: str, bundle: Path) -> ImageConfig:
    source = OciLayoutSource(OciLayoutRef(path=layout, tag=app))
    with source:
        unpack_from_source(source, bundle / "rootfs")
        entry = source.root()
        config = source.read_config(source.read_manifest(entry).config)
    subprocess.run([RUNC or "runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    uid, _, gid = (config.user or "0:0").partition(":")
    process = spec["process"]
    process.update(terminal=False, args=[*config.entrypoint, *config.cmd], env=list(config.env),
                   cwd=config.working_dir or "/", user={"uid": int(uid), "gid": int(gid or uid)})
    process["capabilities"] = dict.fromkeys(("bounding", "effective", "permitted"), CAPS)
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = app
    (bundle / "config.json").write_text(json.dumps(spec))
    return config


@pytest.fixture
def runc_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "runc-state"
    yield root
    if root.exists():
        for name in os.listdir(root):
            subprocess.run(["runc", "--root", str(root), "delete", "--force", name], check=False,
                           capture_output=True)


@pytest.mark.skipif(RUNC is None or NSENTER is None or os.geteuid() != 0,
                    reason="needs runc, nsenter and root")
@pytest.mark.parametrize("app", list(APPS))
def test_image_runs_under_runc_and_answers(app: str, built: dict[str, images.BuildResult], tmp_path: Path,
                                           runc_root: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _bundle(built[app].layout, app, bundle)
    name = f"coffer-qs-{app}-{uuid.uuid4().hex[:8]}"
    log = (tmp_path / "out.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), name],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        pid = 0
        while time.monotonic() - started < 10 and proc.poll() is None:
            state = subprocess.run(["runc", "--root", str(runc_root), "state", name], capture_output=True,
                                   check=False)
            if state.returncode == 0:
                pid = json.loads(state.stdout)["pid"]
                if pid:
                    break
            time.sleep(0.02)
        assert pid, (tmp_path / "out.log").read_text(errors="replace")
        client = (f"from coffer.quickstart.images import probe; "
                  f"print(probe({app!r}, '127.0.0.1', {APPS[app].port}, timeout=10))")
        answer = subprocess.run([NSENTER or "nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable,
                                 "-c", client], capture_output=True, text=True, check=False, timeout=30)
        elapsed = time.monotonic() - started
        assert answer.returncode == 0, answer.stderr + (tmp_path / "out.log").read_text(errors="replace")
        print(f"{app}: answered {answer.stdout.strip()!r} {elapsed:.2f} s after runc run")
    finally:
        subprocess.run(["runc", "--root", str(runc_root), "kill", name, "KILL"], check=False,
                       capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --------------------------------------------------------------------------------------------------
# Damaged inputs


def test_garbage_deb_is_a_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad_1_all.deb"
    bad.write_bytes(b"!<arch>\nnot really a package")
    with pytest.raises(FormatError, match=r"bad_1_all\.deb"):
        images._read_deb(bad, {})


def test_truncated_deb_is_a_format_error(built: dict[str, images.BuildResult], tmp_path: Path) -> None:
    real = max((CACHE / "debs").glob("libc6_*.deb"), key=lambda p: p.stat().st_mtime)
    cut = tmp_path / real.name
    cut.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    with pytest.raises(FormatError):
        images._read_deb(cut, {})


def test_tampered_cached_deb_is_downloaded_again(
    built: dict[str, images.BuildResult], tmp_path: Path
) -> None:
    resolution = images._resolution(APPS["memcached"], CACHE, no_progress)
    small = min(resolution.base, key=lambda p: p.size)
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / small.filename).write_bytes(b"tampered")
    try:
        paths = images.fetch_debs([small], debs)
    except TransportError as exc:
        pytest.skip(f"apt cannot download {small.name}: {exc}")
    assert images._file_sha256(paths[small.name]) == small.sha256


def test_damaged_cached_layer_is_rebuilt(built: dict[str, images.BuildResult], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    spec = APPS["nginx"]
    first = images.build_layer("cfg", (), spec.files, cache=cache)
    first.path.write_bytes(b"\x1f\x8bdamaged")
    again = images.build_layer("cfg", (), spec.files, cache=cache)
    assert again.digest == first.digest
    assert "sha256:" + images._file_sha256(again.path) == first.digest
