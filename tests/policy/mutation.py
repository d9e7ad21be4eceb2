"""Random edits of a JSON request for the policy's property tests: replace the values at up to a few
paths with values drawn from a strategy."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``value`` (keys and indexes), the empty path first."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += json_paths(item, (*prefix, index))
    return out


def mutate(data: st.DataObject, request: Any, values: st.SearchStrategy[Any], *, least: int = 1,
           most: int = 3) -> None:
    """Replace, in place, the value at ``least``..``most`` drawn paths of ``request`` with drawn values."""
    for _ in range(data.draw(st.integers(least, most))):
        path = data.draw(st.sampled_from(json_paths(request)[1:]))
        parent = request
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = data.draw(values)
