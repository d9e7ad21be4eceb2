"""The runc bundle of a container: ``config.json`` built from a ``CreateContainerRequest``.

The host sends the OCI parameters in the policy contract's shape (``Process``, ``Root``, ``Mounts``,
``Linux``...); the policy has already checked them. This module turns them into the OCI runtime
configuration runc reads, keeping only what the guest is prepared to honour:

* the process (argv, environment, working directory, user, capabilities, ``noNewPrivileges``) is
  taken as requested, except that it never gets a terminal: its stdio are pipes the agent buffers;
* the standard runtime mounts (``/proc``, ``/dev``, ``/dev/pts``, ``/dev/shm``, ``/dev/mqueue``,
  ``/sys`` read-only, ``/sys/fs/cgroup`` read-only, ``/etc/hostname``, ``/etc/hosts``,
  ``/etc/resolv.conf``) are always the guest's own, whatever sources the request names;
* any other mount must be a bind (or a tmpfs) whose source lies under the sandbox's shared
  directory in the guest's storage. The host's view of that directory
  (:data:`coffer.policy.requests.SHARED_DIR`) is mapped into storage; an arbitrary path such as
  ``/etc`` or another container's root is refused. Propagation is always private;
* namespaces are pid, ipc, uts and mount — never network: every container of a sandbox shares the
  sandbox's network namespace — and never paths to join (the host does not choose namespaces);
* masked and read-only paths are runc's defaults plus whatever the request adds; devices are never
  passed through.

The JSON is written deterministically (sorted keys), and :func:`config_sha256` is the digest the
agent measures for ``CreateContainer``: SHA-256 of the canonical JSON of the request's OCI
parameters (the secrets the guest adds later are not part of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from coffer.errors import StorageError, UsageError

OCI_VERSION: Final = "1.0.2"
CONFIG_FILE: Final = "config.json"
#: Where the host runtime says its shared volumes are; mapped to ``<storage>/shared``.
HOST_SHARED_DIR: Final = "/run/kata-containers/shared/containers"
SHARED_SUBDIR: Final = "shared"

#: runc's default masked and read-only paths (``runc spec``).
DEFAULT_MASKED_PATHS: Final = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
)  # fmt: skip
DEFAULT_READONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

#: The standard mounts: destination → (type, source, options). The three ``/etc`` files are bound
#: from files the guest writes into the bundle.
STANDARD_MOUNTS: Final[Mapping[str, tuple[str, str, tuple[str, ...]]]] = {
    "/proc": ("proc", "proc", ("nosuid", "noexec", "nodev")),
    "/dev": ("tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    "/dev/pts": ("devpts", "devpts", ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                                      "gid=5")),
    "/dev/shm": ("tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),  # noqa: S108
    "/dev/mqueue": ("mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    "/sys": ("sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    "/sys/fs/cgroup": ("cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
}
ETC_FILES: Final = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
NAMESPACES: Final = ("pid", "ipc", "uts", "mount")
CAPABILITY_SETS: Final = ("Bounding", "Effective", "Inheritable", "Permitted", "Ambient")

# Mount options a request may carry on its own mounts; anything else (shared propagation, suid,
# dev, idmap...) is refused rather than dropped, so the container sees what the policy allowed.
_BIND_OPTIONS: Final = frozenset({"bind", "rbind", "ro", "rw", "rprivate", "private", "nosuid", "nodev",
                                  "noexec", "relatime", "norelatime", "noatime", "strictatime"})
_TMPFS_OPTION_RE: Final = re.compile(r"(?:mode=[0-7]{3,4}|size=[0-9]+[kmg]?|uid=[0-9]+|gid=[0-9]+)")
_CAP_RE: Final = re.compile(r"CAP_[A-Z_]{1,32}")
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")
MAX_ARGS: Final = 4096
MAX_ENV: Final = 4096
MAX_STRING: Final = 128 * 1024


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the form that is hashed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def config_sha256(oci: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of the request's OCI parameters (measured at create)."""
    try:
        return hashlib.sha256(canonical_json(oci)).hexdigest()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"OCI parameters are not plain JSON: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Reading the request's fields


def _map(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}.{key} must be an object")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_STRING or "\x00" in value:
        raise UsageError(f"{where}.{key} must be a string without NUL bytes")
    return value


def _strs(obj: Mapping[str, Any], key: str, where: str, *, limit: int) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > limit:
        raise UsageError(f"{where}.{key} must be a list of at most {limit} strings")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_STRING or "\x00" in item:
            raise UsageError(f"{where}.{key} must hold strings without NUL bytes")
    return list(value)


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise UsageError(f"{where}.{key} must be an integer id")
    return value


def _bool(obj: Mapping[str, Any], key: str, where: str, *, default: bool = False) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise UsageError(f"{where}.{key} must be true or false")
    return value


def _abs_path(value: str, what: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts:
        raise UsageError(f"{what} {value[:200]!r} must be an absolute path without '..'")
    return str(path)


def parse_user(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"UID","GID","AdditionalGids"}`` → runc's ``{"uid","gid","additionalGids"}``."""
    uid = _int(obj, "UID", where)
    gid = _int(obj, "GID", where)
    extra = obj.get("AdditionalGids") or []
    if not isinstance(extra, list) or len(extra) > 64 or any(
            isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 2**32 - 1 for g in extra):
        raise UsageError(f"{where}.AdditionalGids must be a list of group ids")
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if extra:
        user["additionalGids"] = sorted(set(extra))
    return user


def parse_capabilities(obj: object, where: str) -> dict[str, list[str]]:
    """``{"Bounding": [...], ...}`` (or null: none at all) → runc's lower-case sets."""
    caps: dict[str, list[str]] = {name.lower(): [] for name in CAPABILITY_SETS}
    if obj is None:
        return caps
    if not isinstance(obj, Mapping):
        raise UsageError(f"{where} must be an object or null")
    for name in CAPABILITY_SETS:
        values = _strs(obj, name, where, limit=64)
        for value in values:
            if not _CAP_RE.fullmatch(value):
                raise UsageError(f"{where}.{name}: {value[:40]!r} is not a capability name like CAP_CHOWN")
        caps[name.lower()] = values
    return caps


def parse_process(obj: Mapping[str, Any], where: str, *, extra_env: Sequence[str] = ()) -> dict[str, Any]:
    """A request's process (``Args``, ``Env``, ``Cwd``, ``User``, ``Capabilities``,
    ``NoNewPrivileges``) → runc's process object, never with a terminal."""
    args = _strs(obj, "Args", where, limit=MAX_ARGS)
    if not args:
        raise UsageError(f"{where}.Args must name a program")
    env = _strs(obj, "Env", where, limit=MAX_ENV)
    for item in env:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"{where}.Env: an entry is not NAME=VALUE")
    user = obj.get("User")
    if not isinstance(user, Mapping):
        raise UsageError(f"{where}.User must be an object")
    return {
        "terminal": False,
        "user": parse_user(user, f"{where}.User"),
        "args": args,
        "env": [*env, *extra_env],
        "cwd": _abs_path(_str(obj, "Cwd", where, default="/") or "/", f"{where}.Cwd"),
        "capabilities": parse_capabilities(obj.get("Capabilities"), f"{where}.Capabilities"),
        "noNewPrivileges": _bool(obj, "NoNewPrivileges", where, default=True),
    }


# --------------------------------------------------------------------------------------------------
# Mounts


@dataclass(frozen=True)
class BundleMount:
    """A mount the guest itself adds (a secret file), already safe: source inside storage."""

    destination: str
    source: Path
    options: tuple[str, ...] = ("rbind", "rprivate", "ro", "nosuid", "nodev", "noexec")


def shared_dir(storage: Path) -> Path:
    return storage / SHARED_SUBDIR


def _map_source(source: str, storage: Path, where: str) -> Path:
    """A request's bind source → a directory under ``<storage>/shared`` (created empty if absent)."""
    root = shared_dir(storage).resolve()
    text = _abs_path(source, f"{where}.source")
    if text == HOST_SHARED_DIR or text.startswith(HOST_SHARED_DIR + "/"):
        candidate = root / text[len(HOST_SHARED_DIR):].lstrip("/")
    else:
        candidate = Path(text)
    # Resolve symbolic links before the containment check, so a link cannot lead out.
    resolved = candidate.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UsageError(f"{where}: bind source {source[:200]!r} is outside the sandbox's shared storage; "
                         "host paths are never mounted into a container")
    if not resolved.exists():
        try:
            resolved.mkdir(mode=0o755, parents=True)
        except OSError as exc:
            raise StorageError(f"cannot create the volume directory for {where}: {exc.strerror}") from exc
    return resolved


def _request_mount(obj: object, storage: Path, where: str) -> dict[str, Any] | None:
    """One of the request's mounts → runc's form, None for a standard one (the guest adds its own)."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"{where} must be an object")
    destination = _abs_path(_str(obj, "destination", where), f"{where}.destination")
    kind = _str(obj, "type", where, default="bind")
    options = _strs(obj, "options", where, limit=32)
    if destination in STANDARD_MOUNTS or destination in ETC_FILES:
        return None
    if kind == "bind":
        bad = [o for o in options if o not in _BIND_OPTIONS]
        if bad:
            raise UsageError(f"{where}: mount option {bad[0][:40]!r} is not allowed")
        source = _map_source(_str(obj, "source", where), storage, where)
        mode = "ro" if "ro" in options else "rw"
        flags = [o for o in options if o in ("nosuid", "nodev", "noexec")]
        return {"destination": destination, "type": "bind", "source": str(source),
                "options": ["rbind", "rprivate", mode, *flags]}
    if kind == "tmpfs":
        bad = [o for o in options if o not in _BIND_OPTIONS and not _TMPFS_OPTION_RE.fullmatch(o)]
        if bad:
            raise UsageError(f"{where}: mount option {bad[0][:40]!r} is not allowed")
        return {"destination": destination, "type": "tmpfs", "source": "tmpfs",
                "options": sorted({"nosuid", "nodev", *options} - {"bind", "rbind", "private", "rprivate"})}
    raise UsageError(f"{where}: mount type {kind[:40]!r} is not allowed (bind or tmpfs only)")


def _standard_mounts(etc_dir: Path) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": dest, "type": kind, "source": source, "options": list(options)}
        for dest, (kind, source, options) in STANDARD_MOUNTS.items()
    ]
    for dest in ETC_FILES:
        mounts.append({"destination": dest, "type": "bind", "source": str(etc_dir / PurePosixPath(dest).name),
                       "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]})
    return mounts


def write_etc_files(etc_dir: Path, hostname: str, resolv_conf: bytes = b"") -> None:
    """The files bound at /etc/hostname, /etc/hosts and /etc/resolv.conf."""
    etc_dir.mkdir(mode=0o755, exist_ok=True)
    hosts = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             f"127.0.1.1\t{hostname}\n").encode()
    files = (("hostname", f"{hostname}\n".encode()), ("hosts", hosts), ("resolv.conf", resolv_conf))
    for name, data in files:
        path = etc_dir / name
        path.write_bytes(data)
        path.chmod(0o644)


# --------------------------------------------------------------------------------------------------
# The configuration


def check_hostname(hostname: str) -> str:
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise UsageError(f"hostname {hostname[:80]!r} is not a valid host name")
    return hostname


def build_config(
    oci: Mapping[str, Any],
    rootfs: Path,
    *,
    storage: Path,
    etc_dir: Path,
    hostname: str,
    cgroups_path: str,
    extra_env: Sequence[str] = (),
    extra_mounts: Sequence[BundleMount] = (),
) -> dict[str, Any]:
    """runc's ``config.json`` for the request's ``OCI`` object and the unpacked ``rootfs``.

    ``extra_env`` and ``extra_mounts`` are the guest's own additions (secrets).
    """
    where = "OCI"
    if not isinstance(oci, Mapping):
        raise UsageError("OCI must be an object")
    process = parse_process(_map(oci, "Process", where), f"{where}.Process", extra_env=extra_env)
    root = _map(oci, "Root", where, required=False)
    readonly = _bool(root, "Readonly", f"{where}.Root")
    if oci.get("Hooks") is not None:
        raise UsageError(f"{where}.Hooks must be null: the guest runs no host-supplied hooks")
    linux = _map(oci, "Linux", where, required=False)
    masked = _strs(linux, "MaskedPaths", f"{where}.Linux", limit=256)
    readonly_paths = _strs(linux, "ReadonlyPaths", f"{where}.Linux", limit=256)
    for path in (*masked, *readonly_paths):
        _abs_path(path, f"{where}.Linux path")
    # The workload policy does not speak of sysctls, so none from the host are applied.
    if linux.get("Sysctl"):
        raise UsageError(f"{where}.Linux.Sysctl: the guest applies no host-chosen sysctls")

    mounts = _standard_mounts(etc_dir)
    raw_mounts = oci.get("Mounts") or []
    if not isinstance(raw_mounts, list) or len(raw_mounts) > 256:
        raise UsageError(f"{where}.Mounts must be a list of at most 256 mounts")
    taken = {m["destination"] for m in mounts}
    for n, item in enumerate(raw_mounts):
        mount = _request_mount(item, storage, f"{where}.Mounts[{n}]")
        if mount is None:
            continue
        if mount["destination"] in taken:
            raise UsageError(f"{where}.Mounts[{n}]: {mount['destination']} is mounted twice")
        taken.add(mount["destination"])
        mounts.append(mount)
    for extra in extra_mounts:
        if extra.destination in taken:
            raise UsageError(f"a secret file and a mount both use {extra.destination}")
        taken.add(extra.destination)
        mounts.append({"destination": extra.destination, "type": "bind", "source": str(extra.source),
                       "options": list(extra.options)})

    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": readonly},
        "hostname": check_hostname(hostname),
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind in NAMESPACES],
            "cgroupsPath": cgroups_path,
            # The guest's own lists: the host may not choose what the workload cannot see (masking
            # a config or a secret file) or cannot write; its lists were only checked for shape.
            "maskedPaths": sorted(DEFAULT_MASKED_PATHS),
            "readonlyPaths": sorted(DEFAULT_READONLY_PATHS),
        },
    }
    # Host annotations are not passed to runc (nothing in the guest should act on them).
    return config


def process_json(process: Mapping[str, Any]) -> dict[str, Any]:
    """runc's process object for an ``ExecProcessRequest`` ``process`` (no capabilities unless given)."""
    return parse_process(process, "process")


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` deterministically, readable by root only (it may hold secret env values)."""
    data = canonical_json(obj)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_bundle(bundle: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config.json`` into ``bundle`` (which must exist); returns its path."""
    path = bundle / CONFIG_FILE
    write_json(path, config)
    return path
