"""The agent requests a Kubernetes container makes, built the way the host runtime builds them.

:class:`ContainerSpec` is one container as the runtime will start it: a Kubernetes container object
resolved against its pod (security context, volumes), the image config (Entrypoint, Cmd, Env,
WorkingDir, User) and the ConfigMaps and Secrets that supply its environment, following kubelet and
containerd:

* argv: ``command`` replaces the image Entrypoint, ``args`` replaces its Cmd (an empty list counts as
  unset, as in kubelet); ``$(VAR)`` references to the container's own variables are expanded and
  ``$$`` is a literal ``$``;
* env: the image's variables, overlaid by the pod's (``envFrom`` first, then ``env``), plus
  ``HOSTNAME``; a value only known at run time (``fieldRef``, a Secret, a ConfigMap not in the
  manifests) is kept as a full-match pattern rather than a value;
* user: ``runAsUser``/``runAsGroup`` (container over pod), else the image's numeric ``uid[:gid]``;
  ``supplementalGroups`` and ``fsGroup`` become additional groups. A user *name* would need the image's
  ``/etc/passwd``, which is not read: such an image needs ``runAsUser`` in the pod;
* capabilities: containerd's default set, plus ``add``, minus ``drop`` (``ALL`` in either); a
  privileged container gets every capability and the host's devices;
* mounts: the runtime's standard mounts plus one bind mount per ``volumeMount``.

:func:`container_request` turns a spec into the ``CreateContainerRequest`` input of the policy
contract, and :func:`policy_mounts` gives the policy's view of the same mounts, so generator and
runtime cannot drift apart. :func:`exec_request`, :func:`read_stream_request` and friends build the
other inputs (for tests and ``coffer policy explain``).

Manifest fields are read through the ``field_*`` helpers, which raise :class:`ManifestFieldError`
naming the field path (``spec.containers[0].env[2].value``) so the generator can add the document
and line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coffer.errors import FormatError, UsageError
from coffer.image.models import ImageConfig
from coffer.policy.model import EnvRule, Mount, User

FieldPath = tuple[str | int, ...]

#: containerd's default capability set for a non-privileged container (names without ``CAP_``).
DEFAULT_CAPABILITIES: Final = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
    "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip
#: Every Linux capability (up to CHECKPOINT_RESTORE, Linux 5.9), in kernel order.
ALL_CAPABILITIES: Final = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK",
    "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN",
    "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND",
    "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip

OCI_VERSION: Final = "1.1.0"
#: containerd's default masked and read-only paths for a non-privileged container.
MASKED_PATHS: Final = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

#: The runtime's standard mounts (the contract's ``common.default_mounts``): destination, type,
#: source, options.
DEFAULT_MOUNTS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    ("/dev/pts", "devpts", "devpts", ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                                      "gid=5")),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),  # noqa: S108
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    ("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
    ("/etc/hostname", "bind", "/run/kata-containers/shared/containers/{sandbox}-hostname",
     ("rbind", "rprivate", "rw")),
    ("/etc/hosts", "bind", "/run/kata-containers/shared/containers/{sandbox}-hosts",
     ("rbind", "rprivate", "rw")),
    ("/etc/resolv.conf", "bind", "/run/kata-containers/shared/containers/{sandbox}-resolv.conf",
     ("rbind", "rprivate", "rw")),
)

#: Where the runtime shares ConfigMap, Secret, emptyDir... contents into the guest.
SHARED_DIR: Final = "/run/kata-containers/shared/containers"

#: Patterns for ``fieldRef`` values only known once the pod runs (full-match regexes).
DNS_LABEL_PATTERN: Final = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_PATTERN: Final = "[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
IP_PATTERN: Final = "[0-9a-fA-F:.]+"
IPS_PATTERN: Final = "[0-9a-fA-F:.,]+"
FIELD_PATTERNS: Final[Mapping[str, str]] = {
    "metadata.name": DNS_SUBDOMAIN_PATTERN,
    "metadata.namespace": DNS_LABEL_PATTERN,
    "metadata.uid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "spec.nodeName": DNS_SUBDOMAIN_PATTERN,
    "spec.serviceAccountName": DNS_SUBDOMAIN_PATTERN,
    "status.hostIP": IP_PATTERN,
    "status.hostIPs": IPS_PATTERN,
    "status.podIP": IP_PATTERN,
    "status.podIPs": IPS_PATTERN,
}
RESOURCE_PATTERN: Final = "[0-9]+"
#: A value that is not known when the policy is made (a Secret's, a ConfigMap's not in the manifests).
ANY_VALUE: Final = "(?s).*"

_ENV_NAME_RE: Final = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_EXPAND_RE: Final = re.compile(r"\$(\$|\(([^)]*)\))")
_REGEX_META: Final = frozenset("\\.+*?()|[]{}^$")
MAX_NAME: Final = 253


# --------------------------------------------------------------------------------------------------
# Reading manifest fields with paths


class ManifestFieldError(FormatError):
    """A Kubernetes manifest field is missing, of the wrong type or has a value Coffer refuses."""

    def __init__(self, path: FieldPath, reason: str) -> None:
        self.path = path
        self.field_reason = reason
        super().__init__("Kubernetes manifest", f"{path_text(path)}: {reason}")


def path_text(path: FieldPath) -> str:
    """``("spec", "containers", 0, "env")`` -> ``spec.containers[0].env``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(document)"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def field_map(obj: Mapping[str, Any], key: str, path: FieldPath, *, required: bool = False) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestFieldError((*path, key), "is required")
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ManifestFieldError((*path, key), f"must be a mapping, not {_type_name(value)}")
    return value


def field_list(obj: Mapping[str, Any], key: str, path: FieldPath, *, required: bool = False) -> list[Any]:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestFieldError((*path, key), "is required")
        return []
    if not isinstance(value, list):
        raise ManifestFieldError((*path, key), f"must be a list, not {_type_name(value)}")
    return value


def field_maps(obj: Mapping[str, Any], key: str, path: FieldPath, *, required: bool = False
               ) -> list[tuple[FieldPath, dict[str, Any]]]:
    """A list of mappings, each with its own path."""
    items = []
    for n, item in enumerate(field_list(obj, key, path, required=required)):
        if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
            raise ManifestFieldError((*path, key, n), f"must be a mapping, not {_type_name(item)}")
        items.append(((*path, key, n), item))
    return items


def field_str(obj: Mapping[str, Any], key: str, path: FieldPath, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestFieldError((*path, key), "is required")
        return None
    if not isinstance(value, str):
        raise ManifestFieldError((*path, key), f"must be a string, not {_type_name(value)}")
    return value


def field_req_str(obj: Mapping[str, Any], key: str, path: FieldPath) -> str:
    value = field_str(obj, key, path, required=True)
    assert value is not None
    return value


def field_strs(obj: Mapping[str, Any], key: str, path: FieldPath) -> list[str]:
    items = field_list(obj, key, path)
    for n, item in enumerate(items):
        if not isinstance(item, str):
            raise ManifestFieldError((*path, key, n), f"must be a string, not {_type_name(item)}")
    return items


def field_bool(obj: Mapping[str, Any], key: str, path: FieldPath) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ManifestFieldError((*path, key), f"must be true or false, not {_type_name(value)}")
    return value


def field_int(obj: Mapping[str, Any], key: str, path: FieldPath, *, low: int = 0,
              high: int = 2**31 - 1) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestFieldError((*path, key), f"must be an integer, not {_type_name(value)}")
    if not low <= value <= high:
        raise ManifestFieldError((*path, key), f"{value} is out of range {low}..{high}")
    return value


# --------------------------------------------------------------------------------------------------
# The resolved container


@dataclass(frozen=True, kw_only=True)
class VolumeMount:
    """One ``volumeMount`` resolved against the pod's volumes.

    ``kind`` is ``configmap``, ``secret``, ``emptydir``, ``hostpath``, ``projected``, ``downwardapi`` or
    ``pvc``; ``source`` is the object's name (ConfigMap, Secret, claim), the volume's name (emptyDir,
    projected, downwardAPI) or, for ``hostpath``, the path on the host.
    """

    destination: str
    kind: str
    source: str
    read_only: bool = False


@dataclass(frozen=True, kw_only=True)
class ContainerSpec:
    """One container as the runtime starts it (see the module docstring for how each field is found)."""

    name: str
    image: str
    args: tuple[str, ...]
    env: tuple[EnvRule, ...]
    working_dir: str = "/"
    user: User = field(default_factory=lambda: User(uid=0, gid=0))
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    privileged: bool = False
    no_new_privileges: bool = False
    read_only_root: bool = False
    mounts: tuple[VolumeMount, ...] = ()
    terminal: bool = False
    stdin: bool = False
    sysctls: tuple[tuple[str, str], ...] = ()
    #: Commands the kubelet runs through exec: exec probes and lifecycle hooks.
    exec_commands: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_kubernetes(
        cls,
        container: Mapping[str, Any],
        *,
        image: ImageConfig | None,
        pod_spec: Mapping[str, Any] | None = None,
        config_maps: Mapping[str, Mapping[str, str]] | None = None,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        fields: Mapping[str, str] | None = None,
        field_patterns: Mapping[str, str] | None = None,
        hostname: str | None = None,
        path: FieldPath = (),
        unknown_config_maps: list[str] | None = None,
        reveal_secrets: bool = False,
    ) -> ContainerSpec:
        """Resolve a Kubernetes container object (``path`` is where it sits, for error messages).

        ``image`` None means the image config is unknown (generation without pulling): then
        ``command`` is required and only the pod's variables, working dir and user are used.
        ``fields`` gives concrete ``fieldRef`` values (``status.podIP``...); the others stay
        patterns (``field_patterns`` over :data:`FIELD_PATTERNS`). ``hostname`` is the pod's host
        name, or None for a generated one. ConfigMaps named but not given are noted in
        ``unknown_config_maps`` and their values become patterns. Secret values stay patterns (the
        policy travels in a pod annotation) unless ``reveal_secrets`` -- for building the request a
        running pod makes, which does carry them.
        """
        return _resolve(container, image=image, pod_spec=pod_spec or {}, config_maps=config_maps or {},
                        secrets=secrets or {}, fields=fields or {},
                        field_patterns={**FIELD_PATTERNS, **(field_patterns or {})}, hostname=hostname,
                        path=path, unknown=unknown_config_maps if unknown_config_maps is not None else [],
                        reveal_secrets=reveal_secrets)

    def env_list(self) -> list[str]:
        """``NAME=VALUE`` as the runtime passes it; every value must be concrete."""
        out = []
        for rule in self.env:
            if rule.value is None:
                raise UsageError(
                    f"container {self.name!r}: variable {rule.name} is only known at run time; "
                    "give its value (fields=...) to build a request"
                )
            out.append(f"{rule.name}={rule.value}")
        return out


def _escape(text: str) -> str:
    """A regex matching ``text`` literally, escaping only what both Python and Rust regex accept."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def _expand(text: str, variables: Mapping[str, EnvRule]) -> EnvRule:
    """Kubernetes ``$(VAR)`` expansion; a reference to a run-time value makes the result a pattern.

    Returned as an EnvRule named "" (value or pattern).
    """
    pieces: list[tuple[bool, str]] = []  # (is_pattern, text)
    pos = 0
    for match in _EXPAND_RE.finditer(text):
        pieces.append((False, text[pos:match.start()]))
        pos = match.end()
        if match.group(1) == "$":
            pieces.append((False, "$"))
            continue
        name = match.group(2)
        rule = variables.get(name)
        if rule is None:
            pieces.append((False, match.group(0)))  # kubelet leaves unknown references as written
        elif rule.value is not None:
            pieces.append((False, rule.value))
        else:
            pieces.append((True, rule.pattern or ANY_VALUE))
    pieces.append((False, text[pos:]))
    if not any(is_pattern for is_pattern, _ in pieces):
        return EnvRule(name="", value="".join(t for _, t in pieces))
    return EnvRule(name="", pattern="".join(f"(?:{t})" if p else _escape(t) for p, t in pieces))


def _env_value(item: Mapping[str, Any], path: FieldPath, *, variables: Mapping[str, EnvRule],
               config_maps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
               fields: Mapping[str, str], field_patterns: Mapping[str, str], unknown: list[str],
               name: str, reveal_secrets: bool) -> EnvRule | None:
    """The value of one ``env`` entry, or None when an optional reference is absent."""
    value = item.get("value")
    source = field_map(item, "valueFrom", path)
    has_source = item.get("valueFrom") is not None
    if value is not None and has_source:
        raise ManifestFieldError(path, "has both value and valueFrom")
    if not has_source:
        expanded = _expand(field_str(item, "value", path) or "", variables)
        return EnvRule(name=name, value=expanded.value, pattern=expanded.pattern)
    src_path = (*path, "valueFrom")
    kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef") if k in source]
    if len(kinds) != 1:
        raise ManifestFieldError(src_path, "must have exactly one of fieldRef, resourceFieldRef, "
                                           "configMapKeyRef, secretKeyRef")
    kind = kinds[0]
    ref = field_map(source, kind, src_path, required=True)
    ref_path = (*src_path, kind)
    if kind == "fieldRef":
        field_path = field_req_str(ref, "fieldPath", ref_path)
        if field_path in fields:
            return EnvRule(name=name, value=fields[field_path])
        label = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
        if field_path in field_patterns:
            return EnvRule(name=name, pattern=field_patterns[field_path])
        if label is not None:
            return EnvRule(name=name, pattern=ANY_VALUE)
        raise ManifestFieldError((*ref_path, "fieldPath"), f"unsupported field {field_path!r}")
    if kind == "resourceFieldRef":
        field_req_str(ref, "resource", ref_path)
        return EnvRule(name=name, pattern=RESOURCE_PATTERN)
    object_name = field_req_str(ref, "name", ref_path)
    key = field_req_str(ref, "key", ref_path)
    optional = bool(field_bool(ref, "optional", ref_path))
    if kind == "secretKeyRef":
        found = secrets.get(object_name)
        if found is not None and key in found:
            # Secret values stay out of the policy (which travels in a pod annotation); only a request
            # being built for a known pod carries the value.
            return EnvRule(name=name, value=found[key]) if reveal_secrets else \
                EnvRule(name=name, pattern=ANY_VALUE)
        if found is not None and optional:
            return None
        if found is not None:
            raise ManifestFieldError((*ref_path, "key"), f"Secret {object_name!r} has no key {key!r}")
        return EnvRule(name=name, pattern=ANY_VALUE)
    found = config_maps.get(object_name)
    if found is None:
        unknown.append(object_name)
        return EnvRule(name=name, pattern=ANY_VALUE)
    if key not in found:
        if optional:
            return None
        raise ManifestFieldError((*ref_path, "key"), f"ConfigMap {object_name!r} has no key {key!r}")
    return EnvRule(name=name, value=found[key])


def _resolve_env(container: Mapping[str, Any], path: FieldPath, *, image: ImageConfig | None,
                 config_maps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
                 fields: Mapping[str, str], field_patterns: Mapping[str, str], hostname: EnvRule,
                 unknown: list[str], reveal_secrets: bool) -> tuple[dict[str, EnvRule], dict[str, EnvRule]]:
    """(every variable of the process, the pod-defined ones used for ``$(VAR)`` in argv)."""
    pod_env: dict[str, EnvRule] = {}
    for item_path, item in field_maps(container, "envFrom", path):
        prefix = field_str(item, "prefix", item_path) or ""
        kinds = [k for k in ("configMapRef", "secretRef") if k in item]
        if len(kinds) != 1:
            raise ManifestFieldError(item_path, "must have exactly one of configMapRef, secretRef")
        ref = field_map(item, kinds[0], item_path, required=True)
        ref_path = (*item_path, kinds[0])
        object_name = field_req_str(ref, "name", ref_path)
        optional = bool(field_bool(ref, "optional", ref_path))
        table = (config_maps if kinds[0] == "configMapRef" else secrets).get(object_name)
        if table is None:
            if kinds[0] == "configMapRef" and not optional:
                unknown.append(object_name)
                # Which variables it holds is unknown too: nothing can be pinned.
                raise ManifestFieldError(ref_path, f"ConfigMap {object_name!r} is not in the manifests; "
                                                   "envFrom needs it to know the variables")
            if not optional:
                raise ManifestFieldError(ref_path, f"Secret {object_name!r} is not in the manifests; "
                                                   "envFrom needs it to know the variables")
            continue
        for key in sorted(table):
            var = prefix + key
            if not _ENV_NAME_RE.fullmatch(var):
                continue  # kubelet skips keys that are not valid variable names
            if kinds[0] == "secretRef" and not reveal_secrets:
                pod_env[var] = EnvRule(name=var, pattern=ANY_VALUE)
            else:
                pod_env[var] = EnvRule(name=var, value=table[key])
    for item_path, item in field_maps(container, "env", path):
        name = field_req_str(item, "name", item_path)
        if not _ENV_NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
            raise ManifestFieldError((*item_path, "name"), f"{name[:80]!r} is not a valid variable name")
        rule = _env_value(item, item_path, variables=pod_env, config_maps=config_maps, secrets=secrets,
                          fields=fields, field_patterns=field_patterns, unknown=unknown, name=name,
                          reveal_secrets=reveal_secrets)
        if rule is not None:
            pod_env[name] = rule
    merged: dict[str, EnvRule] = {}
    for n, entry in enumerate(image.env if image is not None else ()):
        name, sep, value = entry.partition("=")
        if not sep or not name:
            raise FormatError("image config", f"Env[{n}] is not NAME=VALUE")
        merged[name] = EnvRule(name=name, value=value)
    merged["HOSTNAME"] = EnvRule(name="HOSTNAME", value=hostname.value, pattern=hostname.pattern)
    merged.update(pod_env)
    return merged, pod_env


def _numeric_user(text: str, image_name: str) -> tuple[int | None, int | None, str | None]:
    """(uid, gid, non-numeric part) of an image ``User`` of the form ``uid[:gid]``."""
    user, _, group = text.partition(":")
    uid = int(user) if user.isdecimal() else None
    gid = int(group) if group.isdecimal() else None
    name = None
    if user and uid is None:
        name = user
    elif group and gid is None:
        name = group
    if (uid is not None and uid >= 2**32) or (gid is not None and gid >= 2**32):
        raise FormatError("image config", f"{image_name}: User {text[:80]!r} is out of range")
    return uid, gid, name


def _capabilities(security: Mapping[str, Any], path: FieldPath, privileged: bool) -> tuple[str, ...]:
    if privileged:
        return ALL_CAPABILITIES
    caps_obj = field_map(security, "capabilities", path)
    caps_path = (*path, "capabilities")

    def names(key: str) -> list[str]:
        out = []
        for n, raw in enumerate(field_strs(caps_obj, key, caps_path)):
            name = raw.upper().removeprefix("CAP_")
            if name != "ALL" and name not in ALL_CAPABILITIES:
                raise ManifestFieldError((*caps_path, key, n), f"unknown capability {raw[:40]!r}")
            out.append(name)
        return out

    add, drop = names("add"), names("drop")
    current = set() if "ALL" in drop else set(DEFAULT_CAPABILITIES) - set(drop)
    current |= set(ALL_CAPABILITIES) if "ALL" in add else set(add)
    return tuple(c for c in ALL_CAPABILITIES if c in current)


def _volumes(pod_spec: Mapping[str, Any]) -> dict[str, tuple[FieldPath, dict[str, Any]]]:
    found: dict[str, tuple[FieldPath, dict[str, Any]]] = {}
    for vol_path, volume in field_maps(pod_spec, "volumes", ("spec",)):
        name = field_req_str(volume, "name", vol_path)
        if name in found:
            raise ManifestFieldError((*vol_path, "name"), f"volume {name!r} is defined twice")
        found[name] = (vol_path, volume)
    return found


_VOLUME_KINDS: Final = {
    "configMap": "configmap", "secret": "secret", "emptyDir": "emptydir", "hostPath": "hostpath",
    "projected": "projected", "downwardAPI": "downwardapi", "persistentVolumeClaim": "pvc",
}  # fmt: skip


def _mount(volume_path: FieldPath, volume: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, source) of a pod volume."""
    kinds = [k for k in _VOLUME_KINDS if k in volume]
    if len(kinds) != 1:
        other = sorted(set(volume) - {"name"})
        raise ManifestFieldError(volume_path, "volume type " + (", ".join(other) or "(none)") +
                                 " is not supported (use configMap, secret, emptyDir, hostPath, "
                                 "projected, downwardAPI or persistentVolumeClaim)")
    kind = kinds[0]
    body = field_map(volume, kind, volume_path)
    body_path = (*volume_path, kind)
    name = field_req_str(volume, "name", volume_path)
    if kind == "configMap":
        return "configmap", field_req_str(body, "name", body_path)
    if kind == "secret":
        return "secret", field_req_str(body, "secretName", body_path)
    if kind == "persistentVolumeClaim":
        return "pvc", field_req_str(body, "claimName", body_path)
    if kind == "hostPath":
        host = field_req_str(body, "path", body_path)
        if not host.startswith("/") or "\x00" in host:
            raise ManifestFieldError((*body_path, "path"), "must be an absolute path")
        return "hostpath", host
    return _VOLUME_KINDS[kind], name


def _exec_commands(container: Mapping[str, Any], path: FieldPath) -> tuple[tuple[str, ...], ...]:
    found: list[tuple[str, ...]] = []
    places: list[tuple[FieldPath, dict[str, Any]]] = []
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        places.append(((*path, probe), field_map(container, probe, path)))
    lifecycle = field_map(container, "lifecycle", path)
    for hook in ("postStart", "preStop"):
        places.append(((*path, "lifecycle", hook), field_map(lifecycle, hook, (*path, "lifecycle"))))
    for place_path, place in places:
        action = field_map(place, "exec", place_path)
        if not action:
            continue
        command = field_strs(action, "command", (*place_path, "exec"))
        if not command:
            raise ManifestFieldError((*place_path, "exec", "command"), "must be a non-empty list")
        if tuple(command) not in found:
            found.append(tuple(command))
    return tuple(found)


def _resolve(container: Mapping[str, Any], *, image: ImageConfig | None, pod_spec: Mapping[str, Any],
             config_maps: Mapping[str, Mapping[str, str]], secrets: Mapping[str, Mapping[str, str]],
             fields: Mapping[str, str], field_patterns: Mapping[str, str], hostname: str | None,
             path: FieldPath, unknown: list[str], reveal_secrets: bool) -> ContainerSpec:
    name = field_req_str(container, "name", path)
    if not re.fullmatch(DNS_LABEL_PATTERN, name) or len(name) > 63:
        raise ManifestFieldError((*path, "name"), f"{name[:80]!r} is not a DNS-1123 label")
    image_name = field_req_str(container, "image", path)
    if not image_name.strip():
        raise ManifestFieldError((*path, "image"), "is empty")
    if hostname is not None:
        host_rule = EnvRule(name="HOSTNAME", value=hostname)
    elif "metadata.name" in fields:
        host_rule = EnvRule(name="HOSTNAME", value=fields["metadata.name"])
    else:
        host_rule = EnvRule(name="HOSTNAME", pattern=field_patterns["metadata.name"])
    env, pod_env = _resolve_env(container, path, image=image, config_maps=config_maps, secrets=secrets,
                                fields=fields, field_patterns=field_patterns, hostname=host_rule,
                                unknown=unknown, reveal_secrets=reveal_secrets)

    command = field_strs(container, "command", path)
    args = field_strs(container, "args", path)
    if image is None and not command:
        raise ManifestFieldError((*path, "command"), "is required when the image config is not read "
                                                     "(without pulling, the image's entrypoint is unknown)")
    entrypoint = command or list(image.entrypoint if image is not None else ())
    cmd = args or ([] if command else list(image.cmd if image is not None else ()))
    argv: list[str] = []
    for n, arg in enumerate(entrypoint + cmd):
        from_pod = (bool(command) and n < len(command)) or (bool(args) and n >= len(entrypoint))
        if not from_pod:
            argv.append(arg)  # the image's own argv is not expanded
            continue
        expanded = _expand(arg, pod_env)
        if expanded.value is None:
            where = ("command", n) if command and n < len(command) else ("args", n - len(entrypoint))
            raise ManifestFieldError((*path, *where), "refers to a variable only known at run time; "
                                                      "the policy pins exact arguments")
        argv.append(expanded.value)
    if not argv:
        raise ManifestFieldError((*path, "command"), "neither the container nor the image gives a command")

    pod_security = field_map(pod_spec, "securityContext", ("spec",))
    security = field_map(container, "securityContext", path)
    sec_path = (*path, "securityContext")
    privileged = bool(field_bool(security, "privileged", sec_path))

    def pick(key: str) -> int | None:
        own = field_int(security, key, sec_path, high=2**31 - 1)
        return own if own is not None else field_int(pod_security, key, ("spec", "securityContext"))

    run_as_user, run_as_group = pick("runAsUser"), pick("runAsGroup")
    image_uid = image_gid = None
    user_name = None
    if image is not None and image.user:
        image_uid, image_gid, user_name = _numeric_user(image.user, image_name)
    if run_as_user is None and user_name is not None and (image_uid is None or run_as_group is None):
        raise UsageError(
            f"{path_text(path)} ({name}): the image runs as user {user_name!r}, a name; Coffer does not "
            "read the image's /etc/passwd, so set securityContext.runAsUser (and runAsGroup) in the pod"
        )
    uid = run_as_user if run_as_user is not None else (image_uid or 0)
    if run_as_group is not None:
        gid = run_as_group
    elif run_as_user is None and image_gid is not None:
        gid = image_gid
    else:
        gid = 0  # containerd looks the uid up in the image's /etc/passwd; not read here
    groups: set[int] = set()
    for n, g in enumerate(field_list(pod_security, "supplementalGroups", ("spec", "securityContext"))):
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 2**32:
            raise ManifestFieldError(("spec", "securityContext", "supplementalGroups", n),
                                     "must be an integer group id")
        groups.add(g)
    fs_group = field_int(pod_security, "fsGroup", ("spec", "securityContext"))
    if fs_group is not None:
        groups.add(fs_group)
    groups.discard(gid)

    allow_escalation = field_bool(security, "allowPrivilegeEscalation", sec_path)
    volumes = _volumes(pod_spec)
    mounts: list[VolumeMount] = []
    seen_destinations: set[str] = set()
    for mount_path, mount in field_maps(container, "volumeMounts", path):
        volume_name = field_req_str(mount, "name", mount_path)
        destination = field_req_str(mount, "mountPath", mount_path)
        if not destination.startswith("/") or "\x00" in destination:
            raise ManifestFieldError((*mount_path, "mountPath"), "must be an absolute path")
        if destination in seen_destinations:
            raise ManifestFieldError((*mount_path, "mountPath"), f"{destination!r} is mounted twice")
        seen_destinations.add(destination)
        if volume_name not in volumes:
            raise ManifestFieldError((*mount_path, "name"), f"no volume named {volume_name!r} in the pod")
        if field_str(mount, "subPath", mount_path) or field_str(mount, "subPathExpr", mount_path):
            raise ManifestFieldError((*mount_path, "subPath"), "subPath mounts are not supported")
        kind, source = _mount(*volumes[volume_name])
        read_only = bool(field_bool(mount, "readOnly", mount_path))
        if kind in ("configmap", "secret", "projected", "downwardapi"):
            read_only = True  # the kubelet always mounts these read-only
        mounts.append(VolumeMount(destination=destination, kind=kind, source=source, read_only=read_only))

    sysctls = []
    for item_path, item in field_maps(pod_security, "sysctls", ("spec", "securityContext")):
        sysctls.append((field_req_str(item, "name", item_path), field_req_str(item, "value", item_path)))

    working_dir = field_str(container, "workingDir", path) or (image.working_dir if image else None)
    return ContainerSpec(
        name=name,
        image=image_name,
        args=tuple(argv),
        env=tuple(env.values()),
        working_dir=working_dir or "/",
        user=User(uid=uid, gid=gid, additional_gids=tuple(sorted(groups))),
        capabilities=_capabilities(security, sec_path, privileged),
        privileged=privileged,
        no_new_privileges=allow_escalation is False and not privileged,
        read_only_root=bool(field_bool(security, "readOnlyRootFilesystem", sec_path)),
        mounts=tuple(mounts),
        terminal=bool(field_bool(container, "tty", path)),
        stdin=bool(field_bool(container, "stdin", path)),
        sysctls=tuple(sysctls),
        exec_commands=_exec_commands(container, path),
    )


# --------------------------------------------------------------------------------------------------
# Mounts: the runtime's view and the policy's view of the same volume mounts


def policy_source(mount: VolumeMount) -> str:
    """The policy's ``source`` for a volume mount: ``configmap:NAME``..., or the host path."""
    if mount.kind == "hostpath":
        return mount.source
    return f"{mount.kind}:{mount.source}"


def _options(read_only: bool) -> tuple[str, ...]:
    return ("rbind", "rprivate", "ro" if read_only else "rw")


def policy_mounts(spec: ContainerSpec) -> tuple[Mount, ...]:
    """The policy mounts for a container's volume mounts (the standard mounts need none)."""
    return tuple(Mount(destination=m.destination, type="bind", source=policy_source(m),
                       options=_options(m.read_only)) for m in spec.mounts)


def request_source(mount: VolumeMount, *, container_id: str) -> str:
    """Where the runtime's bind mount comes from inside the guest.

    A host path is bound as it is; everything else is a directory the runtime shares into the guest
    under :data:`SHARED_DIR`, named after the container and the volume's object.
    """
    if mount.kind == "hostpath":
        return mount.source
    return f"{SHARED_DIR}/{container_id}-{mount.kind}-{mount.source}"


# --------------------------------------------------------------------------------------------------
# Requests


def _caps(names: Sequence[str]) -> list[str]:
    return [f"CAP_{n}" for n in names]


def _user(user: User) -> dict[str, Any]:
    return {"UID": user.uid, "GID": user.gid, "AdditionalGids": list(user.additional_gids)}


def container_request(*, container_id: str, name: str, image: str, spec: ContainerSpec,
                      sandbox_id: str = "sandbox") -> dict[str, Any]:
    """The ``CreateContainerRequest`` input the runtime sends for ``spec`` (policy contract shape)."""
    caps = _caps(spec.capabilities)
    mounts: list[dict[str, Any]] = [
        {"destination": dest, "type": kind, "source": source.format(sandbox=sandbox_id),
         "options": list(opts)}
        for dest, kind, source, opts in DEFAULT_MOUNTS
    ]
    mounts += [
        {"destination": m.destination, "type": "bind", "source": request_source(m, container_id=container_id),
         "options": list(_options(m.read_only))}
        for m in spec.mounts
    ]
    devices: list[dict[str, Any]] = []
    if spec.privileged:
        # A privileged container gets the host's devices; these stand for them.
        devices = [{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11},
                   {"path": "/dev/mem", "type": "c", "major": 1, "minor": 1}]
    return {
        "container_id": container_id,
        "name": name,
        "image": image,
        "OCI": {
            "Version": OCI_VERSION,
            "Process": {
                "Terminal": spec.terminal,
                "User": _user(spec.user),
                "Args": list(spec.args),
                "Env": spec.env_list(),
                "Cwd": spec.working_dir,
                "Capabilities": {"Bounding": caps, "Effective": caps, "Inheritable": [],
                                 "Permitted": caps, "Ambient": []},
                "NoNewPrivileges": spec.no_new_privileges,
            },
            "Root": {"Path": "rootfs", "Readonly": spec.read_only_root},
            "Mounts": mounts,
            "Annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": name,
                "io.kubernetes.cri.image-name": image,
                "io.kubernetes.cri.sandbox-id": sandbox_id,
            },
            "Linux": {
                "Namespaces": [{"type": "ipc", "path": ""}, {"type": "uts", "path": ""},
                               {"type": "mount", "path": ""}],
                "Devices": devices,
                "Sysctl": dict(spec.sysctls),
                "MaskedPaths": [] if spec.privileged else list(MASKED_PATHS),
                "ReadonlyPaths": [] if spec.privileged else list(READONLY_PATHS),
            },
            "Hooks": None,
        },
    }


def sandbox_request(*, name: str, namespace: str | None = None, sandbox_id: str = "sandbox",
                    hostname: str | None = None) -> dict[str, Any]:
    """The ``CreateSandboxRequest`` input for a pod."""
    return {"sandbox_id": sandbox_id, "hostname": hostname or name, "name": name, "namespace": namespace,
            "storages": [], "guest_hook_path": "", "kernel_modules": [], "sandbox_pidns": False}


def exec_request(*, container_id: str, args: Sequence[str], spec: ContainerSpec | None = None,
                 exec_id: str = "exec-1", env: Sequence[str] | None = None, cwd: str | None = None,
                 user: User | None = None, terminal: bool = False) -> dict[str, Any]:
    """An ``ExecProcessRequest`` input; env, cwd and user default to the container's (as CRI exec does)."""
    chosen_user = user or (spec.user if spec is not None else User(uid=0, gid=0))
    return {
        "container_id": container_id,
        "exec_id": exec_id,
        "process": {
            "Args": list(args),
            "Env": list(env) if env is not None else (spec.env_list() if spec is not None else []),
            "Cwd": cwd or (spec.working_dir if spec is not None else "/"),
            "User": _user(chosen_user),
            "Terminal": terminal,
            "Capabilities": None,
        },
    }


def read_stream_request(*, container_id: str, exec_id: str = "", stream: str = "stdout") -> dict[str, Any]:
    """A ``ReadStreamRequest`` input (an empty exec id reads the container's own process)."""
    if stream not in ("stdout", "stderr"):
        raise UsageError(f"stream must be stdout or stderr, not {stream!r}")
    return {"container_id": container_id, "exec_id": exec_id, "stream": stream}


def write_stream_request(*, container_id: str, exec_id: str = "") -> dict[str, Any]:
    """A ``WriteStreamRequest`` (or ``CloseStdinRequest``) input."""
    return {"container_id": container_id, "exec_id": exec_id}


def copy_file_request(*, container_id: str, path: str, size: int = 0, mode: int = 0o644) -> dict[str, Any]:
    """A ``CopyFileRequest`` input for a regular file."""
    return {"container_id": container_id, "path": path, "file_size": size, "file_mode": mode,
            "file_type": "Regular", "symlink_target": "", "uid": 0, "gid": 0}
