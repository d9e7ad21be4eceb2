"""Deliver the policy's secrets into a container: fetched from the KBS by the guest, never the host.

Each :class:`~coffer.policy.model.Secret` names a KBS resource (``kbs:///REPO/TYPE/TAG``) and either
an environment variable or a file path inside the container. The guest fetches the resource after
attestation (:func:`kbs_fetcher`; tests inject any ``fetch`` function), then

* ``env``: appends ``NAME=VALUE`` to the container process's environment (the value must be UTF-8
  text without NUL bytes);
* ``file``: writes the value into the container's secrets directory in the guest's private storage
  (directory mode 0700, file mode 0400, owned by the container's user) and bind-mounts that one file
  read-only at the given path.

Secret values never appear in logs, error messages or reprs: errors name the resource and the
delivery target only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

from coffer.errors import CofferError, FormatError, StorageError, UsageError
from coffer.guest.bundle import BundleMount
from coffer.kbs.admin_client import resource_path
from coffer.kbs.client import KbsClient
from coffer.policy.model import Secret

#: ``fetch(resource_uri) -> value``.
SecretFetch = Callable[[str], bytes]

KBS_PREFIX: Final = "kbs:///"
MAX_SECRET_BYTES: Final = 1024 * 1024


class SecretDeliveryError(CofferError):
    """A secret could not be fetched or delivered (the message names the resource, never the value)."""


@dataclass(frozen=True)
class SecretDelivery:
    """What :func:`deliver_secrets` prepared: env entries and read-only file mounts."""

    env: tuple[str, ...] = field(default=(), repr=False)
    mounts: tuple[BundleMount, ...] = ()

    def __repr__(self) -> str:
        return f"SecretDelivery(env={len(self.env)} entries, mounts={[m.destination for m in self.mounts]})"


def kbs_fetcher(client_factory: Callable[[], KbsClient]) -> SecretFetch:
    """A fetch function backed by a KBS client: attests on first use, then gets each resource."""
    state: dict[str, KbsClient] = {}

    def fetch(resource: str) -> bytes:
        client = state.get("client")
        if client is None:
            client = state["client"] = client_factory()
        if client.token is None:
            client.attest()
        return client.get_resource(resource_path(resource))

    return fetch


def _check_target(secret: Secret, n: int) -> None:
    if not secret.resource.startswith(KBS_PREFIX):
        raise UsageError(f"secrets[{n}]: resource must be a kbs:/// URI")
    if (secret.env is None) == (secret.file is None):
        raise UsageError(f"secrets[{n}] ({secret.resource}): give exactly one of env or file")
    if secret.file is not None:
        path = PurePosixPath(secret.file)
        if not path.is_absolute() or ".." in path.parts or path == PurePosixPath("/"):
            raise UsageError(f"secrets[{n}] ({secret.resource}): file must be an absolute path without '..'")


def _fetch(fetch: SecretFetch, secret: Secret) -> bytes:
    # The fetch's own typed errors (attestation refused, release denied, KBS unreachable) pass
    # through unchanged: the agent maps each to its code, and none of them carries the value.
    value = fetch(secret.resource)
    if not isinstance(value, bytes):
        raise SecretDeliveryError(f"secret {secret.resource}: the fetch returned no bytes")
    if len(value) > MAX_SECRET_BYTES:
        raise SecretDeliveryError(f"secret {secret.resource} is larger than {MAX_SECRET_BYTES} bytes")
    return value


def _env_entry(secret: Secret, name: str, value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"secret {secret.resource}", f"value for env {name} is not UTF-8 text") from None
    if "\x00" in text:
        raise FormatError(f"secret {secret.resource}", f"value for env {name} contains a NUL byte")
    return f"{name}={text}"


def _write_file(directory: Path, n: int, secret: Secret, value: bytes, *, uid: int, gid: int) -> Path:
    # The name is derived from the position and target, never from the value.
    digest = hashlib.sha256(str(secret.file).encode()).hexdigest()[:16]
    path = directory / f"{n}-{digest}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        try:
            os.fchown(fd, uid, gid)
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(
            f"cannot write secret {secret.resource} for {secret.file}: {exc.strerror}") from exc
    return path


def deliver_secrets(
    secrets: Sequence[Secret], fetch: SecretFetch, directory: Path, *, uid: int, gid: int
) -> SecretDelivery:
    """Fetch every secret and prepare its delivery; ``directory`` (created, 0700) holds the files.

    On any error nothing fetched so far is left in ``directory``'s files (the caller removes the
    directory with the rest of the container).
    """
    for n, secret in enumerate(secrets):
        _check_target(secret, n)
    env: list[str] = []
    mounts: list[BundleMount] = []
    if not secrets:
        return SecretDelivery()
    try:
        directory.mkdir(mode=0o700, exist_ok=False)
    except OSError as exc:
        raise StorageError(f"cannot create the secrets directory: {exc.strerror}") from exc
    written: list[Path] = []
    try:
        for n, secret in enumerate(secrets):
            value = _fetch(fetch, secret)
            if secret.env is not None:
                env.append(_env_entry(secret, secret.env, value))
            else:
                assert secret.file is not None
                path = _write_file(directory, n, secret, value, uid=uid, gid=gid)
                written.append(path)
                mounts.append(BundleMount(destination=str(PurePosixPath(secret.file)), source=path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return SecretDelivery(env=tuple(env), mounts=tuple(mounts))
