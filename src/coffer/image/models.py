"""OCI descriptors, manifests, indexes and image configs, parsed strictly from bytes.

Parsing is pure: bytes in, a frozen dataclass or a :class:`~coffer.errors.FormatError` out. Every
document has a size ceiling checked before JSON decoding, duplicate keys and non-finite numbers are
refused, and each digest must be ``sha256:`` followed by 64 lowercase hex digits. Unknown fields are
ignored, as the image specification requires, but the exact bytes are kept (``raw``) so a document's
digest is always that of what was read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from coffer._internal.encoding import reject_constant, reject_duplicate_keys
from coffer.errors import FormatError, UnsupportedError
from coffer.image import media

MiB: Final = 1024 * 1024
MAX_MANIFEST_BYTES: Final = 4 * MiB
MAX_INDEX_BYTES: Final = 4 * MiB
MAX_CONFIG_BYTES: Final = 8 * MiB
MAX_ANNOTATION_VALUE: Final = 64 * 1024
MAX_ANNOTATIONS: Final = 256
MAX_LAYERS: Final = 1024
MAX_INDEX_ENTRIES: Final = 1024
MAX_BLOB_SIZE: Final = (1 << 63) - 1

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
_OTHER_DIGEST_RE: Final = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable string map (annotations, labels), so descriptors can be set members."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: Mapping[str, str] = MappingProxyType(dict(items or {}))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"


EMPTY_ANNOTATIONS: Final = FrozenMap()


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a well-formed ``sha256:<64 hex>`` digest string."""
    if not isinstance(value, str):
        raise FormatError(what, "digest is not a string")
    if _DIGEST_RE.fullmatch(value):
        return value
    if _OTHER_DIGEST_RE.fullmatch(value) and not value.startswith("sha256:"):
        raise UnsupportedError(f"{what}: digest algorithm {value.split(':', 1)[0]!r} is not supported")
    raise FormatError(what, f"malformed digest {value[:80]!r}")


def sha256_digest(data: bytes) -> str:
    """The OCI digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_json_object(data: bytes, what: str, limit: int) -> dict[str, Any]:
    """Decode a JSON object of at most ``limit`` bytes, refusing duplicate keys and NaN/Infinity."""
    if len(data) > limit:
        raise FormatError(what, f"{len(data)} bytes exceeds the limit of {limit}")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=reject_duplicate_keys, parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(what, f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(what, "top level is not a JSON object")
    return obj


def dump_json(obj: Mapping[str, Any]) -> bytes:
    """Serialise a document compactly (the form Coffer writes and digests)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _get_str(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise FormatError(what, f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise FormatError(what, f"{key!r} is not a string")
    return value


def _req_str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = _get_str(obj, key, what)
    assert value is not None
    return value


def _get_int(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if value is None:
        raise FormatError(what, f"missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(what, f"{key!r} is not an integer")
    return value


def _get_list(obj: Mapping[str, Any], key: str, what: str, limit: int, *, required: bool) -> list[Any]:
    value = obj.get(key)
    if value is None:
        if required:
            raise FormatError(what, f"missing {key!r}")
        return []
    if not isinstance(value, list):
        raise FormatError(what, f"{key!r} is not a list")
    if len(value) > limit:
        raise FormatError(what, f"{key!r} has {len(value)} entries, more than {limit}")
    return value


def _str_list(obj: Mapping[str, Any], key: str, what: str, limit: int = 256) -> tuple[str, ...]:
    items = _get_list(obj, key, what, limit, required=False)
    if not all(isinstance(item, str) for item in items):
        raise FormatError(what, f"{key!r} holds a non-string")
    return tuple(items)


def parse_annotations(value: object, what: str) -> Mapping[str, str]:
    """Validate an ``annotations`` map: string keys and values, bounded count and value size."""
    if value is None:
        return EMPTY_ANNOTATIONS
    if not isinstance(value, dict):
        raise FormatError(what, "annotations is not an object")
    if len(value) > MAX_ANNOTATIONS:
        raise FormatError(what, f"{len(value)} annotations, more than {MAX_ANNOTATIONS}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise FormatError(what, f"annotation {key[:100]!r} is not a string")
        if len(item) > MAX_ANNOTATION_VALUE:
            raise FormatError(
                what, f"annotation {key[:100]!r} is {len(item)} characters, over {MAX_ANNOTATION_VALUE}"
            )
    return FrozenMap(value)


@dataclass(frozen=True, kw_only=True)
class Platform:
    """The platform a manifest in an index runs on."""

    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: object, what: str) -> Platform:
        if not isinstance(obj, dict):
            raise FormatError(what, "platform is not an object")
        return cls(
            architecture=_req_str(obj, "architecture", what),
            os=_req_str(obj, "os", what),
            variant=_get_str(obj, "variant", what, required=False),
            os_version=_get_str(obj, "os.version", what, required=False),
            os_features=_str_list(obj, "os.features", what),
        )

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version is not None:
            obj["os.version"] = self.os_version
        if self.os_features:
            obj["os.features"] = list(self.os_features)
        if self.variant is not None:
            obj["variant"] = self.variant
        return obj

    def matches(self, os: str, architecture: str, variant: str | None = None) -> bool:
        """Whether this platform is ``os/architecture[/variant]``."""
        if self.os != os or self.architecture != architecture:
            return False
        return variant is None or self.variant == variant


@dataclass(frozen=True, kw_only=True)
class Descriptor:
    """A typed, sized, digested pointer to a blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default=EMPTY_ANNOTATIONS)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        check_digest(self.digest, "descriptor")
        if isinstance(self.size, bool) or not 0 <= self.size <= MAX_BLOB_SIZE:
            raise FormatError("descriptor", f"size {self.size!r} out of range")

    @classmethod
    def from_obj(cls, obj: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError(what, "descriptor is not an object")
        platform = obj.get("platform")
        return cls(
            media_type=_req_str(obj, "mediaType", what),
            digest=check_digest(obj.get("digest"), what),
            size=_checked_size(_get_int(obj, "size", what), what),
            annotations=parse_annotations(obj.get("annotations"), what),
            urls=_str_list(obj, "urls", what),
            platform=None if platform is None else Platform.from_obj(platform, what),
            artifact_type=_get_str(obj, "artifactType", what, required=False),
        )

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            obj["urls"] = list(self.urls)
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.platform is not None:
            obj["platform"] = self.platform.to_obj()
        if self.artifact_type is not None:
            obj["artifactType"] = self.artifact_type
        return obj

    @property
    def hex(self) -> str:
        """The hex part of the digest (the blob's file name in a layout)."""
        return self.digest.split(":", 1)[1]


def _checked_size(size: int, what: str) -> int:
    if not 0 <= size <= MAX_BLOB_SIZE:
        raise FormatError(what, f"size {size} out of range")
    return size


def _schema_version(obj: Mapping[str, Any], what: str) -> None:
    if _get_int(obj, "schemaVersion", what) != 2:
        raise UnsupportedError(f"{what}: schemaVersion {obj.get('schemaVersion')!r} is not 2")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """An image manifest (OCI, or Docker schema 2 which has the same shape)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default=EMPTY_ANNOTATIONS)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    raw: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def parse(cls, data: bytes, *, media_type: str | None = None) -> Manifest:
        """Parse a manifest; ``media_type`` is the one its descriptor or HTTP response declared."""
        what = "image manifest"
        obj = load_json_object(data, what, MAX_MANIFEST_BYTES)
        _schema_version(obj, what)
        kind = _document_media_type(obj, media_type, what, default=media.OCI_MANIFEST,
                                    allowed=media.MANIFEST_TYPES, kind_name="manifest")
        config = Descriptor.from_obj(obj.get("config"), "manifest config descriptor")
        if config.media_type not in media.CONFIG_TYPES and config.media_type != media.OCI_EMPTY:
            # Artifacts may use other config types; images must not. Coffer acts on images.
            raise FormatError(what, f"unknown config media type {config.media_type!r}")
        layers = tuple(
            Descriptor.from_obj(item, f"layer descriptor {n}")
            for n, item in enumerate(_get_list(obj, "layers", what, MAX_LAYERS, required=True))
        )
        for n, layer in enumerate(layers):
            if not media.is_layer(layer.media_type):
                raise FormatError(what, f"layer {n} has unknown media type {layer.media_type!r}")
            if kind == media.DOCKER_MANIFEST and media.is_encrypted(layer.media_type):
                raise FormatError(what, "encrypted layers need an OCI manifest, not Docker schema 2")
        subject = obj.get("subject")
        return cls(
            media_type=kind,
            config=config,
            layers=layers,
            annotations=parse_annotations(obj.get("annotations"), what),
            subject=None if subject is None else Descriptor.from_obj(subject, "manifest subject"),
            artifact_type=_get_str(obj, "artifactType", what, required=False),
            raw=bytes(data),
        )

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type is not None:
            obj["artifactType"] = self.artifact_type
        obj["config"] = self.config.to_obj()
        obj["layers"] = [layer.to_obj() for layer in self.layers]
        if self.subject is not None:
            obj["subject"] = self.subject.to_obj()
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj

    def to_bytes(self) -> bytes:
        """Fresh compact JSON of this manifest (its digest differs from ``raw``'s if edited)."""
        return dump_json(self.to_obj())

    @property
    def digest(self) -> str:
        """Digest of the bytes this manifest was parsed from (or of its serialisation if built)."""
        return sha256_digest(self.raw or self.to_bytes())


def _document_media_type(obj: Mapping[str, Any], media_type: str | None, what: str, *, default: str,
                         allowed: Collection[str], kind_name: str) -> str:
    """The document's media type: its own ``mediaType``, else the one it was fetched as, else the
    OCI default; the two must agree when both are given, and the result must be of ``allowed``."""
    declared = _get_str(obj, "mediaType", what, required=False)
    if declared is not None and media_type is not None and declared != media_type:
        raise FormatError(what, f"mediaType {declared!r} contradicts {media_type!r}")
    kind = declared or media_type or default
    if kind not in allowed:
        raise FormatError(what, f"unknown {kind_name} media type {kind!r}")
    return kind


@dataclass(frozen=True, kw_only=True)
class Index:
    """An image index (OCI) or manifest list (Docker): one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default=EMPTY_ANNOTATIONS)
    raw: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def parse(cls, data: bytes, *, media_type: str | None = None, what: str = "image index") -> Index:
        obj = load_json_object(data, what, MAX_INDEX_BYTES)
        _schema_version(obj, what)
        kind = _document_media_type(obj, media_type, what, default=media.OCI_INDEX,
                                    allowed=media.INDEX_TYPES, kind_name="index")
        manifests = tuple(
            Descriptor.from_obj(item, f"index entry {n}")
            for n, item in enumerate(_get_list(obj, "manifests", what, MAX_INDEX_ENTRIES, required=True))
        )
        return cls(
            media_type=kind,
            manifests=manifests,
            annotations=parse_annotations(obj.get("annotations"), what),
            raw=bytes(data),
        )

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        obj["manifests"] = [entry.to_obj() for entry in self.manifests]
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj

    def to_bytes(self) -> bytes:
        return dump_json(self.to_obj())

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw or self.to_bytes())


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """The parts of an image config Coffer relies on; the full document stays in ``raw``."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    variant: str | None = None
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str | None = None
    user: str | None = None
    labels: Mapping[str, str] = field(default=EMPTY_ANNOTATIONS)
    raw: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        what = "image config"
        obj = load_json_object(data, what, MAX_CONFIG_BYTES)
        rootfs = obj.get("rootfs")
        if not isinstance(rootfs, dict):
            raise FormatError(what, "missing rootfs object")
        if rootfs.get("type") != "layers":
            raise FormatError(what, f"rootfs.type {rootfs.get('type')!r} is not 'layers'")
        diff_ids = tuple(
            check_digest(item, f"{what} diff_id {n}")
            for n, item in enumerate(_get_list(rootfs, "diff_ids", what, MAX_LAYERS, required=True))
        )
        run = obj.get("config") or {}
        if not isinstance(run, dict):
            raise FormatError(what, "config is not an object")
        labels = run.get("Labels")
        if labels is not None and (
            not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values())
        ):
            raise FormatError(what, "config.Labels is not a string map")
        return cls(
            architecture=_req_str(obj, "architecture", what),
            os=_req_str(obj, "os", what),
            variant=_get_str(obj, "variant", what, required=False),
            diff_ids=diff_ids,
            env=_str_list(run, "Env", what, 4096),
            entrypoint=_str_list(run, "Entrypoint", what, 4096),
            cmd=_str_list(run, "Cmd", what, 4096),
            working_dir=_get_str(run, "WorkingDir", what, required=False),
            user=_get_str(run, "User", what, required=False),
            labels=FrozenMap(labels),
            raw=bytes(data),
        )

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)


def parse_manifest_or_index(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a document that may be either a manifest or an index (e.g. a registry response)."""
    kind = media_type
    if kind is None:
        obj = load_json_object(data, "manifest or index", max(MAX_MANIFEST_BYTES, MAX_INDEX_BYTES))
        declared = obj.get("mediaType")
        if isinstance(declared, str):
            kind = declared
        elif "manifests" in obj:
            kind = media.OCI_INDEX
        else:
            kind = media.OCI_MANIFEST
    if kind in media.INDEX_TYPES:
        return Index.parse(data, media_type=kind)
    if kind in media.MANIFEST_TYPES:
        return Manifest.parse(data, media_type=kind)
    raise FormatError("manifest or index", f"unknown media type {kind!r}")


# A function reading a small blob whole under a size ceiling: a source's ``read_document`` or a
# layout's ``read_blob``.
DocumentReader = Callable[["Descriptor", int], bytes]


def read_manifest_with(descriptor: Descriptor, read: DocumentReader) -> Manifest:
    """The manifest ``descriptor`` points at (its media type checked first), read with ``read``."""
    if descriptor.media_type not in media.MANIFEST_TYPES:
        raise FormatError("manifest descriptor", f"media type {descriptor.media_type!r} is not a manifest")
    return Manifest.parse(read(descriptor, MAX_MANIFEST_BYTES), media_type=descriptor.media_type)


def read_index_with(descriptor: Descriptor, read: DocumentReader) -> Index:
    """The index ``descriptor`` points at (its media type checked first), read with ``read``."""
    if descriptor.media_type not in media.INDEX_TYPES:
        raise FormatError("index descriptor", f"media type {descriptor.media_type!r} is not an index")
    return Index.parse(read(descriptor, MAX_INDEX_BYTES), media_type=descriptor.media_type)


def read_config_with(descriptor: Descriptor, read: DocumentReader) -> ImageConfig:
    """The image config ``descriptor`` points at (its media type checked first), read with ``read``."""
    if descriptor.media_type not in media.CONFIG_TYPES:
        raise FormatError("config descriptor", f"media type {descriptor.media_type!r} is not a config")
    return ImageConfig.parse(read(descriptor, MAX_CONFIG_BYTES))
