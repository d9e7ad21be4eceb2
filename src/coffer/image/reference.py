"""Image references in the transport syntax skopeo and podman users type.

* ``oci:PATH[:TAG]`` -- an OCI image layout directory, optionally one tagged image in it;
* ``docker-archive:PATH[:REF]`` -- a ``docker save`` tarball; ``REF`` is ``name:tag`` or ``@N``
  (the N-th image of the archive);
* ``docker://[HOST/]REPO[:TAG][@sha256:DIGEST]`` -- an image in an OCI distribution registry; a missing
  host means Docker Hub (``docker.io``, ``library/`` for single-component names) and a missing tag
  and digest means ``latest``.

As in containers/image, ``PATH`` ends at the first colon, so a layout path cannot itself hold one.
Parsing is pure and refuses anything it does not understand with a :class:`~coffer.errors.UsageError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from coffer.errors import UsageError

DOCKER_HUB: Final = "docker.io"
DEFAULT_TAG: Final = "latest"
MAX_NAME_LENGTH: Final = 255

_TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_OCI_REF_RE: Final = re.compile(r"[A-Za-z0-9._/:@+-]{1,255}")
_COMPONENT_RE: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST_RE: Final = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class OciLayoutRef:
    """``oci:PATH[:TAG]``."""

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True, kw_only=True)
class DockerArchiveRef:
    """``docker-archive:PATH[:REF]``: ``name`` (a normalised registry reference) or ``index``."""

    path: Path
    name: RegistryRef | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.name is not None:
            return f"docker-archive:{self.path}:{self.name.familiar}"
        if self.index is not None:
            return f"docker-archive:{self.path}:@{self.index}"
        return f"docker-archive:{self.path}"


@dataclass(frozen=True, kw_only=True)
class RegistryRef:
    """``docker://HOST/REPO:TAG`` or ``...@sha256:...``, host and repository normalised."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes into ``/v2/<repo>/manifests/<reference>``: the digest if pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def familiar(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return f"docker://{self.familiar}"

    def with_digest(self, digest: str) -> RegistryRef:
        return RegistryRef(host=self.host, repository=self.repository, tag=self.tag, digest=digest)


ImageRef = OciLayoutRef | DockerArchiveRef | RegistryRef


def parse_registry_name(text: str, *, default_tag: bool = True) -> RegistryRef:
    """Parse ``[HOST/]REPO[:TAG][@DIGEST]`` (the part after ``docker://``)."""
    if not text or len(text) > MAX_NAME_LENGTH + 80:
        raise UsageError(f"image name {text[:80]!r} is empty or too long")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise UsageError(f"image {text!r}: digest must be sha256: followed by 64 lowercase hex digits")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"image {text!r}: invalid tag {tag!r}")
    parts = rest.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, parts[1:]
    else:
        host, path = DOCKER_HUB, parts
    if not _HOST_RE.fullmatch(host):
        raise UsageError(f"image {text!r}: invalid registry host {host!r}")
    if host == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    for component in path:
        if not _COMPONENT_RE.fullmatch(component):
            raise UsageError(
                f"image {text!r}: repository component {component!r} must be lowercase letters, digits "
                "and single separators"
            )
    repository = "/".join(path)
    if len(f"{host}/{repository}") > MAX_NAME_LENGTH:
        raise UsageError(f"image {text!r}: name longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return RegistryRef(host=host, repository=repository, tag=tag, digest=digest)


def _split_path(transport: str, body: str) -> tuple[Path, str | None]:
    path_text, sep, rest = body.partition(":")
    if not path_text:
        raise UsageError(f"{transport}: reference needs a path")
    if "\x00" in path_text:
        raise UsageError(f"{transport}: path contains a NUL byte")
    return Path(path_text), (rest if sep else None)


def parse_reference(text: str) -> ImageRef:
    """Parse a transport-qualified image reference; :class:`UsageError` on anything else."""
    transport, sep, body = text.partition(":")
    if not sep:
        raise UsageError(
            f"image reference {text[:80]!r} has no transport; use oci:PATH[:TAG], "
            "docker-archive:PATH[:REF] or docker://HOST/REPO:TAG"
        )
    if transport == "oci":
        path, tag = _split_path("oci", body)
        if tag and not _OCI_REF_RE.fullmatch(tag):
            raise UsageError(f"oci: invalid image name {tag[:80]!r} in the layout")
        return OciLayoutRef(path=path, tag=tag or None)
    if transport == "docker-archive":
        path, ref = _split_path("docker-archive", body)
        if not ref:
            return DockerArchiveRef(path=path)
        if ref.startswith("@"):
            if not ref[1:].isdecimal() or len(ref) > 8:
                raise UsageError(f"docker-archive: source index {ref!r} is not @N")
            return DockerArchiveRef(path=path, index=int(ref[1:]))
        name = parse_registry_name(ref, default_tag=False)
        if name.digest is not None:
            raise UsageError("docker-archive: a reference inside an archive cannot carry a digest")
        if name.tag is None:
            raise UsageError(f"docker-archive: reference {ref!r} needs a tag")
        return DockerArchiveRef(path=path, name=name)
    if transport == "docker":
        if not body.startswith("//"):
            raise UsageError(f"docker transport needs docker://HOST/REPO:TAG, got {text[:80]!r}")
        return parse_registry_name(body[2:])
    raise UsageError(f"unknown transport {transport[:40]!r}; supported: oci:, docker-archive:, docker://")
