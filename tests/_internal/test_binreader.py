from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer._internal.binreader import Reader
from coffer.errors import FormatError


def test_reads_little_and_big_endian_integers() -> None:
    r = Reader(bytes.fromhex("0102 03040506 0708"), "t")
    assert r.u16() == 0x0201
    assert r.u32_be() == 0x03040506
    assert r.u16_be() == 0x0708
    assert r.remaining == 0
    r.expect_end()


def test_rejects_read_past_end_with_offset() -> None:
    r = Reader(b"\x01\x02\x03", "thing")
    r.u16()
    with pytest.raises(FormatError, match=r"malformed thing at offset 0x2: u32: needs 4 bytes"):
        r.u32("u32")


def test_rejects_nonzero_reserved_field() -> None:
    with pytest.raises(FormatError, match="reserved must be zero"):
        Reader(b"\x00\x01", "t").zeros(2)


def test_rejects_sized_buffer_over_limit() -> None:
    with pytest.raises(FormatError, match="exceeds limit"):
        Reader(b"\x00\x05hello", "t").sized_be16("name", limit=4)


def test_rejects_trailing_bytes_when_end_expected() -> None:
    r = Reader(b"\x00\x00", "t")
    r.u8()
    with pytest.raises(FormatError, match="trailing"):
        r.expect_end()


def test_rejects_negative_length() -> None:
    with pytest.raises(FormatError, match="negative"):
        Reader(b"", "t").read(-1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(min_value=0, max_value=70), max_size=10))
def test_fuzz_reads_never_raise_anything_but_format_error(data: bytes, sizes: list[int]) -> None:
    r = Reader(data, "fuzz")
    try:
        for n in sizes:
            r.read(n)
    except FormatError:
        pass
    assert 0 <= r.offset <= len(data)
