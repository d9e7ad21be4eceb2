"""coffer.policy.engine fast paths: the texts they compare, the container id they join in, policy
shapes they leave to the request rule, and edge cases of the views, each checked against the request
rule (the interpreter) on the whole request."""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.policy import _views as views_mod
from coffer.policy import engine as engine_mod
from coffer.policy import requests as rq
from coffer.policy.engine import RULES, PolicyEngine, policy_data
from coffer.policy.model import ContainerPolicy, EnvRule, HostAccess, Mount, User, WorkloadPolicy
from tests.policy import fastcheck
from tests.policy.mutation import mutate

CC = "CreateContainerRequest"
EP = "ExecProcessRequest"
IMAGE = "docker.io/library/app@sha256:" + "4" * 64
RO = ("rbind", "rprivate", "ro")

APP = ContainerPolicy(
    name="app",
    image=IMAGE,
    args=("app", "--serve"),
    env=(
        EnvRule(name="PATH", value="/usr/bin"),
        EnvRule(name="MODE", value="prod"),
        EnvRule(name="HOST", pattern="[a-z0-9-]+"),
        EnvRule(name="ANY", pattern="(?s).*"),
        EnvRule(name="IP", pattern="[0-9]+(\\.[0-9]+){3}"),
        EnvRule(name="LEVEL", value="info"),
        EnvRule(name="LEVEL", pattern="debug|trace"),
    ),
    working_dir="/srv",
    user=User(uid=1000, gid=1000, additional_gids=(5,)),
    capabilities=("CHOWN",),
    no_new_privileges=True,
    read_only_root=True,
    mounts=(
        Mount(destination="/etc/app", source="configmap:app-conf", options=RO),
        Mount(destination="/data", source="/var/lib/app", options=("rbind", "rprivate", "rw")),
    ),
    allow=HostAccess(exec=(("app", "--health"),)),
)
# Shapes the create fast path cannot state (the request rule decides them).
REGEX_MOUNT = ContainerPolicy(
    name="regex-mount", image=IMAGE, args=("x",), capabilities=(),
    mounts=(Mount(destination="/cache", source="regex:/var/cache/[a-z]+", options=RO),),
)
TMPFS = ContainerPolicy(
    name="tmpfs", image=IMAGE, args=("x",), capabilities=(),
    mounts=(Mount(destination="/scratch", type="tmpfs", source="", options=("nosuid",)),),
)
TWO_VALUES = ContainerPolicy(
    name="two-values", image=IMAGE, args=("x",), capabilities=(),
    env=(EnvRule(name="MODE", value="a"), EnvRule(name="MODE", value="b")),
)
POLICY = WorkloadPolicy(name="web", containers=(APP, REGEX_MOUNT, TMPFS, TWO_VALUES))
SPEC = rq.ContainerSpec(
    name="app",
    image=IMAGE,
    args=APP.args,
    env=(
        EnvRule(name="PATH", value="/usr/bin"),
        EnvRule(name="MODE", value="prod"),
        EnvRule(name="HOST", value="web-1"),
        EnvRule(name="ANY", value="a\nb=c"),
    ),
    working_dir="/srv",
    user=User(uid=1000, gid=1000, additional_gids=(5,)),
    capabilities=("CHOWN",),
    no_new_privileges=True,
    read_only_root=True,
    mounts=(
        rq.VolumeMount(destination="/etc/app", kind="configmap", source="app-conf", read_only=True),
        rq.VolumeMount(destination="/data", kind="hostpath", source="/var/lib/app"),
    ),
)
_DATA = policy_data(POLICY)
_LOADED, _FAST_ON = engine_mod._load_rules(RULES, _DATA)
_CONTEXT = engine_mod._view_context(_DATA, _LOADED)
_STATE = {"containers": {"c-app": 0}}


def create(container_id: str = "c-1") -> dict[str, Any]:
    return rq.container_request(container_id=container_id, name="app", image=IMAGE, spec=SPEC)


def exec_req(args: list[str] | None = None) -> dict[str, Any]:
    return rq.exec_request(container_id="c-app", args=args or ["app", "--health"], spec=SPEC)


def proc(req: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = req["OCI"]["Process"] if "OCI" in req else req["process"]
    return p


def fast_allows(request: str, req: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether the fast path allows ``req`` (see tests.policy.fastcheck)."""
    return fastcheck.fast_allows(_LOADED, _CONTEXT, request, req, state)


def decides_as_the_rule(request: str, req: dict[str, Any], state: dict[str, Any]) -> bool:
    """The engine's decision (fast path first), checked equal to the request rule's alone; ``state``
    is {} or _STATE (the app created as c-app)."""
    engine = PolicyEngine(POLICY)
    if state["containers"]:
        assert engine.decide(CC, create("c-app")).allowed
    assert engine.state == state
    decision = engine.decide(request, req)
    allowed = decision.allowed
    try:
        full = _LOADED.evaluate(request, json.dumps({**req, "pstate": state}))
    except RuntimeError:  # a Rego error: the engine fails closed
        assert not decision.allowed
        assert decision.reasons[-1].endswith("policy evaluation failed")
        return False
    assert full["allowed"] is allowed, (req, decision)
    assert set(decision.reasons) == set(full["reasons"])
    return decision.allowed


def test_policy_gets_fast_paths() -> None:
    assert _FAST_ON


def test_common_requests_take_the_fast_path() -> None:
    assert fast_allows(CC, create(), {"containers": {}})
    assert fast_allows(EP, exec_req(), _STATE)


@pytest.mark.parametrize("container_id", ['a"b', "a\\b", "a/b", "a~b", "café", "a b", "a\nb", "a\x7fb", ""])
def test_container_id_outside_the_plain_characters_goes_to_the_request_rule(container_id: str) -> None:
    req = create(container_id)
    assert not fast_allows(CC, req, {"containers": {}})
    decides_as_the_rule(CC, req, {"containers": {}})


def test_plain_container_id_is_joined_into_the_shared_volume_source() -> None:
    req = create("Abc_1.2-3")
    assert fast_allows(CC, req, {"containers": {}})
    for mount in req["OCI"]["Mounts"]:
        if mount["destination"] == "/etc/app":
            mount["source"] = mount["source"].replace("Abc_1.2-3", "other")
    assert not fast_allows(CC, req, {"containers": {}})
    assert not decides_as_the_rule(CC, req, {"containers": {}})


def test_reused_container_id_is_refused() -> None:
    assert not fast_allows(CC, create("c-app"), _STATE)
    assert not decides_as_the_rule(CC, create("c-app"), _STATE)


def _caps(req: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = proc(req)["Capabilities"]
    return c


def _env(req: dict[str, Any]) -> list[Any]:
    e: list[Any] = proc(req)["Env"]
    return e


def _mount(req: dict[str, Any], dest: str) -> dict[str, Any]:
    return next(m for m in req["OCI"]["Mounts"] if m["destination"] == dest)


# Edits of the app's CreateContainer request: (name, edit, whether the request rule allows it).
CREATE_EDITS: list[tuple[str, Callable[[dict[str, Any]], object], bool]] = [
    ("same", lambda r: None, True),
    # A raw list shaped like the lines of the policy's one capability: [1, "CAP_CHOWN"].
    ("caps_shaped_like_lines", lambda r: _caps(r).update(Bounding=[1, "CAP_CHOWN"]), False),
    ("caps_lines_text_as_name", lambda r: _caps(r).update(Bounding=["CAP_CHOWN\nCAP_KILL"]), False),
    ("caps_marker_string", lambda r: _caps(r).update(Effective="Bounding"), False),
    ("caps_effective_differs", lambda r: _caps(r).update(Effective=["CAP_KILL"]), False),
    ("caps_effective_reordered_same", lambda r: _caps(r).update(Effective=["CAP_CHOWN"]), True),
    ("caps_inheritable_like_bounding", lambda r: _caps(r).update(Inheritable=["CAP_CHOWN"]), False),
    ("caps_permitted_empty", lambda r: _caps(r).update(Permitted=[]), True),
    # The regorus RVM does not bind `every k, v`'s key: a failing value next to an "any" variable.
    ("env_value_fails_charset_next_to_any", lambda r: _env(r).append("HOST=Web"), False),
    ("env_host_upper", lambda r: _env(r).__setitem__(2, "HOST=Web-1"), False),
    ("env_ip_regex_ok", lambda r: _env(r).append("IP=10.0.0.1"), True),
    ("env_ip_regex_bad", lambda r: _env(r).append("IP=10.0.0"), False),
    ("env_level_exact", lambda r: _env(r).append("LEVEL=info"), True),
    ("env_level_pattern", lambda r: _env(r).append("LEVEL=trace"), True),
    ("env_level_other", lambda r: _env(r).append("LEVEL=warn"), False),
    ("env_fixed_value_changed", lambda r: _env(r).__setitem__(1, "MODE=dev"), False),
    ("env_fixed_missing", lambda r: _env(r).pop(1), False),
    ("env_name_twice_same", lambda r: _env(r).append("PATH=/usr/bin"), True),
    ("env_name_twice_other", lambda r: _env(r).append("MODE=dev"), False),
    ("env_empty_name_exact_like", lambda r: _env(r).append("=prod"), False),
    ("env_unknown", lambda r: _env(r).append("OTHER=1"), False),
    ("args_with_quote", lambda r: proc(r).update(Args=['app","--serve']), False),
    ("args_with_del", lambda r: proc(r).update(Args=["app\x7f", "--serve"]), False),
    ("args_with_backslash", lambda r: proc(r).update(Args=["app\\", "--serve"]), False),
    ("args_unicode", lambda r: proc(r).update(Args=["äpp", "--serve"]), False),
    ("cwd_with_del_quote", lambda r: proc(r).update(Cwd="/srv\x7f"), False),
    ("gids_duplicated", lambda r: proc(r)["User"].update(AdditionalGids=[5, 5]), True),
    ("gids_true", lambda r: proc(r)["User"].update(AdditionalGids=[True]), False),
    ("nnp_absent", lambda r: proc(r).pop("NoNewPrivileges"), False),
    ("nnp_null", lambda r: proc(r).update(NoNewPrivileges=None), False),
    ("readonly_absent", lambda r: r["OCI"]["Root"].pop("Readonly"), False),
    ("readonly_string", lambda r: r["OCI"]["Root"].update(Readonly="true"), False),
    ("masked_string", lambda r: r["OCI"]["Linux"].update(MaskedPaths="/proc/kcore"), False),
    ("masked_null", lambda r: r["OCI"]["Linux"].update(MaskedPaths=None), False),
    ("mount_hostpath_same", lambda r: _mount(r, "/data").update(source="/var/lib/app"), True),
    ("mount_tab_in_type", lambda r: _mount(r, "/data").update(type="bind\t/x"), False),
    ("mount_space_in_type", lambda r: _mount(r, "/data").update(type="bind /x"), False),
    ("mount_comma_in_dest", lambda r: _mount(r, "/data").update(destination="/data,/proc proc"), False),
    ("mount_space_in_default_dest", lambda r: _mount(r, "/proc").update(destination="/pr oc"), False),
    ("caps_with_comma", lambda r: _caps(r).update(Bounding=["CAP_CHOWN,CAP_KILL"]), False),
    ("mount_dest_number", lambda r: _mount(r, "/data").update(destination=5), False),
    ("mount_options_unsortable", lambda r: _mount(r, "/data").update(options=["rw", 1]), False),
    ("mount_default_any_source", lambda r: _mount(r, "/proc").update(source="/elsewhere"), True),
    ("mount_policy_dest_as_default_type", lambda r: _mount(r, "/data").update(type="proc"), False),
    ("mount_default_twice", lambda r: r["OCI"]["Mounts"].append(dict(_mount(r, "/proc"))), True),
    ("image_other", lambda r: r.update(image="docker.io/library/app:latest"), False),
    ("name_two_values", lambda r: r.update(name="two-values"), False),
]


@pytest.mark.parametrize(("name", "change", "allowed"), CREATE_EDITS, ids=[e[0] for e in CREATE_EDITS])
def test_create_edit_is_decided_as_the_request_rule(
    name: str, change: Callable[[dict[str, Any]], object], allowed: bool
) -> None:
    req = create()
    change(req)
    fast = fast_allows(CC, req, {"containers": {}})
    assert decides_as_the_rule(CC, req, {"containers": {}}) is allowed
    if not allowed:
        assert not fast


EXEC_EDITS: list[tuple[str, Callable[[dict[str, Any]], object], bool]] = [
    ("same", lambda r: None, True),
    ("nnp_true", lambda r: proc(r).update(NoNewPrivileges=True), True),
    ("nnp_false", lambda r: proc(r).update(NoNewPrivileges=False), False),
    ("nnp_null", lambda r: proc(r).update(NoNewPrivileges=None), False),
    ("caps_absent", lambda r: proc(r).pop("Capabilities"), True),
    ("caps_empty_sets", lambda r: proc(r).update(Capabilities={"Bounding": []}), True),
    ("caps_some", lambda r: proc(r).update(Capabilities={"Bounding": ["CAP_CHOWN"]}), False),
    ("args_other", lambda r: proc(r).update(Args=["app", "--debug"]), False),
    ("env_fixed_absent", lambda r: proc(r).update(Env=["HOST=x"]), True),
    ("env_fixed_other", lambda r: proc(r).update(Env=["MODE=dev"]), False),
    ("env_bad_host_next_to_any", lambda r: proc(r).update(Env=["ANY=1", "HOST=Web"]), False),
    ("cwd_other", lambda r: proc(r).update(Cwd="/"), False),
    ("user_other", lambda r: proc(r).update(User={"UID": 0, "GID": 0, "AdditionalGids": [5]}), False),
]


@pytest.mark.parametrize(("name", "change", "allowed"), EXEC_EDITS, ids=[e[0] for e in EXEC_EDITS])
def test_exec_edit_is_decided_as_the_request_rule(
    name: str, change: Callable[[dict[str, Any]], object], allowed: bool
) -> None:
    req = exec_req()
    change(req)
    fast = fast_allows(EP, req, _STATE)
    assert decides_as_the_rule(EP, req, _STATE) is allowed
    if not allowed:
        assert not fast


@pytest.mark.parametrize("name", ["regex-mount", "tmpfs", "two-values"])
def test_policy_shapes_the_fast_path_cannot_state_have_no_create_entry(name: str) -> None:
    _LOADED._interpreter.set_input_json("{}")
    constants = _LOADED._interpreter.eval_rule("data.agent_policy.fast_constants")
    assert name not in constants["create"]
    assert "app" in constants["create"]


def test_shapes_without_a_fast_path_are_still_decided() -> None:
    engine = PolicyEngine(POLICY)
    for container_id, value, allowed in [("c-2", "b", True), ("c-3", "c", False)]:
        spec = rq.ContainerSpec(name="two-values", image=IMAGE, args=("x",),
                                env=(EnvRule(name="MODE", value=value),), capabilities=(),
                                no_new_privileges=True)
        req = rq.container_request(container_id=container_id, name="two-values", image=IMAGE, spec=spec)
        assert not fast_allows(CC, req, {"containers": {}})
        assert engine.decide(CC, req).allowed is allowed


# --------------------------------------------------------------------------------------------------
# The texts


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def _back(text: str) -> Any:
    return json.loads(text.replace("\x7f", '"'))


@settings(max_examples=300, deadline=None)
@given(a=_JSON, b=_JSON)
def test_text_is_one_to_one(a: Any, b: Any) -> None:
    assert _back(views_mod.text_of(a)) == a
    text = views_mod.text_of(a)
    assert all(" " <= ch <= "\x7f" for ch in text)
    assert '"' not in text
    if views_mod.text_of(a) == views_mod.text_of(b):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(value=_JSON, rest=st.dictionaries(st.sampled_from(["name", "Env", "x"]), _JSON, max_size=3))
def test_view_json_holds_the_text_and_is_ascii(value: Any, rest: dict[str, Any]) -> None:
    text = views_mod.text_of(value)
    view = views_mod._view(text, rest)
    assert view.isascii()
    assert json.loads(view) == {**rest, "fixed": text}


def _slotted(value: Any, slots: list[tuple[str, str]]) -> tuple[Any, Any]:
    """``value`` with strings starting "@" made slots, and the same with "@" strings kept as text."""
    if isinstance(value, str) and value.startswith("@"):
        prefix, _, suffix = value[1:].partition("|")
        slots.append((prefix, suffix))
        return engine_mod._IdSlot(prefix, suffix), value
    if isinstance(value, list):
        pairs = [_slotted(v, slots) for v in value]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(value, dict):
        pairs_d = {k: _slotted(v, slots) for k, v in value.items()}
        return {k: p[0] for k, p in pairs_d.items()}, {k: p[1] for k, p in pairs_d.items()}
    return value, value


def _fill(value: Any, container_id: str) -> Any:
    if isinstance(value, engine_mod._IdSlot):
        return f"{value.prefix}{container_id}{value.suffix}"
    if isinstance(value, list):
        return [_fill(v, container_id) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, container_id) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None)
@given(
    value=st.recursive(
        st.text(alphabet="@|ab\"\\\n\x7fé", max_size=6) | st.integers() | st.none(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8,
    ),
    container_id=st.text(alphabet="-._aZ09", min_size=1, max_size=8),
)
def test_texts_around_ids_join_to_the_text_with_the_id(value: Any, container_id: str) -> None:
    slotted, _ = _slotted(value, [])
    parts = engine_mod._texts_around_ids(slotted)
    filled = _fill(slotted, container_id)
    expected = views_mod.text_of(json.loads(json.dumps(filled, sort_keys=True)))
    assert container_id.join(parts) == expected


# --------------------------------------------------------------------------------------------------
# Random mutations of the app's requests


_LEAF = st.sampled_from([
    None, True, False, 0, 5, 1000, 1000.0, "", "/", "/srv", "CAP_CHOWN", "CAP_KILL", "bind", "proc", "ro",
    "app", "--serve", "--health", "PATH=/usr/bin", "MODE=prod", "HOST=web", "HOST=Web", "ANY=x\ny",
    "IP=1.2.3.4", "LEVEL=trace", "a\tb", "a\nb", '"', "\\", "\x7f", "\x80", "é", "Bounding",
    "/run/kata-containers/shared/containers/c-1-configmap-app-conf",
])
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["UID", "GID", "AdditionalGids", "Bounding", "x"]),
                                        inner, max_size=2), max_leaves=5)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fast_path_never_allows_a_mutated_app_request_the_rule_denies(data: st.DataObject) -> None:
    request = data.draw(st.sampled_from([CC, EP]))
    req = create() if request == CC else exec_req()
    mutate(data, req, _VALUE)
    fast_allows(request, req, {"containers": {}} if request == CC else _STATE)


@pytest.mark.parametrize("container_id", ["c-app", "a/b", "a~b", "a b", "", "é"])
def test_remove_of_a_known_id_is_decided_as_the_request_rule(container_id: str) -> None:
    state = {"containers": {container_id: 0}}
    allowed = fast_allows("RemoveContainerRequest", {"container_id": container_id}, state)
    assert allowed is (container_id == "c-app")  # other ids: the request rule escapes the pointer


def test_remove_of_an_unknown_id_goes_to_the_request_rule() -> None:
    assert not fast_allows("RemoveContainerRequest", {"container_id": "nope"}, _STATE)
    assert not fast_allows("RemoveContainerRequest", {"container_id": 5}, _STATE)
    engine = PolicyEngine(POLICY)
    decision = engine.decide("RemoveContainerRequest", {"container_id": "nope"})
    assert (decision.allowed, decision.container) == (True, None)


# --------------------------------------------------------------------------------------------------
# The compiled views (scripts/build_native.py): used only when built from the current source, and
# giving exactly what the Python views give.

def _native_views() -> Any:
    try:
        return importlib.import_module("coffer.policy._views_native")
    except ImportError:
        return None


_NATIVE = _native_views()


def test_views_compiled_from_another_source_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    stale = types.ModuleType("coffer.policy._views_native")
    stale.SOURCE_SHA256 = "0" * 64  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "coffer.policy._views_native", stale)
    assert engine_mod._load_views() is views_mod


def test_python_views_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COFFER_NATIVE", "0")
    assert engine_mod._load_views() is views_mod


def _outcome(view: Callable[..., Any], *args: Any) -> Any:
    try:
        return view(*args)
    except (TypeError, ValueError, RecursionError) as exc:
        return type(exc)


@pytest.mark.skipif(_NATIVE is None, reason="compiled views not built (python scripts/build_native.py)")
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_compiled_views_give_what_the_python_views_give(data: st.DataObject) -> None:
    assert engine_mod._load_views() is _NATIVE  # built from this source: the engine uses it
    request = data.draw(st.sampled_from([CC, EP, "RemoveContainerRequest"]))
    req: Any = create() if request == CC else exec_req()
    mutate(data, req, _VALUE, least=0)
    state = data.draw(st.sampled_from([{}, _STATE["containers"]]))
    context = views_mod.ViewContext(_CONTEXT.default_pairs, _CONTEXT.env_fixed)
    native_context = _NATIVE.ViewContext(_CONTEXT.default_pairs, _CONTEXT.env_fixed)
    expected = _outcome(views_mod.VIEWS[request], req, dict(state), context)
    assert _outcome(_NATIVE.VIEWS[request], req, dict(state), native_context) == expected
