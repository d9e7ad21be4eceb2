"""OCI image layout directories: read and write, every blob checked against its digest and size.

A layout is ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` and
``blobs/sha256/<hex>``. Reads stream in chunks and check size and digest as they go; a blob is only
trusted once the last chunk has been checked, so callers that act on content before the end must
spool it (see :meth:`OciLayout.iter_blob`). Writes go to a temporary file in the blob directory,
are fsynced and renamed into place only when digest and size match: a failed write leaves nothing.
:func:`staged_layout` extends that to a whole new layout, which appears at its destination only
when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from coffer.errors import FormatError, UsageError
from coffer.image import media
from coffer.image.models import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    check_digest,
    load_json_object,
    parse_annotations,
    read_config_with,
    read_index_with,
    read_manifest_with,
)

LAYOUT_FILE: Final = "oci-layout"
INDEX_FILE: Final = "index.json"
LAYOUT_VERSION: Final = "1.0.0"
REF_NAME: Final = "org.opencontainers.image.ref.name"
CHUNK: Final = 1024 * 1024
MAX_LAYOUT_INDEX_BYTES: Final = 4 * 1024 * 1024
_ATTACHMENT_TAG: Final = re.compile(r"sha256-[0-9a-f]{64}\.(?:sig|att|sbom)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` through a fsynced temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class BlobWriter:
    """Streams one blob into a layout; :meth:`commit` checks it and moves it into place.

    Leaving the ``with`` block without a successful commit removes the temporary file.
    """

    def __init__(self, layout: OciLayout) -> None:
        self._layout = layout
        self._hash = hashlib.sha256()
        self._size = 0
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=layout.blob_dir)
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, chunk: bytes | memoryview) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    @property
    def size(self) -> int:
        return self._size

    def commit(
        self,
        media_type: str,
        *,
        expected: Descriptor | None = None,
        annotations: dict[str, str] | None = None,
    ) -> Descriptor:
        """Finish the blob; with ``expected``, refuse it unless digest and size match."""
        digest = "sha256:" + self._hash.hexdigest()
        try:
            if expected is not None:
                if self._size != expected.size:
                    raise FormatError(
                        f"blob {expected.digest}",
                        f"wrote {self._size} bytes, descriptor says {expected.size}",
                    )
                if digest != expected.digest:
                    raise FormatError(f"blob {expected.digest}", f"content has digest {digest}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._layout.blob_dir / digest.split(":", 1)[1])
            _fsync_dir(self._layout.blob_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        if expected is not None:
            return expected
        return Descriptor(
            media_type=media_type,
            digest=digest,
            size=self._size,
            annotations=parse_annotations(annotations, "blob descriptor"),
        )

    def final_path(self, digest: str) -> Path:
        """Where a committed blob of ``digest`` lives."""
        return self._layout.blob_path(digest)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class OciLayout:
    """An OCI image layout directory. Use :meth:`open` for an existing one, :meth:`create` for a new one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path) -> OciLayout:
        """Open an existing layout, checking its ``oci-layout`` marker."""
        marker = root / LAYOUT_FILE
        try:
            data = marker.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"{root} is not an OCI image layout (no {LAYOUT_FILE} file)") from None
        except OSError as exc:
            raise UsageError(f"cannot read {marker}: {exc.strerror}") from exc
        obj = load_json_object(data, LAYOUT_FILE, 4096)
        if obj.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise FormatError(
                LAYOUT_FILE, f"imageLayoutVersion {obj.get('imageLayoutVersion')!r} is not 1.0.0"
            )
        return cls(root)

    @classmethod
    def create(cls, root: Path) -> OciLayout:
        """Create an empty layout at ``root``, which must not exist or be an empty directory."""
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise UsageError(f"{root} already exists and is not empty")
        layout = cls(root)
        layout.blob_dir.mkdir(parents=True)
        atomic_write(root / LAYOUT_FILE, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        layout.write_index(Index(media_type=media.OCI_INDEX, manifests=()))
        return layout

    # -- index -----------------------------------------------------------------------------------

    def read_index(self) -> Index:
        path = self.root / INDEX_FILE
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_LAYOUT_INDEX_BYTES + 1)
        except FileNotFoundError:
            raise FormatError("OCI layout", f"{INDEX_FILE} is missing") from None
        return Index.parse(data, what=f"{INDEX_FILE}")

    def write_index(self, index: Index) -> None:
        atomic_write(self.root / INDEX_FILE, index.to_bytes())

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The index entry named ``tag`` (``ref.name`` annotation), or the only entry if ``tag`` is None."""
        entries = self.read_index().manifests
        if tag is None:
            # Signatures stored beside the image (cosign's sha256-<hex>.sig tags) are not images.
            entries = tuple(
                e for e in entries if not _ATTACHMENT_TAG.fullmatch(e.annotations.get(REF_NAME, ""))
            )
            if len(entries) != 1:
                raise UsageError(
                    f"{self.root} holds {len(entries)} images; name one with oci:{self.root}:TAG"
                )
            return entries[0]
        found = [entry for entry in entries if entry.annotations.get(REF_NAME) == tag]
        if not found:
            raise UsageError(f"no image named {tag!r} in {self.root}")
        if len(found) > 1:
            raise FormatError(INDEX_FILE, f"{len(found)} entries are named {tag!r}")
        return found[0]

    def set_ref(self, descriptor: Descriptor, tag: str | None) -> Descriptor:
        """Add ``descriptor`` to the index under ``tag``, replacing any entry of that name."""
        annotations = dict(descriptor.annotations)
        if tag is not None:
            annotations[REF_NAME] = tag
        entry = replace(descriptor, annotations=parse_annotations(annotations, INDEX_FILE))
        index = self.read_index()
        kept = tuple(e for e in index.manifests if tag is None or e.annotations.get(REF_NAME) != tag)
        self.write_index(
            Index(media_type=media.OCI_INDEX, manifests=(*kept, entry), annotations=index.annotations)
        )
        return entry

    # -- blobs -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        check_digest(digest, "blob digest")
        return self.blob_dir / digest.split(":", 1)[1]

    def has_blob(self, descriptor: Descriptor) -> bool:
        try:
            return self.blob_path(descriptor.digest).stat().st_size == descriptor.size
        except FileNotFoundError:
            return False

    def iter_blob(self, descriptor: Descriptor, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yield the blob in chunks; raise :class:`FormatError` on a size or digest mismatch.

        The check on the digest happens after the last chunk: content is trusted only once the
        iterator has been exhausted without an error.
        """
        what = f"blob {descriptor.digest}"
        path = self.blob_path(descriptor.digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FormatError(what, "missing from the layout") from None
        except OSError as exc:
            raise FormatError(what, f"cannot open: {exc.strerror}") from exc
        hasher = hashlib.sha256()
        seen = 0
        with os.fdopen(fd, "rb") as handle:
            while True:
                chunk = handle.read(min(chunk_size, descriptor.size - seen + 1))
                if not chunk:
                    break
                seen += len(chunk)
                if seen > descriptor.size:
                    raise FormatError(what, f"longer than the {descriptor.size} bytes its descriptor says")
                hasher.update(chunk)
                yield chunk
        if seen != descriptor.size:
            raise FormatError(what, f"truncated: {seen} of {descriptor.size} bytes")
        actual = "sha256:" + hasher.hexdigest()
        if actual != descriptor.digest:
            raise FormatError(what, f"content has digest {actual}")

    def verify_blob(self, descriptor: Descriptor) -> None:
        for _ in self.iter_blob(descriptor):
            pass

    def read_blob(self, descriptor: Descriptor, limit: int) -> bytes:
        """Read a small blob whole (manifests, configs), refusing descriptors over ``limit`` bytes."""
        if descriptor.size > limit:
            raise FormatError(
                f"blob {descriptor.digest}", f"{descriptor.size} bytes exceeds the limit of {limit}"
            )
        return b"".join(self.iter_blob(descriptor))

    def read_manifest(self, descriptor: Descriptor) -> Manifest:
        return read_manifest_with(descriptor, self.read_blob)

    def read_nested_index(self, descriptor: Descriptor) -> Index:
        return read_index_with(descriptor, self.read_blob)

    def read_config(self, descriptor: Descriptor) -> ImageConfig:
        return read_config_with(descriptor, self.read_blob)

    def blob_writer(self) -> BlobWriter:
        return BlobWriter(self)

    def write_blob(
        self, chunks: Iterable[bytes], media_type: str, *, expected: Descriptor | None = None
    ) -> Descriptor:
        """Stream ``chunks`` into the layout; with ``expected``, refuse a digest or size mismatch."""
        with self.blob_writer() as writer:
            for chunk in chunks:
                writer.write(chunk)
                if expected is not None and writer.size > expected.size:
                    raise FormatError(f"blob {expected.digest}", f"longer than {expected.size} bytes")
            return writer.commit(media_type, expected=expected)

    def write_bytes(self, data: bytes, media_type: str) -> Descriptor:
        return self.write_blob([data], media_type)

    def write_manifest(self, manifest: Manifest) -> Descriptor:
        data = manifest.raw or manifest.to_bytes()
        return self.write_bytes(data, manifest.media_type)


@contextlib.contextmanager
def staged_layout(destination: Path) -> Iterator[OciLayout]:
    """Build a new layout next to ``destination`` and move it there only if the block succeeds.

    ``destination`` must not exist (or be an empty directory). On any error the staging directory
    is removed and ``destination`` is left as it was.
    """
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UsageError(f"{destination} already exists and is not empty")
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.staging-", dir=parent))
    try:
        layout = OciLayout.create(staging)
        yield layout
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
        _fsync_dir(parent)
        layout.root = destination
        layout.blob_dir = destination / "blobs" / "sha256"
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
