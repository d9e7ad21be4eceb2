"""docker-archive transport: skopeo interop both ways, legacy and Docker 25+ archives, hostile input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UnsupportedError, UsageError
from coffer.image import docker_archive, media
from coffer.image.docker_archive import (
    MAX_ARCHIVE_MANIFEST_BYTES,
    DockerArchiveDestination,
    DockerArchiveSource,
    parse_archive_manifest,
)
from coffer.image.layout import OciLayout
from coffer.image.locations import open_destination, open_source
from coffer.image.models import Descriptor, Manifest, sha256_digest
from coffer.image.pipeline import PlatformChoice, copy_image
from coffer.image.reference import DockerArchiveRef, parse_reference
from coffer.image.transport import ImageSource
from tests.image.imagebuild import config_json, layer_tar, make_image, make_multiarch
from tests.image.tarbuild import Entry, build_tar, d, f, hard, sym

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _skopeo(*args: str) -> str:
    assert SKOPEO is not None
    done = subprocess.run([SKOPEO, "--insecure-policy", *args], check=True, capture_output=True, text=True,
                          timeout=60)
    return done.stdout


def _ref(path: Path, suffix: str = "") -> DockerArchiveRef:
    ref = parse_reference(f"docker-archive:{path}{suffix}")
    assert isinstance(ref, DockerArchiveRef)
    return ref


def _read_all(source: ImageSource) -> tuple[Manifest, bytes, list[bytes]]:
    manifest = source.read_manifest(source.root())
    config = source.read_document(manifest.config, 1 << 20)
    layers = [b"".join(source.iter_blob(layer)) for layer in manifest.layers]
    return manifest, config, layers


def _layout_blobs(layout: OciLayout, tag: str) -> tuple[bytes, list[bytes], list[str]]:
    """Config bytes, uncompressed layers and layer media types of a tagged image in a layout."""
    manifest = layout.read_manifest(layout.resolve(tag))
    config = layout.read_blob(manifest.config, 1 << 20)
    layers = []
    for layer in manifest.layers:
        data = b"".join(layout.iter_blob(layer))
        layers.append(gzip.decompress(data) if media.compression(layer.media_type) == "gzip" else data)
    return config, layers, [layer.media_type for layer in manifest.layers]


# -- archives built by hand -----------------------------------------------------------------------

LAYERS = [layer_tar("one"), layer_tar("two")]
CONFIG = config_json(LAYERS)


def _skopeo_style(config: bytes = CONFIG, layers: list[bytes] = LAYERS,
                  tags: tuple[str, ...] = ("busybox:latest",)) -> tuple[list[Entry], list[dict[str, Any]]]:
    entries = [f(f"{_hex(layer)}.tar", layer) for layer in layers] + [f(f"{_hex(config)}.json", config)]
    manifest = [{"Config": f"{_hex(config)}.json", "RepoTags": list(tags),
                 "Layers": [f"{_hex(layer)}.tar" for layer in layers]}]
    return entries, manifest


def _pack(entries: list[Entry], manifest: object) -> bytes:
    return build_tar([*entries, f("manifest.json", json.dumps(manifest).encode())])


def _legacy(images: list[tuple[list[str], list[bytes]]]) -> bytes:
    """What ``docker save`` wrote before Docker 25: ``<id>/layer.tar``, ``<id>/json``, ``VERSION``."""
    entries: list[Entry] = []
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for tags, layers in images:
        config = config_json(layers)
        ids: list[str] = []
        for n, layer in enumerate(layers):
            layer_id = _hex(config + bytes([n]))
            legacy = {"id": layer_id, **({"parent": ids[-1]} if ids else {})}
            entries += [d(layer_id), f(f"{layer_id}/VERSION", b"1.0"),
                        f(f"{layer_id}/json", json.dumps(legacy).encode()), f(f"{layer_id}/layer.tar", layer)]
            ids.append(layer_id)
        entries.append(f(f"{_hex(config)}.json", config))
        manifest.append({"Config": f"{_hex(config)}.json", "RepoTags": tags,
                         "Layers": [f"{i}/layer.tar" for i in ids]})
        for tag in tags:
            name, _, version = tag.rpartition(":")
            repositories.setdefault(name, {})[version] = ids[-1]
    entries.append(f("repositories", json.dumps(repositories).encode()))
    return _pack(entries, manifest)


def _oci_style(blobs: list[bytes], config: bytes, *, tags: tuple[str, ...] = ("busybox:latest",),
               names: dict[int, str] | None = None) -> bytes:
    """What Docker 25+ writes: an OCI layout whose ``manifest.json`` points into ``blobs/sha256``."""
    names = names or {}
    paths = [names.get(n, f"blobs/sha256/{_hex(blob)}") for n, blob in enumerate(blobs)]
    entries = [d("blobs"), d("blobs/sha256"), f(f"blobs/sha256/{_hex(config)}", config),
               *(f(path, blob) for path, blob in zip(paths, blobs, strict=True)),
               f("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), f("index.json", b'{"schemaVersion":2}')]
    manifest = [{"Config": f"blobs/sha256/{_hex(config)}", "RepoTags": list(tags), "Layers": paths}]
    return _pack(entries, manifest)


def _write(tmp_path: Path, data: bytes, name: str = "in.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- reading what skopeo writes ---------------------------------------------------------------------


@needs_skopeo
def test_reads_skopeo_archive_and_blobs_match_its_oci_layout(tmp_path: Path) -> None:
    layout = make_image(tmp_path / "lay", n_layers=2, gz=True)
    archive = tmp_path / "a.tar"
    _skopeo("copy", "oci:" + str(tmp_path / "lay") + ":latest",
            f"docker-archive:{archive}:example.com/foo/bar:t1")
    want_config, want_layers, _ = _layout_blobs(layout, "latest")
    for suffix in ("", ":example.com/foo/bar:t1", ":@0"):
        with open_source(_ref(archive, suffix)) as source:
            assert isinstance(source, DockerArchiveSource)
            manifest, config, layers = _read_all(source)
            assert source.resolve_tag("t1") is None
        assert config == want_config
        assert manifest.config.digest == sha256_digest(want_config)
        assert layers == want_layers  # skopeo stores layers uncompressed
        assert [layer.media_type for layer in manifest.layers] == [media.OCI_LAYER_TAR] * 2
        assert [layer.digest for layer in manifest.layers] == json.loads(config)["rootfs"]["diff_ids"]
    with pytest.raises(UsageError, match="no image named"):
        DockerArchiveSource(_ref(archive, ":example.com/foo/bar:other"))
    with pytest.raises(UsageError, match="out of range"):
        DockerArchiveSource(_ref(archive, ":@1"))


# -- writing what skopeo reads ----------------------------------------------------------------------


@needs_skopeo
@pytest.mark.parametrize("docker", [False, True], ids=["oci-gzip", "docker-schema2"])
def test_written_archive_is_read_by_skopeo(tmp_path: Path, docker: bool) -> None:
    layout = make_image(tmp_path / "lay", n_layers=2, gz=True, docker=docker)
    want_config, want_layers, _ = _layout_blobs(layout, "latest")
    out = tmp_path / "out.tar"
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}:latest")) as source, \
            open_destination(_ref(out, ":busybox:latest")) as destination:
        assert isinstance(destination, DockerArchiveDestination)
        assert not destination.supports_encryption
        assert not destination.supports_extra_tags
        copy_image(source, destination)
        destination.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lay", "out.tar"]  # no staging left

    with tarfile.open(out) as archive:
        names = archive.getnames()
        manifest_json = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        repositories = json.loads(archive.extractfile("repositories").read())  # type: ignore[union-attr]
    diff_ids = json.loads(want_config)["rootfs"]["diff_ids"]
    assert manifest_json == [{"Config": f"{_hex(want_config)}.json", "RepoTags": ["busybox:latest"],
                              "Layers": [f"{i.split(':')[1]}.tar" for i in diff_ids]}]
    assert list(repositories) == ["busybox"]
    assert f"{repositories['busybox']['latest']}/json" in names

    inspected = json.loads(_skopeo("inspect", f"docker-archive:{out}"))
    assert inspected["Layers"] == diff_ids
    assert inspected["Architecture"] == "amd64"
    _skopeo("copy", f"docker-archive:{out}", f"oci:{tmp_path / 'back'}:x")
    _, back_layers, _ = _layout_blobs(OciLayout.open(tmp_path / "back"), "x")
    assert back_layers == want_layers

    # And Coffer reads its own archive, by the name skopeo would use too.
    with open_source(_ref(out, ":docker.io/library/busybox:latest")) as source:
        _, config, layers = _read_all(source)
    assert config == want_config
    assert layers == want_layers


def test_untagged_destination_writes_no_repositories_file(tmp_path: Path) -> None:
    make_image(tmp_path / "lay", n_layers=1)
    out = tmp_path / "out.tar"
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source, \
            open_destination(_ref(out)) as destination:
        assert destination.tag is None
        copy_image(source, destination)
        destination.commit()
    with tarfile.open(out) as archive:
        assert "repositories" not in archive.getnames()
        assert json.loads(archive.extractfile("manifest.json").read())[0]["RepoTags"] == []  # type: ignore[union-attr]
    with DockerArchiveSource(_ref(out)) as source:
        _read_all(source)


def test_registry_name_becomes_docker_repo_tag(tmp_path: Path) -> None:
    make_image(tmp_path / "lay", n_layers=1)
    out = tmp_path / "out.tar"
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source, \
            open_destination(_ref(out, ":example.com:5000/team/app:v2")) as destination:
        copy_image(source, destination)
        destination.commit()
    with tarfile.open(out) as archive:
        entry = json.loads(archive.extractfile("manifest.json").read())[0]  # type: ignore[union-attr]
    assert entry["RepoTags"] == ["example.com:5000/team/app:v2"]


# -- other archive layouts --------------------------------------------------------------------------


def test_legacy_archive_selects_by_name_and_by_index(tmp_path: Path) -> None:
    other = [layer_tar("three")]
    path = _write(tmp_path, _legacy([(["busybox:latest"], LAYERS), (["example.com/x:1", "x:2"], other)]))
    with DockerArchiveSource(_ref(path, ":busybox:latest")) as source:
        _, config, layers = _read_all(source)
    assert (config, layers) == (CONFIG, LAYERS)
    for suffix in (":example.com/x:1", ":docker.io/library/x:2", ":@1"):
        with DockerArchiveSource(_ref(path, suffix)) as source:
            _, config, layers = _read_all(source)
        assert (config, layers) == (config_json(other), other)
    with pytest.raises(UsageError, match="holds 2 images"):
        DockerArchiveSource(_ref(path))


def test_docker25_archive_with_blob_members(tmp_path: Path) -> None:
    plain = layer_tar("plain")
    zipped = gzip.compress(layer_tar("zipped"), mtime=0)
    config = config_json([plain, layer_tar("zipped")])
    path = _write(tmp_path, _oci_style([plain, zipped], config))
    with DockerArchiveSource(_ref(path)) as source:
        manifest, got_config, layers = _read_all(source)
    assert got_config == config
    assert layers == [plain, zipped]
    assert [layer.media_type for layer in manifest.layers] == [media.OCI_LAYER_TAR, media.OCI_LAYER_GZIP]
    assert [layer.digest for layer in manifest.layers] == [sha256_digest(plain), sha256_digest(zipped)]


def test_gzip_layer_hashed_at_open_is_checked_against_diff_id(tmp_path: Path) -> None:
    zipped = gzip.compress(layer_tar("z"), mtime=0)
    entries, manifest = _skopeo_style(config_json([layer_tar("z")]), [zipped])
    with DockerArchiveSource(_ref(_write(tmp_path, _pack(entries, manifest)))) as source:
        assert _read_all(source)[2] == [zipped]
    entries, manifest = _skopeo_style(config_json([layer_tar("other")]), [zipped])
    with pytest.raises(FormatError, match="diff_id"):
        DockerArchiveSource(_ref(_write(tmp_path, _pack(entries, manifest), "bad.tar")))


def test_multi_member_gzip_layer_is_accepted(tmp_path: Path) -> None:
    plain = layer_tar("multi")
    zipped = gzip.compress(plain[:700], mtime=0) + gzip.compress(plain[700:], mtime=0)
    config = config_json([plain])
    entries, manifest = _skopeo_style(config, [zipped])
    archives = {"hashed.tar": _pack(entries, manifest), "claimed.tar": _oci_style([zipped], config)}
    for name, data in archives.items():
        with DockerArchiveSource(_ref(_write(tmp_path, data, name))) as source:
            assert _read_all(source)[2] == [zipped]


def test_ambiguous_tag_and_bzip2_layer_are_refused(tmp_path: Path) -> None:
    image = {"Config": f"{_hex(CONFIG)}.json", "RepoTags": ["busybox:latest"],
             "Layers": [f"{_hex(layer)}.tar" for layer in LAYERS]}
    entries, _ = _skopeo_style()
    path = _write(tmp_path, _pack(entries, [image, image]))
    with pytest.raises(FormatError, match="2 images are tagged"):
        DockerArchiveSource(_ref(path, ":busybox:latest"))
    entries, manifest = _skopeo_style(config_json([b"BZh9"]), [b"BZh9"])
    with pytest.raises(UnsupportedError, match="bzip2"):
        DockerArchiveSource(_ref(_write(tmp_path, _pack(entries, manifest), "bz.tar")))


def test_tampered_blob_member_is_refused_on_read(tmp_path: Path) -> None:
    plain = layer_tar("plain")
    tampered = plain[:-1] + b"\x01"
    path = _write(tmp_path, _oci_style([tampered], config_json([plain]),
                                       names={0: f"blobs/sha256/{_hex(plain)}"}))
    with DockerArchiveSource(_ref(path)) as source:
        layer = source.read_manifest(source.root()).layers[0]
        with pytest.raises(FormatError, match="digest"):
            b"".join(source.iter_blob(layer))


def test_gzip_blob_with_wrong_diff_id_is_refused_at_end_of_read(tmp_path: Path) -> None:
    zipped = gzip.compress(layer_tar("z"), mtime=0)
    path = _write(tmp_path, _oci_style([zipped], config_json([layer_tar("not-z")])))
    with DockerArchiveSource(_ref(path)) as source:  # a claimed digest is not hashed at open
        layer = source.read_manifest(source.root()).layers[0]
        chunks = source.iter_blob(layer)
        with pytest.raises(FormatError, match="diff_id"):
            b"".join(chunks)


def test_zstd_layer_is_listed_but_not_streamed(tmp_path: Path) -> None:
    fake_zstd = b"\x28\xb5\x2f\xfd" + b"\0" * 60
    path = _write(tmp_path, _oci_style([fake_zstd], config_json([layer_tar("z")])))
    with DockerArchiveSource(_ref(path)) as source:
        layer = source.read_manifest(source.root()).layers[0]
        assert layer.media_type == media.OCI_LAYER_ZSTD
        with pytest.raises(UnsupportedError, match="zstd"):
            b"".join(source.iter_blob(layer))


def test_unknown_and_mismatched_descriptors_are_refused(tmp_path: Path) -> None:
    entries, manifest = _skopeo_style()
    with DockerArchiveSource(_ref(_write(tmp_path, _pack(entries, manifest)))) as source:
        root = source.root()
        with pytest.raises(FormatError, match="not in"):
            b"".join(source.iter_blob(Descriptor(media_type=media.OCI_LAYER_TAR, digest="sha256:" + "0" * 64,
                                                 size=1)))
        wrong_size = Descriptor(media_type=root.media_type, digest=root.digest, size=root.size + 1)
        with pytest.raises(FormatError):
            source.read_document(wrong_size, 1 << 20)
        with pytest.raises(FormatError, match="limit"):
            source.read_document(root, 10)


def test_compressed_archive_is_unsupported(tmp_path: Path) -> None:
    entries, manifest = _skopeo_style()
    path = _write(tmp_path, gzip.compress(_pack(entries, manifest)))
    with pytest.raises(UnsupportedError, match="compressed"):
        DockerArchiveSource(_ref(path))


def test_missing_archive_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        DockerArchiveSource(_ref(tmp_path / "nope.tar"))
    with pytest.raises(UsageError, match="regular file"):
        DockerArchiveSource(_ref(tmp_path))


# -- hostile archives -------------------------------------------------------------------------------

Builder = Callable[[list[Entry], list[dict[str, Any]]], bytes]


def _replace(entries: list[Entry], index: int, entry: Entry) -> list[Entry]:
    return [entry if n == index else e for n, e in enumerate(entries)]


HOSTILE: dict[str, Builder] = {
    "manifest_missing": lambda e, m: build_tar(e),
    "manifest_oversized": lambda e, m: build_tar(
        [*e, f("manifest.json", json.dumps(m).encode() + b" " * MAX_ARCHIVE_MANIFEST_BYTES)]),
    "manifest_not_json": lambda e, m: build_tar([*e, f("manifest.json", b"[{nope")]),
    "manifest_lists_no_image": lambda e, m: _pack(e, []),
    "manifest_is_symlink": lambda e, m: build_tar(
        [*e, f("real.json", json.dumps(m).encode()), sym("manifest.json", "real.json")]),
    "member_with_dotdot": lambda e, m: _pack([*e, f("../escape", b"x")], m),
    "member_absolute": lambda e, m: _pack([*e, f("/etc/escape", b"x")], m),
    "member_duplicated": lambda e, m: _pack([*e, e[0]], m),
    "layer_is_symlink": lambda e, m: _pack(_replace(e, 0, sym(e[0].name, "/etc/passwd")), m),
    "layer_is_hardlink": lambda e, m: _pack(_replace(e, 0, hard(e[0].name, e[1].name)), m),
    "layer_is_directory": lambda e, m: _pack(_replace(e, 0, d(e[0].name)), m),
    "layer_missing": lambda e, m: _pack(e[1:], m),
    "config_missing": lambda e, m: _pack(e[:-1], m),
    "config_is_symlink": lambda e, m: _pack(_replace(e, 2, sym(e[2].name, e[0].name)), m),
    "layer_path_escapes": lambda e, m: _pack(e, [{**m[0], "Layers": ["../" + m[0]["Layers"][0]]}]),
    "config_path_absolute": lambda e, m: _pack(e, [{**m[0], "Config": "/" + m[0]["Config"]}]),
    "layer_not_matching_diff_id": lambda e, m: _pack(
        e, [{**m[0], "Layers": list(reversed(m[0]["Layers"]))}]),
    "diff_ids_count_differs": lambda e, m: _pack(e, [{**m[0], "Layers": m[0]["Layers"][:1]}]),
    "config_not_json": lambda e, m: _pack([*e, f("bad.json", b"{")], [{**m[0], "Config": "bad.json"}]),
    "truncated_member": lambda e, m: _pack(e, m)[:1536],
    "not_a_tar": lambda e, m: b"this is not a tar archive " * 40,
    "empty_file": lambda e, m: b"",
}


# What each refusal must say, so a case cannot pass by failing for an unrelated reason.
REASONS = {
    "manifest_missing": "no manifest.json", "manifest_oversized": "exceeds the limit",
    "manifest_not_json": "invalid JSON", "manifest_lists_no_image": "lists no images",
    "manifest_is_symlink": "symbolic link", "member_with_dotdot": "climbs out",
    "member_absolute": "absolute", "member_duplicated": "more than once",
    "layer_is_symlink": "symbolic link", "layer_is_hardlink": "hard link",
    "layer_is_directory": "directory", "layer_missing": "missing", "config_missing": "missing",
    "config_is_symlink": "symbolic link", "layer_path_escapes": "climbs out",
    "config_path_absolute": "absolute", "layer_not_matching_diff_id": "diff_id",
    "diff_ids_count_differs": "diff_ids for", "config_not_json": "invalid JSON",
    "truncated_member": "past the end", "not_a_tar": "not a readable tar", "empty_file": "empty file",
}


def _copy(source: str, destination: str, platform: PlatformChoice | None = None) -> None:
    """Copy one image between two references and commit, as the CLI does (errors abort)."""
    with open_source(parse_reference(source)) as src, open_destination(parse_reference(destination)) as dst:
        copy_image(src, dst, platform=platform)
        dst.commit()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(tmp_path: Path, case: str) -> None:
    entries, manifest = _skopeo_style()
    path = _write(tmp_path, HOSTILE[case](entries, manifest))
    out = tmp_path / "out.tar"
    with pytest.raises(FormatError, match=REASONS[case]):
        _copy(f"docker-archive:{path}", f"docker-archive:{out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar"]  # nothing written, no staging


def test_archive_with_too_many_members_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker_archive, "MAX_MEMBERS", 8)
    entries, manifest = _skopeo_style()
    padding = [f(f"pad{n}", b"") for n in range(6)]
    with pytest.raises(FormatError, match="more than 8 members"):
        DockerArchiveSource(_ref(_write(tmp_path, _pack([*entries, *padding], manifest))))
    DockerArchiveSource(_ref(_write(tmp_path, _pack(entries, manifest), "ok.tar"))).close()


def test_dot_directory_entry_is_tolerated(tmp_path: Path) -> None:
    entries, manifest = _skopeo_style()
    with DockerArchiveSource(_ref(_write(tmp_path, _pack([d("."), *entries], manifest)))) as source:
        assert _read_all(source)[2] == LAYERS


# -- destination refusals ---------------------------------------------------------------------------


def _encrypted_layout(root: Path) -> None:
    layout = OciLayout.create(root)
    layer = layout.write_bytes(b"ciphertext", media.OCI_LAYER_GZIP_ENC)
    config = layout.write_bytes(config_json([b"plain"]), media.OCI_CONFIG)
    manifest = Manifest(media_type=media.OCI_MANIFEST, config=config, layers=(layer,))
    layout.set_ref(layout.write_manifest(manifest), "latest")


def test_encrypted_image_into_archive_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    _encrypted_layout(tmp_path / "enc")
    out = tmp_path / "out.tar"
    with pytest.raises(UnsupportedError, match="encrypted images to oci: or docker://"):
        _copy(f"oci:{tmp_path / 'enc'}", f"docker-archive:{out}:busybox:latest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]

    # The manifest alone is refused too, even if the caller skipped put_blob's check.
    layout = OciLayout.open(tmp_path / "enc")
    raw = layout.read_blob(layout.resolve("latest"), 1 << 20)
    with DockerArchiveDestination(_ref(out)) as destination, \
            pytest.raises(UnsupportedError, match="plain single-platform"):
        destination.put_manifest(raw, media.OCI_MANIFEST, tag=None)
    assert not out.exists()


def test_index_into_archive_keeps_only_the_chosen_platform(tmp_path: Path) -> None:
    make_multiarch(tmp_path / "multi")
    out = tmp_path / "out.tar"
    _copy(f"oci:{tmp_path / 'multi'}", f"docker-archive:{out}", PlatformChoice("linux", "arm64"))
    with open_source(parse_reference(f"docker-archive:{out}")) as source:
        config = source.read_config(source.read_manifest(source.root()).config)
    assert config.architecture == "arm64"


def test_all_platforms_into_archive_is_refused(tmp_path: Path) -> None:
    make_multiarch(tmp_path / "multi")
    out = tmp_path / "out.tar"
    with pytest.raises(UsageError, match="single platform"):
        _copy(f"oci:{tmp_path / 'multi'}", f"docker-archive:{out}", PlatformChoice())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi"]


def test_extra_tag_and_second_manifest_are_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "lay", n_layers=1)
    out = tmp_path / "out.tar"
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source, \
            DockerArchiveDestination(_ref(out, ":busybox:v1")) as destination:
        assert destination.tag == "v1"
        copy_image(source, destination)
        raw = source.read_document(source.root(), 1 << 20)
        with pytest.raises(UnsupportedError, match="own tag"):
            destination.put_manifest(raw, media.OCI_MANIFEST, tag="sha256-abc.sig")
        with pytest.raises(UnsupportedError, match="single-platform"):
            destination.put_manifest(raw, media.OCI_MANIFEST, tag="v1")
        destination.commit()
    assert out.exists()


def test_manifest_before_its_blobs_is_refused(tmp_path: Path) -> None:
    layout = make_image(tmp_path / "lay", n_layers=1)
    raw = layout.read_blob(layout.resolve("latest"), 1 << 20)
    with DockerArchiveDestination(_ref(tmp_path / "out.tar")) as destination, \
            pytest.raises(UsageError, match="not stored"):
        destination.put_manifest(raw, media.OCI_MANIFEST, tag=None)


def test_blob_not_matching_its_descriptor_is_refused(tmp_path: Path) -> None:
    expected = Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"right"), size=5)
    with DockerArchiveDestination(_ref(tmp_path / "out.tar")) as destination:
        with pytest.raises(FormatError):
            destination.put_blob([b"wrong"], media.OCI_LAYER_TAR, expected=expected)
        assert not destination.has_blob(expected)
        assert destination.put_blob([b"ri", b"ght"], media.OCI_LAYER_TAR, expected=expected) == expected
        assert destination.has_blob(expected)
        with pytest.raises(UsageError, match="nothing to commit"):
            destination.commit()
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        DockerArchiveDestination(_ref(out))
    out.unlink()

    make_image(tmp_path / "lay", n_layers=1)
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source, \
            DockerArchiveDestination(_ref(out)) as destination:
        copy_image(source, destination)
        out.write_bytes(b"precious")  # appears while the archive is being built
        with pytest.raises(UsageError, match="not overwriting"):
            destination.commit()
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lay", "out.tar"]


def test_index_reference_is_not_a_destination(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="@N"):
        DockerArchiveDestination(_ref(tmp_path / "out.tar", ":@0"))
    with pytest.raises(UsageError, match="does not exist"):
        DockerArchiveDestination(_ref(tmp_path / "missing" / "out.tar"))


def test_wrong_diff_id_in_written_image_is_refused(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "lay")
    layer = layout.write_bytes(gzip.compress(layer_tar("a")), media.OCI_LAYER_GZIP)
    config = layout.write_bytes(config_json([layer_tar("b")]), media.OCI_CONFIG)
    manifest = Manifest(media_type=media.OCI_MANIFEST, config=config, layers=(layer,))
    layout.set_ref(layout.write_manifest(manifest), "latest")
    with pytest.raises(FormatError, match="diff_id"), \
            open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source, \
            open_destination(_ref(tmp_path / "out.tar")) as destination:
        copy_image(source, destination)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lay"]


def test_abort_after_commit_is_a_no_op(tmp_path: Path) -> None:
    make_image(tmp_path / "lay", n_layers=1)
    out = tmp_path / "out.tar"
    with open_source(parse_reference(f"oci:{tmp_path / 'lay'}")) as source:
        destination = DockerArchiveDestination(_ref(out))
        copy_image(source, destination)
        destination.commit()
        destination.commit()
        destination.abort()
    assert out.exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # an ordinary new file, not mkstemp's 0600


# -- property test --------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["Config", "RepoTags", "Layers", "Parent"]) | st.text(max_size=4),
                      inner, max_size=4),
    max_leaves=16,
)
_PATHS = st.sampled_from(["a.json", "../x", "/abs", "./b/../c", "", ".", "x\x00y", "ok/layer.tar"])
_ENTRY = st.fixed_dictionaries({"Config": _PATHS | _JSON, "RepoTags": st.lists(st.text(max_size=8)) | _JSON,
                                "Layers": st.lists(_PATHS, max_size=3) | _JSON})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), _JSON.map(lambda v: json.dumps(v).encode()),
                 st.lists(_ENTRY, max_size=3).map(lambda v: json.dumps(v).encode())))
def test_manifest_parser_raises_only_coffer_errors(data: bytes) -> None:
    try:
        images = parse_archive_manifest(data)
    except CofferError:
        return
    for image in images:
        assert ".." not in image.config.split("/")
        assert not image.config.startswith("/")
        assert all(".." not in layer.split("/") and not layer.startswith("/") for layer in image.layers)
