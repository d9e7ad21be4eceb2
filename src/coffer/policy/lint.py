"""Review findings for a workload policy: settings that are valid but weaken what the policy protects.

:func:`lint` never refuses a policy (the parser does that); it lists what a reviewer should look at,
each with the field path and a concrete hint. ``error`` findings undo the point of the policy (an
unpinned image, exec of any command, a decision log or debug TEE in production); ``warning`` findings
are choices that widen what the host can do and that should be deliberate.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from coffer.errors import CofferError
from coffer.image.reference import parse_registry_name
from coffer.policy.model import ContainerPolicy, EnvRule, WorkloadPolicy

Severity = Literal["warning", "error"]
_Add = Callable[[Severity, str, str, str], None]  # records one finding


@dataclass(frozen=True, kw_only=True)
class Finding:
    severity: Severity
    where: str  # field path, as in parse errors: containers[0].allow.exec[1]
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message} (hint: {self.hint})"


#: Variables that make a program load code or read start-up commands from where the value points.
DANGEROUS_ENV: Final = frozenset({
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_DEBUG", "LD_PROFILE", "GCONV_PATH", "GLIBC_TUNABLES",
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONBREAKPOINT",
    "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS",
    "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB", "LUA_INIT", "LUA_PATH", "PHPRC",
})  # fmt: skip

SHELLS: Final = frozenset(
    {"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox"}
)
INTERPRETERS: Final = frozenset({
    "python", "python2", "python3", "perl", "ruby", "node", "nodejs", "php", "lua", "java", "jshell",
    "awk", "gawk", "env", "xargs", "nsenter", "chroot", "su", "sudo", "osascript", "tclsh", "wish",
})  # fmt: skip

#: Capabilities that let a process escape the container or read other processes' memory.
ESCAPE_CAPABILITIES: Final = frozenset(
    {"SYS_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO", "BPF", "DAC_READ_SEARCH"}
)
#: Capabilities that widen what the container can do to the guest or the network.
BROAD_CAPABILITIES: Final = frozenset({
    "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_BOOT", "SYS_TIME", "MAC_ADMIN", "MAC_OVERRIDE",
    "LINUX_IMMUTABLE", "SYSLOG", "CHECKPOINT_RESTORE", "SETFCAP", "SYS_RESOURCE", "MKNOD",
    "IPC_OWNER", "DAC_OVERRIDE", "AUDIT_CONTROL",
})  # fmt: skip

# Probes: strings a pattern that "admits everything" accepts although nobody meant them.
_ANY_COMMAND: Final = ("rm -rf / --no-preserve-root", "cat /etc/shadow", "x")
_SHELL_COMMANDS: Final = (
    *(
        f"{prefix}{shell} {flag} id"
        for shell in ("sh", "bash", "busybox sh", "python3", "perl", "node")
        for prefix in ("", "/bin/", "/usr/bin/")
        for flag in ("-c", "-e")
    ),
    *("sh", "/bin/sh", "bash", "/bin/bash", "sh -i"),
)
_ANY_PATH: Final = ("/etc/passwd", "/usr/bin/evil", "/root/.ssh/authorized_keys")
_ANY_VALUE: Final = ("", "anything at all", "/var/x:/usr/bin", "$(id)")
_PATH_PROBES: Final = ("/var/evil:/usr/bin", "/var/evil")


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except (re.error, RecursionError):  # the parser has checked every pattern; be safe for built models
        return False


def _admits_all(pattern: str, probes: tuple[str, ...]) -> bool:
    return all(_fullmatch(pattern, probe) for probe in probes)


def _program(argv0: str) -> str:
    return posixpath.basename(argv0)


def lint(policy: WorkloadPolicy) -> list[Finding]:
    """Findings in document order (policy-wide first, then each container)."""
    out: list[Finding] = []

    def add(severity: Severity, where: str, message: str, hint: str) -> None:
        out.append(Finding(severity=severity, where=where, message=message, hint=hint))

    if policy.debug:
        add(
            "error",
            "debug",
            "the decision log is on: every request and decision is logged",
            "set debug: false before production; debug policies are visible in the attestation claims "
            "and a KBS policy should refuse them",
        )
    att = policy.attestation
    if not att.tee:
        add(
            "warning",
            "attestation.tee",
            "no TEE type is required (any hardware TEE is accepted)",
            "list the TEE types this workload runs on, e.g. tee: [snp, tdx]",
        )
    elif "sample" in att.tee or "sampledevice" in att.tee:
        add(
            "error",
            "attestation.tee",
            "the sample TEE (no hardware, no protection) is accepted",
            "remove sample from attestation.tee; it exists for tests only",
        )
    if att.allow_debug:
        add(
            "error",
            "attestation.allow_debug",
            "debug-enabled TEEs are accepted: the host can read the guest's memory",
            "set allow_debug: false",
        )
    for i, container in enumerate(policy.containers):
        _lint_container(container, f"containers[{i}]", add)
    return out


def _lint_container(c: ContainerPolicy, path: str, add: _Add) -> None:
    who = f"container {c.name!r}"
    try:
        digest = parse_registry_name(c.image, default_tag=False).digest
    except CofferError:  # built by hand without the parser; the engine will refuse it anyway
        digest = None
    if digest is None:
        add(
            "error",
            f"{path}.image",
            f"{who}: image {c.image!r} is not pinned by digest, so the registry decides what runs",
            "pin it: coffer policy generate resolves tags, or append @sha256:<digest>",
        )

    for i, rule in enumerate(c.env):
        _lint_env(rule, f"{path}.env[{i}]", who, add)

    if c.privileged:
        add(
            "error",
            f"{path}.privileged",
            f"{who} runs privileged: all capabilities and devices, no masked paths",
            "set privileged: false and list only the capabilities it needs",
        )
    for i, cap in enumerate(c.capabilities):
        where = f"{path}.capabilities[{i}]"
        if cap in ESCAPE_CAPABILITIES:
            add(
                "error",
                where,
                f"{who} gets CAP_{cap}, which lets it escape the container or read other processes",
                f"drop {cap}; if a tool needs it, run that tool in a separate sandbox",
            )
        elif cap in BROAD_CAPABILITIES:
            add(
                "warning",
                where,
                f"{who} gets CAP_{cap}, which is rarely needed",
                f"drop {cap} unless the workload needs it, and say why in review",
            )
    if c.user.uid == 0:
        add(
            "warning",
            f"{path}.user.uid",
            f"{who} runs as root (uid 0)",
            "run as an unprivileged user: set user.uid (and the image's USER) to a non-zero id",
        )
    if not c.no_new_privileges:
        add(
            "warning",
            f"{path}.no_new_privileges",
            f"{who} may gain privileges through setuid binaries",
            "set no_new_privileges: true",
        )
    if not c.read_only_root:
        add(
            "warning",
            f"{path}.read_only_root",
            f"note: {who} has a writable root filesystem",
            "set read_only_root: true and mount writable directories (emptyDir) where it writes",
        )

    allow = c.allow
    for i, argv in enumerate(allow.exec):
        where = f"{path}.allow.exec[{i}]"
        program = _program(argv[0])
        if program in SHELLS and (len(argv) == 1 or argv[1:] in (("-i",), ("-l",), ("sh",))):
            add(
                "error",
                where,
                f"the host may open an interactive shell in {who}",
                "allow the exact maintenance commands instead of a shell",
            )
        elif program in SHELLS or program in INTERPRETERS:
            add(
                "warning",
                where,
                f"the host may run {program} in {who}; the argv is fixed, but an "
                "interpreter's behaviour also depends on files and environment",
                "prefer calling the program itself with fixed arguments",
            )
    for i, pattern in enumerate(allow.exec_patterns):
        where = f"{path}.allow.exec_patterns[{i}]"
        if _admits_all(pattern, _ANY_COMMAND):
            add(
                "error",
                where,
                f"exec pattern {pattern!r} admits any command in {who}",
                "list exact commands under allow.exec, or anchor the pattern to one program and its options",
            )
        elif any(_fullmatch(pattern, probe) for probe in _SHELL_COMMANDS):
            add(
                "error",
                where,
                f"exec pattern {pattern!r} admits a shell or interpreter running arbitrary code in {who}",
                "allow the exact commands under allow.exec instead",
            )
    if allow.stdin:
        add(
            "warning",
            f"{path}.allow.stdin",
            f"the host may write to the stdin of processes in {who}",
            "set stdin: false unless an interactive session is part of the workload's design",
        )
    for i, pattern in enumerate(allow.copy_files):
        where = f"{path}.allow.copy_files[{i}]"
        if _admits_all(pattern, _ANY_PATH):
            add(
                "error",
                where,
                f"copy_files pattern {pattern!r} lets the host write any file in {who}",
                "restrict it to one directory the workload reads data from, e.g. ^/data/in/[^/]+$",
            )
        else:
            add(
                "warning",
                where,
                f"the host may copy files into {who} at paths matching {pattern!r}",
                "make sure nothing executes or loads code from those paths",
            )

    env_names = {rule.name for rule in c.env}
    for i, secret in enumerate(c.secrets):
        if secret.env is None:
            continue
        where = f"{path}.secrets[{i}].env"
        add(
            "warning",
            where,
            f"secret {secret.resource} is delivered as environment variable {secret.env}",
            "deliver it as a file (file: /run/secrets/...): environment variables leak into child "
            "processes, crash dumps and /proc/<pid>/environ",
        )
        if secret.env in env_names:
            add(
                "error",
                where,
                f"the host may also set {secret.env} (it is listed under env)",
                f"remove {secret.env} from env so only the agent can set it",
            )


def _lint_env(rule: EnvRule, where: str, who: str, add: _Add) -> None:
    if rule.name in DANGEROUS_ENV:
        add(
            "error",
            where,
            f"the host may set {rule.name} in {who}, which makes programs load code from where it points",
            f"remove {rule.name}; bake the setting into the image if it is needed",
        )
        return
    if rule.pattern is None:
        return
    if rule.name == "PATH" and any(_fullmatch(rule.pattern, probe) for probe in _PATH_PROBES):
        add(
            "error",
            where,
            f"the pattern for PATH in {who} lets the host put a directory of its choosing "
            "first on the search path",
            "give PATH as an exact value (PATH=/usr/local/bin:/usr/bin:/bin)",
        )
    elif _admits_all(rule.pattern, _ANY_VALUE):
        add(
            "warning",
            where,
            f"the pattern {rule.pattern!r} for {rule.name} in {who} admits any value",
            f"narrow it to the values {rule.name} really takes (e.g. [0-9.]+ for an address)",
        )
