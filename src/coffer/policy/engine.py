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

Threads: a regorus engine is bound to the thread that created it (see :mod:`coffer._internal.rego`),
and crossing threads per decision would cost more than the decision. So a :class:`PolicyEngine` is
used only on the thread that created it: any other thread gets a :class:`~coffer.errors.UsageError`.
Its regorus engine lives in a thread-local registry of that thread, so it is dropped there even when
the :class:`PolicyEngine` object is collected elsewhere (then at the owner's next construction, or
when the owner thread ends).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import regorus  # type: ignore[import-untyped]

from coffer.errors import FormatError, UsageError
from coffer.policy.model import (
    ALWAYS_ALLOWED,
    RULED,
    ContainerPolicy,
    WorkloadPolicy,
    container_to_obj,
    to_obj,
)

RULES: Final[str] = resources.files("coffer.policy").joinpath("rules.rego").read_text("utf-8")

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
    """How the rules match a policy mount's source: ``source_regex`` always, plus ``source_exact`` or
    ``source_prefix``/``source_suffix`` (one path component between them) stating the same set, which
    the rules check without a regex."""
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


def _env_data(container: ContainerPolicy) -> dict[str, Any]:
    exact: dict[str, bool] = {}
    patterns: dict[str, list[str]] = {}
    hints: dict[str, list[str]] = {}
    for rule in container.env:
        if rule.pattern is not None:
            patterns.setdefault(rule.name, []).append(
                _anchored(rule.pattern, f"container {container.name!r}: env {rule.name}"))
            hints.setdefault(rule.name, []).append(f"must match {json.dumps(rule.pattern)}")
        else:
            exact[f"{rule.name}={rule.value or ''}"] = True
            hints.setdefault(rule.name, []).append(f"must be {json.dumps(rule.value or '')}")
    names = sorted(hints)
    return {
        "exact": exact,
        "patterns": patterns,
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def split_policy(text: str) -> tuple[str, dict[str, Any]]:
    """(rules, data) of a delivered ``policy.rego``: the text before the last ``policy_data := `` line
    and that line's value, decoded as strict JSON (an object; no duplicate keys, NaN or trailing text)."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise FormatError("policy.rego", f"larger than {MAX_POLICY_BYTES} bytes")
    marks = list(_DATA_LINE.finditer(text))
    if not marks:
        raise FormatError("policy.rego", "no 'policy_data := ' line")
    mark = marks[-1]
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
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
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_ops(state: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """``state`` with JSON-patch ``ops`` (add/replace/remove on objects) applied, as a new object.
    ValueError on anything else, leaving ``state`` untouched."""
    new = copy.deepcopy(state)
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
            raise ValueError(f"unsupported op {op!r}")
        parts = _pointer(op.get("path"))
        parent: Any = new
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                raise ValueError(f"no object at {op['path']!r}")
        if not isinstance(parent, dict):
            raise ValueError(f"no object at {op['path']!r}")
        key = parts[-1]
        if op["op"] == "remove":
            if key not in parent:
                raise ValueError(f"nothing to remove at {op['path']!r}")
            del parent[key]
        else:
            if "value" not in op or (op["op"] == "replace" and key not in parent):
                raise ValueError(f"bad {op['op']} at {op['path']!r}")
            parent[key] = copy.deepcopy(op["value"])
    return new


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
        self._state_json = json.dumps(self._state)
        engine = regorus.Engine()
        try:
            engine.add_policy("policy.rego", rules)
            packages = list(engine.get_packages())
            engine.add_data_json(json.dumps({"agent_policy": {"policy_data": data}}))
        except (RuntimeError, ValueError) as exc:
            raise FormatError("policy.rego", f"does not compile: {_first_line(exc)}") from None
        if PACKAGE not in packages:
            raise FormatError("policy.rego", f"must declare 'package agent_policy' (found {packages})")
        self._purge_orphans()
        _engines_here()[self._key] = engine

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
        if not isinstance(untrusted, Mapping):
            return Decision(request, False, (f"{request}: the request input is not an object",), None)
        if "pstate" in input_doc:
            return Decision(request, False,
                            (f"{request}: the request carries the reserved field \"pstate\"",), None)
        try:
            text = json.dumps(input_doc, allow_nan=False)
        except (TypeError, ValueError):
            return Decision(request, False, (f"{request}: the request input is not JSON",), None)
        text = f'{text[:-1]}{"," if len(text) > 2 else ""}"pstate":{self._state_json}}}'
        engine = _engines_here().get(self._key)
        try:
            if engine is None:
                raise RuntimeError("the regorus engine is gone")
            engine.set_input_json(text)
            result = engine.eval_rule(f"{PACKAGE}.{request}")
        except Exception as exc:  # regorus raises RuntimeError, ValueError...: fail closed
            return self._failed(request, f"Rego evaluation error: {_first_line(exc)}")
        except BaseException as exc:
            if type(exc).__name__ != "PanicException":
                raise
            return self._failed(request, f"regorus panicked: {_first_line(exc)}")
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
                new_state = _apply_ops(self._state, ops)
                new_json = json.dumps(new_state, allow_nan=False)
            except (TypeError, ValueError) as exc:
                return self._failed(request, f"state ops: {_first_line(exc)}")
            self._state, self._state_json = new_state, new_json
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
