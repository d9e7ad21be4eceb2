"""A bounds-checked cursor over bytes, for every binary format Coffer parses.

Every read checks the remaining length first and raises :class:`~coffer.errors.FormatError` naming
the structure and the offset, so that a truncated or lying length field can never read past the end
or produce a short field silently.
"""

from __future__ import annotations

import struct

from coffer.errors import FormatError

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U16_BE = struct.Struct(">H")
_U32_BE = struct.Struct(">I")
_U64_BE = struct.Struct(">Q")


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
        pos = self._pos
        end = pos + n
        if n < 0:
            raise self.fail(f"{field}: negative length {n}")
        if end > len(self._data):
            raise self.fail(f"{field}: needs {n} bytes, only {self.remaining} left (truncated)")
        self._pos = end
        return self._data[pos:end]

    def skip(self, n: int, field: str = "field") -> None:
        self.read(n, field)

    def zeros(self, n: int, field: str = "reserved") -> None:
        """Read ``n`` bytes that the specification says must be zero."""
        start = self._pos
        if any(self.read(n, field)):
            raise self.fail(f"{field} must be zero", offset=start)

    def _unpack(self, fmt: struct.Struct, field: str) -> int:
        pos = self._pos
        end = pos + fmt.size
        if end > len(self._data):
            raise self.fail(f"{field}: needs {fmt.size} bytes, only {self.remaining} left (truncated)")
        self._pos = end
        value: int = fmt.unpack_from(self._data, pos)[0]
        return value

    def u8(self, field: str = "u8") -> int:
        return self._unpack(_U8, field)

    def u16(self, field: str = "u16") -> int:
        return self._unpack(_U16, field)

    def u32(self, field: str = "u32") -> int:
        return self._unpack(_U32, field)

    def u64(self, field: str = "u64") -> int:
        return self._unpack(_U64, field)

    def u16_be(self, field: str = "u16") -> int:
        return self._unpack(_U16_BE, field)

    def u32_be(self, field: str = "u32") -> int:
        return self._unpack(_U32_BE, field)

    def u64_be(self, field: str = "u64") -> int:
        return self._unpack(_U64_BE, field)

    def sized_be16(self, field: str = "sized buffer", *, limit: int | None = None) -> bytes:
        """A buffer preceded by its big-endian u16 length (the TPM2B_* shape)."""
        size = self.u16_be(f"{field} size")
        if limit is not None and size > limit:
            raise self.fail(f"{field}: size {size} exceeds limit {limit}")
        return self.read(size, field)

    def expect_end(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")
