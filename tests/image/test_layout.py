"""OCI image layout directories: verified reads, atomic writes, staged new layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coffer.errors import FormatError, UsageError
from coffer.image import media
from coffer.image.layout import REF_NAME, OciLayout, staged_layout
from coffer.image.models import Descriptor, Manifest, sha256_digest


def _image(layout: OciLayout, tag: str = "latest") -> Descriptor:
    config = layout.write_bytes(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"L")]},
            }
        ).encode(),
        media.OCI_CONFIG,
    )
    layer = layout.write_blob([b"L"], media.OCI_LAYER_TAR)
    manifest = Manifest(media_type=media.OCI_MANIFEST, config=config, layers=(layer,))
    return layout.set_ref(layout.write_manifest(manifest), tag)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs" / "sha256").iterdir())


def test_round_trip(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    entry = _image(layout)
    reopened = OciLayout.open(tmp_path / "img")
    assert reopened.resolve("latest") == entry
    assert reopened.resolve() == entry
    manifest = reopened.read_manifest(entry)
    config = reopened.read_config(manifest.config)
    assert config.diff_ids == (sha256_digest(b"L"),)
    assert b"".join(reopened.iter_blob(manifest.layers[0])) == b"L"
    assert entry.annotations[REF_NAME] == "latest"


def test_set_ref_replaces_same_tag(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    _image(layout)
    blob = layout.write_bytes(b"{}", media.OCI_CONFIG)
    layout.set_ref(Descriptor(media_type=media.OCI_MANIFEST, digest=blob.digest, size=blob.size), "latest")
    assert len(layout.read_index().manifests) == 1
    with pytest.raises(UsageError):
        layout.resolve("other")


def test_rejects_flipped_blob_byte(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    desc = layout.write_bytes(b"hello world", media.OCI_LAYER_TAR)
    layout.blob_path(desc.digest).write_bytes(b"hello World")
    with pytest.raises(FormatError, match="digest"):
        layout.verify_blob(desc)


def test_rejects_truncated_blob(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    desc = layout.write_bytes(b"hello world", media.OCI_LAYER_TAR)
    layout.blob_path(desc.digest).write_bytes(b"hello")
    with pytest.raises(FormatError, match="truncated"):
        layout.verify_blob(desc)


def test_rejects_overlong_blob_without_reading_it_all(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    desc = layout.write_bytes(b"abc", media.OCI_LAYER_TAR)
    layout.blob_path(desc.digest).write_bytes(b"abc" + b"x" * 10_000_000)
    with pytest.raises(FormatError, match="longer"):
        layout.verify_blob(desc)


def test_rejects_missing_blob_and_oversized_manifest_descriptor(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    with pytest.raises(FormatError, match="missing"):
        layout.verify_blob(Descriptor(media_type=media.OCI_LAYER_TAR, digest="sha256:" + "0" * 64, size=1))
    huge = Descriptor(media_type=media.OCI_MANIFEST, digest="sha256:" + "0" * 64, size=5 * 1024 * 1024)
    with pytest.raises(FormatError, match="limit"):
        layout.read_manifest(huge)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "img")
    expected = Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"right"), size=5)
    with pytest.raises(FormatError):
        layout.write_blob([b"wrong"], media.OCI_LAYER_TAR, expected=expected)
    with pytest.raises(FormatError):
        layout.write_blob([b"right", b"extra"], media.OCI_LAYER_TAR, expected=expected)

    def failing() -> list[bytes]:
        raise OSError("source went away")

    with pytest.raises(OSError, match="went away"):
        layout.write_blob((chunk for chunk in failing()), media.OCI_LAYER_TAR)
    assert _leftovers(tmp_path / "img") == []
    assert layout.write_blob([b"ri", b"ght"], media.OCI_LAYER_TAR, expected=expected) == expected


def test_open_refuses_non_layout(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        OciLayout.open(tmp_path)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(FormatError):
        OciLayout.open(tmp_path)


def test_create_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(UsageError):
        OciLayout.create(tmp_path)


def test_staged_layout_appears_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out"

    def interrupted() -> None:
        with staged_layout(dest) as layout:
            _image(layout)
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        interrupted()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with staged_layout(dest) as layout:
        entry = _image(layout)
    assert OciLayout.open(dest).resolve("latest") == entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
