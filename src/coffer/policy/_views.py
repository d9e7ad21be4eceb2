"""Request views for the workload policy's fast paths (see :mod:`coffer.policy.engine` and the "fast
paths" section of ``rules.rego``): a request's fields selected and reformatted as one JSON text the
regorus RVM loads cheaply. Nothing is decided here; the fast rules compare.

The module depends on the standard library only, so that ``scripts/build_native.py`` can compile it
with mypyc (the engine uses the compiled copy only when it was built from this very file: see
:func:`coffer.policy.engine._load_views`). Keep it plain typed Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

#: The capability sets, in the view's order.
_CAP_SETS: Final = ("Ambient", "Bounding", "Effective", "Inheritable", "Permitted")


def _ascii_json_encoder() -> Callable[[Any], str]:
    """Compact ASCII JSON (no spaces, no NaN; object keys in the dicts' own order), made once: json's
    C encoder without the circular-reference check (a cycle ends in RecursionError instead), or
    JSONEncoder.encode where there is none. TypeError or ValueError for what is not JSON."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        encode_py: Callable[[Any], str] = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
        return encode_py
    encoder = make(None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False)

    def encode(value: Any) -> str:
        return "".join(encoder(value, 0))

    return encode


ENCODE_ASCII = _ascii_json_encoder()
ESCAPE: Final = json.encoder.encode_basestring_ascii


def text_of(value: Any) -> str:
    """The fast paths' text of a value (see RULES, "fast paths"): its compact ASCII JSON with each
    '"' written as DEL. ASCII JSON holds no DEL (it escapes every character outside space..tilde), so
    this is one-to-one."""
    return ENCODE_ASCII(value).replace('"', "\x7f")


def _view(text: str, rest: dict[str, Any]) -> str:
    """The view's JSON: {"fixed": text, **rest}, all ASCII (a Python string regorus reads without
    converting it). A text without backslash needs no escape as a JSON string (escapes make regorus
    load a string much slower), so it is put between quotes as it is."""
    others = ENCODE_ASCII(rest)
    fixed = ESCAPE(text) if "\\" in text else f'"{text}"'
    return f'{{"fixed":{fixed}{"," if len(others) > 2 else ""}{others[1:]}'


# --------------------------------------------------------------------------------------------------
# Request views for the fast paths (see RULES, "fast paths"). Selection and reformatting only: a field
# the request lacks is null where the rules read it so, lists are sorted only where the rules compare
# them as sets or after sorting, a value of an unexpected type is passed on unchanged (the fast path
# then does not allow) or, where a reformatting needs a type, the request gets no view (the request
# rule decides it). Objects the view makes have their keys in sorted order, as the expected texts.


def _sorted(items: Any) -> Any:
    """A list sorted (a permutation: only where the rules ignore order), anything else unchanged."""
    if type(items) is list:
        try:
            return sorted(items)
        except TypeError:
            return items
    return items


def _user_view(user: Any) -> Any:
    """[AdditionalGids, GID, UID] of a User object (each null when absent, as the rules read it;
    AdditionalGids sorted, without duplicates, when all integers: the rules compare it as a set, and
    Python's 1 == 1.0 == True would merge values that differ in Rego); anything else unchanged."""
    if not isinstance(user, dict):
        return user
    gids = user.get("AdditionalGids")
    if type(gids) is list and gids and all(type(g) is int for g in gids):
        gids = sorted(set(gids))
    return [gids, user.get("GID"), user.get("UID")]


def _lines(strings: Any) -> list[Any] | None:
    """The lines of a string list sorted: [count, the strings joined by commas], made only when no
    string holds a comma (so equal lines are equal lists); None for anything else."""
    if type(strings) is not list:
        return None
    if not strings:
        return [0, ""]
    try:
        text = ",".join(sorted(strings))
    except TypeError:  # not all strings
        return None
    if text.count(",") != len(strings) - 1:
        return None
    return [len(strings), text]


def _caps_view(caps: Any) -> list[Any] | None:
    """[Ambient, Bounding, Effective, Inheritable, Permitted], each as the lines of the set, or
    "Bounding" when those are Bounding's, or null when absent; None unless each set present is a
    list of strings without commas."""
    if not isinstance(caps, dict):
        return None
    bounding = caps.get("Bounding")
    first = None
    if bounding is not None:
        first = _lines(bounding)
        if first is None:
            return None
    out: list[Any] = []
    for key in _CAP_SETS:
        names = caps.get(key)
        if key == "Bounding" or names is None:
            out.append(first if key == "Bounding" else None)
        # Sets are mostly equal: a list equal to Bounding, a list of strings, has its lines.
        elif first is not None and type(names) is list and names == bounding:
            out.append("Bounding")
        else:
            lines = _lines(names)
            if lines is None:
                return None
            out.append("Bounding" if lines == first else lines)
    return out


def _env_view(env: Any) -> dict[str, str] | None:
    """{NAME: VALUE} of an Env list (NAME up to the first "="); None unless every entry is a string
    NAME=VALUE with a non-empty NAME and no NAME repeats."""
    if type(env) is not list:
        return None
    out: dict[str, str] = {}
    for entry in env:
        if type(entry) is not str:
            return None
        name, sep, value = entry.partition("=")
        if not name or not sep or name in out:
            return None
        out[name] = value
    return out


def _mounts_view(mounts: Any, default_pairs: frozenset[str]) -> tuple[list[Any], dict[str, Any]] | None:
    """(MountTypes, MountData) of OCI.Mounts: the lines of the "destination type" of every mount, and
    {"destination type": [source, options sorted]} for each not among ``default_pairs`` (the
    standard mounts'); None unless every mount is an object with a string destination and type, and
    these hold no space or comma."""
    if type(mounts) is not list:
        return None
    try:
        # str.join: TypeError unless destination and type are strings.
        pairs = [" ".join((mount["destination"], mount["type"])) for mount in mounts]
        data = {pair: [mount.get("source"), _sorted(mount.get("options"))]
                for pair, mount in zip(pairs, mounts, strict=True) if pair not in default_pairs}
    except (KeyError, TypeError, AttributeError):  # not an object, a field missing or not a string
        return None
    pairs.sort()
    text = ",".join(pairs)
    count = len(pairs)
    if text.count(" ") != count or text.count(",") != max(count - 1, 0):
        return None
    if len(data) > 1:
        data = dict(sorted(data.items()))
    return [count, text], data


def create_view(doc: dict[str, Any], containers: dict[str, Any], context: ViewContext) -> str | None:
    """The CreateContainer view as JSON text, or None when the request does not have the shape of one.
    TypeError, ValueError or RecursionError when a value selected is not JSON."""
    oci = doc.get("OCI")
    if not isinstance(oci, dict):
        return None
    proc, root, linux = oci.get("Process"), oci.get("Root"), oci.get("Linux")
    if not (isinstance(proc, dict) and isinstance(root, dict) and isinstance(linux, dict)):
        return None
    env = _env_view(proc.get("Env"))
    mounts = _mounts_view(oci.get("Mounts"), context.default_pairs)
    fixed_names = context.env_fixed.get(doc.get("name"))  # type: ignore[arg-type]
    if env is None or mounts is None or fixed_names is None:
        return None
    # The values of the variables the container's policy fixes go into the text (null when absent);
    # the others stay, as [NAME, VALUE] pairs, for the value checks.
    fixed_values = [env.pop(name, None) for name in fixed_names]
    caps = _caps_view(proc.get("Capabilities"))
    if caps is None:
        return None
    container_id = doc.get("container_id")
    # Absent fields are null, as the rules read them.
    fixed = [
        proc.get("Args"), caps, proc.get("Cwd"), linux.get("Devices"), oci.get("Hooks"), mounts[0], mounts[1],
        _user_view(proc.get("User")), doc.get("image"),
        # The state's entry for the container id ({} when it has none).
        {container_id: containers[container_id]} if type(container_id) is str and container_id in containers
        else {},
        fixed_values,
    ]
    masked = linux.get("MaskedPaths")
    return _view(text_of(fixed), {
        "name": doc.get("name"),
        "container_id": container_id,
        "flags": [proc.get("NoNewPrivileges"), root.get("Readonly")],
        "MaskedPaths": masked[:1] if type(masked) is list else masked,
        "Env": list(env.items()),
    })


def exec_view(doc: dict[str, Any], containers: dict[str, Any], context: ViewContext) -> str | None:
    """The ExecProcess view as JSON text, or None when the request does not have the shape of one or
    its container id has no state entry. TypeError, ValueError or RecursionError as create_view."""
    del context
    proc = doc.get("process")
    container_id = doc.get("container_id")
    if not isinstance(proc, dict) or type(container_id) is not str or container_id not in containers:
        return None
    env = _env_view(proc.get("Env"))
    if env is None:
        return None
    # Absent fields are null, as the rules read them, except NoNewPrivileges (absent, it is the
    # container's): it ends the list when present.
    fixed = [proc.get("Args"), proc.get("Capabilities"), proc.get("Cwd"), _user_view(proc.get("User"))]
    if "NoNewPrivileges" in proc:
        fixed.append(proc["NoNewPrivileges"])
    return _view(text_of(fixed), {"state": containers[container_id], "Env": env})


def remove_view(doc: dict[str, Any], containers: dict[str, Any], context: ViewContext) -> str | None:
    """The RemoveContainer view as JSON text, or None when its container id has no state entry."""
    del context
    container_id = doc.get("container_id")
    if type(container_id) is not str or container_id not in containers:
        return None
    return ENCODE_ASCII({"container_id": container_id, "state": containers[container_id]})


VIEWS: Final = {"CreateContainerRequest": create_view, "ExecProcessRequest": exec_view,
                 "RemoveContainerRequest": remove_view}


@dataclass(frozen=True)
class ViewContext:
    """What the views select by: the "destination type" of the standard mounts (as the mounts view
    writes them), and for each container name with a CreateContainer fast path the names of the
    variables its policy fixes to one value, in the order of their values in the expected text."""

    default_pairs: frozenset[str]
    env_fixed: Mapping[str, tuple[str, ...]]
