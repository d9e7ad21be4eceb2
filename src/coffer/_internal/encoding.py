"""Strict decoders for hex and base64, detection of how an evidence file is encoded, and the
conversion of claim objects into JSON-ready values (bytes as lowercase hex)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any

from coffer.errors import FormatError

_HEX = re.compile(rb"\A(?:[0-9a-fA-F]{2})*\Z")
_B64 = re.compile(rb"\A[A-Za-z0-9+/]*={0,2}\Z")
_B64URL = re.compile(rb"\A[A-Za-z0-9_-]*={0,2}\Z")
_WS = re.compile(rb"\s+")


def hex_decode(text: str | bytes, what: str = "hex string") -> bytes:
    """Decode hex; an odd length or a non-hex character is an error, never silently skipped."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if not _HEX.match(raw):
        raise FormatError(what, "not an even-length hexadecimal string")
    return bytes.fromhex(raw.decode("ascii"))


def b64_decode(text: str | bytes, what: str = "base64 string") -> bytes:
    """Decode standard or URL-safe base64, padded or not; any other character is an error."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    urlsafe = bool(_B64URL.match(raw)) and not _B64.match(raw)
    if not (_B64.match(raw) or urlsafe):
        raise FormatError(what, "not base64")
    stripped = raw.rstrip(b"=")
    if len(stripped) % 4 == 1:
        raise FormatError(what, "base64 length is impossible")
    padded = stripped + b"=" * (-len(stripped) % 4)
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(what, "not base64") from exc


def decode_binary_file(data: bytes, what: str = "evidence file") -> bytes:
    """Accept a binary evidence file given raw, as hex text or as base64 text.

    Text forms are recognised only when the whole file (ignoring white space) is in that alphabet, so
    a raw binary structure is never mangled. Hex wins over base64 when both would parse, since a hex
    string is also valid base64 but never the other way round for real evidence.
    """
    compact = _WS.sub(b"", data)
    if not compact:
        raise FormatError(what, "file is empty")
    if compact[:2] in (b"0x", b"0X") and _HEX.match(compact[2:]):
        return bytes.fromhex(compact[2:].decode("ascii"))
    if _HEX.match(compact):
        return bytes.fromhex(compact.decode("ascii"))
    if (_B64.match(compact) or _B64URL.match(compact)) and len(compact) >= 16:
        return b64_decode(compact, what)
    return data


def to_jsonable(value: Any) -> Any:
    """Turn claims (dataclasses, enums, bytes, dates/times/datetimes, containers) into JSON values.

    Bytes become lowercase hex, which is the documented form of every byte field in ``--json`` output.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.repr}
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date | time):
        # TOML local dates and times (tomllib gives datetime.date / datetime.time): ISO 8601 text.
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [to_jsonable(v) for v in value]
    return value


def to_json_object(value: Any) -> dict[str, Any]:
    """:func:`to_jsonable` for a dataclass or mapping, typed as the JSON object it becomes."""
    out = to_jsonable(value)
    if not isinstance(out, dict):
        raise TypeError(f"{type(value).__name__} does not convert to a JSON object")
    return out


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no white space, UTF-8 (for signing and hashing)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` ``object_pairs_hook`` refusing a key that appears twice (ValueError)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:100]!r}")
        out[key] = value
    return out


def reject_constant(name: str) -> Any:
    """``json`` ``parse_constant`` refusing NaN and Infinity (ValueError)."""
    raise ValueError(f"{name} is not valid JSON")


def load_json_object(data: bytes, what: str, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Parse a JSON object strictly: size-limited, UTF-8, no duplicate keys, no NaN/Infinity."""
    if len(data) > max_bytes:
        raise FormatError(what, f"{len(data)} bytes exceeds the {max_bytes}-byte limit")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, val in pairs:
            if key in out:
                raise FormatError(what, f"duplicate key {key!r}")
            out[key] = val
        return out

    def no_constants(name: str) -> Any:
        raise FormatError(what, f"{name} is not valid JSON")

    def finite_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise FormatError(what, f"number {text[:20]!r} is out of range")
        return value

    try:
        parsed = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates,
                            parse_constant=no_constants, parse_float=finite_float)
        # json accepts lone UTF-16 surrogates ("\ud800"), which no later .encode() survives; refuse
        # them here, once, rather than at every place a string is used.
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python's conversion limit.
        raise FormatError(what, f"not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(parsed, dict):
        raise FormatError(what, "top level must be a JSON object")
    return parsed
