"""``docker-archive:`` -- images in ``docker save`` tarballs, read as OCI images and written for
``docker load`` and skopeo.

Reading accepts the three layouts found in the wild, all described by a top-level ``manifest.json``
(``[{"Config": ..., "RepoTags": [...], "Layers": [...]}]``): the legacy one of Docker before 25
(``<id>/layer.tar``, ``<id>/json``, ``<hex>.json``), the one skopeo writes (``<diff_id>.tar``,
``<hex>.json``), and Docker 25+'s embedded OCI layout (``blobs/sha256/<hex>``). The archive is indexed
once (member name -> data offset and size) and blobs are then read by offset from one open file, so
nothing is extracted and a layer is never held whole in memory. Hostile archives are refused with
:class:`~coffer.errors.FormatError`: absolute or ``..`` member names, duplicate names, too many
members, an oversized or missing ``manifest.json``, or a config or layer that is missing, a link, or
not a regular file.

The chosen image is presented as an OCI image: a manifest is synthesised (``root()``), with layer media
types taken from the layer files' magic bytes. Layer digests must be known up front, so each layer is
hashed once when the archive is opened, except members named ``blobs/sha256/<hex>``, whose name is
taken as the claim and checked when the blob is read. The config's ``rootfs.diff_ids`` are checked
against the layers:

* uncompressed layers: at open (their digest is their diff_id);
* gzip layers that were hashed at open: at open too (decompressed while hashing);
* gzip layers named by digest: in :meth:`DockerArchiveSource.iter_blob`, after the last chunk, like the
  digest check (so, as for every source, a layer is trusted only once its iterator is exhausted);
* zstd layers: cannot be checked without a zstd decoder, so :meth:`~DockerArchiveSource.iter_blob`
  refuses them (:class:`~coffer.errors.UnsupportedError`); their manifest and config can still be read.

Writing produces what skopeo writes (``<diff_id>.tar`` layers, uncompressed; ``<hex>.json`` config;
legacy ``<id>/{layer.tar,VERSION,json}`` metadata; ``manifest.json``; ``repositories`` when tagged). Blobs
are staged in a temporary directory beside the destination; :meth:`DockerArchiveDestination.commit`
writes the archive to a temporary file there and links it into place, refusing to replace an existing
file. Encrypted layers and indexes are refused: an archive holds one plain single-platform image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from coffer._internal.encoding import reject_constant, reject_duplicate_keys
from coffer.errors import FormatError, UnsupportedError, UsageError
from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import (
    MAX_CONFIG_BYTES,
    MAX_LAYERS,
    Descriptor,
    ImageConfig,
    Manifest,
    MiB,
    sha256_digest,
)
from coffer.image.reference import DOCKER_HUB, DockerArchiveRef, RegistryRef, parse_registry_name
from coffer.image.transport import ImageDestination, ImageSource

MANIFEST_FILE: Final = "manifest.json"
REPOSITORIES_FILE: Final = "repositories"
MAX_ARCHIVE_MANIFEST_BYTES: Final = 1 * MiB
MAX_MEMBERS: Final = 65536
MAX_IMAGES: Final = 1024
MAX_REPO_TAGS: Final = 256
MAX_NAME_CHARS: Final = 4096
CHUNK: Final = 1024 * 1024

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC: Final = b"BZh"
XZ_MAGIC: Final = b"\xfd7zXZ\x00"
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
_BLOB_PREFIX: Final = "blobs/sha256/"

_PLAIN_ONLY: Final = (
    "docker-archive holds plain single-platform images; write encrypted images to oci: or docker://"
)


# --------------------------------------------------------------------------------------------------
# manifest.json


@dataclass(frozen=True)
class ArchiveImage:
    """One entry of ``manifest.json``: member names of the config and layers, and the image's tags."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def member_name(name: str, what: str) -> str:
    """The canonical form of an in-archive path (``./a//b`` -> ``a/b``); absolute or ``..`` is refused."""
    if not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise FormatError(what, f"path {name[:100]!r} is empty, too long or holds a NUL byte")
    if name.startswith("/"):
        raise FormatError(what, f"absolute path {name[:100]!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FormatError(what, f"path {name[:100]!r} climbs out of the archive")
    return "/".join(parts)


def _path_field(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(what, "is not a string")
    canonical = member_name(value, what)
    if not canonical:
        raise FormatError(what, f"path {value[:100]!r} names the archive root")
    return canonical


def parse_archive_manifest(data: bytes) -> tuple[ArchiveImage, ...]:
    """Parse ``manifest.json`` strictly: size ceiling, no duplicate keys, bounded lists, safe paths."""
    what = MANIFEST_FILE
    if len(data) > MAX_ARCHIVE_MANIFEST_BYTES:
        raise FormatError(what, f"{len(data)} bytes exceeds the limit of {MAX_ARCHIVE_MANIFEST_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=reject_duplicate_keys,
                         parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(what, f"invalid JSON: {exc}") from exc
    if not isinstance(obj, list):
        raise FormatError(what, "top level is not a JSON array")
    if not obj:
        raise FormatError(what, "lists no images")
    if len(obj) > MAX_IMAGES:
        raise FormatError(what, f"{len(obj)} images, more than {MAX_IMAGES}")
    images = []
    for n, item in enumerate(obj):
        where = f"{what} entry {n}"
        if not isinstance(item, dict):
            raise FormatError(where, "is not an object")
        config = _path_field(item.get("Config"), f"{where} Config")
        tags = item.get("RepoTags")
        if tags is None:
            tags = []
        if not isinstance(tags, list) or len(tags) > MAX_REPO_TAGS:
            raise FormatError(where, f"RepoTags is not a list of at most {MAX_REPO_TAGS} entries")
        if not all(isinstance(tag, str) and 0 < len(tag) <= 512 for tag in tags):
            raise FormatError(where, "RepoTags holds something other than a short non-empty string")
        layers = item.get("Layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise FormatError(where, f"Layers is not a list of at most {MAX_LAYERS} entries")
        images.append(ArchiveImage(
            config=config,
            repo_tags=tuple(tags),
            layers=tuple(_path_field(layer, f"{where} layer {i}") for i, layer in enumerate(layers)),
        ))
    return tuple(images)


def docker_name(ref: RegistryRef) -> str:
    """The repository as Docker shows it: ``busybox`` for ``docker.io/library/busybox``."""
    if ref.host != DOCKER_HUB:
        return ref.name
    return ref.repository.removeprefix("library/")


def _same_name(repo_tag: str, wanted: RegistryRef) -> bool:
    try:
        parsed = parse_registry_name(repo_tag, default_tag=False)
    except UsageError:
        return False  # a tag Coffer cannot parse names no image the user could have asked for
    return (parsed.host, parsed.repository, parsed.tag) == (wanted.host, wanted.repository, wanted.tag)


# --------------------------------------------------------------------------------------------------
# The tar index


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str
    offset: int
    size: int


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.isdir():
        return "directory"
    if info.isreg():
        return "sparse file" if info.sparse is not None else "file"
    return "special file"


def _index_archive(fd: int, file_size: int) -> dict[str, _Member]:
    """Member name -> where its data is, refusing unsafe names, duplicates and impossible sizes."""
    members: dict[str, _Member] = {}
    what = "docker archive"
    try:
        with os.fdopen(os.dup(fd), "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            while (info := archive.next()) is not None:
                archive.members.clear()  # type: ignore[attr-defined]  # keep memory bounded: the index suffices
                if len(members) >= MAX_MEMBERS:
                    raise FormatError(what, f"more than {MAX_MEMBERS} members")
                name = member_name(info.name, f"{what} member")
                if not name:
                    if info.isdir():
                        continue  # "./", as `tar -C dir .` writes
                    raise FormatError(what, f"member {info.name[:100]!r} has no name")
                if name in members:
                    raise FormatError(what, f"member {name[:100]!r} appears more than once")
                kind = _kind(info)
                if info.size < 0:  # tarfile accepts a negative base-256 size field
                    raise FormatError(what, f"member {name[:100]!r} has a negative size", offset=info.offset)
                if kind == "file" and info.offset_data + info.size > file_size:
                    raise FormatError(what, f"member {name[:100]!r} runs past the end of the file",
                                      offset=info.offset_data)
                members[name] = _Member(name=name, kind=kind, offset=info.offset_data, size=info.size)
    except (tarfile.TarError, EOFError, UnicodeError, ValueError, OverflowError) as exc:
        raise FormatError(what, f"not a readable tar archive: {exc}") from exc
    return members


def _claimed_digest(name: str) -> str | None:
    """``sha256:<hex>`` for a member named ``blobs/sha256/<hex>`` (Docker 25+), else None."""
    if not name.startswith(_BLOB_PREFIX):
        return None
    hex_part = name.removeprefix(_BLOB_PREFIX)
    if len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part):
        return "sha256:" + hex_part
    return None


class _Gunzip:
    """Streaming, bounded-output decompression of a (possibly multi-member) gzip stream."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._inflater = zlib.decompressobj(_GZIP_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while data:
                if self._inflater.eof:
                    # Another gzip member follows (Docker's reader accepts those too).
                    self._inflater = zlib.decompressobj(_GZIP_WBITS)
                out = self._inflater.decompress(data, CHUNK)
                if out:
                    yield out
                data = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise FormatError(self._what, f"corrupt gzip data: {exc}") from exc

    def finish(self) -> bytes:
        try:
            out = self._inflater.flush()
        except zlib.error as exc:
            raise FormatError(self._what, f"corrupt gzip data: {exc}") from exc
        if not self._inflater.eof:
            raise FormatError(self._what, "gzip stream is truncated")
        return out


def _sniff_layer(head: bytes, what: str) -> str:
    if head.startswith(GZIP_MAGIC):
        return media.OCI_LAYER_GZIP
    if head.startswith(ZSTD_MAGIC):
        return media.OCI_LAYER_ZSTD
    if head.startswith((BZIP2_MAGIC, XZ_MAGIC)):
        raise UnsupportedError(f"{what}: bzip2 and xz layers have no OCI media type")
    return media.OCI_LAYER_TAR


@dataclass
class _Blob:
    member: _Member
    #: diff_id still to be checked against the decompressed content when the blob is read.
    diff_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Source


class DockerArchiveSource(ImageSource):
    """``docker-archive:PATH[:NAME:TAG|:@N]`` as a source (see the module docstring)."""

    def __init__(self, ref: DockerArchiveRef) -> None:
        self.name = str(ref)
        self._ref = ref
        self._fd = _open_archive(ref.path)
        self._documents: dict[str, bytes] = {}
        self._blobs: dict[str, _Blob] = {}
        try:
            self._root = self._load()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------

    def _read_member(self, member: _Member) -> bytes:
        data = os.pread(self._fd, member.size, member.offset)
        if len(data) != member.size:
            raise FormatError("docker archive", f"member {member.name[:100]!r} is truncated")
        return data

    def _load(self) -> Descriptor:
        size = os.fstat(self._fd).st_size
        members = _index_archive(self._fd, size)
        found = members.get(MANIFEST_FILE)
        if found is None:
            raise FormatError("docker archive", f"no {MANIFEST_FILE} (not a docker save archive)")
        manifest_member = _regular(found, "member")
        if manifest_member.size > MAX_ARCHIVE_MANIFEST_BYTES:
            raise FormatError(MANIFEST_FILE, f"{manifest_member.size} bytes exceeds the limit of "
                                             f"{MAX_ARCHIVE_MANIFEST_BYTES}")
        image = self._choose(parse_archive_manifest(self._read_member(manifest_member)))

        config_member = _lookup(members, image.config, "config")
        if config_member.size > MAX_CONFIG_BYTES:
            raise FormatError("image config", f"{config_member.size} bytes exceeds the limit of "
                                              f"{MAX_CONFIG_BYTES}")
        config_bytes = self._read_member(config_member)
        config_digest = sha256_digest(config_bytes)
        claimed = _claimed_digest(config_member.name)
        if claimed is not None and claimed != config_digest:
            raise FormatError("image config", f"{config_member.name} has digest {config_digest}")
        config = ImageConfig.parse(config_bytes)
        if len(config.diff_ids) != len(image.layers):
            raise FormatError("image config",
                              f"{len(config.diff_ids)} diff_ids for {len(image.layers)} layers")

        layers = [
            self._layer(_lookup(members, path, f"layer {n}"), diff_id, n)
            for n, (path, diff_id) in enumerate(zip(image.layers, config.diff_ids, strict=True))
        ]
        config_desc = Descriptor(media_type=media.OCI_CONFIG, digest=config_digest, size=len(config_bytes))
        manifest = Manifest(media_type=media.OCI_MANIFEST, config=config_desc, layers=tuple(layers))
        data = manifest.to_bytes()
        self._documents[config_digest] = config_bytes
        self._documents[sha256_digest(data)] = data
        return Descriptor(media_type=media.OCI_MANIFEST, digest=sha256_digest(data), size=len(data))

    def _choose(self, images: tuple[ArchiveImage, ...]) -> ArchiveImage:
        path = self._ref.path
        if self._ref.index is not None:
            if self._ref.index >= len(images):
                raise UsageError(f"{path} holds {len(images)} images; @{self._ref.index} is out of range")
            return images[self._ref.index]
        if self._ref.name is not None:
            wanted = self._ref.name
            found = [image for image in images if any(_same_name(t, wanted) for t in image.repo_tags)]
            if len(found) > 1:
                raise FormatError(MANIFEST_FILE, f"{len(found)} images are tagged {wanted.familiar!r}")
            if not found:
                tags = sorted({t for image in images for t in image.repo_tags})
                shown = ", ".join(repr(t[:100]) for t in tags[:10]) + (", ..." if len(tags) > 10 else "")
                raise UsageError(
                    f"no image named {wanted.familiar!r} in {path} (it holds: {shown or 'no tags'})"
                )
            return found[0]
        if len(images) != 1:
            raise UsageError(f"{path} holds {len(images)} images; choose one with "
                             f"docker-archive:{path}:NAME:TAG or docker-archive:{path}:@N")
        return images[0]

    def _layer(self, member: _Member, diff_id: str, n: int) -> Descriptor:
        what = f"layer {n} ({member.name[:100]})"
        media_type = _sniff_layer(self._read_member(_Member(member.name, member.kind, member.offset,
                                                            min(member.size, 8))), what)
        claimed = _claimed_digest(member.name)
        pending: str | None = None
        if media_type == media.OCI_LAYER_TAR:
            digest = claimed or self._hash(member, what, gunzip=False)[0]
            if digest != diff_id:
                raise FormatError(what, f"content digest {digest} is not the config's diff_id {diff_id}")
        elif media_type == media.OCI_LAYER_GZIP and claimed is None:
            digest, plain = self._hash(member, what, gunzip=True)
            if plain != diff_id:
                raise FormatError(what, f"uncompressed digest {plain} is not the config's diff_id {diff_id}")
        else:
            digest = claimed or self._hash(member, what, gunzip=False)[0]
            pending = diff_id
        known = self._blobs.get(digest)
        if known is not None and None not in (known.diff_id, pending) and known.diff_id != pending:
            raise FormatError(what, f"blob {digest} is given two different diff_ids")
        if known is None or pending is not None:
            self._blobs[digest] = _Blob(member=member, diff_id=pending)
        return Descriptor(media_type=media_type, digest=digest, size=member.size)

    def _hash(self, member: _Member, what: str, *, gunzip: bool) -> tuple[str, str | None]:
        """The member's digest and, with ``gunzip``, its uncompressed digest, in one streaming pass."""
        raw = hashlib.sha256()
        plain = hashlib.sha256() if gunzip else None
        inflater = _Gunzip(what) if gunzip else None
        for chunk in self._chunks(member, what):
            raw.update(chunk)
            if inflater is not None and plain is not None:
                for out in inflater.feed(chunk):
                    plain.update(out)
        if inflater is None or plain is None:
            return "sha256:" + raw.hexdigest(), None
        plain.update(inflater.finish())
        return "sha256:" + raw.hexdigest(), "sha256:" + plain.hexdigest()

    def _chunks(self, member: _Member, what: str) -> Iterator[bytes]:
        done = 0
        while done < member.size:
            chunk = os.pread(self._fd, min(CHUNK, member.size - done), member.offset + done)
            if not chunk:
                raise FormatError(what, f"truncated: {done} of {member.size} bytes")
            done += len(chunk)
            yield chunk

    # -- ImageSource ------------------------------------------------------------------------------

    def root(self) -> Descriptor:
        return self._root

    def resolve_tag(self, tag: str) -> Descriptor | None:
        # An archive stores one image per entry and no side documents (signatures) under other tags.
        return None

    def read_document(self, descriptor: Descriptor, limit: int) -> bytes:
        what = f"blob {descriptor.digest}"
        if descriptor.size > limit:
            raise FormatError(what, f"{descriptor.size} bytes exceeds the limit of {limit}")
        return b"".join(self.iter_blob(descriptor))

    def iter_blob(self, descriptor: Descriptor) -> Iterator[bytes]:
        what = f"blob {descriptor.digest}"
        document = self._documents.get(descriptor.digest)
        if document is not None:
            if len(document) != descriptor.size:
                raise FormatError(what, f"is {len(document)} bytes, descriptor says {descriptor.size}")
            yield document
            return
        blob = self._blobs.get(descriptor.digest)
        if blob is None:
            raise FormatError(what, f"not in {self._ref.path}")
        member = blob.member
        if member.size != descriptor.size:
            raise FormatError(what, f"archive member is {member.size} bytes, "
                                    f"descriptor says {descriptor.size}")
        inflater: _Gunzip | None = None
        if blob.diff_id is not None:
            head = self._read_member(_Member(member.name, member.kind, member.offset, min(member.size, 8)))
            if not head.startswith(GZIP_MAGIC):
                raise UnsupportedError(
                    f"{what}: a zstd layer cannot be checked against the config's diff_id (no zstd decoder)"
                )
            inflater = _Gunzip(what)
        raw = hashlib.sha256()
        plain = hashlib.sha256()
        for chunk in self._chunks(member, what):
            raw.update(chunk)
            if inflater is not None:
                for out in inflater.feed(chunk):
                    plain.update(out)
            yield chunk
        actual = "sha256:" + raw.hexdigest()
        if actual != descriptor.digest:
            raise FormatError(what, f"content has digest {actual}")
        if inflater is not None:
            plain.update(inflater.finish())
            plain_digest = "sha256:" + plain.hexdigest()
            if plain_digest != blob.diff_id:
                raise FormatError(what, f"uncompressed digest {plain_digest} is not the config's diff_id "
                                        f"{blob.diff_id}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_archive(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"docker archive {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot open docker archive {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"docker archive {path} is not a regular file (it is read by offset)")
        head = os.pread(fd, 8, 0)
        if head.startswith((GZIP_MAGIC, ZSTD_MAGIC, BZIP2_MAGIC, XZ_MAGIC)):
            raise UnsupportedError(f"docker archive {path} is compressed; decompress it first")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _regular(member: _Member, what: str) -> _Member:
    if member.kind != "file":
        raise FormatError("docker archive",
                          f"{what} {member.name[:100]!r} is a {member.kind}, not a regular file")
    return member


def _lookup(members: Mapping[str, _Member], name: str, what: str) -> _Member:
    member = members.get(name)
    if member is None:
        raise FormatError("docker archive", f"{what} {name[:100]!r} listed in {MANIFEST_FILE} is missing")
    return _regular(member, what)


# --------------------------------------------------------------------------------------------------
# Destination


@dataclass(frozen=True)
class _StagedImage:
    config: Descriptor
    #: The staged uncompressed layers (an archive stores them so; each digest is the diff_id).
    layers: tuple[Descriptor, ...]
    config_obj: Mapping[str, Any]


class DockerArchiveDestination(ImageDestination):
    """``docker-archive:PATH[:NAME:TAG]`` as a destination (see the module docstring)."""

    supports_encryption = False
    supports_extra_tags = False
    supports_index = False

    def __init__(self, ref: DockerArchiveRef) -> None:
        if ref.index is not None:
            raise UsageError("docker-archive: @N selects an image to read; a destination takes NAME:TAG")
        self.name = str(ref)
        self._path = ref.path
        self._ref_name = ref.name
        self.tag = ref.name.tag if ref.name is not None else None
        self._image: _StagedImage | None = None
        self._done = False
        if ref.path.exists() or ref.path.is_symlink():
            raise UsageError(f"{ref.path} already exists; docker-archive does not overwrite files")
        parent = ref.path.parent
        if not parent.is_dir():
            raise UsageError(f"directory {parent} does not exist")
        try:
            self._staging = Path(tempfile.mkdtemp(prefix=f".{ref.path.name}.staging-", dir=parent))
        except OSError as exc:
            raise UsageError(f"cannot write beside {ref.path}: {exc.strerror}") from exc
        try:
            self._layout = OciLayout.create(self._staging / "layout")
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            raise

    def _check_open(self) -> None:
        if self._done:
            raise UsageError(f"{self.name}: the destination was already committed or aborted")

    def has_blob(self, descriptor: Descriptor) -> bool:
        return not self._done and self._layout.has_blob(descriptor)

    def put_blob(
        self, chunks: Iterable[bytes], media_type: str, *, expected: Descriptor | None = None
    ) -> Descriptor:
        self._check_open()
        if media.is_encrypted(media_type) or (expected and media.is_encrypted(expected.media_type)):
            raise UnsupportedError(_PLAIN_ONLY)
        if expected is not None and self._layout.has_blob(expected):
            for _ in chunks:  # drain the source so its digest check still runs
                pass
            return expected
        return self._layout.write_blob(chunks, media_type, expected=expected)

    def put_manifest(self, data: bytes, media_type: str, *, tag: str | None) -> Descriptor:
        self._check_open()
        if media_type in media.INDEX_TYPES:
            raise UnsupportedError(_PLAIN_ONLY)
        if media_type not in media.MANIFEST_TYPES:
            raise UnsupportedError(f"docker-archive cannot store a document of media type {media_type!r}")
        if tag is not None and tag != self.tag:
            raise UnsupportedError(f"docker-archive stores only the image's own tag, not {tag!r}")
        if self._image is not None:
            raise UnsupportedError(_PLAIN_ONLY)
        manifest = Manifest.parse(data, media_type=media_type)
        if any(media.is_encrypted(layer.media_type) for layer in manifest.layers):
            raise UnsupportedError(_PLAIN_ONLY)
        if manifest.config.media_type not in media.CONFIG_TYPES:
            raise UnsupportedError(f"docker-archive holds container images, not artifacts of config type "
                                   f"{manifest.config.media_type!r}")
        for blob in (manifest.config, *manifest.layers):
            if not self._layout.has_blob(blob):
                raise UsageError(f"{self.name}: blob {blob.digest} was not stored before the manifest")
        config_bytes = self._layout.read_blob(manifest.config, MAX_CONFIG_BYTES)
        config = ImageConfig.parse(config_bytes)
        if len(config.diff_ids) != len(manifest.layers):
            raise FormatError("image config",
                              f"{len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers")
        layers = tuple(
            self._uncompressed(layer, diff_id, n)
            for n, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True))
        )
        self._image = _StagedImage(config=manifest.config, layers=layers,
                                   config_obj=json.loads(config_bytes))
        return Descriptor(media_type=media_type, digest=sha256_digest(data), size=len(data))

    def _uncompressed(self, layer: Descriptor, diff_id: str, n: int) -> Descriptor:
        """The staged uncompressed form of ``layer``, checked against its diff_id."""
        what = f"layer {n} ({layer.digest})"
        compression = media.compression(layer.media_type)
        if compression == "none":
            if layer.digest != diff_id:
                raise FormatError(what, f"digest is not the config's diff_id {diff_id}")
            return layer
        if compression == "zstd":
            raise UnsupportedError(f"{what}: zstd layers cannot be decompressed for docker-archive")
        inflater = _Gunzip(what)
        with self._layout.blob_writer() as writer:
            for chunk in self._layout.iter_blob(layer):
                for out in inflater.feed(chunk):
                    writer.write(out)
            writer.write(inflater.finish())
            plain = writer.commit(media.OCI_LAYER_TAR)
        if plain.digest != diff_id:
            raise FormatError(what,
                              f"uncompressed digest {plain.digest} is not the config's diff_id {diff_id}")
        return plain

    # -- commit ----------------------------------------------------------------------------------

    def _repo_tag(self) -> tuple[str, str] | None:
        if self._ref_name is None or self._ref_name.tag is None:
            return None
        return docker_name(self._ref_name), self._ref_name.tag

    def _write_archive(self, handle: IO[bytes], image: _StagedImage) -> None:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:

            def add(name: str, data: bytes | None = None, *, source: Path | None = None,
                    size: int = 0, link: str | None = None) -> None:
                info = tarfile.TarInfo(name)
                info.mode, info.mtime, info.uid, info.gid = 0o444, 0, 0, 0
                if link is not None:
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
                    archive.addfile(info)
                elif source is not None:
                    info.size = size
                    with source.open("rb") as blob:
                        archive.addfile(info, blob)
                else:
                    assert data is not None
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))

            written: set[str] = set()
            for layer in image.layers:
                if layer.hex not in written:
                    written.add(layer.hex)
                    add(f"{layer.hex}.tar", source=self._layout.blob_path(layer.digest), size=layer.size)
            config_name = f"{image.config.hex}.json"
            add(config_name, source=self._layout.blob_path(image.config.digest), size=image.config.size)

            # Legacy per-layer metadata, as skopeo writes it; IDs are chain IDs, as in containers/image.
            chain = ""
            parent: str | None = None
            for n, layer in enumerate(image.layers):
                chain = layer.digest if not chain else sha256_digest(f"{chain} {layer.digest}".encode())
                layer_id = chain.split(":", 1)[1]
                legacy: dict[str, Any] = {"id": layer_id}
                if parent is not None:
                    legacy["parent"] = parent
                if n == len(image.layers) - 1:
                    for key in ("architecture", "config", "container", "container_config", "created",
                                "docker_version", "os"):
                        legacy[key] = image.config_obj.get(key)
                add(f"{layer_id}/layer.tar", link=f"../{layer.hex}.tar")
                add(f"{layer_id}/VERSION", b"1.0")
                add(f"{layer_id}/json", _compact(legacy, sort=True))
                parent = layer_id

            repo_tag = self._repo_tag()
            entry = {
                "Config": config_name,
                "RepoTags": [f"{repo_tag[0]}:{repo_tag[1]}"] if repo_tag else [],
                "Layers": [f"{layer.hex}.tar" for layer in image.layers],
            }
            add(MANIFEST_FILE, _compact([entry]))
            if repo_tag is not None and parent is not None:
                add(REPOSITORIES_FILE, _compact({repo_tag[0]: {repo_tag[1]: parent}}))

    def commit(self) -> None:
        if self._done:
            return
        if self._image is None:
            raise UsageError(f"{self.name}: no image manifest was stored, nothing to commit")
        parent = self._path.parent
        tmp = parent / f".{self._path.name}.tmp-{secrets.token_hex(8)}"
        try:
            # O_EXCL and the default mode let the umask decide permissions, as for any new file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "wb") as handle:
                self._write_archive(handle, self._image)
                handle.flush()
                os.fsync(handle.fileno())
            _publish(tmp, self._path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._done = True
        shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        shutil.rmtree(self._staging, ignore_errors=True)


def _compact(obj: object, *, sort: bool = False) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=sort, ensure_ascii=False).encode()


def _publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` without ever replacing an existing ``path``."""
    try:
        os.link(tmp, path)  # fails if path exists, unlike rename
    except FileExistsError:
        raise UsageError(f"{path} appeared while the archive was written; not overwriting it") from None
    except OSError as exc:
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} already exists; not overwriting it") from exc
        os.rename(tmp, path)  # a filesystem without hard links
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
