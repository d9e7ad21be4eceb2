"""The check behind the fast-path tests: a fast rule, run by the RVM on a request's view, agrees with
the interpreter on the same view, and allows only what the request rule allows, with the same ops."""

from __future__ import annotations

import json
from typing import Any

from coffer.policy import engine as engine_mod


def fast_allows(loaded: Any, context: Any, request: str, req: Any, state: dict[str, Any]) -> bool:
    """Whether the fast path allows ``req`` (with the policy state ``state``); asserts that the RVM
    and the interpreter agree on the view and that, when the fast path allows, the request rule
    allows with the same ops and container."""
    if not isinstance(req, dict):
        return False
    try:
        text = engine_mod._VIEWS[request](req, state["containers"], context)
    except (TypeError, ValueError, RecursionError):
        return False
    if text is None:
        return False
    rule = engine_mod._FAST[request]
    fast = loaded.evaluate_fast(rule, text)
    try:
        interpreted = loaded.evaluate(rule, text)
    except RuntimeError:  # the interpreter fails where the RVM is undefined (e.g. a builtin's type)
        interpreted = None
    assert (None if fast == "<undefined>" else fast) == interpreted, (req, fast, interpreted)
    if fast == "<undefined>":
        return False
    full = loaded.evaluate(request, json.dumps({**req, "pstate": state}))
    assert full["allowed"] is True, (req, full)
    container, triples = fast
    ops = [dict(zip(("op", "path", "value"), triple, strict=False)) for triple in triples]
    assert (ops, container) == (full["ops"], full["container"]), req
    return True
