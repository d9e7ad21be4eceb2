"""The workload policy document on disk: strict YAML/JSON parsing, canonical dumping, the JSON Schema.

:func:`parse_policy` turns the bytes a person wrote (YAML, or JSON, which is YAML) into a
:class:`~coffer.policy.model.WorkloadPolicy`. Every refusal is a :class:`PolicyFormatError` (a
:class:`~coffer.errors.FormatError`) whose message names ``file:line:column`` and the field path, e.g.
``policy.yaml:14:9: containers[0].env[2]: pattern ...``. The parser works on YAML nodes rather than
loaded Python objects so that it keeps those positions and can refuse what a plain load would hide:
duplicate keys, anchors and aliases (the "billion laughs"), implicit type surprises (``name: no``).

Regular expressions in the document are evaluated by the agent's Rego engine (Rust ``regex``) and
checked here with Python's :mod:`re`, so only a conservative common subset is accepted: no lookaround,
backreferences, atomic groups, possessive quantifiers, conditionals or engine-specific escapes.

:func:`dump_policy` writes the canonical form (:func:`coffer.policy.model.to_obj`): the same policy
always gives the same bytes, and ``parse_policy(dump_policy(p)) == p``.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

import yaml  # type: ignore[import-untyped]  # types-PyYAML is not installed
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from coffer.errors import CofferError, FormatError, UsageError
from coffer.image.reference import parse_registry_name
from coffer.policy.model import (
    POLICY_VERSION,
    AttestationRequirement,
    ContainerPolicy,
    EnvRule,
    HostAccess,
    Mount,
    Secret,
    SignatureRequirement,
    User,
    WorkloadPolicy,
    to_obj,
)

MAX_POLICY_BYTES: Final = 1024 * 1024
#: Deepest node nesting accepted; a valid document needs 6 (containers[0].allow.exec[0][0]).
MAX_DEPTH: Final = 16
MAX_PATTERN_LENGTH: Final = 4096
#: Largest counted repetition (``{n,m}``) in a pattern: larger ones blow up the agent's compiled regex.
MAX_REPETITION: Final = 1000
MAX_ID: Final = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel, never a real id

#: Linux capabilities (``include/uapi/linux/capability.h``, 0..40), without the ``CAP_`` prefix.
LINUX_CAPABILITIES: Final = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip
#: TEE names as the KBS protocol spells them (kbs-types ``Tee``).
TEE_NAMES: Final = (
    "az-snp-vtpm", "az-tdx-vtpm", "cca", "csv", "hygondcu", "nvidia", "sample", "sampledevice",
    "se", "sgx", "snp", "tdx", "tpm",
)  # fmt: skip
#: SNP TCB components (bytes of the reported TCB version).
SNP_TCB_COMPONENTS: Final = ("bootloader", "tee", "snp", "microcode", "fmc")

_DNS_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ENV_NAME_RE: Final = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]{0,1023}")
_MOUNT_TYPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TCB_COMPONENT_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_KBS_SEGMENT: Final = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
_KBS_RESOURCE_RE: Final = re.compile(rf"kbs:///{_KBS_SEGMENT}/{_KBS_SEGMENT}/{_KBS_SEGMENT}")
_PEM_KEY_RE: Final = re.compile(r"-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\n?")

_STR: Final = "tag:yaml.org,2002:str"
_INT: Final = "tag:yaml.org,2002:int"
_BOOL: Final = "tag:yaml.org,2002:bool"
_NULL: Final = "tag:yaml.org,2002:null"
_SEQ: Final = "tag:yaml.org,2002:seq"
_MAP: Final = "tag:yaml.org,2002:map"
_TAG_NAMES: Final = {
    _STR: "a string", _INT: "an integer", _BOOL: "a boolean", _NULL: "null",
    "tag:yaml.org,2002:float": "a number", "tag:yaml.org,2002:timestamp": "a date",
    _SEQ: "a list", _MAP: "a mapping",
}  # fmt: skip

_DOCUMENT: Final = "(document)"
_LEADING_TABS: Final = re.compile(r"^[ \t]+", re.MULTILINE)

SCHEMA: dict[str, Any] = json.loads(resources.files("coffer.policy").joinpath("schema.json").read_text())


class PolicyFormatError(FormatError):
    """A policy document was refused; ``line``/``column`` are 1-based (``None`` when not positional)."""

    def __init__(
        self,
        source: str,
        reason: str,
        *,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.field = field
        where = source if line is None else f"{source}:{line}:{column}"
        super().__init__("workload policy", f"{where}: {field}: {reason}" if field else f"{where}: {reason}")


# --------------------------------------------------------------------------------------------------
# Regular expressions portable between Python re and Rust regex


_ESCAPE_OK: Final = frozenset("dDsSwWafnrtv") | frozenset(r".^$|?*+()[]{}-/\ ")
_ANCHOR_ESCAPES: Final = frozenset("bBA")
_HEX_ESCAPES: Final = {"x": 2, "u": 4, "U": 8}
_COUNTED_RE: Final = re.compile(r"\{(\d*)(,(\d*))?\}")
_FLAGS_RE: Final = re.compile(r"\(\?([ims]*)(?:-([ims]*))?([:)])")
_HEX_RE: Final = re.compile(r"[0-9A-Fa-f]+")


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a portable regular expression, or ``None`` if it is.

    It must compile with Python's :mod:`re` without warnings and use only syntax that Rust's ``regex``
    crate (the agent's Rego engine) reads the same way.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"pattern is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        with warnings.catch_warnings():
            # FutureWarnings flag syntax (nested sets, set operations) that Rust reads differently.
            warnings.simplefilter("error")
            re.compile(pattern)
    except (re.error, Warning, RecursionError, OverflowError) as exc:
        return f"pattern is not a valid regular expression ({exc})"
    return _portability_problem(pattern)


def _portability_problem(p: str) -> str | None:
    i, n = 0, len(p)
    in_class = False
    while i < n:
        c = p[i]
        if c == "\\":
            e = p[i + 1] if i + 1 < n else ""
            if e.isdigit():
                if e == "0":
                    return "octal escapes are not portable; write \\xHH"
                return "backreferences (\\1) are not supported by the agent's regex engine"
            if e in _HEX_ESCAPES:
                width = _HEX_ESCAPES[e]
                digits = p[i + 2 : i + 2 + width]
                if len(digits) != width or not _HEX_RE.fullmatch(digits):
                    return f"\\{e} needs exactly {width} hex digits"
                i += 2 + width
                continue
            if e in _ANCHOR_ESCAPES:
                if in_class:
                    return f"\\{e} inside a character class is not portable"
            elif e not in _ESCAPE_OK:
                return f"escape \\{e} is not portable between Python and Rust regular expressions"
            i += 2
            continue
        if in_class:
            if c == "[":
                return "a [ inside a character class is read differently by Rust; escape it as \\["
            if p.startswith(("&&", "--", "~~"), i):
                return f"{p[i : i + 2]!r} inside a character class is a set operation in Rust; escape it"
            if c == "]":
                in_class = False
            i += 1
            continue
        if c == "[":
            in_class = True
            i += 1
            if p.startswith("^", i):
                i += 1
            if p.startswith("]", i):  # a leading ] is a literal in both engines
                i += 1
            continue
        if c == "(" and p.startswith("(?", i):
            rest = p[i + 2 : i + 4]
            if rest.startswith(":"):
                i += 3
                continue
            if rest.startswith("P<"):
                i = p.index(">", i) + 1  # re.compile validated the group name
                continue
            if rest.startswith(("=", "!", "<=", "<!")):
                return "lookaround ((?=, (?!, (?<=, (?<!) is not supported by the agent's regex engine"
            if rest.startswith("P="):
                return "backreferences ((?P=name)) are not supported by the agent's regex engine"
            if rest.startswith(">"):
                return "atomic groups ((?>...)) are not supported by the agent's regex engine"
            if rest.startswith("("):
                return "conditional groups are not supported by the agent's regex engine"
            if rest.startswith("#"):
                return "comments ((?#...)) are not supported by the agent's regex engine"
            m = _FLAGS_RE.match(p, i)
            if m is None:
                return "only the inline flags i, m and s are portable"
            i = m.end()
            continue
        if c in "*+?" and p.startswith("+", i + 1):
            return "possessive quantifiers (*+, ++, ?+) are not supported by the agent's regex engine"
        if c == "{":
            m = _COUNTED_RE.match(p, i)
            if m is None:
                return "a literal { must be escaped as \\{"
            low, comma, high = m.group(1), m.group(2), m.group(3)
            if not low:
                return "{,n} is not portable; write {0,n}"
            if int(low) > MAX_REPETITION or (comma and high and int(high) > MAX_REPETITION):
                return f"counted repetition above {MAX_REPETITION} is refused"
            i = m.end()
            if p.startswith("+", i):
                return "possessive quantifiers ({n}+) are not supported by the agent's regex engine"
            continue
        i += 1
    return None


def normalise_capability(name: str) -> str:
    """``cap_net_admin`` → ``NET_ADMIN`` (no validation)."""
    upper = name.strip().upper()
    return upper[4:] if upper.startswith("CAP_") else upper


def valid_env_name(name: str) -> bool:
    return _ENV_NAME_RE.fullmatch(name) is not None


# --------------------------------------------------------------------------------------------------
# YAML nodes with positions


class _RefusedError(Exception):
    """Raised inside the composer; carries the mark to report."""

    def __init__(self, mark: Any, reason: str) -> None:
        super().__init__(reason)
        self.mark = mark
        self.reason = reason


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """The pure-Python safe composer with aliases, anchors and deep nesting refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedError(event.start_mark, "YAML aliases (*name) are not allowed in a policy")
        if getattr(event, "anchor", None) is not None:
            raise _RefusedError(event.start_mark, "YAML anchors (&name) are not allowed in a policy")
        if self._depth >= MAX_DEPTH:
            raise _RefusedError(event.start_mark, f"nesting deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_CONSTRUCTOR: Final = yaml.SafeLoader("")


def _env_text(rule: EnvRule) -> str:
    return f"{rule.name}={rule.value}" if rule.pattern is None else f"{rule.name} matching {rule.pattern}"


def _join(path: str, key: str) -> str:
    return key if not path else f"{path}.{key}"


def _kind(node: Any) -> str:
    return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    # -- primitives --------------------------------------------------------------------------------

    def fail(self, node: Any, path: str, reason: str) -> NoReturn:
        mark = node.start_mark
        raise PolicyFormatError(
            self.source, reason, line=mark.line + 1, column=mark.column + 1, field=path or _DOCUMENT
        )

    def mapping(
        self, node: Any, path: str, required: Iterable[str], optional: Iterable[str]
    ) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP:
            self.fail(node, path, f"expected a mapping, got {_kind(node)}")
        required, optional = tuple(required), tuple(optional)
        known = required + optional
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else _kind(key_node)
                self.fail(key_node, path, f"key {str(shown)[:40]!r} is not a string")
            key = key_node.value
            if key in out:
                self.fail(key_node, _join(path, key), "duplicate key")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
                self.fail(key_node, _join(path, key[:60]), f"unknown field{hint}")
            out[key] = value_node
        for key in required:
            if key not in out:
                self.fail(node, path, f"missing required field {key!r}")
        return out

    def seq(self, node: Any, path: str, *, non_empty: bool = False) -> list[Any]:
        if not isinstance(node, yaml.SequenceNode) or node.tag != _SEQ:
            self.fail(node, path, f"expected a list, got {_kind(node)}")
        items: list[Any] = list(node.value)
        if non_empty and not items:
            self.fail(node, path, "must not be empty")
        return items

    def string(self, node: Any, path: str, *, non_empty: bool = False) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            quote = " (quote it)" if isinstance(node, yaml.ScalarNode) and node.tag in _TAG_NAMES else ""
            self.fail(node, path, f"expected a string, got {_kind(node)}{quote}")
        value: str = node.value
        if non_empty and not value:
            self.fail(node, path, "must not be empty")
        if "\x00" in value:
            self.fail(node, path, "contains a NUL character")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            self.fail(node, path, "contains a lone surrogate escape")
        return value

    def integer(self, node: Any, path: str, low: int, high: int) -> int:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT:
            self.fail(node, path, f"expected an integer, got {_kind(node)}")
        try:
            value = int(_CONSTRUCTOR.construct_yaml_int(node))
        except (ValueError, yaml.YAMLError) as exc:  # pragma: no cover - the resolver's regex is stricter
            raise PolicyFormatError(self.source, "not an integer", field=path) from exc
        if not low <= value <= high:
            self.fail(node, path, f"must be between {low} and {high}")
        return value

    def boolean(self, node: Any, path: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
            self.fail(node, path, f"expected true or false, got {_kind(node)}")
        return bool(_CONSTRUCTOR.construct_yaml_bool(node))

    def is_null(self, node: Any) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == _NULL

    def strings(self, node: Any, path: str, *, non_empty_items: bool = False) -> list[tuple[Any, str]]:
        return [
            (item, self.string(item, f"{path}[{i}]", non_empty=non_empty_items))
            for i, item in enumerate(self.seq(node, path))
        ]

    def unique(self, items: Iterable[tuple[Any, Any]], path: str, what: str, *, key: str = "") -> None:
        """Refuse a repeated value; ``items`` are (node, value) with the value already normalised."""
        seen: set[Any] = set()
        for i, (node, value) in enumerate(items):
            if value in seen:
                self.fail(node, f"{path}[{i}]{key}", f"duplicate {what} {value!r}")
            seen.add(value)

    def regex(self, node: Any, path: str) -> str:
        pattern = self.string(node, path)
        problem = regex_problem(pattern)
        if problem is not None:
            self.fail(node, path, problem)
        return pattern

    def abs_path(self, node: Any, path: str) -> str:
        value = self.string(node, path, non_empty=True)
        if not value.startswith("/"):
            self.fail(node, path, f"{value[:80]!r} is not an absolute path")
        if ".." in value.split("/"):
            self.fail(node, path, "must not contain a '..' component")
        return value

    def env_name(self, node: Any, path: str, name: str) -> str:
        if not valid_env_name(name):
            self.fail(node, path, f"{name[:80]!r} is not a valid environment variable name")
        return name

    # -- document ----------------------------------------------------------------------------------

    def document(self, root: Any) -> WorkloadPolicy:
        fields = self.mapping(
            root, "", ("version", "name", "containers"), ("namespace", "attestation", "debug")
        )
        version_node = fields["version"]
        if not isinstance(version_node, yaml.ScalarNode) or version_node.tag != _INT:
            self.fail(
                version_node, "version", f"expected the integer {POLICY_VERSION}, got {_kind(version_node)}"
            )
        version = self.integer(version_node, "version", -(2**63), 2**63)
        if version != POLICY_VERSION:
            self.fail(
                version_node, "version", f"unsupported version {version}; this Coffer reads {POLICY_VERSION}"
            )
        name_node = fields["name"]
        name = self.string(name_node, "name", non_empty=True)
        if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(part) for part in name.split(".")):
            self.fail(
                name_node, "name", f"{name[:80]!r} is not a DNS-1123 subdomain (lowercase a-z, 0-9, '-', '.')"
            )
        namespace = None
        if "namespace" in fields and not self.is_null(fields["namespace"]):
            namespace = self.string(fields["namespace"], "namespace", non_empty=True)
            if not _DNS_LABEL_RE.fullmatch(namespace):
                self.fail(fields["namespace"], "namespace", f"{namespace[:80]!r} is not a DNS-1123 label")
        attestation = AttestationRequirement()
        if "attestation" in fields:
            attestation = self.attestation(fields["attestation"], "attestation")
        debug = self.boolean(fields["debug"], "debug") if "debug" in fields else False
        container_nodes = self.seq(fields["containers"], "containers", non_empty=True)
        containers = tuple(self.container(n, f"containers[{i}]") for i, n in enumerate(container_nodes))
        self.unique(
            (
                (self.mapping_value(n, "name"), c.name)
                for n, c in zip(container_nodes, containers, strict=True)
            ),
            "containers",
            "container name",
            key=".name",
        )
        return WorkloadPolicy(
            version=version,
            name=name,
            namespace=namespace,
            attestation=attestation,
            debug=debug,
            containers=containers,
        )

    @staticmethod
    def mapping_value(node: Any, key: str) -> Any:
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
        return node  # pragma: no cover - only called for validated mappings

    def attestation(self, node: Any, path: str) -> AttestationRequirement:
        fields = self.mapping(node, path, (), ("tee", "min_tcb", "allow_debug"))
        tees: list[tuple[Any, str]] = []
        if "tee" in fields:
            tees = self.strings(fields["tee"], _join(path, "tee"))
            for i, (tee_node, tee) in enumerate(tees):
                if tee not in TEE_NAMES:
                    self.fail(tee_node, f"{path}.tee[{i}]", self.unknown_name("TEE", tee, TEE_NAMES))
            self.unique(tees, _join(path, "tee"), "TEE")
        min_tcb: dict[str, dict[str, int]] = {}
        if "min_tcb" in fields:
            tcb_path = _join(path, "min_tcb")
            per_tee = self.mapping(fields["min_tcb"], tcb_path, (), TEE_NAMES)
            for tee, tee_node in per_tee.items():
                tee_path = _join(tcb_path, tee)
                if tees and tee not in {t for _, t in tees}:
                    self.fail(tee_node, tee_path, f"{tee} is not among the allowed TEEs (attestation.tee)")
                if tee == "snp":
                    components = self.mapping(tee_node, tee_path, (), SNP_TCB_COMPONENTS)
                    min_tcb[tee] = {
                        k: self.integer(v, _join(tee_path, k), 0, 255) for k, v in components.items()
                    }
                else:
                    min_tcb[tee] = self.tcb_components(tee_node, tee_path)
        allow_debug = (
            self.boolean(fields["allow_debug"], _join(path, "allow_debug"))
            if "allow_debug" in fields
            else False
        )
        return AttestationRequirement(tee=tuple(t for _, t in tees), min_tcb=min_tcb, allow_debug=allow_debug)

    def tcb_components(self, node: Any, path: str) -> dict[str, int]:
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP:
            self.fail(node, path, f"expected a mapping, got {_kind(node)}")
        out: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, path, non_empty=True)
            if not _TCB_COMPONENT_RE.fullmatch(key):
                self.fail(key_node, _join(path, key[:40]), "TCB component names are lowercase identifiers")
            if key in out:
                self.fail(key_node, _join(path, key), "duplicate key")
            out[key] = self.integer(value_node, _join(path, key), 0, 2**32 - 1)
        return out

    @staticmethod
    def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        return f"unknown {what} {name[:40]!r}" + (f"; did you mean {close[0]!r}?" if close else "")

    def container(self, node: Any, path: str) -> ContainerPolicy:
        fields = self.mapping(
            node,
            path,
            ("name", "image", "args"),
            (
                "env",
                "working_dir",
                "user",
                "capabilities",
                "no_new_privileges",
                "privileged",
                "read_only_root",
                "mounts",
                "allow",
                "secrets",
                "signature",
            ),
        )

        def p(key: str) -> str:
            return _join(path, key)

        name = self.string(fields["name"], p("name"), non_empty=True)
        if not _DNS_LABEL_RE.fullmatch(name):
            self.fail(
                fields["name"], p("name"), f"{name[:80]!r} is not a DNS-1123 label (lowercase a-z, 0-9, '-')"
            )
        image = self.string(fields["image"], p("image"), non_empty=True)
        try:
            parse_registry_name(image)
        except CofferError as exc:
            self.fail(fields["image"], p("image"), f"invalid image reference: {exc}")
        args = self.strings(fields["args"], p("args"))
        if not args:
            self.fail(fields["args"], p("args"), "must not be empty (the exact argv: entrypoint and command)")
        if not args[0][1]:
            self.fail(args[0][0], f"{p('args')}[0]", "the program name must not be empty")
        env: list[EnvRule] = []
        if "env" in fields:
            env_items = self.seq(fields["env"], p("env"))
            env = [self.env_rule(n, f"{p('env')}[{i}]") for i, n in enumerate(env_items)]
            self.unique(zip(env_items, map(_env_text, env), strict=True), p("env"), "environment rule")
        working_dir = (
            self.abs_path(fields["working_dir"], p("working_dir")) if "working_dir" in fields else "/"
        )
        user = self.user(fields["user"], p("user")) if "user" in fields else User(uid=0, gid=0)
        capabilities: list[tuple[Any, str]] = []
        if "capabilities" in fields:
            for i, (cap_node, raw) in enumerate(self.strings(fields["capabilities"], p("capabilities"))):
                cap = normalise_capability(raw)
                if cap not in LINUX_CAPABILITIES:
                    problem = self.unknown_name("capability", raw, LINUX_CAPABILITIES)
                    if cap == "ALL":
                        problem += "; list the capabilities, or set privileged: true"
                    self.fail(cap_node, f"{p('capabilities')}[{i}]", problem)
                capabilities.append((cap_node, cap))
            self.unique(capabilities, p("capabilities"), "capability")
        flags = {
            key: self.boolean(fields[key], p(key)) if key in fields else default
            for key, default in (
                ("no_new_privileges", True),
                ("privileged", False),
                ("read_only_root", False),
            )
        }
        mounts: list[Mount] = []
        if "mounts" in fields:
            mount_nodes = self.seq(fields["mounts"], p("mounts"))
            mounts = [self.mount(n, f"{p('mounts')}[{i}]") for i, n in enumerate(mount_nodes)]
            self.unique(
                (
                    (self.mapping_value(n, "destination"), m.destination)
                    for n, m in zip(mount_nodes, mounts, strict=True)
                ),
                p("mounts"),
                "mount destination",
                key=".destination",
            )
        allow = self.host_access(fields["allow"], p("allow")) if "allow" in fields else HostAccess()
        secrets: list[Secret] = []
        if "secrets" in fields:
            secret_nodes = self.seq(fields["secrets"], p("secrets"))
            secrets = [self.secret(n, f"{p('secrets')}[{i}]") for i, n in enumerate(secret_nodes)]
            self.unique(
                zip(secret_nodes, (s.env or s.file for s in secrets), strict=True),
                p("secrets"),
                "secret destination",
            )
        signature = None
        if "signature" in fields and not self.is_null(fields["signature"]):
            signature = self.signature(fields["signature"], p("signature"))
        return ContainerPolicy(
            name=name,
            image=image,
            args=tuple(a for _, a in args),
            env=tuple(env),
            working_dir=working_dir,
            user=user,
            capabilities=tuple(c for _, c in capabilities),
            mounts=tuple(mounts),
            allow=allow,
            secrets=tuple(secrets),
            signature=signature,
            **flags,
        )

    def env_rule(self, node: Any, path: str) -> EnvRule:
        if isinstance(node, yaml.ScalarNode):
            text = self.string(node, path)
            name, sep, value = text.partition("=")
            if not sep:
                self.fail(node, path, "expected NAME=VALUE, or {name: NAME, pattern: REGEX}")
            return EnvRule(name=self.env_name(node, path, name), value=value)
        fields = self.mapping(node, path, ("name",), ("value", "pattern"))
        name = self.env_name(
            fields["name"], _join(path, "name"), self.string(fields["name"], _join(path, "name"))
        )
        if ("value" in fields) == ("pattern" in fields):
            self.fail(node, path, "give exactly one of value and pattern")
        if "value" in fields:
            return EnvRule(name=name, value=self.string(fields["value"], _join(path, "value")))
        return EnvRule(name=name, pattern=self.regex(fields["pattern"], _join(path, "pattern")))

    def user(self, node: Any, path: str) -> User:
        fields = self.mapping(node, path, ("uid", "gid"), ("additional_gids",))
        gids: list[tuple[Any, int]] = []
        if "additional_gids" in fields:
            gid_path = _join(path, "additional_gids")
            gids = [
                (n, self.integer(n, f"{gid_path}[{i}]", 0, MAX_ID))
                for i, n in enumerate(self.seq(fields["additional_gids"], gid_path))
            ]
            self.unique(gids, gid_path, "group id")
        return User(
            uid=self.integer(fields["uid"], _join(path, "uid"), 0, MAX_ID),
            gid=self.integer(fields["gid"], _join(path, "gid"), 0, MAX_ID),
            additional_gids=tuple(g for _, g in gids),
        )

    def mount(self, node: Any, path: str) -> Mount:
        fields = self.mapping(node, path, ("destination",), ("type", "source", "options"))
        kind = "bind"
        if "type" in fields:
            kind = self.string(fields["type"], _join(path, "type"), non_empty=True)
            if not _MOUNT_TYPE_RE.fullmatch(kind):
                self.fail(fields["type"], _join(path, "type"), f"{kind[:40]!r} is not a mount type")
        options: list[tuple[Any, str]] = []
        if "options" in fields:
            options = self.strings(fields["options"], _join(path, "options"), non_empty_items=True)
        return Mount(
            destination=self.abs_path(fields["destination"], _join(path, "destination")),
            type=kind,
            source=self.string(fields["source"], _join(path, "source")) if "source" in fields else "",
            options=tuple(o for _, o in options),
        )

    def host_access(self, node: Any, path: str) -> HostAccess:
        fields = self.mapping(node, path, (), ("exec", "exec_patterns", "logs", "stdin", "copy_files"))
        execs: list[tuple[Any, tuple[str, ...]]] = []
        if "exec" in fields:
            exec_path = _join(path, "exec")
            for i, entry in enumerate(self.seq(fields["exec"], exec_path)):
                if isinstance(entry, yaml.ScalarNode):
                    self.fail(
                        entry,
                        f"{exec_path}[{i}]",
                        "each exec entry is an argv list such as "
                        "[nginx, -s, reload]; for a pattern over the command line use exec_patterns",
                    )
                argv = self.strings(entry, f"{exec_path}[{i}]")
                if not argv or not argv[0][1]:
                    self.fail(entry, f"{exec_path}[{i}]", "must be a non-empty argv list with a program name")
                execs.append((entry, tuple(a for _, a in argv)))
            self.unique(execs, exec_path, "exec command")
        patterns: dict[str, tuple[str, ...]] = {}
        for key in ("exec_patterns", "copy_files"):
            if key in fields:
                items = self.seq(fields[key], _join(path, key))
                values = [(n, self.regex(n, f"{_join(path, key)}[{i}]")) for i, n in enumerate(items)]
                self.unique(values, _join(path, key), "pattern")
                patterns[key] = tuple(v for _, v in values)
        return HostAccess(
            exec=tuple(e for _, e in execs),
            exec_patterns=patterns.get("exec_patterns", ()),
            logs=self.boolean(fields["logs"], _join(path, "logs")) if "logs" in fields else False,
            stdin=self.boolean(fields["stdin"], _join(path, "stdin")) if "stdin" in fields else False,
            copy_files=patterns.get("copy_files", ()),
        )

    def secret(self, node: Any, path: str) -> Secret:
        fields = self.mapping(node, path, ("resource",), ("env", "file"))
        resource = self.string(fields["resource"], _join(path, "resource"), non_empty=True)
        if not _KBS_RESOURCE_RE.fullmatch(resource) or "/./" in resource or "/../" in resource:
            self.fail(
                fields["resource"],
                _join(path, "resource"),
                f"{resource[:80]!r} is not a KBS resource kbs:///REPOSITORY/TYPE/TAG",
            )
        if ("env" in fields) == ("file" in fields):
            self.fail(node, path, "give exactly one of env (a variable name) and file (an absolute path)")
        if "env" in fields:
            env = self.string(fields["env"], _join(path, "env"))
            return Secret(resource=resource, env=self.env_name(fields["env"], _join(path, "env"), env))
        return Secret(resource=resource, file=self.abs_path(fields["file"], _join(path, "file")))

    def signature(self, node: Any, path: str) -> SignatureRequirement:
        fields = self.mapping(node, path, ("keys",), ())
        keys_path = _join(path, "keys")
        keys = self.strings(fields["keys"], keys_path)
        if not keys:
            self.fail(fields["keys"], keys_path, "must list at least one public key")
        for i, (key_node, key) in enumerate(keys):
            if not _PEM_KEY_RE.fullmatch(key):
                self.fail(
                    key_node, f"{keys_path}[{i}]", "expected a PEM public key (-----BEGIN PUBLIC KEY-----)"
                )
            if not _loads_public_key(key):
                self.fail(key_node, f"{keys_path}[{i}]", "the PEM public key does not load")
        self.unique(keys, keys_path, "key")
        return SignatureRequirement(keys=tuple(k for _, k in keys))


def _loads_public_key(pem: str) -> bool:
    try:
        load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _line_column(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def parse_policy(data: bytes, *, source: str = "policy") -> WorkloadPolicy:
    """Parse a policy document (YAML or JSON); :class:`PolicyFormatError` on anything malformed."""
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyFormatError(source, f"document is {len(data)} bytes; the limit is {MAX_POLICY_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFormatError(source, f"not UTF-8 at byte offset {exc.start}") from exc
    text = text.removeprefix("\ufeff")
    if text.lstrip(" \t\r\n").startswith("{"):
        # JSON indented with tabs (jq --tab) is still a YAML flow mapping once the indentation is spaces;
        # line-leading whitespace inside a flow scalar is folded away, so values do not change.
        text = _LEADING_TABS.sub(lambda m: " " * len(m.group()), text)
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
    except _RefusedError as exc:
        raise PolicyFormatError(
            source, exc.reason, line=exc.mark.line + 1, column=exc.mark.column + 1
        ) from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise PolicyFormatError(
            source, f"character {exc.character!r} is not allowed in YAML", line=line, column=column
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = f"YAML: {exc.problem or exc.context}"
        if mark is None:  # pragma: no cover - PyYAML always marks its syntax errors
            raise PolicyFormatError(source, reason) from None
        raise PolicyFormatError(source, reason, line=mark.line + 1, column=mark.column + 1) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is one of the above
        raise PolicyFormatError(source, f"YAML: {exc}") from None
    except RecursionError as exc:  # pragma: no cover - the depth cap comes first
        raise PolicyFormatError(source, "nesting too deep") from exc
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise PolicyFormatError(source, "the document is empty")
    return _Parser(source).document(root)


def load_policy_file(path: Path) -> WorkloadPolicy:
    """Read and parse a policy file; :class:`UsageError` when the file cannot be read."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
    return parse_policy(data, source=str(path))


# --------------------------------------------------------------------------------------------------
# Canonical output


_LINE_BREAK_LOOKALIKES: Final = frozenset("\x85\u2028\u2029\ufeff")


class _Flow(list[Any]):
    """A list the dumper writes on one line (short lists of scalars)."""


class _FlowMap(dict[str, Any]):
    """A mapping the dumper writes on one line."""


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    def ignore_aliases(self, data: Any) -> bool:
        return True  # the parser refuses anchors and aliases, so never emit them

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)  # indent list items under their key


def _represent_str(dumper: Any, data: str) -> Any:
    style: str | None = None
    if any(ch in _LINE_BREAK_LOOKALIKES or not (ch.isprintable() or ch == "\n") for ch in data):
        style = '"'  # PyYAML writes NEL/LS/PS raw in other styles, and a reader takes them as line breaks
    elif "\n" in data:
        style = "|"  # PEM keys and other multi-line text stay readable
    return dumper.represent_scalar(_STR, data, style=style)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Flow, lambda d, data: d.represent_sequence(_SEQ, data, flow_style=True))
_Dumper.add_representer(_FlowMap, lambda d, data: d.represent_mapping(_MAP, data, flow_style=True))

_FLOW_WIDTH: Final = 100
_FLOW_MAPS: Final = ("env", "mounts", "secrets", "user", "min_tcb")


def _has_newline(obj: Any) -> bool:
    if isinstance(obj, str):
        return "\n" in obj
    if isinstance(obj, dict):
        return any(_has_newline(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_newline(v) for v in obj)
    return False


def _fits(obj: Any) -> bool:
    return len(json.dumps(obj, ensure_ascii=False)) <= _FLOW_WIDTH and not _has_newline(obj)


def _readable(obj: Any, key: str = "") -> Any:
    """Mark short scalar lists and small entries (env, mounts, secrets, user) for one-line output."""
    if isinstance(obj, dict):
        out = {k: _readable(v, "min_tcb" if key == "min_tcb" else k) for k, v in obj.items()}
        return _FlowMap(out) if key in _FLOW_MAPS and _fits(obj) else out
    if isinstance(obj, list):
        items = [_readable(v, key) for v in obj]
        scalars = all(not isinstance(v, dict | list) for v in obj)
        return _Flow(items) if scalars and _fits(obj) else items
    return obj


# Characters JSON may leave raw that a YAML reader refuses or reads as line breaks.
_JSON_UNSAFE: Final = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)


def dump_policy(policy: WorkloadPolicy, *, fmt: Literal["yaml", "json"] = "yaml") -> bytes:
    """The canonical document for ``policy``: stable bytes that :func:`parse_policy` reads back equal."""
    obj = to_obj(policy)
    if fmt == "json":
        text = json.dumps(obj, indent=2, ensure_ascii=False)
        # Keep astral characters raw (a YAML reader does not join \\ud83d\\ude00 pairs) and escape the rest.
        text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        return (text + "\n").encode()
    if fmt == "yaml":
        text = yaml.dump(
            _readable(obj),
            Dumper=_Dumper,
            sort_keys=False,
            allow_unicode=True,
            width=1_000_000,
            default_flow_style=False,
            indent=2,
        )
        return str(text).encode()
    raise UsageError(f"unknown policy format {fmt!r}; use yaml or json")


__all__ = [
    "LINUX_CAPABILITIES",
    "MAX_POLICY_BYTES",
    "SCHEMA",
    "TEE_NAMES",
    "PolicyFormatError",
    "dump_policy",
    "load_policy_file",
    "normalise_capability",
    "parse_policy",
    "regex_problem",
    "valid_env_name",
]
