"""Media type names of OCI and Docker images, and which of them Coffer accepts.

Encrypted layers keep their plaintext media type and gain the ``+encrypted`` suffix (the ocicrypt
convention); the helpers here convert between the two forms and classify a layer's compression.
"""

from __future__ import annotations

from typing import Final, Literal

from coffer.errors import FormatError, UnsupportedError

ENCRYPTED_SUFFIX: Final = "+encrypted"

# Manifests and indexes.
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"

# Configs.
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"

# Plaintext layers.
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# Encrypted layers (ocicrypt).
OCI_LAYER_TAR_ENC: Final = OCI_LAYER_TAR + ENCRYPTED_SUFFIX
OCI_LAYER_GZIP_ENC: Final = OCI_LAYER_GZIP + ENCRYPTED_SUFFIX
OCI_LAYER_ZSTD_ENC: Final = OCI_LAYER_ZSTD + ENCRYPTED_SUFFIX
OCI_LAYER_ND_TAR_ENC: Final = OCI_LAYER_ND_TAR + ENCRYPTED_SUFFIX
OCI_LAYER_ND_GZIP_ENC: Final = OCI_LAYER_ND_GZIP + ENCRYPTED_SUFFIX
OCI_LAYER_ND_ZSTD_ENC: Final = OCI_LAYER_ND_ZSTD + ENCRYPTED_SUFFIX

MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})

PLAIN_LAYER_TYPES: Final = frozenset(
    {
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_ND_TAR,
        OCI_LAYER_ND_GZIP,
        OCI_LAYER_ND_ZSTD,
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_FOREIGN_GZIP,
    }
)
# Only OCI layer types have an encrypted form; Docker schema 2 manifests carry no annotations.
ENCRYPTED_LAYER_TYPES: Final = frozenset(
    {
        OCI_LAYER_TAR_ENC,
        OCI_LAYER_GZIP_ENC,
        OCI_LAYER_ZSTD_ENC,
        OCI_LAYER_ND_TAR_ENC,
        OCI_LAYER_ND_GZIP_ENC,
        OCI_LAYER_ND_ZSTD_ENC,
    }
)
LAYER_TYPES: Final = PLAIN_LAYER_TYPES | ENCRYPTED_LAYER_TYPES

# Every media type Coffer will read or write in a descriptor it acts on.
ALLOWED: Final = MANIFEST_TYPES | INDEX_TYPES | CONFIG_TYPES | LAYER_TYPES | {OCI_EMPTY}

Compression = Literal["none", "gzip", "zstd"]


def is_encrypted(media_type: str) -> bool:
    """Whether ``media_type`` names an ocicrypt-encrypted layer."""
    return media_type.endswith(ENCRYPTED_SUFFIX)


def encrypted(media_type: str) -> str:
    """The ``+encrypted`` form of a plaintext OCI layer type (refuses types ocicrypt has no form for)."""
    result = media_type + ENCRYPTED_SUFFIX
    if result not in ENCRYPTED_LAYER_TYPES:
        raise UnsupportedError(f"layers of media type {media_type!r} cannot be encrypted")
    return result


def decrypted(media_type: str) -> str:
    """The plaintext form of an encrypted layer type."""
    if media_type not in ENCRYPTED_LAYER_TYPES:
        raise FormatError("layer descriptor", f"media type {media_type!r} is not an encrypted layer type")
    return media_type.removesuffix(ENCRYPTED_SUFFIX)


def is_layer(media_type: str) -> bool:
    """Whether ``media_type`` is a known (plain or encrypted) layer type."""
    return media_type in LAYER_TYPES


def compression(media_type: str) -> Compression:
    """The compression of a plaintext layer blob of this type."""
    if media_type not in PLAIN_LAYER_TYPES:
        raise UnsupportedError(f"not a plaintext layer media type: {media_type!r}")
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


def check_allowed(media_type: str, what: str) -> str:
    """Return ``media_type`` if Coffer knows it, else raise a :class:`FormatError` naming ``what``."""
    if media_type not in ALLOWED:
        raise FormatError(what, f"unknown media type {media_type!r}")
    return media_type
