"""Resources (secrets) sealed at rest: an AES-256-GCM envelope per resource under a master key.

Each resource gets its own random 256-bit data key (DEK). The data is encrypted under the DEK, the DEK
is wrapped under the master key, both with AES-256-GCM and with the resource path as associated data, so
a sealed value copied to another path, or a truncated/altered one, fails to open. The envelope names
the master key by a short identifier (first 8 bytes of SHA-256 over a derived check value, never the
key itself), which lets rotation resume after a crash and lets a server detect a wrong master key.

Envelope layout (all lengths fixed except the ciphertext)::

    magic "CKR1" | key id (8) | wrap nonce (12) | wrapped DEK + tag (48) | data nonce (12) | ciphertext + tag

Neither the plaintext nor the keys ever appear in an error message, a log line or a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coffer.errors import ConfigError, StorageError
from coffer.kbs.store import NS_RESOURCES, Store

MASTER_KEY_BYTES = 32
_MAGIC = b"CKR1"
_KEY_ID_LEN = 8
_KEY_FILE_FORBIDDEN_MODE = 0o077  # a master key file must be private to its owner
_NONCE = 12
_WRAPPED = 32 + 16
_HEADER = len(_MAGIC) + _KEY_ID_LEN + _NONCE + _WRAPPED + _NONCE
_LIST_LIMIT = 1_000_000
_HEX_KEY = re.compile(rb"\s*([0-9a-fA-F]{64})\s*")


class MasterKey:
    """The 32-byte key that wraps every resource's data key. Its ``repr`` shows only its id."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigError(f"a KBS master key is {MASTER_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        self.key_id = hashlib.sha256(b"coffer kbs master key id\0" + key).digest()[:_KEY_ID_LEN]

    def __repr__(self) -> str:
        return f"MasterKey(id={self.key_id.hex()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.key_id)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(MASTER_KEY_BYTES))

    @classmethod
    def from_text(cls, data: bytes, what: str) -> MasterKey:
        """64 hex digits (surrounding white space ignored) or exactly 32 raw bytes."""
        match = _HEX_KEY.fullmatch(data)
        if match:
            return cls(bytes.fromhex(match.group(1).decode("ascii")))
        if len(data) == MASTER_KEY_BYTES:
            return cls(data)
        raise ConfigError(f"{what} must hold 32 bytes, raw or as 64 hex digits")

    @classmethod
    def load(cls, file: Path | None, env: str = "COFFER_KBS_MASTER_KEY") -> MasterKey:
        """From ``file`` when given, else from the environment variable ``env`` (hex).

        A key file group or others may access (``mode & 0o077``) is refused: ``chmod 600`` it."""
        if file is not None:
            try:
                with open(file, "rb") as handle:
                    mode = os.fstat(handle.fileno()).st_mode
                    if os.name == "posix" and mode & _KEY_FILE_FORBIDDEN_MODE:
                        raise ConfigError(
                            f"the KBS master key file {file} is accessible by group or others (mode "
                            f"{stat.S_IMODE(mode):04o}); restrict it to its owner: chmod 600 {file}")
                    data = handle.read()
            except OSError as exc:
                raise ConfigError(f"cannot read the KBS master key file {file}: {exc.strerror}") from exc
            return cls.from_text(data, f"master key file {file}")
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"no KBS master key: configure [master_key] file, or set ${env} "
                              "(64 hex digits; `coffer kbs rotate-master-key --new-key-file F` creates one)")
        return cls.from_text(value.encode(), f"${env}")

    def write(self, path: Path) -> None:
        """Write as hex to a new file readable by the owner only (fsynced; refuses to overwrite)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self._key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def hex(self) -> str:
        """The key as hex, for writing it to a file or an environment variable. Never log this."""
        return self._key.hex()

    def _aead(self) -> AESGCM:
        return AESGCM(self._key)


def validate_path(path: str) -> str:
    """``repo/type/tag`` checked with the Trustee resource path rule."""
    from coffer.kbs.protocol import parse_resource_path  # noqa: PLC0415  (sibling module, built in parallel)

    repo, kind, tag = parse_resource_path(path)
    return f"{repo}/{kind}/{tag}"


def _aad(path: str) -> bytes:
    return _MAGIC + b"\0" + path.encode("utf-8")


def seal(master: MasterKey, path: str, data: bytes) -> bytes:
    dek = AESGCM.generate_key(bit_length=256)
    wrap_nonce = secrets.token_bytes(_NONCE)
    data_nonce = secrets.token_bytes(_NONCE)
    wrapped = master._aead().encrypt(wrap_nonce, dek, _aad(path))
    body = AESGCM(dek).encrypt(data_nonce, data, _aad(path))
    return _MAGIC + master.key_id + wrap_nonce + wrapped + data_nonce + body


def sealed_key_id(sealed: bytes) -> bytes | None:
    if len(sealed) < _HEADER + 16 or not sealed.startswith(_MAGIC):
        return None
    return sealed[len(_MAGIC):len(_MAGIC) + _KEY_ID_LEN]


def unseal(keys: Sequence[MasterKey], path: str, sealed: bytes) -> bytes:
    key_id = sealed_key_id(sealed)
    if key_id is None:
        raise StorageError(f"sealed resource {path} is corrupt (bad envelope)")
    master = next((k for k in keys if k.key_id == key_id), None)
    if master is None:
        raise StorageError(f"resource {path} is sealed under master key {key_id.hex()}, which is not "
                           "configured (wrong master key?)")
    offset = len(_MAGIC) + _KEY_ID_LEN
    wrap_nonce = sealed[offset:offset + _NONCE]
    offset += _NONCE
    wrapped = sealed[offset:offset + _WRAPPED]
    offset += _WRAPPED
    data_nonce = sealed[offset:offset + _NONCE]
    offset += _NONCE
    try:
        dek = master._aead().decrypt(wrap_nonce, wrapped, _aad(path))
        return AESGCM(dek).decrypt(data_nonce, sealed[offset:], _aad(path))
    except InvalidTag:
        raise StorageError(f"sealed resource {path} failed its integrity check") from None


class ResourceStore:
    """Resources by ``repo/type/tag`` path, sealed in :data:`NS_RESOURCES` of a :class:`Store`.

    ``fallback_keys`` can still open values (used while a rotation to a new key is under way) but new
    values are always sealed under ``master_key``.
    """

    def __init__(self, store: Store, master_key: MasterKey, *,
                 fallback_keys: Sequence[MasterKey] = ()) -> None:
        self._store = store
        self._key = master_key
        self._keys = (master_key, *fallback_keys)

    @property
    def master_key_id(self) -> str:
        return self._key.key_id.hex()

    def put(self, path: str, data: bytes) -> None:
        path = validate_path(path)
        self._store.put(NS_RESOURCES, path, seal(self._key, path, data))

    def get(self, path: str) -> bytes | None:
        path = validate_path(path)
        entry = self._store.get(NS_RESOURCES, path, now=datetime.now(UTC))
        if entry is None:
            return None
        return unseal(self._keys, path, entry.value)

    def delete(self, path: str) -> bool:
        return self._store.delete(NS_RESOURCES, validate_path(path))

    def list(self) -> list[str]:
        return [e.key for e in self._store.list_entries(NS_RESOURCES, now=datetime.now(UTC),
                                                        limit=_LIST_LIMIT)]

    def check_master_key(self) -> bool:
        """False when a stored resource is sealed under a key this store does not hold."""
        entries = self._store.list_entries(NS_RESOURCES, now=datetime.now(UTC), limit=1)
        if not entries:
            return True
        return any(k.key_id == sealed_key_id(entries[0].value) for k in self._keys)

    def rotate(self, new_key: MasterKey) -> int:
        """Re-seal every resource (fresh data key) under ``new_key``; returns how many were re-sealed.

        Safe to re-run after an interruption: values already under ``new_key`` are skipped, and each
        value is replaced by compare-and-set, so a concurrent admin write is never overwritten with
        stale data (the rotation retries that one value).
        """
        keys = (*self._keys, new_key)
        count = 0
        for entry in self._store.list_entries(NS_RESOURCES, now=datetime.now(UTC), limit=_LIST_LIMIT):
            current = entry
            for _attempt in range(5):
                if sealed_key_id(current.value) == new_key.key_id:
                    break
                plain = unseal(keys, current.key, current.value)
                resealed = seal(new_key, current.key, plain)
                done = self._store.compare_and_set(NS_RESOURCES, current.key, resealed,
                                                   expected_version=current.version,
                                                   expires_at=current.expires_at)
                if done is not None:
                    count += 1
                    break
                latest = self._store.get(NS_RESOURCES, current.key, now=datetime.now(UTC))
                if latest is None:
                    break
                current = latest
            else:
                raise StorageError(f"resource {entry.key} kept changing during rotation; re-run it")
        self._key = new_key
        self._keys = (new_key, *(k for k in self._keys if k != new_key))
        return count


__all__ = ["MASTER_KEY_BYTES", "MasterKey", "ResourceStore", "seal", "unseal", "validate_path"]
