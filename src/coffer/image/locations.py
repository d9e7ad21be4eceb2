"""Open the source or destination a parsed image reference names (``oci:``, ``docker-archive:``,
``docker://``)."""

from __future__ import annotations

from typing import Final

from coffer.errors import UsageError
from coffer.image.docker_archive import DockerArchiveDestination, DockerArchiveSource
from coffer.image.reference import DockerArchiveRef, ImageRef, OciLayoutRef, RegistryRef, parse_reference
from coffer.image.registry import RegistryDestination, RegistrySource
from coffer.image.transport import (
    ImageDestination,
    ImageSource,
    OciLayoutDestination,
    OciLayoutSource,
    TransportOptions,
)

DEFAULT_OPTIONS: Final = TransportOptions()


def open_source(ref: ImageRef | str, options: TransportOptions = DEFAULT_OPTIONS) -> ImageSource:
    """The source for a reference (parsed, or text such as ``oci:dir:tag``)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if isinstance(ref, OciLayoutRef):
        return OciLayoutSource(ref)
    if isinstance(ref, DockerArchiveRef):
        return DockerArchiveSource(ref)
    if isinstance(ref, RegistryRef):
        return RegistrySource(ref, options)
    raise UsageError(f"unsupported image reference {ref!r}")


def open_destination(ref: ImageRef | str, options: TransportOptions = DEFAULT_OPTIONS) -> ImageDestination:
    """The destination for a reference (parsed, or text)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if isinstance(ref, OciLayoutRef):
        return OciLayoutDestination(ref)
    if isinstance(ref, DockerArchiveRef):
        return DockerArchiveDestination(ref)
    if isinstance(ref, RegistryRef):
        return RegistryDestination(ref, options)
    raise UsageError(f"unsupported image reference {ref!r}")
