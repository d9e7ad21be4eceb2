"""Configuration of ``coffer kbs serve``: one TOML file, every key optional.

Example (all values shown are the defaults unless noted)::

    listen = "127.0.0.1:8080"
    db = "sqlite:///<state dir>/state.db"       # or "postgresql://user@host/db" (replicas share it)
    state_dir = "~/.local/state/coffer/kbs"       # $COFFER_KBS_STATE_DIR overrides the default
    max_body_bytes = 2097152

    [master_key]
    file = "/etc/coffer/kbs-master.key"          # 32 bytes, raw or hex
    env = "COFFER_KBS_MASTER_KEY"                 # read when no file is configured
    # With neither, <state_dir>/master.key is used, generated (mode 0600) on the first start.

    [sessions]
    timeout_seconds = 300
    max_sessions = 150000                         # ~300 x the sustained handshake rate

    [token]
    ttl_seconds = 300

    [policy]
    resource = "resource.rego"                    # installed at start-up when set
    [policy.attestation]                          # policy id -> Rego file, installed at start-up
    default_cpu = "ear-cpu.rego"

    [collateral]
    endorsements = "vcek.der"                     # SNP offline endorsements (file or directory)
    collateral_dir = "intel/"                     # TDX/SGX offline collateral
    fetch = false                                 # fetch from AMD KDS / Intel PCS when missing
    cache_dir = "..."

    [admin]                                       # absent: no admin access at all
    issuer = "coffer-admin"                       # optional: required "iss"
    audience = "coffer-kbs"                       # optional: required in "aud"
    [[admin.keys]]
    id = "ops"
    public_key = "admin-ops.pub"                  # PEM: Ed25519 (EdDSA) or EC P-256 (ES256)
    [[admin.acls]]
    role = "admin"                                # the token's "role" claim
    allowed_endpoints = "^/kbs/v0/.*$"            # regex over path (+ "?query"), must start ^/kbs
    [[admin.acls]]
    role = "read-only"
    allowed_endpoints = "^/kbs/v0/(resource-policy|attestation-policy|reference-value|audit).*$"

Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from coffer.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_MASTER_KEY_ENV = "COFFER_KBS_MASTER_KEY"
DEFAULT_SESSION_TIMEOUT = timedelta(minutes=5)
# Live sessions last 5 minutes, so the bound must be about 300 times the sustained handshake rate
# (150 000 sustains 500 handshakes/s); it still caps what an /auth flood can make the store hold.
DEFAULT_MAX_SESSIONS = 150_000
DEFAULT_TOKEN_TTL = timedelta(minutes=5)
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
STATE_DIR_ENV = "COFFER_KBS_STATE_DIR"

ADMIN_ROLES = ("admin", "read-only")


def default_state_dir() -> Path:
    """``$COFFER_KBS_STATE_DIR``, else ``$XDG_STATE_HOME/coffer/kbs``, else ``~/.local/state/coffer/kbs``."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "coffer" / "kbs"


@dataclass(frozen=True, kw_only=True)
class AdminKey:
    """One trusted admin token signer: a PEM public key (Ed25519 → EdDSA, EC P-256 → ES256)."""

    id: str
    public_key_pem: bytes
    source: str = ""  # the file it was read from, for messages


@dataclass(frozen=True, kw_only=True)
class AdminAcl:
    """Tokens whose ``role`` claim is ``role`` may call endpoints matching ``allowed_endpoints``
    (a regex matched in full against the request path, plus ``?query`` when there is one)."""

    role: str
    allowed_endpoints: str


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    keys: tuple[AdminKey, ...]
    acls: tuple[AdminAcl, ...] = ()
    issuer: str | None = None
    audience: str | None = None
    max_token_lifetime: timedelta = timedelta(hours=24)


@dataclass(frozen=True, kw_only=True)
class CollateralConfig:
    endorsements: Path | None = None
    collateral_dir: Path | None = None
    fetch: bool = False
    cache_dir: Path | None = None


@dataclass(frozen=True, kw_only=True)
class KbsConfig:
    listen: str = DEFAULT_LISTEN
    db: str | None = None  # None → sqlite:///<state_dir>/state.db
    state_dir: Path = field(default_factory=default_state_dir)
    master_key_file: Path | None = None
    master_key_env: str = DEFAULT_MASTER_KEY_ENV
    session_timeout: timedelta = DEFAULT_SESSION_TIMEOUT
    max_sessions: int = DEFAULT_MAX_SESSIONS
    token_ttl: timedelta = DEFAULT_TOKEN_TTL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    resource_policy_file: Path | None = None
    attestation_policy_files: Mapping[str, Path] = field(default_factory=dict)
    collateral: CollateralConfig = field(default_factory=CollateralConfig)

    def master_key_path(self) -> Path | None:
        """The master key file in force: the configured one; else, when the environment variable
        is not set either, ``<state_dir>/master.key`` (the embedded default, created on first start)."""
        if self.master_key_file is not None:
            return self.master_key_file
        if os.environ.get(self.master_key_env):
            return None
        return self.state_dir / "master.key"
    admin: AdminConfig | None = None  # None: every admin request is refused

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'state.db'}"

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def with_overrides(self, *, db: str | None = None, listen: str | None = None) -> KbsConfig:
        """The command line wins over the file."""
        out = self
        if db is not None:
            out = replace(out, db=db)
        if listen is not None:
            parse_listen(listen)
            out = replace(out, listen=listen)
        return out


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text.strip())
    if not match:
        raise ConfigError(f"listen address must be HOST:PORT, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port out of range: {port}")
    return host, port


def load_config(path: Path | None = None) -> KbsConfig:
    """Read a TOML configuration file (``None``: all defaults)."""
    if path is None:
        return KbsConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read KBS configuration {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"KBS configuration {path} is not valid TOML: {exc}") from exc
    return config_from_mapping(data, base_dir=path.resolve().parent, source=str(path))


def config_from_mapping(data: Mapping[str, Any], *, base_dir: Path,
                        source: str = "configuration") -> KbsConfig:
    reader = _Reader(data, source, base_dir)
    reader.allow_only("listen", "db", "state_dir", "max_body_bytes", "master_key", "sessions", "token",
                      "policy", "collateral", "admin")
    listen = reader.string("listen", DEFAULT_LISTEN)
    parse_listen(listen)
    state_dir = reader.path("state_dir") or default_state_dir()

    master = reader.table("master_key")
    master.allow_only("file", "env")
    sessions = reader.table("sessions")
    sessions.allow_only("timeout_seconds", "max_sessions")
    token = reader.table("token")
    token.allow_only("ttl_seconds")
    policy = reader.table("policy")
    policy.allow_only("resource", "attestation")
    attestation_policies = policy.table("attestation")
    collateral = reader.table("collateral")
    collateral.allow_only("endorsements", "collateral_dir", "fetch", "cache_dir")

    return KbsConfig(
        listen=listen,
        db=reader.optional_string("db"),
        state_dir=state_dir,
        master_key_file=master.path("file"),
        master_key_env=master.string("env", DEFAULT_MASTER_KEY_ENV),
        session_timeout=timedelta(seconds=sessions.positive_int("timeout_seconds", 300)),
        max_sessions=sessions.positive_int("max_sessions", DEFAULT_MAX_SESSIONS),
        token_ttl=timedelta(seconds=token.positive_int("ttl_seconds", 300)),
        max_body_bytes=reader.positive_int("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        resource_policy_file=policy.path("resource"),
        attestation_policy_files={name: attestation_policies.path_required(name)
                                  for name in attestation_policies.names()},
        collateral=CollateralConfig(
            endorsements=collateral.path("endorsements"),
            collateral_dir=collateral.path("collateral_dir"),
            fetch=collateral.boolean("fetch", False),
            cache_dir=collateral.path("cache_dir"),
        ),
        admin=_admin(reader) if "admin" in data else None,
    )


def _admin(reader: _Reader) -> AdminConfig:
    admin = reader.table("admin")
    admin.allow_only("keys", "acls", "issuer", "audience", "max_token_lifetime_seconds")
    keys: list[AdminKey] = []
    for index, item in enumerate(admin.table_list("keys")):
        item.allow_only("id", "public_key")
        key_path = item.path_required("public_key")
        try:
            pem = key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read admin public key {key_path}: {exc.strerror}") from exc
        if b"PRIVATE KEY" in pem:
            raise ConfigError(f"admin key {key_path} holds a private key; configure the public key only")
        keys.append(AdminKey(id=item.string("id", f"key{index}"), public_key_pem=pem, source=str(key_path)))
    acls: list[AdminAcl] = []
    for item in admin.table_list("acls"):
        item.allow_only("role", "allowed_endpoints")
        role = item.string_required("role")
        pattern = item.string_required("allowed_endpoints")
        if not pattern.startswith("^/kbs") or not pattern.endswith("$"):
            raise ConfigError(f"admin ACL for role {role!r}: allowed_endpoints must start with '^/kbs' "
                              f"and end with '$', got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"admin ACL for role {role!r}: bad regex: {exc}") from exc
        acls.append(AdminAcl(role=role, allowed_endpoints=pattern))
    return AdminConfig(
        keys=tuple(keys),
        acls=tuple(acls),
        issuer=admin.optional_string("issuer"),
        audience=admin.optional_string("audience"),
        max_token_lifetime=timedelta(seconds=admin.positive_int("max_token_lifetime_seconds", 86400)),
    )


class _Reader:
    """Typed access to one TOML table with messages naming the key."""

    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path) -> None:
        self.data = data
        self.where = where
        self.base_dir = base_dir

    def _fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key!r} must be {expected}")

    def names(self) -> list[str]:
        return list(self.data)

    def allow_only(self, *names: str) -> None:
        unknown = sorted(set(self.data) - set(names))
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s) {', '.join(unknown)}")

    def table(self, key: str) -> _Reader:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise self._fail(key, "a table")
        return _Reader(value, f"{self.where} [{key}]", self.base_dir)

    def table_list(self, key: str) -> list[_Reader]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self._fail(key, "an array of tables")
        return [_Reader(v, f"{self.where} {key}[{i}]", self.base_dir) for i, v in enumerate(value)]

    def optional_string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "a string")
        return value

    def string(self, key: str, default: str) -> str:
        value = self.optional_string(key)
        return default if value is None else value

    def string_required(self, key: str) -> str:
        value = self.optional_string(key)
        if not value:
            raise self._fail(key, "a non-empty string")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._fail(key, "a positive integer")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def path(self, key: str) -> Path | None:
        value = self.optional_string(key)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def path_required(self, key: str) -> Path:
        path = self.path(key)
        if path is None:
            raise self._fail(key, "a path")
        return path
