"""Build layer tarballs entry by entry for the image tests."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One tar entry: ``kind`` is file, dir, sym, link, chr, blk or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int | None = None  # a lying header size (the data is still ``data``)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def build_tar(entries: list[Entry], *, gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _TYPES[entry.kind]
            info.mode = entry.mode if entry.kind != "dir" or entry.mode != 0o644 else 0o755
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = 1_600_000_000
            if entry.kind in ("sym", "link"):
                info.linkname = entry.target
            if entry.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            if entry.kind == "file" and entry.size is not None:
                # A header claiming more data than follows: written raw, tarfile would pad it out.
                info.size = entry.size
                archive.fileobj.write(info.tobuf(tarfile.PAX_FORMAT) + entry.data.ljust(512, b"\0"))
                archive.offset += 512 * ((len(info.tobuf(tarfile.PAX_FORMAT)) + 512) // 512)
            elif entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def f(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    return Entry(name, "file", data, mode=mode)


def d(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, "dir", mode=mode)


def sym(name: str, target: str) -> Entry:
    return Entry(name, "sym", target=target, mode=0o777)


def hard(name: str, target: str) -> Entry:
    return Entry(name, "link", target=target)
