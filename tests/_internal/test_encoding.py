from __future__ import annotations

import base64
import contextlib
import enum
import json
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer._internal.encoding import (
    b64_decode,
    canonical_json,
    decode_binary_file,
    hex_decode,
    load_json_object,
    to_jsonable,
)
from coffer.errors import FormatError


def test_hex_decode_rejects_odd_length_and_junk() -> None:
    assert hex_decode("00ff") == b"\x00\xff"
    with pytest.raises(FormatError):
        hex_decode("abc")
    with pytest.raises(FormatError):
        hex_decode("zz")


def test_b64_accepts_standard_urlsafe_and_unpadded() -> None:
    raw = bytes(range(200))
    assert b64_decode(base64.b64encode(raw)) == raw
    assert b64_decode(base64.urlsafe_b64encode(raw).rstrip(b"=")) == raw
    with pytest.raises(FormatError):
        b64_decode("ab$d")
    with pytest.raises(FormatError):
        b64_decode("abcde")


def test_decode_binary_file_detects_hex_base64_and_raw() -> None:
    raw = bytes(range(256)) * 5
    assert decode_binary_file(raw) == raw
    assert decode_binary_file(raw.hex().encode() + b"\n") == raw
    assert decode_binary_file(b"0x" + raw.hex().encode()) == raw
    assert decode_binary_file(base64.b64encode(raw) + b"\n") == raw
    with pytest.raises(FormatError, match="empty"):
        decode_binary_file(b"  \n")


def test_load_json_object_rejects_duplicates_nan_and_non_objects() -> None:
    assert load_json_object(b'{"a": 1}', "t") == {"a": 1}
    with pytest.raises(FormatError, match="duplicate key"):
        load_json_object(b'{"a": 1, "a": 2}', "t")
    with pytest.raises(FormatError, match="NaN"):
        load_json_object(b'{"a": NaN}', "t")
    with pytest.raises(FormatError, match="object"):
        load_json_object(b"[1]", "t")
    with pytest.raises(FormatError, match="limit"):
        load_json_object(b"{}" + b" " * 100, "t", max_bytes=10)
    with pytest.raises(FormatError):
        load_json_object(b"\xff", "t")


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


class _Colour(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class _Thing:
    data: bytes
    colour: _Colour
    when: datetime
    nested: dict[str, bytes]


def test_to_jsonable_renders_bytes_as_lowercase_hex() -> None:
    value = _Thing(b"\xab\xcd", _Colour.RED, datetime(2025, 1, 2, tzinfo=UTC), {"k": b"\x01"})
    assert to_jsonable(value) == {
        "data": "abcd", "colour": "red", "when": "2025-01-02T00:00:00Z", "nested": {"k": "01"},
    }


def test_to_jsonable_converts_toml_local_dates_and_times_with_isoformat() -> None:
    # tomllib gives datetime.date / datetime.time for local dates and times: json.dumps broke on them.
    doc = tomllib.loads("d = 1979-05-27\nt = 07:32:00.5\nl = 1979-05-27T07:32:00\n"
                        "o = 1979-05-27T07:32:00-07:00\n")
    out = to_jsonable(doc)
    assert out == {"d": "1979-05-27", "t": "07:32:00.500000", "l": "1979-05-27T07:32:00",
                   "o": "1979-05-27T07:32:00-07:00"}
    json.dumps(out)
    assert to_jsonable([date(2025, 1, 2), time(1, 2, 3, tzinfo=timezone(timedelta(hours=1)))]) == [
        "2025-01-02", "01:02:03+01:00"]
    assert to_jsonable(datetime(2025, 1, 2, tzinfo=UTC)) == "2025-01-02T00:00:00Z"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoders_only_raise_format_error(data: bytes) -> None:
    for func in (hex_decode, b64_decode, decode_binary_file):
        with contextlib.suppress(FormatError):
            func(data)
    with contextlib.suppress(FormatError):
        load_json_object(data, "fuzz")


def test_json_with_integer_beyond_conversion_limit_is_format_error() -> None:
    with pytest.raises(FormatError):
        load_json_object(b'{"v": ' + b"1" * 5000 + b"}", "t")


def test_json_with_lone_surrogate_is_format_error() -> None:
    with pytest.raises(FormatError):
        load_json_object(b'{"v": "\\ud800"}', "t")
    with pytest.raises(FormatError):
        load_json_object(b'{"\\udc00": 1}', "t")


def test_json_float_overflowing_to_infinity_is_format_error() -> None:
    with pytest.raises(FormatError, match="out of range"):
        load_json_object(b'{"v": 1e999}', "t")
