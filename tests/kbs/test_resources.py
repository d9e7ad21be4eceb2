"""Sealed resources: AES-256-GCM envelopes under the master key, rotation, key loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coffer._internal.clock import utc_now
from coffer.errors import ConfigError, ProtocolError, StorageError
from coffer.kbs.resources import MasterKey, ResourceStore, seal, unseal
from coffer.kbs.store import NS_RESOURCES, MemoryStore

SECRET = b"top secret value 0123456789"


def _raw(store: MemoryStore, path: str) -> bytes:
    entry = store.get(NS_RESOURCES, path, now=utc_now())
    assert entry is not None
    return entry.value


def test_round_trip_and_listing() -> None:
    store = MemoryStore()
    resources = ResourceStore(store, MasterKey.generate())
    resources.put("default/key/one", SECRET)
    resources.put("default/key/two", b"")
    assert resources.get("default/key/one") == SECRET
    assert resources.get("default/key/two") == b""
    assert resources.get("default/key/three") is None
    assert resources.list() == ["default/key/one", "default/key/two"]
    assert resources.delete("default/key/one")
    assert not resources.delete("default/key/one")
    assert resources.list() == ["default/key/two"]


def test_stored_value_holds_no_plaintext() -> None:
    store = MemoryStore()
    ResourceStore(store, MasterKey.generate()).put("repo/type/tag", SECRET)
    raw = _raw(store, "repo/type/tag")
    assert SECRET not in raw
    assert raw.startswith(b"CKR1")


def test_each_seal_uses_fresh_keys_and_nonces() -> None:
    key = MasterKey.generate()
    assert seal(key, "a/b/c", SECRET) != seal(key, "a/b/c", SECRET)


@pytest.mark.parametrize("offset", [4, 12, 30, 80, 95, -1])
def test_rejects_flipped_byte_in_envelope(offset: int) -> None:
    key = MasterKey.generate()
    sealed = bytearray(seal(key, "a/b/c", SECRET))
    sealed[offset] ^= 0x01
    with pytest.raises(StorageError) as info:
        unseal([key], "a/b/c", bytes(sealed))
    assert SECRET.decode() not in str(info.value)


def test_rejects_truncated_envelope() -> None:
    key = MasterKey.generate()
    sealed = seal(key, "a/b/c", SECRET)
    with pytest.raises(StorageError):
        unseal([key], "a/b/c", sealed[:40])


def test_rejects_value_moved_to_another_path() -> None:
    store = MemoryStore()
    resources = ResourceStore(store, MasterKey.generate())
    resources.put("repo/type/secret", SECRET)
    store.put(NS_RESOURCES, "repo/type/public", _raw(store, "repo/type/secret"))
    with pytest.raises(StorageError, match="integrity"):
        resources.get("repo/type/public")


def test_rejects_wrong_master_key() -> None:
    store = MemoryStore()
    ResourceStore(store, MasterKey.generate()).put("a/b/c", SECRET)
    other = ResourceStore(store, MasterKey.generate())
    assert not other.check_master_key()
    with pytest.raises(StorageError, match="not configured"):
        other.get("a/b/c")


def test_rejects_bad_resource_path() -> None:
    resources = ResourceStore(MemoryStore(), MasterKey.generate())
    for bad in ("a/b", "a/b/c/d", "../b/c", "a/b/.c", "a//c", ""):
        with pytest.raises(ProtocolError) as info:
            resources.put(bad, SECRET)
        assert info.value.kind == "PluginInternalError"


def test_rotation_reseals_everything() -> None:
    store = MemoryStore()
    old, new = MasterKey.generate(), MasterKey.generate()
    resources = ResourceStore(store, old)
    for i in range(5):
        resources.put(f"repo/type/t{i}", SECRET + bytes([i]))
    before = {p: _raw(store, p) for p in resources.list()}
    assert resources.rotate(new) == 5
    for path, value in before.items():
        assert _raw(store, path) != value
    only_new = ResourceStore(store, new)
    assert only_new.check_master_key()
    assert only_new.get("repo/type/t3") == SECRET + b"\x03"
    with pytest.raises(StorageError):
        ResourceStore(store, old).get("repo/type/t3")
    # writes after the rotation use the new key
    resources.put("repo/type/later", SECRET)
    assert only_new.get("repo/type/later") == SECRET
    # a second run has nothing left to do
    assert ResourceStore(store, old).rotate(new) == 0


def test_interrupted_rotation_resumes_and_stays_readable() -> None:
    store = MemoryStore()
    old, new = MasterKey.generate(), MasterKey.generate()
    resources = ResourceStore(store, old)
    for i in range(4):
        resources.put(f"repo/type/t{i}", SECRET + bytes([i]))
    # simulate a crash after two values were re-sealed
    for path in ("repo/type/t0", "repo/type/t1"):
        store.put(NS_RESOURCES, path, seal(new, path, SECRET + bytes([int(path[-1])])))
    during = ResourceStore(store, old, fallback_keys=[new])
    assert [during.get(f"repo/type/t{i}") for i in range(4)] == [SECRET + bytes([i]) for i in range(4)]
    assert ResourceStore(store, old).rotate(new) == 2
    final = ResourceStore(store, new)
    assert [final.get(f"repo/type/t{i}") for i in range(4)] == [SECRET + bytes([i]) for i in range(4)]


def test_master_key_from_hex_file_raw_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = MasterKey.generate()
    hex_file = tmp_path / "hex.key"
    key.write(hex_file)
    assert MasterKey.load(hex_file) == key
    assert stat.S_IMODE(os.stat(hex_file).st_mode) == 0o600
    raw_file = tmp_path / "raw.key"
    raw_file.write_bytes(bytes.fromhex(key.hex()))
    raw_file.chmod(0o600)
    assert MasterKey.load(raw_file) == key
    monkeypatch.setenv("MY_KEY", key.hex())
    assert MasterKey.load(None, "MY_KEY") == key


def test_master_key_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    MasterKey.generate().write(path)
    with pytest.raises(FileExistsError):
        MasterKey.generate().write(path)


def test_rejects_missing_or_malformed_master_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COFFER_KBS_MASTER_KEY", raising=False)
    with pytest.raises(ConfigError, match="no KBS master key"):
        MasterKey.load(None)
    short = tmp_path / "short"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="32 bytes"):
        MasterKey.load(short)
    with pytest.raises(ConfigError, match="cannot read"):
        MasterKey.load(tmp_path / "absent")
    monkeypatch.setenv("COFFER_KBS_MASTER_KEY", "zz" * 32)
    with pytest.raises(ConfigError):
        MasterKey.load(None)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_rejects_master_key_file_readable_by_group_or_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    MasterKey.generate().write(path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="group or others") as info:
        MasterKey.load(path)
    assert "chmod 600" in str(info.value)
    path.chmod(0o400)  # owner-only, read-only: fine
    MasterKey.load(path)


def test_master_key_repr_does_not_reveal_it() -> None:
    key = MasterKey.generate()
    assert key.hex() not in repr(key)
    assert key.hex() not in str(key)
    assert repr(key) == f"MasterKey(id={key.key_id.hex()})"
