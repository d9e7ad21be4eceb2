"""One interface for every place an image can live: read from an :class:`ImageSource`, write to an
:class:`ImageDestination`.

Implementations: OCI layout directories (here), ``docker save`` archives
(:mod:`coffer.image.docker_archive`) and OCI distribution registries (:mod:`coffer.image.registry`).
:func:`coffer.image.locations.open_source` and ``open_destination`` pick one from a parsed reference.

Contract every implementation keeps:

* a source checks every blob it hands out against its descriptor's size and digest; a streamed blob
  is trusted only once its iterator is exhausted without an error (the last chunk carries the check),
  so callers that act on content spool it first;
* a destination makes nothing visible until :meth:`ImageDestination.commit`; :meth:`abort` (or
  leaving the ``with`` block on an error) removes what it staged. A registry cannot take back blobs
  it has received, but no manifest or tag is pushed before ``commit``, so nothing is reachable;
* manifests and configs are read whole under a size ceiling; layers are streamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from coffer.errors import FormatError
from coffer.image import media
from coffer.image.layout import (
    CHUNK,
    INDEX_FILE,
    REF_NAME,
    BlobWriter,
    OciLayout,
    atomic_write,
    staged_layout,
)
from coffer.image.models import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_annotations,
    read_config_with,
    read_index_with,
    read_manifest_with,
)
from coffer.image.reference import OciLayoutRef

# A progress callback: (what, bytes done so far, total or None). Called often; must be cheap.
Progress = Callable[[str, int, int | None], None]


def no_progress(what: str, done: int, total: int | None) -> None:
    """The default :data:`Progress`: report nothing."""


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """How to reach registries (ignored by local transports)."""

    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    insecure: bool = False
    timeout: float = 60.0

    def __repr__(self) -> str:  # never show the password
        return (
            f"TransportOptions(username={self.username!r}, password={'***' if self.password else None}, "
            f"ca_file={self.ca_file!r}, insecure={self.insecure}, timeout={self.timeout})"
        )


class ImageSource(ABC):
    """The read side of an image location."""

    #: What the user typed, for messages.
    name: str

    @abstractmethod
    def root(self) -> Descriptor:
        """The descriptor of the manifest or index the reference names."""

    @abstractmethod
    def resolve_tag(self, tag: str) -> Descriptor | None:
        """Another tag in the same repository or layout (cosign's ``sha256-<hex>.sig``); None if absent."""

    @abstractmethod
    def read_document(self, descriptor: Descriptor, limit: int) -> bytes:
        """A manifest, index or config, whole, checked against ``descriptor`` (refused over ``limit``)."""

    @abstractmethod
    def iter_blob(self, descriptor: Descriptor) -> Iterator[bytes]:
        """A blob in chunks; the size and digest check happens on the way (see the module docstring)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and temporary files."""

    # -- conveniences shared by every source ------------------------------------------------------

    def read_manifest(self, descriptor: Descriptor) -> Manifest:
        return read_manifest_with(descriptor, self.read_document)

    def read_index(self, descriptor: Descriptor) -> Index:
        return read_index_with(descriptor, self.read_document)

    def read_config(self, descriptor: Descriptor) -> ImageConfig:
        return read_config_with(descriptor, self.read_document)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlobSink(ABC):
    """A blob being written whose digest is known only at the end (an encrypted or decrypted layer).

    Bytes written are staged, never visible, until :meth:`commit`; leaving the ``with`` block without
    a commit discards them.
    """

    @abstractmethod
    def write(self, chunk: bytes | memoryview) -> None: ...

    @abstractmethod
    def commit(self, media_type: str) -> Descriptor:
        """Store the staged bytes as a blob of ``media_type`` and return its descriptor."""

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class _SpooledSink(BlobSink):
    """Stages into an anonymous temporary file, then hands it to :meth:`ImageDestination.put_blob`."""

    def __init__(self, destination: ImageDestination, tmpdir: Path | None) -> None:
        self._destination = destination
        self._file = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - closed by commit/abort
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    def commit(self, media_type: str) -> Descriptor:
        digest = "sha256:" + self._hash.hexdigest()
        expected = Descriptor(media_type=media_type, digest=digest, size=self._size)
        self._file.seek(0)
        try:
            return self._destination.put_blob(iter(lambda: self._file.read(CHUNK), b""), media_type,
                                               expected=expected)
        finally:
            self._file.close()

    def abort(self) -> None:
        self._file.close()


class ImageDestination(ABC):
    """The write side of an image location; see the module docstring for what ``commit`` means."""

    name: str
    #: The tag the reference names (None: the destination has no tag, e.g. an untagged layout).
    tag: str | None
    #: Whether blobs may carry ``+encrypted`` media types and annotations (a docker archive cannot).
    supports_encryption: bool = True
    #: Whether manifests other than the image's own can be stored under extra tags (signatures).
    supports_extra_tags: bool = True
    #: Whether a multi-platform index can be stored (else only the chosen platform's manifest is).
    supports_index: bool = True

    @abstractmethod
    def has_blob(self, descriptor: Descriptor) -> bool:
        """Whether a blob of this digest and size is already there (so it need not be sent)."""

    @abstractmethod
    def put_blob(
        self, chunks: Iterable[bytes], media_type: str, *, expected: Descriptor | None = None
    ) -> Descriptor:
        """Store a blob; with ``expected``, refuse it unless its digest and size match."""

    def blob_sink(self) -> BlobSink:
        """A sink for a blob whose digest is known only once written (spooled to a temporary file)."""
        return _SpooledSink(self, None)

    @abstractmethod
    def put_manifest(self, data: bytes, media_type: str, *, tag: str | None) -> Descriptor:
        """Store a manifest or index (its blobs must be stored first); ``tag`` names it when given.

        Use :attr:`tag` for the image itself; other tags are for signatures.
        """

    @abstractmethod
    def commit(self) -> None:
        """Make everything stored visible at once."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was staged; safe to call more than once and after ``commit`` (then a no-op)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


# --------------------------------------------------------------------------------------------------
# OCI layout directories


class OciLayoutSource(ImageSource):
    """``oci:PATH[:TAG]``."""

    def __init__(self, ref: OciLayoutRef) -> None:
        self.name = str(ref)
        self._ref = ref
        self.layout = OciLayout.open(ref.path)

    def root(self) -> Descriptor:
        return self.layout.resolve(self._ref.tag)

    def resolve_tag(self, tag: str) -> Descriptor | None:
        found = [e for e in self.layout.read_index().manifests if e.annotations.get(REF_NAME) == tag]
        if len(found) > 1:
            raise FormatError(INDEX_FILE, f"{len(found)} entries are named {tag!r}")
        return found[0] if found else None

    def read_document(self, descriptor: Descriptor, limit: int) -> bytes:
        return self.layout.read_blob(descriptor, limit)

    def iter_blob(self, descriptor: Descriptor) -> Iterator[bytes]:
        return self.layout.iter_blob(descriptor)


class OciLayoutDestination(ImageDestination):
    """``oci:PATH[:TAG]`` as a destination.

    A new directory is built beside ``PATH`` and renamed into place on commit. An existing layout
    gains the new blobs (each renamed into place only once checked, so a reader never sees a partial
    blob) and its ``index.json`` is replaced atomically on commit; on abort the new blobs are removed.
    """

    def __init__(self, ref: OciLayoutRef) -> None:
        self.name = str(ref)
        self.tag = ref.tag
        self._path = ref.path
        self._pending: list[tuple[Descriptor, str | None]] = []
        self._children: set[str] = set()
        self._added: list[Path] = []
        self._done = False
        self._stack = contextlib.ExitStack()
        # Blobs the layout already had: writing one again (same digest) must not make abort delete it.
        self._existing: frozenset[str] = frozenset()
        if ref.path.exists() and (ref.path / "oci-layout").exists():
            self._layout = OciLayout.open(ref.path)
            self._staged = False
            with contextlib.suppress(FileNotFoundError):
                self._existing = frozenset(os.listdir(self._layout.blob_dir))
        else:
            self._layout = self._stack.enter_context(staged_layout(ref.path))
            self._staged = True

    def has_blob(self, descriptor: Descriptor) -> bool:
        return self._layout.has_blob(descriptor)

    def put_blob(
        self, chunks: Iterable[bytes], media_type: str, *, expected: Descriptor | None = None
    ) -> Descriptor:
        if expected is not None and self._layout.has_blob(expected):
            for _ in chunks:  # drain the source so its digest check still runs
                pass
            return expected
        descriptor = self._layout.write_blob(chunks, media_type, expected=expected)
        self._added.append(self._layout.blob_path(descriptor.digest))
        return descriptor

    def blob_sink(self) -> BlobSink:
        return _LayoutSink(self._layout.blob_writer(), self._added)

    def put_manifest(self, data: bytes, media_type: str, *, tag: str | None) -> Descriptor:
        descriptor = self.put_blob([data], media_type)
        if media_type in media.INDEX_TYPES:
            # The manifests an index lists live in blobs only: index.json names images, not parts.
            self._children.update(e.digest for e in Index.parse(data, media_type=media_type).manifests)
        self._pending.append((descriptor, tag))
        return descriptor

    def commit(self) -> None:
        if self._done:
            return
        index = self._layout.read_index()
        entries = list(index.manifests)
        for descriptor, tag in self._pending:
            if tag is None and (descriptor.digest in self._children
                                or any(e.digest == descriptor.digest for e in entries)):
                continue
            annotations = dict(descriptor.annotations)
            if tag is not None:
                annotations[REF_NAME] = tag
                entries = [e for e in entries if e.annotations.get(REF_NAME) != tag]
            entries.append(
                Descriptor(media_type=descriptor.media_type, digest=descriptor.digest, size=descriptor.size,
                           annotations=parse_annotations(annotations, INDEX_FILE))
            )
        new_index = Index(media_type=media.OCI_INDEX, manifests=tuple(entries), annotations=index.annotations)
        if self._staged:
            self._layout.write_index(new_index)
            self._stack.close()  # renames the staging directory into place
        else:
            atomic_write(self._layout.root / INDEX_FILE, new_index.to_bytes())
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._staged:
            with contextlib.suppress(_AbortedError):
                self._stack.__exit__(_AbortedError, _AbortedError(), None)
            return
        for path in self._added:
            if path.name in self._existing:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _LayoutSink(BlobSink):
    """Writes straight into the layout's blob directory (a temporary name until commit)."""

    def __init__(self, writer: BlobWriter, added: list[Path]) -> None:
        self._writer = writer
        self._added = added

    def write(self, chunk: bytes | memoryview) -> None:
        self._writer.write(chunk)

    def commit(self, media_type: str) -> Descriptor:
        descriptor = self._writer.commit(media_type)
        self._added.append(self._writer.final_path(descriptor.digest))
        return descriptor

    def abort(self) -> None:
        self._writer.abort()


class _AbortedError(Exception):
    """Raised into the staging context to make it discard the staged layout."""
