"""The host <-> guest agent wire protocol: length-prefixed JSON frames over a stream socket.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON holding one object, at most
:data:`MAX_FRAME` bytes. The host sends requests and the agent answers each with one response, in
order, on the same connection::

    {"id": 7, "method": "ExecProcessRequest", "params": {...}}
    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"code": "PERMISSION_DENIED", "message": "..."}}

Methods are the workload policy's request names (:data:`METHODS`). Reading is bounded: a declared
length over the limit is refused before any of the payload is read, and a peer that closes in the
middle of a frame is a truncated frame, not a short message. Every refusal is a :class:`FrameError`
(a :class:`~coffer.errors.ProtocolError` whose ``kind`` is the wire error code).

:class:`AgentClient` is the host's synchronous client: one connection, one request at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from coffer._internal.encoding import reject_constant, reject_duplicate_keys
from coffer.errors import PolicyDeniedError, ProtocolError, TransportError
from coffer.policy.model import ALWAYS_ALLOWED, RULED

MAX_FRAME: Final = 1024 * 1024
HEADER: Final = struct.Struct(">I")
MAX_DEPTH: Final = 32
_CHUNK: Final = 64 * 1024

#: Every method the agent knows (the policy's request names).
METHODS: Final = frozenset(RULED) | frozenset(ALWAYS_ALLOWED)

PERMISSION_DENIED: Final = "PERMISSION_DENIED"
INVALID_ARGUMENT: Final = "INVALID_ARGUMENT"
NOT_FOUND: Final = "NOT_FOUND"
FAILED_PRECONDITION: Final = "FAILED_PRECONDITION"
INTERNAL: Final = "INTERNAL"
UNAVAILABLE: Final = "UNAVAILABLE"
CODES: Final = frozenset(
    {PERMISSION_DENIED, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, INTERNAL, UNAVAILABLE})
BLOCKED: Final = " is blocked by policy: "


class FrameError(ProtocolError):
    """A frame or message that breaks the protocol; ``kind`` is the wire error code to answer with.

    ``fatal`` frames leave the stream out of step (oversized, truncated): the connection must be
    closed after the error response. ``request_id`` is the request's id when it could be read."""

    def __init__(self, code: str, detail: str, *, fatal: bool = False, request_id: int | None = None) -> None:
        super().__init__(code, detail)
        self.fatal = fatal
        self.request_id = request_id


class BlockedByPolicyError(PolicyDeniedError):
    """The agent's policy refused the request; ``explanation`` says why, in plain words."""

    def __init__(self, method: str, explanation: str) -> None:
        super().__init__("policy", 0, "agent policy", explanation)
        self.method = method
        self.explanation = explanation

    def __str__(self) -> str:
        return f"{self.method}{BLOCKED}{self.explanation}"


# --------------------------------------------------------------------------------------------------
# Framing


Reader = Callable[[int], bytes]


def _reader(channel: socket.socket | IO[bytes]) -> Reader:
    if isinstance(channel, socket.socket):
        return channel.recv
    return channel.read


def _read_exact(read: Reader, size: int, *, at_start: bool) -> bytes | None:
    """``size`` bytes, or None on EOF before the first byte when ``at_start``; FrameError when the
    peer stops in the middle."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        try:
            chunk = read(min(size - got, _CHUNK))
        except TimeoutError as exc:
            raise TransportError("timed out reading a frame") from exc
        except OSError as exc:
            raise TransportError(f"reading a frame failed: {exc.strerror or type(exc).__name__}") from exc
        if not chunk:
            if at_start and got == 0:
                return None
            raise FrameError(INVALID_ARGUMENT, f"truncated frame: {got} of {size} bytes", fatal=True)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_frame(channel: socket.socket | IO[bytes], *, max_frame: int = MAX_FRAME) -> bytes | None:
    """The payload of the next frame; None on a clean EOF between frames.

    FrameError (fatal) for a length over ``max_frame``, a zero length or EOF inside a frame;
    TransportError when the channel fails or times out."""
    read = _reader(channel)
    header = _read_exact(read, HEADER.size, at_start=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise FrameError(INVALID_ARGUMENT, f"frame of {length} bytes is over the {max_frame}-byte limit",
                         fatal=True)
    if length == 0:
        raise FrameError(INVALID_ARGUMENT, "empty frame", fatal=True)
    payload = _read_exact(read, length, at_start=False)
    assert payload is not None  # at_start=False never returns None
    return payload


def encode_frame(message: Mapping[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """A frame holding ``message`` as compact JSON; FrameError when it would be over ``max_frame``."""
    try:
        payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise FrameError(INTERNAL, f"message is not JSON: {exc}") from None
    if len(payload) > max_frame:
        raise FrameError(INTERNAL, f"message of {len(payload)} bytes is over the {max_frame}-byte limit")
    return HEADER.pack(len(payload)) + payload


def write_frame(channel: socket.socket | IO[bytes], message: Mapping[str, Any]) -> None:
    frame = encode_frame(message)
    try:
        if isinstance(channel, socket.socket):
            channel.sendall(frame)
        else:
            channel.write(frame)
            channel.flush()
    except TimeoutError as exc:
        raise TransportError("timed out writing a frame") from exc
    except OSError as exc:
        raise TransportError(f"writing a frame failed: {exc.strerror or type(exc).__name__}") from exc


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                raise FrameError(INVALID_ARGUMENT, f"message nests deeper than {MAX_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise FrameError(INVALID_ARGUMENT, "message holds a non-finite number")


def decode_message(payload: bytes) -> dict[str, Any]:
    """A frame payload as a JSON object (strict: UTF-8, no duplicate keys, no NaN, bounded nesting)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(INVALID_ARGUMENT, f"message is not UTF-8 (byte {exc.start})") from None
    decoder = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys, parse_constant=reject_constant)
    try:
        value, end = decoder.raw_decode(text.strip())
        if end != len(text.strip()):
            raise ValueError("text after the JSON value")
    except RecursionError:
        raise FrameError(INVALID_ARGUMENT, f"message nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise FrameError(INVALID_ARGUMENT, f"message is not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise FrameError(INVALID_ARGUMENT, "message is not a JSON object")
    _check_depth(value)
    return value


# --------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]


def _valid_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def parse_request(message: Mapping[str, Any]) -> Request:
    """Check a request object: id int, method a known name, params an object, nothing else."""
    raw_id = message.get("id")
    request_id = raw_id if _valid_id(raw_id) else None
    if request_id is None:
        raise FrameError(INVALID_ARGUMENT, "request id must be a non-negative integer")

    def bad(detail: str) -> FrameError:
        return FrameError(INVALID_ARGUMENT, detail, request_id=request_id)

    extra = set(message) - {"id", "method", "params"}
    if extra:
        raise bad(f"unknown request fields: {', '.join(sorted(repr(k) for k in extra)[:5])}")
    method = message.get("method")
    if not isinstance(method, str):
        raise bad("method must be a string")
    if method not in METHODS:
        raise bad(f"unknown method {method[:80]!r}")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise bad("params must be an object")
    return Request(id=request_id, method=method, params=params)


def ok_response(request_id: int | None, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": dict(result)}


def error_response(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    if code not in CODES:
        code = INTERNAL
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def blocked_message(method: str, explanation: str) -> str:
    return f"{method}{BLOCKED}{explanation}"


def parse_response(message: Mapping[str, Any], method: str, request_id: int) -> dict[str, Any]:
    """The result of a response to ``request_id``; the typed error it carries otherwise."""
    if message.get("id") != request_id:
        raise ProtocolError("FormatError", f"response id {message.get('id')!r} does not answer {request_id}")
    ok = message.get("ok")
    if ok is True:
        result = message.get("result")
        if not isinstance(result, dict):
            raise ProtocolError("FormatError", "response result is not an object")
        return result
    error = message.get("error")
    if ok is not False or not isinstance(error, dict):
        raise ProtocolError("FormatError", "response is neither a result nor an error")
    code, text = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(text, str):
        raise ProtocolError("FormatError", "response error lacks a code or message")
    if code == PERMISSION_DENIED:
        prefix = f"{method}{BLOCKED}"
        raise BlockedByPolicyError(method, text.removeprefix(prefix))
    raise ProtocolError(code, text)


# --------------------------------------------------------------------------------------------------
# Client


class AgentClient:
    """A synchronous client of one agent socket: ``call(method, params) -> result``.

    Raises :class:`BlockedByPolicyError` when the policy refused, :class:`ProtocolError` (``kind`` =
    the wire code) for other errors, :class:`TransportError` when the socket fails (the connection
    is then dropped and the next call reconnects). Thread-safe: calls are serialised.
    """

    def __init__(self, socket_path: Path | str, timeout: float | None = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise TransportError(
                    f"cannot connect to the agent at {self.socket_path}: {exc.strerror or exc}") from exc
            self._sock = sock
        return self._sock

    def call(self, method: str, params: Mapping[str, Any] | None = None, *,
             timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its result. ``timeout`` overrides the client's for this call
        (a WaitProcess that may block longer)."""
        with self._lock:
            request_id = next(self._ids)
            sock = self._connect()
            try:
                sock.settimeout(timeout if timeout is not None else self.timeout)
                write_frame(sock, {"id": request_id, "method": method, "params": dict(params or {})})
                payload = read_frame(sock)
                if payload is None:
                    raise TransportError("the agent closed the connection without answering")
                message = decode_message(payload)
            except (TransportError, FrameError):
                self._drop()
                raise
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.timeout)
        return parse_response(message, method, request_id)

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
