"""The workload policy document: what the workload's owner allows the host to ask of the agent.

One document per sandbox (pod). A person reads and reviews it; :mod:`coffer.policy.document` parses
it from YAML or JSON (with errors that point at the line and field), :mod:`coffer.policy.engine`
compiles it to Rego in the Kata agent's shape and decides every host request with it, and
:mod:`coffer.policy.initdata` binds its exact bytes to the TEE.

The shape (``version: 1``)::

    version: 1
    name: web                       # the pod / workload name (informational, and the sandbox name)
    namespace: default              # optional; pinned when given
    attestation:                    # what the KBS must see before releasing this workload's secrets
      tee: [snp, tdx]               # allowed TEE types (empty: any but sample)
      min_tcb: {snp: {bootloader: 3, tee: 0, snp: 8, microcode: 115}}   # optional, per TEE
      allow_debug: false
    debug: false                    # decision log on, denials still enforced; visible in claims
    containers:
      - name: nginx
        image: docker.io/library/nginx@sha256:<64 hex>      # pinned by digest (required)
        signature: {keys: ["-----BEGIN PUBLIC KEY-----..."]} # optional cosign key requirement
        args: ["nginx", "-g", "daemon off;"]                 # exact argv (entrypoint + cmd)
        env:                                                 # every variable the process may get
          - PATH=/usr/local/sbin:/usr/bin                    # exact NAME=VALUE
          - {name: POD_IP, pattern: "[0-9.]+"}               # value matching a full regex
        working_dir: /
        user: {uid: 101, gid: 101, additional_gids: []}
        capabilities: [CHOWN, NET_BIND_SERVICE]              # bounding = effective = permitted
        no_new_privileges: true
        privileged: false
        read_only_root: false
        mounts:
          - {destination: /etc/nginx/conf.d, type: bind, source: "configmap:nginx-conf", options: [ro]}
        allow:                                               # host requests beyond lifecycle calls
          exec: [["nginx", "-s", "reload"]]                  # exact argv lists
          exec_patterns: []                                  # full regexes over the joined argv
          logs: true                                         # ReadStream (stdout/stderr)
          stdin: false                                       # WriteStream / CloseStdin
          copy_files: []                                     # path regexes for CopyFile
        secrets:                                             # delivered by the agent, never the host
          - {resource: "kbs:///default/secret/db", env: DB_PASSWORD}
          - {resource: "kbs:///default/secret/tls", file: /run/secrets/tls.pem}

Everything not allowed is denied. The dataclasses below are the parsed form; they are frozen and
hold only plain values, so :func:`to_obj` gives back the canonical JSON-able document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

POLICY_VERSION: Final = 1

#: Requests always allowed (harmless lifecycle and information calls); the rest are decided by rules.
ALWAYS_ALLOWED: Final = (
    "DestroySandboxRequest",
    "GetOOMEventRequest",
    "GuestDetailsRequest",
    "ListContainersRequest",
    "OnlineCPUMemRequest",
    "SignalProcessRequest",
    "StartContainerRequest",
    "StatsContainerRequest",
    "TtyWinResizeRequest",
    "WaitProcessRequest",
    "RemoveContainerRequest",
)
#: Requests decided by the policy's rules.
RULED: Final = (
    "CreateSandboxRequest",
    "CreateContainerRequest",
    "ExecProcessRequest",
    "ReadStreamRequest",
    "WriteStreamRequest",
    "CloseStdinRequest",
    "CopyFileRequest",
    "SetPolicyRequest",  # always denied: the policy is fixed at launch by initdata
)


@dataclass(frozen=True, kw_only=True)
class EnvRule:
    """One allowed environment variable: an exact value, or a full-match regex over the value."""

    name: str
    value: str | None = None
    pattern: str | None = None


@dataclass(frozen=True, kw_only=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Mount:
    destination: str
    type: str = "bind"
    source: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class HostAccess:
    """Host requests allowed for one container beyond its lifecycle."""

    exec: tuple[tuple[str, ...], ...] = ()
    exec_patterns: tuple[str, ...] = ()
    logs: bool = False
    stdin: bool = False
    copy_files: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Secret:
    """A KBS resource the agent fetches and delivers into the container (``env`` or ``file``)."""

    resource: str
    env: str | None = None
    file: str | None = None


@dataclass(frozen=True, kw_only=True)
class SignatureRequirement:
    """The image must carry a cosign signature by one of these public keys (PEM)."""

    keys: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ContainerPolicy:
    name: str
    image: str
    args: tuple[str, ...]
    env: tuple[EnvRule, ...] = ()
    working_dir: str = "/"
    user: User = field(default_factory=lambda: User(uid=0, gid=0))
    capabilities: tuple[str, ...] = ()
    no_new_privileges: bool = True
    privileged: bool = False
    read_only_root: bool = False
    mounts: tuple[Mount, ...] = ()
    allow: HostAccess = field(default_factory=HostAccess)
    secrets: tuple[Secret, ...] = ()
    signature: SignatureRequirement | None = None


@dataclass(frozen=True, kw_only=True)
class AttestationRequirement:
    tee: tuple[str, ...] = ()
    min_tcb: dict[str, dict[str, int]] = field(default_factory=dict)
    allow_debug: bool = False


@dataclass(frozen=True, kw_only=True)
class WorkloadPolicy:
    name: str
    containers: tuple[ContainerPolicy, ...]
    namespace: str | None = None
    attestation: AttestationRequirement = field(default_factory=AttestationRequirement)
    debug: bool = False
    version: int = POLICY_VERSION



def env_to_obj(rule: EnvRule) -> Any:
    if rule.pattern is not None:
        return {"name": rule.name, "pattern": rule.pattern}
    return f"{rule.name}={rule.value}"


def container_to_obj(c: ContainerPolicy) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "args": list(c.args),
        "env": [env_to_obj(e) for e in c.env],
        "working_dir": c.working_dir,
        "user": {"uid": c.user.uid, "gid": c.user.gid, "additional_gids": list(c.user.additional_gids)},
        "capabilities": list(c.capabilities),
        "no_new_privileges": c.no_new_privileges,
        "privileged": c.privileged,
        "read_only_root": c.read_only_root,
        "mounts": [
            {"destination": m.destination, "type": m.type, "source": m.source, "options": list(m.options)}
            for m in c.mounts
        ],
        "allow": {
            "exec": [list(a) for a in c.allow.exec],
            "exec_patterns": list(c.allow.exec_patterns),
            "logs": c.allow.logs,
            "stdin": c.allow.stdin,
            "copy_files": list(c.allow.copy_files),
        },
        "secrets": [
            {k: v for k, v in (("resource", s.resource), ("env", s.env), ("file", s.file)) if v is not None}
            for s in c.secrets
        ],
    }
    if c.signature is not None:
        obj["signature"] = {"keys": list(c.signature.keys)}
    return obj


def to_obj(policy: WorkloadPolicy) -> dict[str, Any]:
    """The canonical JSON-able form of a policy (every field present, in schema order)."""
    obj: dict[str, Any] = {"version": policy.version, "name": policy.name}
    if policy.namespace is not None:
        obj["namespace"] = policy.namespace
    obj["attestation"] = {
        "tee": list(policy.attestation.tee),
        "min_tcb": {k: dict(v) for k, v in policy.attestation.min_tcb.items()},
        "allow_debug": policy.attestation.allow_debug,
    }
    obj["debug"] = policy.debug
    obj["containers"] = [container_to_obj(c) for c in policy.containers]
    return obj
