"""Root-confined layer unpacking: OCI changeset semantics and a table of hostile tarballs."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from coffer.errors import FormatError, UnsupportedError, UsageError
from coffer.image.unpack import (
    LayerCompression,
    UnpackLimits,
    UnsafeArchiveError,
    unpack_image,
    unpack_layer,
)
from tests.image.tarbuild import Entry, build_tar, d, f, hard, sym


def _opener(data: bytes) -> Callable[[], contextlib.AbstractContextManager[IO[bytes]]]:
    @contextlib.contextmanager
    def open_() -> Iterator[IO[bytes]]:
        yield io.BytesIO(data)

    return open_


def _unpack(
    dest: Path, *layers: bytes, limits: UnpackLimits | None = None, owner: bool | None = None
) -> None:
    plan: list[tuple[Callable[[], contextlib.AbstractContextManager[IO[bytes]]], LayerCompression]] = [
        (_opener(layer), "auto") for layer in layers
    ]
    unpack_image(dest, plan, limits=limits, preserve_owner=owner)


def _snapshot(path: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Everything under ``path``: mode and content (file bytes or link target)."""
    result: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            content: bytes | str | None = None
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = full.read_bytes()
            result[str(full.relative_to(path))] = (st.st_mode, content)
    return result


# -- OCI changeset semantics ---------------------------------------------------------------------


def test_unpacks_files_dirs_links_and_modes(tmp_path: Path) -> None:
    layer = build_tar(
        [
            d("bin"),
            f("bin/tool", b"#!/bin/sh\n", mode=0o755),
            sym("bin/alias", "tool"),
            sym("etc-link", "/etc"),
            hard("bin/tool2", "bin/tool"),
            d("ro", mode=0o555),
            f("ro/inside", b"kept"),
            Entry("pipe", "fifo", mode=0o600),
            f("deep/implicit/parent", b"p"),
        ],
        gz=True,
    )
    dest = tmp_path / "root"
    _unpack(dest, layer)
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == 0o755
    assert os.readlink(dest / "bin/alias") == "tool"
    assert os.readlink(dest / "etc-link") == "/etc"
    assert (dest / "bin/tool").stat().st_ino == (dest / "bin/tool2").stat().st_ino
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro/inside").read_bytes() == b"kept"
    assert stat.S_ISFIFO((dest / "pipe").lstat().st_mode)
    assert (dest / "deep/implicit/parent").read_bytes() == b"p"


def test_whiteout_removes_lower_layer_entries(tmp_path: Path) -> None:
    lower = build_tar([d("a"), f("a/gone"), f("a/stays"), d("tree"), f("tree/x"), f("top")])
    upper = build_tar([f("a/.wh.gone", b""), f(".wh.tree", b""), f(".wh.missing", b"")])
    dest = tmp_path / "root"
    _unpack(dest, lower, upper)
    assert sorted(p.name for p in (dest / "a").iterdir()) == ["stays"]
    assert not (dest / "tree").exists()
    assert (dest / "top").exists()
    assert not any(p.name.startswith(".wh.") for p in dest.rglob("*"))


def test_opaque_whiteout_keeps_same_layer_entries(tmp_path: Path) -> None:
    lower = build_tar([d("etc"), f("etc/old"), d("etc/sub"), f("etc/sub/x")])
    upper = build_tar([d("etc"), f("etc/before", b"1"), f("etc/.wh..wh..opq", b""), f("etc/after", b"2")])
    dest = tmp_path / "root"
    _unpack(dest, lower, upper)
    assert sorted(p.name for p in (dest / "etc").iterdir()) == ["after", "before"]


def test_upper_layer_replaces_file_with_directory_and_back(tmp_path: Path) -> None:
    lower = build_tar([f("x", b"file"), d("y"), f("y/z")])
    upper = build_tar([d("x"), f("x/inner"), f("y", b"now a file")])
    dest = tmp_path / "root"
    _unpack(dest, lower, upper)
    assert (dest / "x/inner").exists()
    assert (dest / "y").read_bytes() == b"now a file"


def test_replacing_a_symlink_with_a_file_does_not_write_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    lower = build_tar([sym("victim", str(outside / "victim"))])
    upper = build_tar([f("victim", b"overwritten")])
    dest = tmp_path / "root"
    _unpack(dest, lower, upper)
    assert (dest / "victim").read_bytes() == b"overwritten"
    assert not (dest / "victim").is_symlink()
    assert (outside / "victim").read_bytes() == b"original"


def test_ownership_kept_when_running_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("ownership is only reproduced when running as root")
    dest = tmp_path / "root"
    _unpack(dest, build_tar([Entry("owned", "file", b"o", uid=1234, gid=4321)]))
    st = (dest / "owned").stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_setuid_dropped_without_ownership(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    _unpack(dest, build_tar([f("su", b"s", mode=0o4755)]), owner=False)
    assert stat.S_IMODE((dest / "su").stat().st_mode) == 0o755


def test_plain_layer_applied_in_place(tmp_path: Path) -> None:
    stats = unpack_layer(tmp_path, io.BytesIO(build_tar([f("a"), f("b", b"12345")])), compression="none")
    assert (stats.entries, stats.bytes_written, stats.layers) == (2, 6, 1)


def test_zstd_layer_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError):
        unpack_layer(tmp_path, io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\0" * 100))


def test_refuses_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x").write_bytes(b"")
    with pytest.raises(UsageError):
        _unpack(tmp_path / "root", build_tar([f("a")]))


# -- hostile tarballs ----------------------------------------------------------------------------

Case = Callable[[Path], tuple[list[bytes], UnpackLimits | None]]

SMALL = UnpackLimits(max_entries=5, max_total_bytes=100, max_file_bytes=50, max_path_bytes=64, max_depth=4)

HOSTILE: dict[str, Case] = {
    "dotdot_name": lambda o: ([build_tar([f("../escaped")])], None),
    "dotdot_inside_name": lambda o: ([build_tar([d("a"), f("a/../../escaped")])], None),
    "absolute_name": lambda o: ([build_tar([f(str(o / "escaped"))])], None),
    "symlink_climbing_out": lambda o: ([build_tar([d("a"), sym("a/up", "../../outside")])], None),
    "symlink_chain_out": lambda o: ([build_tar([d("d"), sym("d/x", ".."), sym("d/y", "x/..")])], None),
    "symlink_then_write": lambda o: ([build_tar([sym("s", str(o)), f("s/escaped")])], None),
    "symlink_then_write_next_layer": lambda o: (
        [build_tar([sym("s", str(o))]), build_tar([f("s/escaped")])],
        None,
    ),
    "symlink_then_mkdir": lambda o: ([build_tar([sym("s", str(o)), d("s/newdir")])], None),
    "symlink_then_opaque_whiteout": lambda o: (
        [build_tar([sym("s", str(o)), f("s/.wh..wh..opq", b"")])],
        None,
    ),
    "symlink_then_whiteout": lambda o: ([build_tar([sym("s", str(o)), f("s/.wh.sentinel", b"")])], None),
    "hardlink_out_relative": lambda o: ([build_tar([hard("h", "../outside/sentinel")])], None),
    "hardlink_out_absolute": lambda o: ([build_tar([hard("h", str(o / "sentinel"))])], None),
    "hardlink_through_symlink": lambda o: ([build_tar([sym("s", str(o)), hard("h", "s/sentinel")])], None),
    "absolute_symlink_when_forbidden": lambda o: (
        [build_tar([sym("s", "/etc/passwd")])],
        UnpackLimits(allow_absolute_symlinks=False),
    ),
    "whiteout_of_dotdot": lambda o: ([build_tar([f(".wh..", b"")])], None),
    "char_device": lambda o: ([build_tar([Entry("null", "chr")])], None),
    "block_device": lambda o: ([build_tar([Entry("sda", "blk")])], None),
    "too_many_entries": lambda o: ([build_tar([f(f"f{n}") for n in range(6)])], SMALL),
    "file_over_size_limit": lambda o: ([build_tar([f("big", b"x" * 51)])], SMALL),
    "total_over_size_limit": lambda o: (
        [build_tar([f("a", b"x" * 50), f("b", b"x" * 50), f("c", b"x")])],
        SMALL,
    ),
    "path_too_long": lambda o: ([build_tar([f("p" * 65)])], SMALL),
    "too_deep": lambda o: ([build_tar([f("a/b/c/d/e")])], SMALL),
    "lying_size_header": lambda o: ([build_tar([Entry("big", "file", b"x", size=10**12)])], None),
    "hardlink_to_directory": lambda o: ([build_tar([d("dir"), hard("h", "dir")])], None),
    "truncated_tar": lambda o: ([build_tar([f("a", b"x" * 2000)])[:1000]], None),
    "not_a_tar": lambda o: ([b"\x1f\x8b" + b"garbage" * 20], None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_rejects_hostile_tarball(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"untouched")
    before = _snapshot(tmp_path)
    layers, limits = HOSTILE[case](outside)
    dest = tmp_path / "root"
    with pytest.raises(FormatError):
        _unpack(dest, *layers, limits=limits)
    assert not dest.exists()
    assert _snapshot(tmp_path) == before, "something was written or removed outside the target"


def test_escape_attempts_raise_unsafe_archive_error(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    unsafe = [name for name in HOSTILE if not name.startswith(("truncated", "not_a"))]
    assert len(unsafe) >= 10
    for n, name in enumerate(unsafe):
        layers, limits = HOSTILE[name](outside)
        with pytest.raises(UnsafeArchiveError):
            _unpack(tmp_path / f"dest{n}", *layers, limits=limits)
