"""The KBS configuration file and the `coffer kbs rotate-master-key` command."""

from __future__ import annotations

import argparse
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coffer.cli import _kbs
from coffer.cli._output import Output
from coffer.errors import ConfigError, UsageError
from coffer.kbs.config import KbsConfig, load_config, parse_listen
from coffer.kbs.open_store import open_store, sqlite_url
from coffer.kbs.resources import MasterKey, ResourceStore


def test_defaults() -> None:
    config = load_config(None)
    assert config.listen == "127.0.0.1:8080"
    assert config.session_timeout == timedelta(minutes=5)
    assert config.max_sessions == 150_000
    assert config.admin is None
    assert config.db_url.startswith("sqlite:///")
    assert config.db_url.endswith("state.db")


def test_full_file_with_relative_paths(tmp_path: Path) -> None:
    pub = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "admin.pub").write_bytes(pub)
    path = tmp_path / "kbs.toml"
    path.write_text("""
listen = "0.0.0.0:9000"
db = "postgresql://kbs@db/kbs"
[master_key]
file = "keys/master.key"
[sessions]
timeout_seconds = 120
max_sessions = 50
[token]
ttl_seconds = 60
[policy]
resource = "resource.rego"
[policy.attestation]
default_cpu = "cpu.rego"
[collateral]
fetch = true
[admin]
issuer = "ops"
[[admin.keys]]
id = "ops-key"
public_key = "admin.pub"
[[admin.acls]]
role = "read-only"
allowed_endpoints = "^/kbs/v0/audit.*$"
""")
    config = load_config(path)
    assert config.host_port == ("0.0.0.0", 9000)
    assert config.db_url == "postgresql://kbs@db/kbs"
    assert config.master_key_file == tmp_path / "keys" / "master.key"
    assert config.session_timeout == timedelta(seconds=120)
    assert config.max_sessions == 50
    assert config.token_ttl == timedelta(seconds=60)
    assert config.resource_policy_file == tmp_path / "resource.rego"
    assert config.attestation_policy_files == {"default_cpu": tmp_path / "cpu.rego"}
    assert config.collateral.fetch
    assert config.admin is not None
    assert config.admin.issuer == "ops"
    assert config.admin.keys[0].id == "ops-key"
    assert config.admin.keys[0].public_key_pem == pub
    assert config.admin.acls[0].role == "read-only"
    overridden = config.with_overrides(db="sqlite:///x.db", listen="127.0.0.1:1")
    assert overridden.db_url == "sqlite:///x.db"
    assert overridden.host_port == ("127.0.0.1", 1)


@pytest.mark.parametrize(("text", "message"), [
    ("unknown = 1", "unknown key"),
    ("[sessions]\ntimeout_seconds = -1", "positive integer"),
    ("[sessions]\nmax_sessions = true", "positive integer"),
    ('listen = "nohost"', "HOST:PORT"),
    ("listen = [", "not valid TOML"),
    ('[[admin.acls]]\nrole = "admin"\nallowed_endpoints = ".*"', "must start with"),
])
def test_rejects_bad_configuration(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "kbs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_rejects_private_key_as_admin_key(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "admin.pem").write_bytes(private)
    path = tmp_path / "kbs.toml"
    path.write_text('[[admin.keys]]\npublic_key = "admin.pem"\n')
    with pytest.raises(ConfigError, match="private key"):
        load_config(path)


def test_parse_listen_ipv6() -> None:
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ConfigError):
        parse_listen("127.0.0.1:99999")


def _run(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    _kbs.register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(argv)
    stdout = io.StringIO()
    assert args.handler(args, Output(json_mode=True, stdout=stdout, stderr=io.StringIO())) == 0
    result: dict[str, object] = json.loads(stdout.getvalue())
    return result


def test_rotate_master_key_in_place(tmp_path: Path) -> None:
    old = MasterKey.generate()
    key_file = tmp_path / "master.key"
    old.write(key_file)
    db = sqlite_url(tmp_path / "state.db")
    store = open_store(db)
    ResourceStore(store, old).put("a/b/c", b"secret")
    store.close()
    config = tmp_path / "kbs.toml"
    config.write_text(f'db = "{db}"\n[master_key]\nfile = "master.key"\n')
    result = _run(["kbs", "rotate-master-key", "--config", str(config), "--json"])
    assert result["resealed"] == 1
    assert result["resumed"] is False
    new = MasterKey.load(key_file)
    assert new != old
    assert result["new_key_id"] == new.key_id.hex()
    assert not (tmp_path / "master.key.new").exists()
    store = open_store(db)
    try:
        assert ResourceStore(store, new).get("a/b/c") == b"secret"
    finally:
        store.close()


def test_rotate_master_key_from_env_needs_new_key_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    old = MasterKey.generate()
    monkeypatch.setenv("COFFER_KBS_MASTER_KEY", old.hex())
    db = sqlite_url(tmp_path / "state.db")
    store = open_store(db)
    ResourceStore(store, old).put("a/b/c", b"secret")
    store.close()
    with pytest.raises(UsageError, match="--new-key-file"):
        _run(["kbs", "rotate-master-key", "--db", db])
    result = _run(["kbs", "rotate-master-key", "--db", db, "--new-key-file", str(tmp_path / "new.key"),
                   "--json"])
    assert result["resealed"] == 1
    new = MasterKey.load(tmp_path / "new.key")
    store = open_store(db)
    try:
        assert ResourceStore(store, new).get("a/b/c") == b"secret"
    finally:
        store.close()


def test_kbs_group_is_shared() -> None:
    parser = argparse.ArgumentParser()
    groups = parser.add_subparsers(dest="group")
    first = _kbs.kbs_commands(groups)
    assert _kbs.kbs_commands(groups) is first


def test_default_config_is_a_kbs_config() -> None:
    assert isinstance(KbsConfig(), KbsConfig)


def test_master_key_defaults_to_a_generated_file_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coffer.kbs.app import resource_store_from_config

    monkeypatch.delenv("COFFER_KBS_MASTER_KEY", raising=False)
    state = tmp_path / "state"
    config = KbsConfig(state_dir=state)
    store = open_store(sqlite_url(tmp_path / "db.sqlite"))
    try:
        first = resource_store_from_config(config, store)
        first.put("repo/type/tag", b"secret")
        key_file = state / "master.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert state.stat().st_mode & 0o777 == 0o700
        again = resource_store_from_config(config, store)  # reuses the key, does not replace it
        assert again.get("repo/type/tag") == b"secret"
    finally:
        store.close()


def test_master_key_from_env_is_not_replaced_by_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COFFER_KBS_MASTER_KEY", MasterKey.generate().hex())
    assert KbsConfig(state_dir=tmp_path).master_key_path() is None
