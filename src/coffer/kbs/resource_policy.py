"""The resource policy: Rego (evaluated by regorus) deciding whether a verified token may fetch a resource.

Contract (as Trustee's): package ``policy``, rule ``allow``; ``input`` is the verified token's claims
(the whole EAR JSON), ``data`` is ``{"plugin": "resource", "resource-path": [repo, type, tag],
"query": {...}}``. Anything but ``allow == true`` (undefined, non-boolean, evaluation error) is a denial.

The policy text lives in the store (namespace ``kbs_policies``, key ``resource-policy``) so every
replica applies the one most recently set; compiled engines are cached by the text's digest, per
thread: a regorus engine is "unsendable" (using it from a thread other than the one that created it
panics), and Starlette runs handlers in the event loop thread and in worker threads.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from coffer._internal import rego
from coffer._internal.clock import utc_now
from coffer.errors import ProtocolError
from coffer.kbs.store import NS_POLICIES, Store

RESOURCE_POLICY_KEY = "resource-policy"
MAX_POLICY_BYTES = 256 * 1024

# Default: resources only, never to sample (software-only) evidence, and only when every submodule of
# the token is affirming (so a platform whose measurements match no reference value gets nothing).
DEFAULT_RESOURCE_POLICY = """\
package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	count(input.submods) > 0
	every _, submod in input.submods {
		submod["ear.status"] == "affirming"
	}
	not sample_evidence
}

sample_evidence if {
	some _, submod in input.submods
	submod["ear.veraison.annotated-evidence"].sample
}
"""

# Trustee's allow_all.rego equivalent, for tests and demos with the sample attester.
ALLOW_ALL_RESOURCE_POLICY = """\
package policy

import rego.v1

default allow := false

allow if data.plugin == "resource"
"""

_regorus: Any = importlib.import_module("regorus")  # untyped extension module


def _short(exc: BaseException) -> str:
    """regorus errors carry a Rust backtrace; keep the message lines only."""
    lines: list[str] = []
    for line in str(exc).splitlines():
        if line.startswith("Stack backtrace"):
            break
        if line.strip():
            lines.append(line.rstrip())
    return " ".join(lines)[:500] or type(exc).__name__


def compile_policy(text: str, *, name: str = "resource-policy.rego") -> Any:
    """A regorus engine holding the policy; ProtocolError("PolicyEngineError") if it does not compile
    or does not define ``data.policy.allow``. Call it on the regorus thread only."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise ProtocolError("PolicyEngineError", f"policy exceeds {MAX_POLICY_BYTES} bytes")
    engine = _regorus.Engine()
    try:
        package = engine.add_policy(name, text)
    except RuntimeError as exc:
        raise ProtocolError("PolicyEngineError", f"policy does not compile: {_short(exc)}") from None
    if package != "data.policy":
        raise ProtocolError("PolicyEngineError", f"policy package must be 'policy', got {package!r}")
    return engine


def evaluate(engine: Any, claims: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    """True only when ``data.policy.allow`` evaluates to exactly ``true``. ``engine`` must belong to
    the calling thread; it is left without input or data afterwards."""
    try:
        engine.add_data(dict(data))
        engine.set_input(dict(claims))
        result = engine.eval_rule("data.policy.allow")
    except (RuntimeError, ValueError, TypeError):
        return False
    finally:
        engine.clear_data()
    return result is True


class ResourcePolicy:
    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utc_now,
                 default: str = DEFAULT_RESOURCE_POLICY) -> None:
        self._store = store
        self._clock = clock
        self._default = default

    def get(self) -> str:
        """The policy in force (the built-in default until one is set)."""
        entry = self._store.get(NS_POLICIES, RESOURCE_POLICY_KEY, now=self._clock())
        return entry.value.decode("utf-8") if entry is not None else self._default

    def is_default(self) -> bool:
        return self._store.get(NS_POLICIES, RESOURCE_POLICY_KEY, now=self._clock()) is None

    def set(self, text: str) -> None:
        """Validate (compile) and store a new policy for every replica."""
        validate_policy(text)
        self._store.put(NS_POLICIES, RESOURCE_POLICY_KEY, text.encode("utf-8"))

    def reset(self) -> bool:
        """Back to the built-in default."""
        return self._store.delete(NS_POLICIES, RESOURCE_POLICY_KEY)

    def allows(self, claims: Mapping[str, Any], *, resource_path: tuple[str, str, str],
               query: Mapping[str, str] | None = None, plugin: str = "resource") -> bool:
        data = {"plugin": plugin, "resource-path": list(resource_path), "query": dict(query or {})}
        text = self.get()

        def on_rego_thread() -> bool:
            try:
                engine = _engine_here(text)
            except ProtocolError:
                return False  # a stored policy that no longer compiles denies everything
            return evaluate(engine, claims, data)

        return rego.run(on_rego_thread)


# Engines by policy digest, most recent last. Touched only on the regorus thread.
_ENGINES: OrderedDict[bytes, Any] = OrderedDict()
_MAX_ENGINES = 8
rego.add_cleanup(_ENGINES.clear)


def _engine_here(text: str) -> Any:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    engine = _ENGINES.get(digest)
    if engine is not None:
        _ENGINES.move_to_end(digest)
        return engine
    engine = compile_policy(text)
    _ENGINES[digest] = engine
    while len(_ENGINES) > _MAX_ENGINES:
        _ENGINES.popitem(last=False)
    return engine


def validate_policy(text: str) -> None:
    """Compile ``text`` (on the regorus thread) or raise ProtocolError("PolicyEngineError")."""

    def on_rego_thread() -> None:
        _engine_here(text)

    rego.run(on_rego_thread)
