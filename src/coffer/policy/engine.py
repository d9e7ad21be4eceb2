"""Compiling a workload policy to Rego and deciding agent requests with it (regorus).

The delivered ``policy.rego`` (the exact bytes initdata binds to the TEE) is the fixed rules module
:data:`RULES` (``package agent_policy``, file ``rules.rego``), then the line ``policy_data := `` and the
compiled policy as JSON with sorted keys and fixed indentation, so the same policy always gives the
same bytes and digest. :func:`policy_data` is that JSON: the document's containers, plus, for each,
what the rules need precomputed (anchored regexes, normalised capabilities, text for explanations)
and ``container_index`` (name -> position) so a decision looks at one container only.

:class:`PolicyEngine` evaluates one request rule per decision and returns a :class:`Decision` with
every failed check in plain words. Its persistent state (which policy container each container id
was created as, and the sandbox) is given to the rules as ``input.pstate`` and changed, in Python,
by the JSON-patch ops of allowed decisions only. The engine fails closed: an unknown request, a
malformed input, a Rego error or a result of the wrong shape is a denial (``policy evaluation
failed``) and never an allowance.

Evaluation: the request rules run in the regorus interpreter. For CreateContainer, ExecProcess and
RemoveContainer, when the policy's rules are this module's :data:`RULES`, the engine first evaluates
the rules' fast paths (``fast_CreateContainerRequest``, ``fast_ExecProcessRequest``,
``fast_RemoveContainerRequest``) compiled to a regorus RVM program (``regorus.Program`` run by
``regorus.Rvm``), on a *view* of the request (:mod:`coffer.policy._views`): the fields the rules read,
selected in Python, most of them written as one text (compact JSON, see RULES "fast paths") that the
fast rule compares whole with a per-container text, sets sorted -- no decision is taken in Python,
the view only makes loading and checking cheap. A fast path only allows, with checks at least as
strict as the request rule's, against per-container constants the interpreter computes once from the
rules (``fast_constants``; this module only writes them as text); whenever it does not allow, the
request rule decides on the whole request (with every reason for a denial). The request rules
themselves do not run in the RVM: in regorus 0.13 it ignores a failing nested ``every`` (it would
allow a request the interpreter denies), settles conflicting object keys silently, does not try an
``else`` after a failed ``some ... in``, and leaves a variable bound by ``every`` unbound where it is
a reference's key; the fast rules avoid those constructs and the tests check them against the
interpreter.

Threads: a regorus engine is bound to the thread that created it (see :mod:`coffer._internal.rego`),
and crossing threads per decision would cost more than the decision. So a :class:`PolicyEngine` is
used only on the thread that created it: any other thread gets a :class:`~coffer.errors.UsageError`.
Its regorus engine lives in a thread-local registry of that thread, so it is dropped there even when
the :class:`PolicyEngine` object is collected elsewhere (then at the owner's next construction, or
when the owner thread ends).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import ModuleType
from typing import Any, Final, cast

import regorus  # type: ignore[import-untyped]

from coffer._internal.encoding import reject_constant, reject_duplicate_keys
from coffer.errors import FormatError, UsageError
from coffer.policy import _views as _pure_views
from coffer.policy.model import (
    ALWAYS_ALLOWED,
    RULED,
    ContainerPolicy,
    WorkloadPolicy,
    container_to_obj,
    to_obj,
)

RULES: Final[str] = resources.files("coffer.policy").joinpath("rules.rego").read_text("utf-8")


def _load_views() -> ModuleType:
    """The request views: the mypyc-compiled copy of :mod:`coffer.policy._views` that
    ``scripts/build_native.py`` makes (``_views_native``, about a third faster), when it was compiled
    from this very source (its SOURCE_SHA256), else the Python module. COFFER_NATIVE=0 forces Python."""
    if os.environ.get("COFFER_NATIVE") == "0":
        return _pure_views
    try:
        native = importlib.import_module("coffer.policy._views_native")
    except ImportError:
        return _pure_views
    source = resources.files("coffer.policy").joinpath("_views.py").read_bytes()
    if getattr(native, "SOURCE_SHA256", None) != hashlib.sha256(source).hexdigest():
        logging.getLogger("coffer.policy.engine").warning(
            "ignoring coffer.policy._views_native: it was built from another _views.py (rebuild it with "
            "scripts/build_native.py)")
        return _pure_views
    return native


_views: Final = _load_views()
#: The request views by request (the tests reach them here).
_VIEWS: Final = _views.VIEWS

PACKAGE: Final = "data.agent_policy"
DATA_MARKER: Final = "policy_data := "
MAX_POLICY_BYTES: Final = 1024 * 1024
#: Where the runtime shares ConfigMap, Secret, emptyDir... contents into the guest.
SHARED_DIR: Final = "/run/kata-containers/shared/containers"
#: The runtime's standard mounts, allowed for every container on destination and type.
DEFAULT_MOUNTS: Final = (
    ("/proc", "proc"), ("/dev", "tmpfs"), ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"),  # noqa: S108
    ("/dev/mqueue", "mqueue"), ("/sys", "sysfs"), ("/sys/fs/cgroup", "cgroup"),
    ("/etc/hostname", "bind"), ("/etc/hosts", "bind"), ("/etc/resolv.conf", "bind"),
)  # fmt: skip
#: Volume kinds whose mount source is a directory shared into the guest (``KIND:NAME`` sources).
SHARED_KINDS: Final = ("configmap", "secret", "emptydir", "projected", "downwardapi", "pvc")

_KNOWN: Final = frozenset(RULED) | frozenset(ALWAYS_ALLOWED)
_LOG = logging.getLogger("coffer.policy.decisions")
_ERRORS = logging.getLogger("coffer.policy.engine")
_REGEX_META: Final = frozenset("\\.+*?()|[]{}^$-")
_DATA_LINE = re.compile(r"(?m)^policy_data := ")
_DIGEST_RE = re.compile(r"[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+")
_TAG_RE = re.compile(r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_FAILED: Final = "policy evaluation failed"
# One character class of literal letters, digits, "_.:,/@" and same-kind ranges (a "-" only first or
# last, where it is literal), repeated with + or *.
_CHARSET_RE = re.compile(r"\[(-?(?:[A-Za-z0-9]-[A-Za-z0-9]|[A-Za-z0-9_.:,/@])+-?)\]([+*])")
_CHARSET_TOKEN_RE = re.compile(r"[A-Za-z0-9]-[A-Za-z0-9]|[A-Za-z0-9_.:,/@-]")
_RANGE_GROUPS: Final = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Requests with a fast path in RULES: request -> rule.
_FAST: Final = {"CreateContainerRequest": "fast_CreateContainerRequest",
                "ExecProcessRequest": "fast_ExecProcessRequest",
                "RemoveContainerRequest": "fast_RemoveContainerRequest"}
_ENTRY_POINTS: Final = {rule: f"{PACKAGE}.{rule}" for rule in _FAST.values()}
# The C scanner of a JSONDecoder: one JSON value from an index (the RVM's output starts with it).
_SCAN: Final = cast(Callable[[str, int], tuple[Any, int]], vars(json.JSONDecoder())["scan_once"])
#: The CreateContainer view's fixed list: its length, and where MountData is.
_FIXED_FIELDS: Final = 10
_MOUNT_DATA: Final = 6
_ENCODE = json.JSONEncoder(allow_nan=False).encode


# --------------------------------------------------------------------------------------------------
# Compilation


def _rx_escape(text: str) -> str:
    """Escape for both Python's and Rust's regex syntax (only the metacharacters they share)."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def _anchored(pattern: str, what: str) -> str:
    # A pattern that compiles on its own has balanced groups, so wrapping cannot be escaped.
    try:
        re.compile(pattern)
    except re.error as exc:
        raise FormatError("workload policy", f"{what}: invalid regex {pattern!r}: {exc}") from None
    return f"^(?:{pattern})$"


def _image_regex(image: str) -> str | None:
    """A regex admitting the policy's image with or without a tag next to its digest (None when the
    reference carries no digest: then only exact equality holds)."""
    name, sep, digest = image.rpartition("@")
    if not sep or not name or not _DIGEST_RE.fullmatch(digest):
        return None
    last = name.rsplit("/", 1)[-1]
    tag = _TAG_RE.search(last)
    if tag is not None:
        name = name[: len(name) - len(tag.group(0))]
    return f"^{_rx_escape(name)}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?@{_rx_escape(digest)}$"


def _source_match(source: str, mount_type: str) -> dict[str, str]:
    """How the rules match a policy mount's source: ``source_regex`` always (for explanations), plus
    ``source_exact``, or ``source_prefix``/``source_suffix`` around the request's own container id
    (the rules check those without a regex)."""
    regex = _source_regex(source, mount_type)
    if source.startswith("regex:"):
        return {"source_regex": regex}
    kind, sep, name = source.partition(":")
    if sep and kind in SHARED_KINDS and name:
        return {"source_regex": regex, "source_prefix": f"{SHARED_DIR}/", "source_suffix": f"-{kind}-{name}"}
    if not source and mount_type != "bind":
        return {"source_regex": regex}
    return {"source_regex": regex, "source_exact": source}


def _source_regex(source: str, mount_type: str) -> str:
    """The mount sources a policy mount admits.

    ``/path`` -- that host path exactly; ``KIND:NAME`` for a shared volume kind -- the runtime's
    shared directory ``SHARED_DIR/<container id>-KIND-NAME``; ``regex:P`` -- a full match of ``P``;
    empty -- any source for a non-bind mount (tmpfs, ...), nothing for a bind mount.
    """
    if source.startswith("regex:"):
        return _anchored(source[len("regex:"):], "mount source")
    kind, sep, name = source.partition(":")
    if sep and kind in SHARED_KINDS and name:
        return f"^{_rx_escape(SHARED_DIR)}/[^/]+-{_rx_escape(kind)}-{_rx_escape(name)}$"
    if not source:
        return "^(?s:.*)$" if mount_type != "bind" else "^$"
    return f"^{_rx_escape(source)}$"


def _cap_name(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def _list_text(items: list[str], none: str) -> str:
    return ", ".join(items) if items else none


def _charset(pattern: str) -> dict[str, Any] | None:
    """For a pattern that is one simple character class repeated (``[a-z0-9-]+``, ``[0-9.]*``): the
    class's characters and the least length, stating the same full-match set without a regex. None
    for any other pattern."""
    match = _CHARSET_RE.fullmatch(pattern)
    if match is None:
        return None
    chars: set[str] = set()
    for token in _CHARSET_TOKEN_RE.findall(match.group(1)):
        if len(token) == 3:
            low, high = token[0], token[2]
            if low > high or not any(low in group and high in group for group in _RANGE_GROUPS):
                return None
            chars.update(chr(code) for code in range(ord(low), ord(high) + 1))
        else:
            chars.add(token)
    return {"chars": "".join(sorted(chars)), "min": 1 if match.group(2) == "+" else 0}


def _env_data(container: ContainerPolicy) -> dict[str, Any]:
    exact: dict[str, bool] = {}
    patterns: dict[str, list[str]] = {}
    charsets: dict[str, list[dict[str, Any]]] = {}
    hints: dict[str, list[str]] = {}
    for rule in container.env:
        if rule.pattern is not None:
            patterns.setdefault(rule.name, []).append(
                _anchored(rule.pattern, f"container {container.name!r}: env {rule.name}"))
            charset = _charset(rule.pattern)
            if charset is not None:
                charsets.setdefault(rule.name, []).append(charset)
            hints.setdefault(rule.name, []).append(f"must match {json.dumps(rule.pattern)}")
        else:
            exact[f"{rule.name}={rule.value or ''}"] = True
            hints.setdefault(rule.name, []).append(f"must be {json.dumps(rule.value or '')}")
    names = sorted(hints)
    # A variable the policy gives only exact values for must be there: dropping it (a mode, a
    # feature flag) would let the image's defaults apply while the policy looks satisfied.
    required = sorted({r.name for r in container.env if r.pattern is None}
                      - {r.name for r in container.env if r.pattern is not None})
    return {
        "required": required,
        "exact": exact,
        "patterns": patterns,
        "charsets": charsets,
        "names": {n: " or ".join(hints[n]) for n in names},
        "allowed": "allowed: " + ", ".join(names) if names else "the policy allows no environment variables",
    }


def _container_data(container: ContainerPolicy) -> dict[str, Any]:
    obj = container_to_obj(container)
    caps = sorted({_cap_name(c) for c in container.capabilities})
    allow = container.allow
    exec_lists = [list(a) for a in allow.exec]
    exec_desc = [json.dumps(a) for a in exec_lists]
    exec_desc += [f"a command matching {json.dumps(p)}" for p in allow.exec_patterns]
    obj.update({
        "image_regex": _image_regex(container.image),
        "env": _env_data(container),
        "env_rules": obj["env"],
        "user": {"uid": container.user.uid, "gid": container.user.gid,
                 "additional_gids": sorted(set(container.user.additional_gids))},
        "capabilities": caps,
        "capabilities_text": _list_text(caps, "none"),
        "mounts": [
            {"destination": m.destination, "type": m.type, "source": m.source,
             **_source_match(m.source, m.type), "options": sorted(m.options)}
            for m in container.mounts
        ],
    })
    obj["allow"].update({
        "exec": exec_lists,
        "exec_regex": [_anchored(p, f"container {container.name!r}: exec pattern")
                       for p in allow.exec_patterns],
        "exec_text": ("allowed: " + "; ".join(exec_desc)) if exec_desc
        else "the policy allows no exec in this container",
        "copy_files_regex": [_anchored(p, f"container {container.name!r}: copy_files")
                             for p in allow.copy_files],
        "copy_files_text": _list_text([f"allowed: paths matching {json.dumps(p)}" for p in allow.copy_files],
                                      "the policy allows no file copies into this container"),
    })
    return obj


def policy_data(policy: WorkloadPolicy) -> dict[str, Any]:
    """The compiled policy data (JSON-able): the document, containers indexed by name, and what the
    rules need precomputed. FormatError when a container name repeats or a regex does not compile."""
    doc = to_obj(policy)
    index: dict[str, int] = {}
    containers = []
    for i, container in enumerate(policy.containers):
        if container.name in index:
            raise FormatError("workload policy", f"container name {container.name!r} appears twice")
        index[container.name] = i
        containers.append(_container_data(container))
    copy_patterns = [p for c in containers for p in c["allow"]["copy_files"]]
    doc.update({
        "containers": containers,
        "container_index": index,
        "common": {"default_mounts": dict(DEFAULT_MOUNTS)},
        "copy_files_regex": [r for c in containers for r in c["allow"]["copy_files_regex"]],
        "copy_files_text": _list_text([f"allowed: paths matching {json.dumps(p)}" for p in copy_patterns],
                                      "the policy allows no file copies"),
    })
    if "namespace" not in doc:
        doc["namespace"] = None
    return doc


def _dump(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)


def compile_policy(policy: WorkloadPolicy) -> str:
    """The exact ``policy.rego`` delivered in initdata: :data:`RULES`, then ``policy_data := `` and the
    data as JSON (sorted keys, two-space indent, ASCII), ending with a newline."""
    return f"{RULES}\n{DATA_MARKER}{_dump(policy_data(policy))}\n"


def split_policy(text: str) -> tuple[str, dict[str, Any]]:
    """(rules, data) of a delivered ``policy.rego``: the text before the last ``policy_data := `` line
    and that line's value, decoded as strict JSON (an object; no duplicate keys, NaN or trailing text)."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise FormatError("policy.rego", f"larger than {MAX_POLICY_BYTES} bytes")
    marks = list(_DATA_LINE.finditer(text))
    if not marks:
        raise FormatError("policy.rego", "no 'policy_data := ' line")
    mark = marks[-1]
    decoder = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys, parse_constant=reject_constant)
    try:
        data, end = decoder.raw_decode(text, mark.end())
    except RecursionError:
        raise FormatError("policy.rego", "policy_data nests too deeply") from None
    except ValueError as exc:
        raise FormatError("policy.rego", f"policy_data is not valid JSON: {exc}") from None
    if text[end:].strip():
        raise FormatError("policy.rego", "text after the policy_data JSON")
    if not isinstance(data, dict):
        raise FormatError("policy.rego", "policy_data is not a JSON object")
    return text[: mark.start()], data


# --------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Decision:
    """One decision: allowed or not, and every failed check in plain words."""

    request: str
    allowed: bool
    reasons: tuple[str, ...]
    container: str | None

    def explanation(self) -> str:
        """One paragraph in plain words."""
        if self.allowed:
            where = f" for container {json.dumps(self.container)}" if self.container else ""
            return f"{self.request} is allowed by the policy{where}."
        reasons = "; ".join(r.rstrip(".") for r in self.reasons) or "no rule allows it"
        return f"{self.request} is denied by the policy: {reasons}."


def _redacted(value: Any) -> Any:
    """A copy of a request input safe to log: environment values and stream data removed."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "Env" and isinstance(item, list):
                out[key] = [e.split("=", 1)[0] + "=<redacted>" if isinstance(e, str) else "<redacted>"
                            for e in item]
            elif key == "data":
                out[key] = "<redacted>"
            else:
                out[key] = _redacted(item)
        return out
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _pointer(path: Any) -> list[str]:
    if type(path) is not str or not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    parts = path[1:].split("/")
    if "~" in path:
        return [p.replace("~1", "/").replace("~0", "~") for p in parts]
    return parts


def _json_copy(value: Any) -> Any:
    """A private copy of a JSON value; ValueError when ``value`` is not JSON."""
    if value is None or type(value) in (str, int, bool):
        return value
    try:
        _ENCODE(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON: {_first_line(exc)}") from None
    return copy.deepcopy(value)


def _apply_ops(state: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """``state`` with JSON-patch ``ops`` (add/replace/remove on objects) applied, as a new object.
    ValueError on anything else, leaving ``state`` untouched.

    Objects on an op's path are copied, the rest is shared with ``state``: state objects are never
    changed in place, so sharing them is safe and an op costs its path, not the whole state."""
    new = dict(state)
    for op in ops:
        if type(op) is not dict or op.get("op") not in ("add", "replace", "remove"):
            raise ValueError(f"unsupported op {op!r}")
        parts = _pointer(op.get("path"))
        parent: dict[str, Any] = new
        for part in parts[:-1]:
            child = parent.get(part)
            if not isinstance(child, dict):
                raise ValueError(f"no object at {op['path']!r}")
            child = dict(child)
            parent[part] = child
            parent = child
        key = parts[-1]
        if op["op"] == "remove":
            if key not in parent:
                raise ValueError(f"nothing to remove at {op['path']!r}")
            del parent[key]
        else:
            if "value" not in op or (op["op"] == "replace" and key not in parent):
                raise ValueError(f"bad {op['op']} at {op['path']!r}")
            parent[key] = _json_copy(op["value"])
    return new


def _view_context(data: Mapping[str, Any], loaded: _Rules) -> _pure_views.ViewContext:
    common = data.get("common")
    default_mounts = common.get("default_mounts") if isinstance(common, dict) else None
    if not isinstance(default_mounts, dict):
        default_mounts = {}
    pairs = frozenset(f"{dest} {mtype}" for dest, mtype in default_mounts.items()
                      if type(dest) is str and type(mtype) is str)
    context: _pure_views.ViewContext = _views.ViewContext(pairs, loaded.env_fixed)
    return context


# --------------------------------------------------------------------------------------------------
# The fast paths' constants


@dataclass(frozen=True)
class _IdSlot:
    """Where a shared volume's source holds the container id, in a constant's text."""

    prefix: str
    suffix: str


def _texts_around_ids(value: Any) -> list[str]:
    """The text (see :func:`_text`) of ``value``, with object keys sorted, cut at each
    :class:`_IdSlot`: joined with a container id of characters that JSON writes as themselves, the
    texts are the text of ``value`` with each slot replaced by the string prefix + id + suffix."""
    parts: list[list[str]] = [[]]

    def walk(item: Any) -> None:
        if isinstance(item, _IdSlot):
            parts[-1].append(_views.ESCAPE(item.prefix)[:-1])
            parts.append([_views.ESCAPE(item.suffix)[1:]])
        elif type(item) is dict:
            parts[-1].append("{")
            for n, key in enumerate(sorted(item)):
                if type(key) is not str:
                    raise ValueError(f"object key {key!r} is not a string")
                parts[-1].append(("," if n else "") + _views.ESCAPE(key) + ":")
                walk(item[key])
            parts[-1].append("}")
        elif type(item) is list:
            parts[-1].append("[")
            for n, element in enumerate(item):
                if n:
                    parts[-1].append(",")
                walk(element)
            parts[-1].append("]")
        else:
            parts[-1].append(_views.ENCODE_ASCII(item))

    walk(value)
    return ["".join(part).replace('"', "\x7f") for part in parts]


def _create_constants(entry: Any) -> dict[str, Any]:
    """A ``fast_constants`` create entry with its ``fixed`` value as texts around container ids (a
    MountData source given as {"prefix", "suffix"} is a slot). ValueError when it has another shape."""
    fixed = entry.get("fixed") if type(entry) is dict else None
    if type(fixed) is not list or len(fixed) != _FIXED_FIELDS or type(fixed[_MOUNT_DATA]) is not dict:
        raise ValueError("a create entry has no fixed MountData")
    slotted = {}
    for pair, mount in fixed[_MOUNT_DATA].items():
        source = mount[0] if type(mount) is list and len(mount) == 2 else None
        if type(source) is dict:
            prefix, suffix = source.get("prefix"), source.get("suffix")
            if set(source) != {"prefix", "suffix"} or type(prefix) is not str or type(suffix) is not str:
                raise ValueError(f"mount {pair!r} has a source of an unknown shape")
            slotted[pair] = [_IdSlot(prefix, suffix), mount[1]]
        else:
            slotted[pair] = mount
    env_fixed = entry.get("env_fixed")
    if type(env_fixed) is not dict:
        raise ValueError("a create entry has no env_fixed")
    # The fixed variables' values end the text, in the order of their names (see _create_view).
    values = [env_fixed[name] for name in sorted(env_fixed)]
    fixed = [*fixed[:_MOUNT_DATA], slotted, *fixed[_MOUNT_DATA + 1:], values]
    return {**entry, "fixed": _texts_around_ids(fixed)}


def _exec_constants(entry: Any) -> Any:
    """A ``fast_constants`` exec entry with its commands as {text: true} (null stays)."""
    if entry is None:
        return None
    commands = entry.get("commands") if type(entry) is dict else None
    if type(commands) is not list:
        raise ValueError("an exec entry has no commands")
    return {**entry, "commands": {"".join(_texts_around_ids(command)): True for command in commands}}


def _fast_constants(value: Any) -> dict[str, Any]:
    """data.coffer_engine: ``fast_constants`` (as the interpreter computed it) with the values the fast
    paths compare as text written so. ValueError when it does not have the rules' shape."""
    create = value.get("create") if type(value) is dict else None
    exec_ = value.get("exec") if type(value) is dict else None
    names = value.get("names") if type(value) is dict else None
    if type(create) is not dict or type(exec_) is not list or type(names) is not list:
        raise ValueError(f"fast_constants is {type(value).__name__} of an unknown shape")
    return {"create": {name: _create_constants(entry) for name, entry in create.items()},
            "exec": [_exec_constants(entry) for entry in exec_], "names": names}


# Each thread's regorus engines by key (dropped on that thread when it ends), and keys whose
# PolicyEngine was collected on another thread, to drop on the owner's next construction.
_LOCAL = threading.local()
_ORPHANS: dict[int, list[int]] = {}
_ORPHANS_LOCK = threading.Lock()
_KEYS = itertools.count(1)


def _engines_here() -> dict[int, Any]:
    engines: dict[int, Any] | None = getattr(_LOCAL, "engines", None)
    if engines is None:
        engines = {}
        _LOCAL.engines = engines
    return engines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class _Rules:
    """One policy's rules loaded on one thread: the interpreter, and for RULES also the compiled RVM
    program of the fast paths."""

    __slots__ = ("_interpreter", "_vm", "env_fixed")

    def __init__(self, interpreter: Any, vm: Any = None,
                 env_fixed: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._interpreter, self._vm = interpreter, vm
        self.env_fixed: Mapping[str, tuple[str, ...]] = env_fixed or {}

    def evaluate(self, rule: str, input_json: str) -> Any:
        """The value of ``rule`` for ``input_json`` (None when undefined); regorus' exceptions pass
        through."""
        self._interpreter.set_input_json(input_json)
        return self._interpreter.eval_rule(f"{PACKAGE}.{rule}")

    def evaluate_fast(self, rule: str, input_json: str) -> Any:
        """The value of the fast-path ``rule`` for a view (the RVM answers ``"<undefined>"`` when it is
        undefined); regorus' exceptions pass through, ValueError for a value that is not JSON."""
        self._vm.set_input_json(input_json)
        output = self._vm.execute_entry_point(_ENTRY_POINTS[rule])
        try:
            # The RVM's output is one JSON value from index 0: the scanner alone reads it.
            return _SCAN(output, 0)[0]
        except StopIteration:
            raise ValueError("the RVM's output is not JSON") from None


def _load_rules(rules: str, data: dict[str, Any]) -> tuple[_Rules, bool]:
    """``rules`` with ``data`` loaded, and whether the fast paths are on (only for this module's RULES).
    FormatError when the rules do not compile or are not ``package agent_policy``."""
    data_json = json.dumps({"agent_policy": {"policy_data": data}})
    interpreter = regorus.Engine()
    try:
        interpreter.add_policy("policy.rego", rules)
        packages = list(interpreter.get_packages())
        interpreter.add_data_json(data_json)
    except (RuntimeError, ValueError) as exc:
        raise FormatError("policy.rego", f"does not compile: {_first_line(exc)}") from None
    if PACKAGE not in packages:
        raise FormatError("policy.rego", f"must declare 'package agent_policy' (found {packages})")
    if rules not in (RULES, RULES + "\n"):
        return _Rules(interpreter), False
    # The fast paths' per-container constants, computed once by the interpreter and given to the RVM
    # as data; a policy they cannot be computed or compiled for is decided without fast paths.
    try:
        interpreter.set_input_json("{}")
        constants = _fast_constants(interpreter.eval_rule(f"{PACKAGE}.fast_constants"))
        # The fast rules read only these constants (and their input).
        fast_json = json.dumps({"coffer_engine": constants}, allow_nan=False)
        program = regorus.Program.compile_from_modules(
            fast_json, [("policy.rego", rules)], [f"{PACKAGE}.{rule}" for rule in _FAST.values()])
        vm = regorus.Rvm()
        vm.load_program(program)
        vm.set_data_json(fast_json)
        # The interpreter gets the constants too, so that the fast paths can be checked against it.
        interpreter.add_data_json(json.dumps({"coffer_engine": constants}, allow_nan=False))
    except Exception as exc:  # any failure: the interpreter decides everything instead
        _ERRORS.warning("no fast paths for this policy: %s", _first_line(exc))
        return _Rules(interpreter), False
    env_fixed = {name: tuple(sorted(entry["env_fixed"])) for name, entry in constants["create"].items()}
    return _Rules(interpreter, vm, env_fixed), True


def _evaluate(loaded: _Rules, rule: str, input_json: str, *, fast: bool = False) -> tuple[Any, str | None]:
    """(value, None), or (None, what went wrong) when regorus failed."""
    try:
        if fast:
            return loaded.evaluate_fast(rule, input_json), None
        return loaded.evaluate(rule, input_json), None
    except Exception as exc:  # regorus raises RuntimeError, ValueError...: fail closed
        return None, f"Rego evaluation error: {_first_line(exc)}"
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        return None, f"regorus panicked: {_first_line(exc)}"


class PolicyEngine:
    """Decides agent requests with one workload policy; keeps the persistent policy state.

    ``policy`` is a parsed :class:`WorkloadPolicy` or a delivered ``policy.rego`` text (whose own rules
    are then evaluated, so an agent can run from initdata alone). Use it only on the thread that
    created it; other threads get :class:`UsageError`.
    """

    def __init__(self, policy: WorkloadPolicy | str) -> None:
        if isinstance(policy, str):
            rules, data = split_policy(policy)
        elif isinstance(policy, WorkloadPolicy):
            rules, data = RULES, policy_data(policy)
        else:
            raise UsageError("PolicyEngine needs a WorkloadPolicy or policy.rego text, "
                             f"not {type(policy).__name__}")
        self._owner = threading.get_ident()
        self._key = next(_KEYS)
        self._debug = data.get("debug") is True
        self._state: dict[str, Any] = {"containers": {}}
        self._state_json: str | None = None
        loaded, self._fast = _load_rules(rules, data)
        self._view_context = _view_context(data, loaded)
        # The fast paths' allowances, made once each (a Decision is immutable).
        self._allowed: dict[tuple[str, str], Decision] = {}
        self._purge_orphans()
        _engines_here()[self._key] = loaded

    @staticmethod
    def _purge_orphans() -> None:
        with _ORPHANS_LOCK:
            keys = _ORPHANS.pop(threading.get_ident(), [])
        engines = _engines_here()
        for key in keys:
            engines.pop(key, None)

    def __del__(self) -> None:
        key = getattr(self, "_key", None)
        if key is None:
            return
        if threading.get_ident() == self._owner:
            engines = getattr(_LOCAL, "engines", None)
            if engines is not None:
                engines.pop(key, None)
        else:
            with _ORPHANS_LOCK:
                _ORPHANS.setdefault(self._owner, []).append(key)

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise UsageError(
                "this PolicyEngine belongs to the thread that created it (regorus engines are bound to "
                "their thread); create one PolicyEngine per thread")

    @property
    def state(self) -> Mapping[str, Any]:
        """A copy of the persistent policy state."""
        return copy.deepcopy(self._state)

    def decide(self, request: str, input: Mapping[str, Any]) -> Decision:
        """Decide one request; on an allowed decision apply its state changes."""
        self._check_thread()
        decision = self._decide(request, input)
        if self._debug:
            self._log(decision, input)
        return decision

    def _decide(self, request: str, input_doc: Mapping[str, Any]) -> Decision:
        if request not in _KNOWN:
            return Decision(request, False, (f"{request}: unknown request (the policy has no rule for it)",),
                            None)
        untrusted: object = input_doc  # callers pass whatever the host sent
        if type(untrusted) is not dict and not isinstance(untrusted, Mapping):
            return Decision(request, False, (f"{request}: the request input is not an object",), None)
        if "pstate" in input_doc:
            return Decision(request, False,
                            (f"{request}: the request carries the reserved field \"pstate\"",), None)
        loaded: _Rules | None = _engines_here().get(self._key)
        if self._fast and loaded is not None and request in _FAST and isinstance(input_doc, dict):
            fast = self._fast_decision(loaded, request, input_doc)
            if fast is not None:
                return fast
        try:
            text = _ENCODE(input_doc)
        except (TypeError, ValueError):
            return Decision(request, False, (f"{request}: the request input is not JSON",), None)
        if self._state_json is None:
            self._state_json = json.dumps(self._state, allow_nan=False)
        text = f'{text[:-1]}{"," if len(text) > 2 else ""}"pstate":{self._state_json}}}'
        if loaded is None:
            return self._failed(request, "Rego evaluation error: the regorus engine is gone")
        result, error = _evaluate(loaded, request, text)
        if error is not None:
            return self._failed(request, error)
        return self._conclude(request, result)

    def _fast_decision(self, loaded: _Rules, request: str, input_doc: dict[str, Any]) -> Decision | None:
        """The fast path's allowance, or None when it does not allow (the request rule decides)."""
        containers = self._state.get("containers")
        try:
            text = _views.VIEWS[request](input_doc, containers if isinstance(containers, dict) else {},
                                   self._view_context)
        except (TypeError, ValueError, RecursionError):
            return None
        if text is None:
            return None
        result, error = _evaluate(loaded, _FAST[request], text, fast=True)
        # A fast rule's value, when it allows: [container, ops as [op, path, value] or [op, path]].
        if error is not None or type(result) is not list or len(result) != 2:
            return None
        container, triples = result
        if type(container) is not str or type(triples) is not list:
            return None
        if triples:
            try:
                ops = [dict(zip(("op", "path", "value"), triple, strict=False)) for triple in triples]
                self._state = _apply_ops(self._state, ops)
            except (TypeError, ValueError) as exc:
                return self._failed(request, f"state ops: {_first_line(exc)}")
            self._state_json = None
        allowed = self._allowed.get((request, container))
        if allowed is None:
            allowed = self._allowed[(request, container)] = Decision(request, True, (), container)
        return allowed

    def _conclude(self, request: str, result: Any) -> Decision:
        """The decision a rule's result states; on allowance its state ops applied."""
        if not isinstance(result, dict):
            return self._failed(request, f"result is {type(result).__name__}, not an object")
        allowed = result.get("allowed")
        reasons = result.get("reasons")
        ops = result.get("ops", [])
        container = result.get("container")
        if (not isinstance(allowed, bool) or not isinstance(reasons, list)
                or not all(isinstance(r, str) for r in reasons) or not isinstance(ops, list)
                or not (container is None or isinstance(container, str))):
            return self._failed(request, "result does not have the decision shape")
        if allowed and reasons:
            return self._failed(request, "result is allowed with reasons")
        if not allowed:
            return Decision(request, False, tuple(reasons) or (f"{request}: no rule allows it",), container)
        if ops:
            try:
                self._state = _apply_ops(self._state, ops)
            except ValueError as exc:
                return self._failed(request, f"state ops: {_first_line(exc)}")
            self._state_json = None
        return Decision(request, True, (), container)

    def _failed(self, request: str, detail: str) -> Decision:
        _ERRORS.error("policy evaluation failed for %s (denied): %s", request, detail)
        return Decision(request, False, (f"{request}: {_FAILED}",), None)

    def _log(self, decision: Decision, input_doc: Mapping[str, Any]) -> None:
        try:
            logged_input: Any = _redacted(input_doc) if isinstance(input_doc, Mapping) else None
            line = json.dumps({"request": decision.request, "allowed": decision.allowed,
                               "container": decision.container, "reasons": list(decision.reasons),
                               "input": logged_input}, sort_keys=True, default=repr)
        except (TypeError, ValueError):
            line = json.dumps({"request": decision.request, "allowed": decision.allowed,
                               "container": decision.container, "reasons": list(decision.reasons)})
        _LOG.info("%s", line)
