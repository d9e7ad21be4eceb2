"""Where layer keys come from: recipient files, private-key files, and the KBS.

Encryption with ``--key kbs:///REPO/key/NAME`` uses a 32-byte key-encryption key (KEK) that lives in
the KBS: an existing resource at that path is reused (so several images can share one key), otherwise
a new KEK is generated here and uploaded through the admin API. The KEK is never printed or logged.

Decryption from the KBS runs the attestation handshake first (once, on the first layer that names a
``kbs:///`` key) and asks for each KEK as a resource: a refused attestation or release stops the
decryption before any plaintext is produced.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from coffer._internal.files import read_bounded
from coffer.errors import FormatError, ProtocolError, UsageError
from coffer.image import ocicrypt
from coffer.kbs.admin_client import AdminClient, resource_path
from coffer.kbs.client import KbsClient

KBS_PREFIX: Final = "kbs:///"
MAX_KEY_FILE: Final = 64 * 1024


def read_key_file(path: Path, what: str) -> bytes:
    """A small key or password file, whole (UsageError when unreadable or over 64 KiB)."""
    return read_bounded(path, what, MAX_KEY_FILE)


def jwe_recipient(spec: str) -> ocicrypt.JweRecipient:
    """``jwe:PUB.pem`` (a public key or certificate, PEM or DER) → a JWE recipient."""
    scheme, sep, path = spec.partition(":")
    if not sep or scheme != "jwe" or not path:
        raise UsageError(f"--recipient must be jwe:PUBLIC_KEY_FILE, got {spec!r}")
    data = read_key_file(Path(path), "recipient key")
    try:
        return ocicrypt.JweRecipient(ocicrypt.load_public_key(data))
    except FormatError as exc:
        raise UsageError(f"{path}: {exc.reason}") from exc


def private_keys(paths: Iterable[Path], password: bytes | None = None) -> tuple[ocicrypt.PrivateKey, ...]:
    """Load decryption keys from files (PEM or DER; ``password`` for encrypted ones)."""
    keys = []
    for path in paths:
        try:
            keys.append(ocicrypt.load_private_key(read_key_file(path, "private key"), password))
        except FormatError as exc:
            raise UsageError(f"{path}: {exc.reason}") from exc
    return tuple(keys)


def kbs_key_id(spec: str) -> str:
    """Check ``kbs:///REPO/TYPE/TAG`` and return it normalised (the ``kid`` stored on the layer)."""
    if not spec.startswith(KBS_PREFIX):
        raise UsageError(f"--key must be kbs:///REPO/TYPE/TAG, got {spec!r}")
    return KBS_PREFIX + resource_path(spec)


@dataclass(frozen=True)
class KbsKek:
    """A KEK recipient and whether it was created by this call (else an existing one was reused)."""

    recipient: ocicrypt.KekRecipient
    created: bool


def kek_from_kbs(admin: AdminClient, spec: str) -> KbsKek:
    """The KEK at ``spec``: reused if the KBS has one, else generated here and uploaded."""
    kid = kbs_key_id(spec)
    existing = admin.get_resource(kid)
    if existing is not None:
        if len(existing) != ocicrypt.KEK_LEN:
            raise UsageError(
                f"the KBS resource {kid} exists but is not a {ocicrypt.KEK_LEN}-byte key; "
                "choose another name"
            )
        return KbsKek(ocicrypt.KekRecipient(kid, existing), created=False)
    kek = secrets.token_bytes(ocicrypt.KEK_LEN)
    admin.put_resource(kid, kek)
    return KbsKek(ocicrypt.KekRecipient(kid, kek), created=True)


class KeyReleaseRefusedError(ProtocolError):
    """The KBS refused the attestation or the release of a key-encryption key."""


@dataclass
class AttestedKekLookup:
    """``DecryptionKeys.kek_for`` backed by a KBS: attests on first use, then fetches each KEK once.

    Errors from the KBS (attestation refused, release denied) propagate as they are, so the caller
    aborts the whole decryption; a kid that is not a ``kbs:///`` URI is simply not ours (None).
    """

    client: KbsClient
    fetched: list[str] = field(default_factory=list)
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    def __call__(self, kid: str) -> bytes | None:
        if not kid.startswith(KBS_PREFIX):
            return None
        if kid not in self._cache:
            try:
                if self.client.token is None:
                    self.client.attest()
                self._cache[kid] = self.client.get_resource(resource_path(kid))
            except ProtocolError as exc:
                raise KeyReleaseRefusedError(exc.kind, f"{kid}: {exc.detail}") from exc
            self.fetched.append(kid)
        return self._cache[kid]
