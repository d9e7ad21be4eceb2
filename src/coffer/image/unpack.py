"""Root-confined unpacking of OCI layer tarballs.

Layers are applied in order onto one directory, with the OCI changeset rules: ``.wh.NAME`` removes
``NAME`` from lower layers, ``.wh..wh..opq`` empties its directory of lower-layer content; hard links,
symbolic links, FIFOs, permissions, modification times and (when running as root) ownership are
reproduced.

Every filesystem operation goes through directory file descriptors opened component by component
with ``O_NOFOLLOW``, so nothing is ever written through a symbolic link and nothing can land outside
the target, whatever the archive holds. On top of that the archive itself is refused
(:class:`UnsafeArchiveError`) when an entry:

* has an absolute name, or a ``..`` component, or a NUL byte;
* would be written below a symbolic link (``symlink-then-write``);
* is a symbolic link whose relative target climbs out of the root, or has a ``..`` after a name
  (the start of a chain such as ``x -> ..``, ``y -> x/..``), or, when
  :attr:`UnpackLimits.allow_absolute_symlinks` is off, any absolute target;
* is a hard link to something outside the root or to a directory;
* is a character or block device;
* exceeds the entry count, per-file size, total size or path length limits.

Symbolic links are kept verbatim: an absolute target means the image's root, as it does inside the
container (the agent mounts the tree as the container's root).

:func:`unpack_image` unpacks into a staging directory beside the destination and renames it into
place only when every layer succeeded, so a refused image leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import hmac
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal, cast

from coffer.errors import FormatError, UnsupportedError, UsageError

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_WHITEOUT: Final = ".wh..wh..opq"
GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
COPY_CHUNK: Final = 1024 * 1024

LayerCompression = Literal["auto", "none", "gzip", "zstd"]


class UnsafeArchiveError(FormatError):
    """A layer archive tried to escape its root, create a device, or exceed a limit."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        super().__init__("layer archive", f"entry {entry[:200]!r}: {reason}")


@dataclass(frozen=True, kw_only=True)
class UnpackLimits:
    """Ceilings on what one image may unpack (all layers together)."""

    max_entries: int = 2_000_000
    max_total_bytes: int = 64 * 1024**3
    max_file_bytes: int = 16 * 1024**3
    max_path_bytes: int = 4096
    max_depth: int = 256
    allow_absolute_symlinks: bool = True


@dataclass(kw_only=True)
class UnpackStats:
    """Counters of one unpack."""

    entries: int = 0
    bytes_written: int = 0
    layers: int = 0
    whiteouts: int = 0


@dataclass(frozen=True)
class _DirMeta:
    parts: tuple[str, ...]
    mode: int
    mtime: float
    uid: int
    gid: int


@dataclass
class _LayerState:
    created: set[tuple[str, ...]] = field(default_factory=set)
    dirs: list[_DirMeta] = field(default_factory=list)


def _normalise(name: str, what: str) -> tuple[str, ...]:
    """Split an entry name into components, refusing anything that is not a plain relative path."""
    if "\x00" in name:
        raise UnsafeArchiveError(name, f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchiveError(name, f"{what} is absolute")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(name, f"{what} has a '..' component")
    return parts


def _symlink_escapes(parent: tuple[str, ...], target: str) -> str | None:
    """Why a relative ``target`` read from directory ``parent`` could leave the root, or None.

    Only leading ``..`` components are accepted, and no more of them than ``parent`` is deep. The
    directories holding a link are real (nothing is written through a link), so its leading ``..``
    climb real parents; once the path descends, a later ``..`` could climb out of a directory some
    other link leads to (``x -> ..`` then ``y -> x/..``), so it is refused.
    """
    if target.startswith("/"):
        return None
    climbing = True
    depth = len(parent)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not climbing:
                return "has a '..' after a name, which could climb out through another link"
            depth -= 1
            if depth < 0:
                return "climbs out of the root"
        else:
            climbing = False
    return None


class _Root:
    """Confined operations below one directory file descriptor."""

    def __init__(self, path: Path, limits: UnpackLimits, *, owner: bool) -> None:
        self.path = path
        self.limits = limits
        self.owner = owner
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.stats = UnpackStats()

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, parts: tuple[str, ...], entry: str, *, create: bool) -> int:
        """Open directory ``parts`` below the root without following any symbolic link."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(
                        part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(
                        part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISLNK(st.st_mode):
                            raise UnsafeArchiveError(
                                entry, "would be written through a symbolic link"
                            ) from None
                        raise FormatError(
                            "layer archive", f"entry {entry!r}: a parent is not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def remove(name: str, dir_fd: int) -> None:
        """Remove ``name`` (file, link or whole directory) from ``dir_fd`` if it exists."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def apply_meta(self, name: str, dir_fd: int, member: tarfile.TarInfo, *, is_link: bool) -> None:
        if self.owner:
            os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        if not is_link:
            mode = member.mode & 0o7777
            if not self.owner:
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
            os.chmod(name, mode, dir_fd=dir_fd)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)


def _open_layer(stream: IO[bytes], compression: LayerCompression) -> IO[bytes]:
    if compression == "auto":
        peek = stream.read(4)
        rest: IO[bytes] = io.BufferedReader(_Prefixed(peek, stream))
        if peek.startswith(GZIP_MAGIC):
            compression = "gzip"
        elif peek.startswith(ZSTD_MAGIC):
            compression = "zstd"
        else:
            compression = "none"
        stream = rest
    if compression == "gzip":
        return cast("IO[bytes]", gzip.GzipFile(fileobj=stream, mode="rb"))
    if compression == "zstd":
        raise UnsupportedError("zstd-compressed layers are not supported yet")
    return stream


class _Hashing(io.RawIOBase):
    """Passes a (decompressed) layer stream through, hashing it: the layer's diff_id."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        self.hasher.update(data)
        buffer[: len(data)] = data
        return len(data)


class _Prefixed(io.RawIOBase):
    """A read-only stream that yields ``prefix`` and then the rest of ``inner``."""

    def __init__(self, prefix: bytes, inner: IO[bytes]) -> None:
        self._prefix = prefix
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def unpack_layer(
    root_path: Path,
    stream: IO[bytes],
    *,
    compression: LayerCompression = "auto",
    limits: UnpackLimits | None = None,
    preserve_owner: bool | None = None,
    stats: UnpackStats | None = None,
    diff_id: str | None = None,
) -> UnpackStats:
    """Apply one layer tarball onto the existing directory ``root_path``.

    ``preserve_owner`` defaults to "running as root". With ``diff_id``, the uncompressed tar stream
    must have that digest (checked after the last byte, so a mismatch fails the whole unpack). On
    error the directory may hold part of the layer (never anything outside it); :func:`unpack_image`
    cleans up.
    """
    limits = limits or UnpackLimits()
    owner = os.geteuid() == 0 if preserve_owner is None else preserve_owner
    root = _Root(root_path, limits, owner=owner)
    if stats is not None:
        root.stats = stats
    state = _LayerState()
    try:
        try:
            hashing = _Hashing(_open_layer(stream, compression))
            tar_stream = io.BufferedReader(hashing, buffer_size=1024 * 1024)
            with tarfile.open(fileobj=tar_stream, mode="r|") as archive:
                for member in archive:
                    _apply(root, state, archive, member)
            if diff_id is not None:
                # The end-of-archive blocks and any padding after them belong to the diff_id too.
                while tar_stream.read(1024 * 1024):
                    pass
                actual = "sha256:" + hashing.hasher.hexdigest()
                if not hmac.compare_digest(actual, diff_id):
                    raise FormatError("layer archive", f"uncompressed digest {actual} differs from the "
                                      f"config's diff_id {diff_id}")
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise FormatError("layer archive", f"not a valid tar stream: {exc}") from exc
        for meta in reversed(state.dirs):
            _finish_dir(root, meta)
        root.stats.layers += 1
        return root.stats
    finally:
        root.close()


def _check_limits(root: _Root, member: tarfile.TarInfo) -> None:
    limits = root.limits
    stats = root.stats
    stats.entries += 1
    if stats.entries > limits.max_entries:
        raise UnsafeArchiveError(member.name, f"more than {limits.max_entries} entries")
    if len(member.name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise UnsafeArchiveError(member.name, f"path longer than {limits.max_path_bytes} bytes")
    if member.isreg():
        if member.size > limits.max_file_bytes:
            raise UnsafeArchiveError(member.name, f"file of {member.size} bytes over {limits.max_file_bytes}")
        if stats.bytes_written + member.size > limits.max_total_bytes:
            raise UnsafeArchiveError(member.name, f"image content over {limits.max_total_bytes} bytes")


def _apply(root: _Root, state: _LayerState, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    _check_limits(root, member)
    parts = _normalise(member.name, "name")
    if not parts:
        if member.isdir():
            return  # "./" itself: the root keeps its own metadata
        raise UnsafeArchiveError(member.name, "empty name")
    if len(parts) > root.limits.max_depth:
        raise UnsafeArchiveError(member.name, f"deeper than {root.limits.max_depth} levels")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(member.name, "device nodes are refused")
    parent, base = parts[:-1], parts[-1]
    if base.startswith(WHITEOUT_PREFIX):
        _whiteout(root, state, member, parent, base)
        return
    fd = root.open_dir(parent, member.name, create=True)
    try:
        _create(root, state, archive, member, fd=fd, parts=parts)
    finally:
        os.close(fd)
    state.created.add(parts)


def _whiteout(
    root: _Root, state: _LayerState, member: tarfile.TarInfo, parent: tuple[str, ...], base: str
) -> None:
    if not (member.isreg() or member.isdir()) or (member.isreg() and member.size != 0):
        raise FormatError("layer archive", f"whiteout {member.name!r} is not an empty file")
    root.stats.whiteouts += 1
    try:
        fd = root.open_dir(parent, member.name, create=base == OPAQUE_WHITEOUT)
    except FileNotFoundError:
        return  # whiting out below a directory that does not exist: nothing to remove
    try:
        if base == OPAQUE_WHITEOUT:
            for name in os.listdir(fd):
                if (*parent, name) not in state.created:
                    root.remove(name, fd)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if not target or target in (".", "..") or target.startswith(WHITEOUT_PREFIX):
            raise UnsafeArchiveError(member.name, "malformed whiteout name")
        if (*parent, target) not in state.created:
            root.remove(target, fd)
    finally:
        os.close(fd)


def _create(
    root: _Root,
    state: _LayerState,
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    *,
    fd: int,
    parts: tuple[str, ...],
) -> None:
    name = parts[-1]
    if member.isdir():
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                root.remove(name, fd)
                os.mkdir(name, 0o700, dir_fd=fd)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=fd)
        # Final permissions later, so a read-only directory does not block its own content.
        state.dirs.append(_DirMeta(parts, member.mode & 0o7777, member.mtime, member.uid, member.gid))
        return
    if member.issym():
        target = member.linkname
        if "\x00" in target or not target:
            raise UnsafeArchiveError(member.name, "symbolic link with an empty or NUL target")
        if target.startswith("/") and not root.limits.allow_absolute_symlinks:
            raise UnsafeArchiveError(member.name, "symbolic link with an absolute target")
        escape = _symlink_escapes(parts[:-1], target)
        if escape is not None:
            raise UnsafeArchiveError(member.name, f"symbolic link target {target[:200]!r} {escape}")
        root.remove(name, fd)
        os.symlink(target, name, dir_fd=fd)
        root.apply_meta(name, fd, member, is_link=True)
        return
    if member.islnk():
        link_parts = _normalise(member.linkname, "hard link target")
        if not link_parts:
            raise UnsafeArchiveError(member.name, "hard link to the root")
        if link_parts == parts:
            raise UnsafeArchiveError(member.name, "hard link to itself")
        src_fd = root.open_dir(link_parts[:-1], member.name, create=False)
        try:
            try:
                st = os.stat(link_parts[-1], dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise FormatError("layer archive", f"hard link {member.name!r} to a missing entry") from None
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(member.name, "hard link to a directory")
            root.remove(name, fd)
            os.link(link_parts[-1], name, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(src_fd)
        return
    if member.isfifo():
        root.remove(name, fd)
        os.mkfifo(name, 0o600, dir_fd=fd)
        root.apply_meta(name, fd, member, is_link=False)
        return
    if member.isreg():
        root.remove(name, fd)
        out = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd
        )
        with os.fdopen(out, "wb") as handle:
            source = archive.extractfile(member)
            if source is None:
                raise FormatError("layer archive", f"entry {member.name!r} has no data")
            remaining = member.size
            while remaining > 0:
                chunk = source.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise FormatError("layer archive", f"entry {member.name!r} is truncated")
                handle.write(chunk)
                remaining -= len(chunk)
        root.stats.bytes_written += member.size
        root.apply_meta(name, fd, member, is_link=False)
        return
    raise FormatError("layer archive", f"entry {member.name!r} has unsupported type {member.type!r}")


def _finish_dir(root: _Root, meta: _DirMeta) -> None:
    try:
        fd = root.open_dir(meta.parts[:-1], "/".join(meta.parts), create=False)
    except (FileNotFoundError, UnsafeArchiveError):
        return  # removed or replaced later in the same layer
    try:
        try:
            st = os.stat(meta.parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        info = tarfile.TarInfo(meta.parts[-1])
        info.mode, info.mtime, info.uid, info.gid = meta.mode, int(meta.mtime), meta.uid, meta.gid
        root.apply_meta(meta.parts[-1], fd, info, is_link=False)
    finally:
        os.close(fd)


LayerOpener = Callable[[], contextlib.AbstractContextManager[IO[bytes]]]


def unpack_image(
    destination: Path,
    layers: Iterable[tuple[LayerOpener, LayerCompression]],
    *,
    limits: UnpackLimits | None = None,
    preserve_owner: bool | None = None,
    diff_ids: Sequence[str] | None = None,
) -> UnpackStats:
    """Unpack ``layers`` (bottom first) into ``destination``, which must not exist or be empty.

    Each layer is given as a function opening its (already verified, already decrypted) blob stream
    and its compression; ``diff_ids`` (the config's) are then checked layer by layer. On any error
    nothing is left at ``destination``.
    """
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UsageError(f"{destination} already exists and is not empty")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.unpack-", dir=destination.parent))
    stats = UnpackStats()
    try:
        for position, (opener, compression) in enumerate(layers):
            if diff_ids is not None and position >= len(diff_ids):
                raise FormatError("image config", "fewer diff_ids than layers")
            with opener() as stream:
                unpack_layer(
                    staging,
                    stream,
                    compression=compression,
                    limits=limits,
                    preserve_owner=preserve_owner,
                    stats=stats,
                    diff_id=None if diff_ids is None else diff_ids[position],
                )
        os.chmod(staging, 0o755)  # noqa: S103 - an image root is world-readable, like /
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
    except BaseException:
        _force_rmtree(staging)
        raise
    return stats


def _force_rmtree(path: Path) -> None:
    """Remove a staging tree even where the archive made directories read-only."""
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)
