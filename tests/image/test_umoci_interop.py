"""Interop: umoci and Coffer unpack the same Coffer-written OCI layout to the same tree."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import Manifest
from coffer.image.unpack import LayerCompression, unpack_image
from tests.image.tarbuild import Entry, build_tar, d, f, hard, sym

UMOCI = shutil.which("umoci")

pytestmark = pytest.mark.skipif(UMOCI is None, reason="umoci is not installed (apt-get install umoci)")

LAYERS = [
    [
        d("bin"),
        f("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755),
        sym("bin/alias", "tool"),
        hard("bin/tool-hard", "bin/tool"),
        d("etc"),
        f("etc/config", b"a=1\n", mode=0o600),
        f("etc/old", b"old"),
        d("etc/sub"),
        f("etc/sub/x", b"x"),
        sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
        d("var", mode=0o1777),
        d("gone"),
        f("gone/file", b"g"),
        Entry("owned", "file", b"o", uid=1000, gid=1000),
        f("su", b"s", mode=0o4755),
    ],
    [
        f("etc/.wh.old", b""),
        f(".wh.gone", b""),
        f("bin/tool", b"#!/bin/sh\necho upgraded\n", mode=0o755),
        d("etc/sub"),
        f("etc/sub/.wh..wh..opq", b""),
        f("etc/sub/y", b"y"),
        d("ro", mode=0o555),
        f("ro/file", b"r"),
    ],
]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    result: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            content: bytes | str | None = None
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = full.read_bytes()
            mode = st.st_mode if not stat.S_ISLNK(st.st_mode) else stat.S_IFLNK
            result[str(full.relative_to(root))] = (mode, st.st_uid, st.st_gid, content)
    return result


def _opener(data: bytes) -> Callable[[], contextlib.AbstractContextManager[IO[bytes]]]:
    @contextlib.contextmanager
    def open_() -> Iterator[IO[bytes]]:
        yield io.BytesIO(data)

    return open_


def _build_layout(root: Path) -> list[bytes]:
    layout = OciLayout.create(root)
    tars = [build_tar(entries) for entries in LAYERS]
    blobs = [gzip.compress(tar, mtime=0) for tar in tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
        "history": [{"created_by": "coffer test"} for _ in tars],
    }
    config_desc = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    layer_descs = tuple(layout.write_bytes(blob, media.OCI_LAYER_GZIP) for blob in blobs)
    manifest = Manifest(media_type=media.OCI_MANIFEST, config=config_desc, layers=layer_descs)
    layout.set_ref(layout.write_manifest(manifest), "latest")
    return blobs


@pytest.mark.skipif(os.geteuid() != 0, reason="umoci keeps ownership only as root; compare as root")
def test_umoci_and_coffer_unpack_to_the_same_tree(tmp_path: Path) -> None:
    assert UMOCI is not None
    blobs = _build_layout(tmp_path / "layout")
    bundle = tmp_path / "bundle"
    subprocess.run(
        [UMOCI, "unpack", "--image", f"{tmp_path / 'layout'}:latest", str(bundle)],
        check=True,
        capture_output=True,
    )
    ours = tmp_path / "ours"
    plan: list[tuple[Callable[[], contextlib.AbstractContextManager[IO[bytes]]], LayerCompression]] = [
        (_opener(blob), "gzip") for blob in blobs
    ]
    unpack_image(ours, plan)
    theirs = _snapshot(bundle / "rootfs")
    mine = _snapshot(ours)
    assert sorted(mine) == sorted(theirs)
    for path in sorted(mine):
        assert mine[path] == theirs[path], path
