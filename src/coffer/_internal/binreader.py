"""A bounds-checked cursor over bytes, for every binary format Coffer parses.

Every read checks the remaining length first and raises :class:`~coffer.errors.FormatError` naming
the structure and the offset, so that a truncated or lying length field can never read past the end
or produce a short field silently.
"""

from __future__ import annotations

from coffer.errors import FormatError


class Reader:
    """Sequential reader over ``data``; integers are little-endian unless the ``_be`` variant is used."""

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str, *, offset: int = 0) -> None:
        self._data = bytes(data)
        self.what = what
        if offset < 0 or offset > len(self._data):
            raise FormatError(what, f"start offset {offset} outside {len(self._data)} bytes")
        self._pos = offset

    @property
    def offset(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def fail(self, reason: str, *, offset: int | None = None) -> FormatError:
        """An error about this structure at the current (or given) offset, for the caller to raise."""
        return FormatError(self.what, reason, offset=self._pos if offset is None else offset)

    def read(self, n: int, field: str = "field") -> bytes:
        if n < 0:
            raise self.fail(f"{field}: negative length {n}")
        if n > self.remaining:
            raise self.fail(f"{field}: needs {n} bytes, only {self.remaining} left (truncated)")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def skip(self, n: int, field: str = "field") -> None:
        self.read(n, field)

    def zeros(self, n: int, field: str = "reserved") -> None:
        """Read ``n`` bytes that the specification says must be zero."""
        start = self._pos
        if any(self.read(n, field)):
            raise self.fail(f"{field} must be zero", offset=start)

    def _int(self, n: int, field: str, order: str) -> int:
        return int.from_bytes(self.read(n, field), order)  # type: ignore[arg-type]

    def u8(self, field: str = "u8") -> int:
        return self._int(1, field, "little")

    def u16(self, field: str = "u16") -> int:
        return self._int(2, field, "little")

    def u32(self, field: str = "u32") -> int:
        return self._int(4, field, "little")

    def u64(self, field: str = "u64") -> int:
        return self._int(8, field, "little")

    def u16_be(self, field: str = "u16") -> int:
        return self._int(2, field, "big")

    def u32_be(self, field: str = "u32") -> int:
        return self._int(4, field, "big")

    def u64_be(self, field: str = "u64") -> int:
        return self._int(8, field, "big")

    def sized_be16(self, field: str = "sized buffer", *, limit: int | None = None) -> bytes:
        """A buffer preceded by its big-endian u16 length (the TPM2B_* shape)."""
        size = self.u16_be(f"{field} size")
        if limit is not None and size > limit:
            raise self.fail(f"{field}: size {size} exceeds limit {limit}")
        return self.read(size, field)

    def expect_end(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")
