"""Appraisal policies: Rego (evaluated by regorus) turning verified claims and reference values into an
AR4SI trustworthiness vector, and the EAR status derived from it.

Policy contract (compatible with Trustee's EAR policies): package ``policy``; the rule
``trust_claims`` is an object mapping AR4SI claim names (``executables``, ``hardware``,
``configuration``, ...) to integers in [-128, 127]; optionally ``extensions`` is a list of
``{"name", "key", "value"}`` objects whose values are copied into the submodule under ``name`` (a
name starting with ``ear.`` is refused, those claims are the service's, except Trustee's
``ear.trustee.*`` extensions such as ``ear.trustee.identifiers``).
``input`` holds ``{"<tee>": claims, "report_data", "init_data", "runtime_data_claims",
"init_data_claims"}``. Reference values are ``data.reference.<name>`` (list of live values) and also
reachable through the built-in ``query_reference_value("<name>")`` (null when absent) that Trustee
policies call.

The default policy (:data:`DEFAULT_CPU_POLICY`, file ``default_cpu.rego``) enforces reference values:
evidence whose measurement is not registered is never affirming, and neither is the ``sample`` TEE.

Speed: a policy text is validated and compiled once (:func:`compiled`, keyed by its digest) into an
engine on the process's regorus thread (engines are bound to their thread, see
:mod:`coffer._internal.rego`); reference data is reloaded into an engine only when the snapshot
object changes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import regorus  # type: ignore[import-untyped]

from coffer._internal import rego
from coffer.errors import FormatError, ProtocolError

AR4SI_CLAIMS = ("instance-identity", "configuration", "executables", "file-system", "hardware",
                "runtime-opaque", "storage-opaque", "sourced-data")
DEFAULT_POLICY_ID = "default"
# Trustee's KBS asks for "default" and its AS appends the TEE class; both names mean the same here.
POLICY_ID_ALIASES = {"default_cpu": DEFAULT_POLICY_ID}
PACKAGE = "data.policy"
MAX_POLICY_BYTES = 256 * 1024
_MAX_EXTENSIONS = 16
# Extension names a policy may not use: the EAR namespace, whose claims (ear.status,
# ear.trustworthiness-vector...) the service sets itself, except Trustee's policy-extension namespace
# (``ear.trustee.identifiers`` is what Trustee's policies emit), which the service never sets.
RESERVED_EXTENSION_PREFIX = "ear."
POLICY_EXTENSION_NAMESPACE = "ear.trustee."

DEFAULT_CPU_POLICY: str = (
    resources.files("coffer.attestation").joinpath("default_cpu.rego").read_text("utf-8"))

# AR4SI tiers, in increasing severity.
NONE, AFFIRMING, WARNING, CONTRAINDICATED = "none", "affirming", "warning", "contraindicated"
_SEVERITY = {NONE: 0, AFFIRMING: 1, WARNING: 2, CONTRAINDICATED: 3}


def canonical_policy_id(policy_id: str) -> str:
    return POLICY_ID_ALIASES.get(policy_id, policy_id)


def tier(value: int) -> str:
    """The AR4SI tier of one trustworthiness claim value (-1..1 none, 2..31 affirming, 32..95
    warning, 96..127 contraindicated; anything else is treated as contraindicated)."""
    if -1 <= value <= 1:
        return NONE
    if 2 <= value <= 31:
        return AFFIRMING
    if 32 <= value <= 95:
        return WARNING
    return CONTRAINDICATED


def status_from_vector(vector: Mapping[str, int]) -> str:
    """``ear.status``: the most severe tier over the vector's claims (``none`` when nothing is
    claimed)."""
    worst = NONE
    for value in vector.values():
        current = tier(value)
        if _SEVERITY[current] > _SEVERITY[worst]:
            worst = current
    return worst


@dataclass(frozen=True, kw_only=True)
class Appraisal:
    """The outcome of a policy: the full AR4SI vector (unset claims 0), its status, and extension
    claims to add to the submodule."""

    policy_id: str
    trust_vector: dict[str, int]
    status: str
    extensions: dict[str, Any] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


class _ThreadEngine:
    """One thread's regorus engine for a policy, with the reference data loaded into it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.reference: Mapping[str, Any] = {}
        self.loaded: object = None

    def query_reference_value(self, name: Any) -> Any:
        return self.reference.get(str(name))

    def load_reference(self, reference: Mapping[str, Any]) -> None:
        if reference is self.loaded:
            return
        self.engine.clear_data()
        self.engine.add_data_json(json.dumps({"reference": reference}))
        self.reference = reference
        self.loaded = reference


# Engines by policy digest. Touched only on the regorus thread (see coffer._internal.rego).
_ENGINES: dict[str, _ThreadEngine] = {}
_MAX_ENGINES = 64
rego.add_cleanup(_ENGINES.clear)


class CompiledPolicy:
    """One validated policy text. :meth:`appraise` is thread-safe.

    The regorus engine behind it lives on the process's regorus thread (an engine is bound to the
    thread that created it), compiled once per distinct text and reused.
    """

    def __init__(self, text: str, *, name: str = "policy.rego") -> None:
        if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
            raise FormatError("appraisal policy", f"larger than {MAX_POLICY_BYTES} bytes")
        self.text = text
        self.name = name
        self.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self._has_extensions = "extensions" in text
        rego.run(self._engine_here)  # compiles and validates now

    def _compile(self) -> _ThreadEngine:
        engine = regorus.Engine()
        try:
            engine.add_policy(self.name, self.text)
            packages = list(engine.get_packages())
        except (RuntimeError, ValueError) as exc:
            raise FormatError("appraisal policy", f"does not compile: {_first_line(exc)}") from None
        if PACKAGE not in packages:
            raise FormatError("appraisal policy", f"must declare 'package policy' (found {packages})")
        state = _ThreadEngine(engine)
        engine.add_extension("query_reference_value", 1, state.query_reference_value)
        try:
            engine.set_input_json("{}")
            engine.eval_rule(f"{PACKAGE}.trust_claims")
        except (RuntimeError, ValueError) as exc:
            if "not a valid rule path" in str(exc):
                raise FormatError("appraisal policy", "must define the rule 'trust_claims'") from None
            # Other errors on an empty input are the policy's business at evaluation time.
        return state

    def _engine_here(self) -> _ThreadEngine:
        """This policy's engine (on the regorus thread only)."""
        state = _ENGINES.get(self.digest)
        if state is None:
            state = self._compile()
            if len(_ENGINES) >= _MAX_ENGINES:
                _ENGINES.clear()
            _ENGINES[self.digest] = state
        return state

    def evaluate(self, input_doc: Mapping[str, Any], reference: Mapping[str, Any]) -> tuple[Any, Any]:
        """Raw ``trust_claims`` and ``extensions`` values (None when undefined)."""
        text = json.dumps(input_doc)

        def on_rego_thread() -> tuple[Any, Any]:
            state = self._engine_here()
            engine = state.engine
            try:
                state.load_reference(reference)
                engine.set_input_json(text)
                claims = engine.eval_rule(f"{PACKAGE}.trust_claims")
                extensions = engine.eval_rule(f"{PACKAGE}.extensions") if self._has_extensions else None
            except (RuntimeError, ValueError) as exc:
                raise ProtocolError("AttestationError",
                                    f"appraisal policy evaluation failed: {_first_line(exc)}") from None
            return claims, extensions

        return rego.run(on_rego_thread)

    def appraise(self, policy_id: str, input_doc: Mapping[str, Any],
                 reference: Mapping[str, Any]) -> Appraisal:
        claims, extensions = self.evaluate(input_doc, reference)
        vector = dict.fromkeys(AR4SI_CLAIMS, 0)
        if not isinstance(claims, dict):
            raise ProtocolError("AttestationError",
                                f"appraisal policy {policy_id!r} produced no trust_claims object")
        for key, value in claims.items():
            if key not in vector:
                raise ProtocolError("AttestationError",
                                    f"appraisal policy {policy_id!r}: unknown trust claim {key!r}")
            if type(value) is not int or not -128 <= value <= 127:
                raise ProtocolError("AttestationError",
                                    f"appraisal policy {policy_id!r}: claim {key!r} is not an int8")
            vector[key] = value
        extra: dict[str, Any] = {}
        if isinstance(extensions, list):
            for item in extensions[:_MAX_EXTENSIONS]:
                if isinstance(item, dict) and isinstance(item.get("name"), str) and "value" in item:
                    name = item["name"]
                    if (name.startswith(RESERVED_EXTENSION_PREFIX)
                            and not name.startswith(POLICY_EXTENSION_NAMESPACE)):
                        # ear.status, ear.trustworthiness-vector... are the service's to set.
                        raise ProtocolError("AttestationError",
                                            f"appraisal policy {policy_id!r}: extension name {name[:64]!r} "
                                            f"is reserved (starts with {RESERVED_EXTENSION_PREFIX!r})")
                    extra[name] = item["value"]
        return Appraisal(policy_id=policy_id, trust_vector=vector, status=status_from_vector(vector),
                         extensions=extra)


_COMPILED: dict[str, CompiledPolicy] = {}
_COMPILED_LOCK = threading.Lock()
_MAX_COMPILED = 64


def compiled(text: str) -> CompiledPolicy:
    """The compiled policy for a text (compiled once per distinct text, bounded cache)."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    with _COMPILED_LOCK:
        found = _COMPILED.get(key)
    if found is not None:
        return found
    policy = CompiledPolicy(text)
    with _COMPILED_LOCK:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        return _COMPILED.setdefault(key, policy)


def validate_policy(text: str) -> None:
    """Raise FormatError unless ``text`` compiles as an appraisal policy (package ``policy``)."""
    compiled(text)


def default_policy() -> CompiledPolicy:
    return compiled(DEFAULT_CPU_POLICY)
