"""Copy an image from a source to a destination, optionally encrypting or decrypting its layers.

One walk serves copy, encrypt and decrypt: the root (a manifest, or an index of per-platform
manifests) is read from the source; the manifests of the chosen platform go through a
:class:`LayerTransform`, every other entry of an index is copied byte for byte; then the manifests
are stored children first and the destination commits. Any error aborts the destination, so
nothing appears there.

Encrypting turns Docker schema 2 documents into their OCI equivalents (the config bytes stay the
same, so diff_ids and the config digest do not change), because only OCI layer types have an
``+encrypted`` form. Decrypting authenticates each layer (HMAC, then the plaintext digest) before
the blob is committed: unauthenticated plaintext only ever sits in the destination's staging area.
"""

from __future__ import annotations

import contextlib
import io
import platform as _platform
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Final, Protocol

from coffer.errors import FormatError, UsageError
from coffer.image import media, ocicrypt
from coffer.image.models import (
    MAX_CONFIG_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_annotations,
)
from coffer.image.transport import ImageDestination, ImageSource, Progress, no_progress
from coffer.image.unpack import LayerOpener, UnpackLimits, UnpackStats, unpack_image

_ARCH_ALIASES: Final = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
#: How deep indexes may nest inside the root index when they are copied unchanged.
MAX_NESTED_INDEX_DEPTH: Final = 8


# --------------------------------------------------------------------------------------------------
# Choices: which platform, which layers


@dataclass(frozen=True)
class PlatformChoice:
    """``os/arch[/variant]``, or every platform of an index (``all``)."""

    os: str | None = None
    architecture: str | None = None
    variant: str | None = None

    @property
    def everything(self) -> bool:
        return self.os is None

    def matches(self, platform: Platform | None) -> bool:
        if self.everything:
            return True
        if platform is None:
            return False
        assert self.architecture is not None
        return platform.matches(self.os or "", self.architecture, self.variant)

    def __str__(self) -> str:
        if self.everything:
            return "all"
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> PlatformChoice:
    machine = _platform.machine().lower()
    return PlatformChoice("linux", _ARCH_ALIASES.get(machine, machine))


def parse_platform(text: str | None) -> PlatformChoice:
    """``linux/amd64``, ``linux/arm64/v8``, ``all``; None means this machine's platform."""
    if text is None:
        return host_platform()
    if text == "all":
        return PlatformChoice()
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise UsageError(f"platform {text!r} is not OS/ARCH[/VARIANT] or 'all'")
    return PlatformChoice(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


LayerSelector = Callable[[int, int], bool]


def parse_layers(text: str) -> LayerSelector:
    """``all``, ``last``, or comma-separated indexes (0 is the base layer; negative counts from the top)."""
    if text == "all":
        return lambda index, count: True
    if text == "last":
        return lambda index, count: index == count - 1
    wanted: set[int] = set()
    for item in text.split(","):
        try:
            wanted.add(int(item.strip()))
        except ValueError:
            raise UsageError(f"--layers expects all, last or indexes like 0,2,-1; got {text!r}") from None

    def selected(index: int, count: int) -> bool:
        for w in wanted:
            if not -count <= w < count:
                raise UsageError(f"--layers: layer index {w} out of range for an image of {count} layers")
        return index in wanted or index - count in wanted

    return selected


# --------------------------------------------------------------------------------------------------
# Layer transforms


class LayerTransform(Protocol):
    """What happens to one layer; returns the descriptor to put in the new manifest."""

    #: Whether the manifests this transform touches must be OCI (encryption needs it).
    needs_oci: bool

    def __call__(
        self, layer: Descriptor, position: int, count: int, source: ImageSource, destination: ImageDestination
    ) -> Descriptor: ...


class _ChunkReader(io.RawIOBase):
    """A file-like view of a chunk iterator (the source's digest check runs when it is exhausted)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _counting(chunks: Iterator[bytes], what: str, total: int, progress: Progress) -> Iterator[bytes]:
    done = 0
    progress(what, 0, total)
    for chunk in chunks:
        done += len(chunk)
        progress(what, done, total)
        yield chunk


def copy_blob(
    blob: Descriptor, source: ImageSource, destination: ImageDestination, progress: Progress = no_progress
) -> Descriptor:
    """Copy one blob unchanged (skipped when the destination has it already)."""
    if destination.has_blob(blob):
        progress(f"blob {blob.hex[:12]} (present)", blob.size, blob.size)
        return blob
    chunks = _counting(source.iter_blob(blob), f"blob {blob.hex[:12]}", blob.size, progress)
    return destination.put_blob(chunks, blob.media_type, expected=blob)


@dataclass
class EncryptLayers:
    """Encrypt the selected plaintext layers for JWE and/or key-provider recipients."""

    jwe: Sequence[ocicrypt.JweRecipient] = ()
    kek: Sequence[ocicrypt.KekRecipient] = ()
    select: LayerSelector = field(default=lambda index, count: True)
    progress: Progress = no_progress
    needs_oci: bool = True

    def __call__(
        self, layer: Descriptor, position: int, count: int, source: ImageSource, destination: ImageDestination
    ) -> Descriptor:
        if not self.select(position, count):
            return copy_blob(layer, source, destination, self.progress)
        if media.is_encrypted(layer.media_type):
            raise UsageError(f"layer {position} ({layer.digest}) is already encrypted")
        target_type = media.encrypted(_oci_layer_type(layer.media_type))
        what = f"encrypt layer {position} ({layer.hex[:12]})"
        reader = io.BufferedReader(
            _ChunkReader(_counting(source.iter_blob(layer), what, layer.size, self.progress)),
            buffer_size=ocicrypt.CHUNK_SIZE,
        )
        with destination.blob_sink() as sink:
            result = ocicrypt.encrypt_layer(reader, sink, jwe=self.jwe, kek=self.kek)
            stored = sink.commit(target_type)
        annotations = {**ocicrypt.filter_annotations(layer.annotations), **result.annotations}
        return Descriptor(media_type=target_type, digest=stored.digest, size=stored.size,
                          annotations=parse_annotations(annotations, "encrypted layer descriptor"),
                          urls=layer.urls)


@dataclass
class DecryptLayers:
    """Decrypt every encrypted layer with the given keys; plaintext layers are copied."""

    keys: ocicrypt.DecryptionKeys
    progress: Progress = no_progress
    needs_oci: bool = False

    def __call__(
        self, layer: Descriptor, position: int, count: int, source: ImageSource, destination: ImageDestination
    ) -> Descriptor:
        if not media.is_encrypted(layer.media_type):
            return copy_blob(layer, source, destination, self.progress)
        plain_type = media.decrypted(layer.media_type)
        what = f"decrypt layer {position} ({layer.hex[:12]})"
        reader = io.BufferedReader(
            _ChunkReader(_counting(source.iter_blob(layer), what, layer.size, self.progress)),
            buffer_size=ocicrypt.CHUNK_SIZE,
        )
        with destination.blob_sink() as sink:
            ocicrypt.decrypt_layer(reader, sink, layer.annotations, self.keys,
                                   expected_size=layer.size)
            stored = sink.commit(plain_type)  # only after the HMAC and the plaintext digest held
        return Descriptor(media_type=plain_type, digest=stored.digest, size=stored.size,
                          annotations=parse_annotations(ocicrypt.filter_annotations(layer.annotations),
                                                        "decrypted layer descriptor"),
                          urls=layer.urls)


_DOCKER_TO_OCI_LAYER: Final = {
    media.DOCKER_LAYER_GZIP: media.OCI_LAYER_GZIP,
    media.DOCKER_LAYER_FOREIGN_GZIP: media.OCI_LAYER_ND_GZIP,
}


def _oci_layer_type(media_type: str) -> str:
    return _DOCKER_TO_OCI_LAYER.get(media_type, media_type)


# --------------------------------------------------------------------------------------------------
# The walk


@dataclass(frozen=True)
class ManifestSummary:
    """What a policy pins for one image manifest."""

    digest: str
    media_type: str
    config_digest: str
    layers: tuple[Descriptor, ...]
    platform: Platform | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "digest": self.digest,
            "media_type": self.media_type,
            "platform": None if self.platform is None else str(_platform_text(self.platform)),
            "config_digest": self.config_digest,
            "layers": [
                {"digest": layer.digest, "media_type": layer.media_type, "size": layer.size,
                 "encrypted": media.is_encrypted(layer.media_type)}
                for layer in self.layers
            ],
        }


def _no_platform(source: ImageSource, index: Index, choice: PlatformChoice) -> UsageError:
    available = ", ".join(sorted({_platform_text(e.platform) for e in index.manifests if e.platform}))
    return UsageError(f"{source.name} has no manifest for platform {choice} (available: "
                      f"{available or 'none'}); choose one with --platform")


def _platform_text(platform: Platform) -> str:
    return "/".join(p for p in (platform.os, platform.architecture, platform.variant) if p)


@dataclass(frozen=True)
class CopyResult:
    """The stored root (manifest or index) and every manifest that was transformed or copied."""

    root: Descriptor
    manifests: tuple[ManifestSummary, ...]
    untouched: tuple[Descriptor, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "digest": self.root.digest,
            "media_type": self.root.media_type,
            "size": self.root.size,
            "manifests": [m.to_json() for m in self.manifests],
            "untouched": [{"digest": d.digest, "platform": None if d.platform is None
                           else _platform_text(d.platform)} for d in self.untouched],
        }


def _copy_untouched(entry: Descriptor, source: ImageSource, destination: ImageDestination,
                    progress: Progress, stored: list[tuple[bytes, str]], *, seen: set[str],
                    depth: int = 0) -> None:
    """Copy an index entry and everything under it byte for byte (manifests kept for the end)."""
    # A hostile index can nest indexes without end, or name one nested index many times at every
    # level (a walk that grows exponentially): each document is walked once and nesting is bounded.
    if entry.digest in seen:
        return
    seen.add(entry.digest)
    if entry.media_type in media.INDEX_TYPES:
        if depth >= MAX_NESTED_INDEX_DEPTH:
            raise FormatError("image index", f"indexes nested more than {MAX_NESTED_INDEX_DEPTH} deep")
        nested = source.read_index(entry)
        for child in nested.manifests:
            _copy_untouched(child, source, destination, progress, stored, seen=seen, depth=depth + 1)
        stored.append((nested.raw, entry.media_type))
        return
    manifest = source.read_manifest(entry)
    for blob in (manifest.config, *manifest.layers):
        copy_blob(blob, source, destination, progress)
    stored.append((manifest.raw, entry.media_type))


def _transform_manifest(manifest: Manifest, source: ImageSource, destination: ImageDestination,
                        transform: LayerTransform | None, progress: Progress) -> Manifest:
    config_bytes = source.read_document(manifest.config, MAX_CONFIG_BYTES)
    to_oci = transform is not None and transform.needs_oci and manifest.media_type == media.DOCKER_MANIFEST
    config_type = media.OCI_CONFIG if to_oci and manifest.config.media_type == media.DOCKER_CONFIG \
        else manifest.config.media_type
    config = destination.put_blob([config_bytes], config_type,
                                  expected=replace(manifest.config, media_type=config_type))
    layers: list[Descriptor] = []
    count = len(manifest.layers)
    for position, layer in enumerate(manifest.layers):
        if transform is None:
            layers.append(copy_blob(layer, source, destination, progress))
            continue
        new = transform(layer, position, count, source, destination)
        if to_oci:
            new = replace(new, media_type=_oci_layer_type(new.media_type))
        layers.append(new)
    return Manifest(
        media_type=media.OCI_MANIFEST if to_oci else manifest.media_type,
        config=config,
        layers=tuple(layers),
        annotations=manifest.annotations,
        subject=manifest.subject,
        artifact_type=manifest.artifact_type,
    )


def copy_image(
    source: ImageSource,
    destination: ImageDestination,
    *,
    transform: LayerTransform | None = None,
    platform: PlatformChoice | None = None,
    progress: Progress = no_progress,
    annotations: Mapping[str, str] | None = None,
) -> CopyResult:
    """Copy the image ``source`` names into ``destination`` (which the caller commits or aborts).

    For an index, the manifests matching ``platform`` (default: this machine's) go through
    ``transform``; the other entries are copied unchanged. A single manifest is always transformed.
    """
    choice = platform if platform is not None else host_platform()

    def as_root(entry: Descriptor) -> CopyResult:
        manifest = source.read_manifest(entry)
        new = _finish(_transform_manifest(manifest, source, destination, transform, progress), transform,
                      manifest, annotations)
        stored = destination.put_manifest(new.raw or new.to_bytes(), new.media_type, tag=destination.tag)
        summary = ManifestSummary(digest=stored.digest, media_type=new.media_type,
                                  config_digest=new.config.digest, layers=new.layers, platform=entry.platform)
        return CopyResult(root=stored, manifests=(summary,))

    root = source.root()
    if root.media_type in media.MANIFEST_TYPES:
        return as_root(root)
    if root.media_type not in media.INDEX_TYPES:
        raise UsageError(f"{source.name}: the image root has media type {root.media_type!r}, "
                         "neither a manifest nor an index")
    index = source.read_index(root)
    chosen = [e for e in index.manifests
              if e.media_type in media.MANIFEST_TYPES and choice.matches(e.platform)]
    if not chosen:
        raise _no_platform(source, index, choice)
    if not destination.supports_index:
        if len(chosen) != 1:
            raise UsageError(f"{destination.name} holds a single platform: choose one with --platform")
        return as_root(chosen[0])
    to_oci = transform is not None and transform.needs_oci and index.media_type == media.DOCKER_MANIFEST_LIST
    pending: list[tuple[bytes, str]] = []
    entries: list[Descriptor] = []
    summaries: list[ManifestSummary] = []
    untouched: list[Descriptor] = []
    seen: set[str] = set()
    for entry in index.manifests:
        if entry not in chosen:
            _copy_untouched(entry, source, destination, progress, pending, seen=seen)
            entries.append(entry)
            untouched.append(entry)
            continue
        manifest = source.read_manifest(entry)
        new = _finish(_transform_manifest(manifest, source, destination, transform, progress), transform,
                      manifest, annotations)
        data = new.raw or new.to_bytes()
        pending.append((data, new.media_type))
        stored = Descriptor(media_type=new.media_type, digest=new.digest, size=len(data),
                            annotations=entry.annotations, platform=entry.platform)
        entries.append(stored)
        summaries.append(ManifestSummary(digest=stored.digest, media_type=new.media_type,
                                         config_digest=new.config.digest, layers=new.layers,
                                         platform=entry.platform))
    for data, media_type in pending:
        destination.put_manifest(data, media_type, tag=None)
    new_index = Index(media_type=media.OCI_INDEX if to_oci else index.media_type, manifests=tuple(entries),
                      annotations=index.annotations)
    unchanged = transform is None and tuple(entries) == index.manifests
    data = index.raw if unchanged else new_index.to_bytes()
    stored_root = destination.put_manifest(data, new_index.media_type, tag=destination.tag)
    return CopyResult(root=stored_root, manifests=tuple(summaries), untouched=tuple(untouched))


def _finish(new: Manifest, transform: LayerTransform | None, original: Manifest,
            annotations: Mapping[str, str] | None) -> Manifest:
    """Keep the original bytes when nothing changed (so a plain copy keeps every digest)."""
    if annotations:
        new = replace(new, annotations=parse_annotations({**new.annotations, **annotations}, "manifest"))
    elif transform is None or (new.layers == original.layers and new.config == original.config
                               and new.media_type == original.media_type):
        return replace(new, raw=original.raw)
    return new


# --------------------------------------------------------------------------------------------------
# Unpacking an image from any source


def select_manifest(
    source: ImageSource, platform: PlatformChoice | None = None
) -> tuple[Descriptor, Manifest]:
    """The one manifest of the root for ``platform`` (default: this machine's)."""
    choice = platform if platform is not None else host_platform()
    root = source.root()
    if root.media_type in media.MANIFEST_TYPES:
        return root, source.read_manifest(root)
    if choice.everything:
        raise UsageError("choose one platform to unpack (--platform OS/ARCH)")
    index = source.read_index(root)
    for entry in index.manifests:
        if entry.media_type in media.MANIFEST_TYPES and choice.matches(entry.platform):
            return entry, source.read_manifest(entry)
    raise _no_platform(source, index, choice)


@dataclass(frozen=True)
class UnpackResult:
    manifest: Descriptor
    config_digest: str
    stats: UnpackStats


def unpack_from_source(
    source: ImageSource,
    destination: Path,
    *,
    keys: ocicrypt.DecryptionKeys | None = None,
    platform: PlatformChoice | None = None,
    limits: UnpackLimits | None = None,
    progress: Progress = no_progress,
) -> UnpackResult:
    """Unpack the image into ``destination`` (which must not exist or be empty).

    Each layer is first spooled to an anonymous temporary file -- checked against its digest, and for
    an encrypted layer decrypted and authenticated -- and only then unpacked, one layer at a time.
    On any error nothing is left at ``destination``.
    """
    entry, manifest = select_manifest(source, platform)
    config = source.read_config(manifest.config)
    if len(config.diff_ids) != len(manifest.layers):
        raise FormatError("image config",
                          f"{len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers")
    count = len(manifest.layers)

    def opener(position: int, layer: Descriptor) -> LayerOpener:
        @contextlib.contextmanager
        def open_layer() -> Iterator[IO[bytes]]:
            what = f"layer {position + 1}/{count} ({layer.hex[:12]})"
            chunks = _counting(source.iter_blob(layer), what, layer.size, progress)
            if media.is_encrypted(layer.media_type):
                if keys is None:
                    raise UsageError(f"layer {position} is encrypted: give a decryption key or a KBS")
                reader = io.BufferedReader(_ChunkReader(chunks), buffer_size=ocicrypt.CHUNK_SIZE)
                spooled, _ = ocicrypt.decrypt_layer_to_tempfile(reader, layer.annotations, keys,
                                                                expected_size=layer.size)
            else:
                spooled = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
                try:
                    for chunk in chunks:
                        spooled.write(chunk)
                    spooled.seek(0)
                except BaseException:
                    spooled.close()
                    raise
            with spooled:
                yield spooled

        return open_layer

    layers = [
        (opener(i, layer), media.compression(media.decrypted(layer.media_type)
                                             if media.is_encrypted(layer.media_type) else layer.media_type))
        for i, layer in enumerate(manifest.layers)
    ]
    stats = unpack_image(destination, layers, limits=limits, diff_ids=config.diff_ids)
    return UnpackResult(manifest=entry, config_digest=manifest.config.digest, stats=stats)


def describe_image(source: ImageSource, platform: PlatformChoice | None = None) -> dict[str, object]:
    """What ``coffer image inspect`` shows: the root, its platforms, and each chosen manifest's
    config and layers (every document read is digest-checked; layer blobs are not fetched)."""
    root = source.root()
    data: dict[str, object] = {"digest": root.digest, "media_type": root.media_type, "size": root.size}
    entries: list[tuple[Descriptor, Platform | None]]
    if root.media_type in media.INDEX_TYPES:
        index = source.read_index(root)
        data["platforms"] = [_platform_text(e.platform) if e.platform else None for e in index.manifests]
        choice = platform if platform is not None else PlatformChoice()
        entries = [(e, e.platform) for e in index.manifests
                   if e.media_type in media.MANIFEST_TYPES and choice.matches(e.platform)]
    else:
        entries = [(root, None)]
    manifests = []
    for entry, entry_platform in entries:
        manifest = source.read_manifest(entry)
        config = source.read_config(manifest.config)
        summary = ManifestSummary(digest=entry.digest, media_type=entry.media_type,
                                  config_digest=manifest.config.digest, layers=manifest.layers,
                                  platform=entry_platform).to_json()
        summary.update({"os": config.os, "architecture": config.architecture,
                        "entrypoint": list(config.entrypoint), "cmd": list(config.cmd),
                        "user": config.user, "diff_ids": list(config.diff_ids)})
        manifests.append(summary)
    data["manifests"] = manifests
    return data
