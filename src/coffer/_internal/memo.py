"""A bounded memo keyed by the identity of immutable objects.

Warm verification re-checks the same certificates and collateral for every attestation from a
platform. Those checks are pure functions of immutable, already-parsed objects, so their results can
be remembered. Hashing such objects would mean hashing their whole content (a certificate hashes its
DER), so this memo keys on ``id()`` and keeps the objects alive in the entry, which guarantees an id
cannot be reused for another object while the entry exists.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._entries: dict[tuple[Hashable, ...], tuple[tuple[object, ...], V]] = {}

    def _key(self, objects: tuple[object, ...], extra: Hashable) -> tuple[Hashable, ...]:
        return (*(id(o) for o in objects), extra)

    def get(self, objects: tuple[object, ...], extra: Hashable = None) -> V | None:
        entry = self._entries.get(self._key(objects, extra))
        if entry is None:
            return None
        kept, value = entry
        if all(a is b for a, b in zip(kept, objects, strict=True)):
            return value
        return None

    def put(self, objects: tuple[object, ...], value: V, extra: Hashable = None) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[self._key(objects, extra)] = (objects, value)
