"""coffer.guest.protocol and the agent's server: framing limits, strict message parsing, the client's
typed errors, and a real agent on a unix socket hammered with malformed, oversized and truncated
frames (it answers with errors and keeps serving)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, ProtocolError, TransportError
from coffer.guest import protocol
from coffer.guest.agent import Agent
from coffer.guest.protocol import (
    MAX_FRAME,
    AgentClient,
    BlockedByPolicyError,
    FrameError,
    decode_message,
    encode_frame,
    parse_request,
    read_frame,
)
from coffer.guest.runtime import NotFoundError
from tests.guest.test_agent import APP_SPEC, FakeRuntime, create_params, make_agent

# --------------------------------------------------------------------------------------------------
# Framing and parsing


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_frame_round_trip() -> None:
    message = {"id": 1, "method": "GuestDetailsRequest", "params": {"ü": "ä"}}
    stream = io.BytesIO(encode_frame(message) + encode_frame({"id": 2}))
    first = read_frame(stream)
    assert first is not None
    assert decode_message(first) == message
    second = read_frame(stream)
    assert second is not None
    assert decode_message(second) == {"id": 2}
    assert read_frame(stream) is None


class Trickle(io.RawIOBase):
    """Gives one byte per read, as a slow peer's socket does."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data[:1], self.data[1:]
        return chunk


def test_partial_reads_are_reassembled() -> None:
    payload = read_frame(Trickle(encode_frame({"id": 9, "x": "y" * 1000})))  # type: ignore[arg-type]
    assert payload is not None
    assert decode_message(payload)["id"] == 9


def test_oversized_length_is_refused_before_reading_the_payload() -> None:
    stream = io.BytesIO(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError) as info:
        read_frame(stream)
    assert info.value.fatal
    assert info.value.kind == protocol.INVALID_ARGUMENT


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00\x00\x10abc", b"\x00\x00\x00\x00"])
def test_truncated_or_empty_frame_is_refused(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        read_frame(io.BytesIO(data))
    assert info.value.fatal


def test_oversized_message_is_not_encoded() -> None:
    with pytest.raises(FrameError):
        encode_frame({"data": "x" * MAX_FRAME})


@pytest.mark.parametrize("payload", [
    b"\xff\xfe", b"[]", b"1", b'{"a": 1, "a": 2}', b'{"a": NaN}', b'{"a": 1} x', b"[" * 100_000,
    json.dumps({"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode(),
])
def test_malformed_message_is_invalid_argument(payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_message(payload)
    assert info.value.kind == protocol.INVALID_ARGUMENT


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_give_frames_or_typed_errors(data: bytes) -> None:
    stream = io.BytesIO(data)
    try:
        while (payload := read_frame(stream)) is not None:
            parse_request(decode_message(payload))
    except CofferError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "method", "params", "x"]), JSON | st.sampled_from(
    sorted(protocol.METHODS)), max_size=4))
def test_random_request_objects_parse_or_give_invalid_argument(message: dict[str, Any]) -> None:
    kind = None
    try:
        request = parse_request(message)
    except FrameError as exc:
        kind = exc.kind
    else:
        assert request.method in protocol.METHODS
        assert isinstance(request.params, dict)
    assert kind in (None, protocol.INVALID_ARGUMENT)


def test_response_errors_become_typed_exceptions() -> None:
    with pytest.raises(BlockedByPolicyError) as blocked:
        protocol.parse_response(protocol.error_response(
            3, protocol.PERMISSION_DENIED, "ExecProcessRequest is blocked by policy: exec not allowed"),
            "ExecProcessRequest", 3)
    assert blocked.value.explanation == "exec not allowed"
    assert str(blocked.value) == "ExecProcessRequest is blocked by policy: exec not allowed"
    with pytest.raises(ProtocolError) as other:
        protocol.parse_response(protocol.error_response(3, protocol.NOT_FOUND, "no container"), "X", 3)
    assert other.value.kind == protocol.NOT_FOUND
    bad_responses = ({"id": 4, "ok": True, "result": {}}, {"id": 3, "ok": "yes"},
                     {"id": 3, "ok": True, "result": 1})
    for bad in bad_responses:
        with pytest.raises(ProtocolError):
            protocol.parse_response(bad, "X", 3)


# --------------------------------------------------------------------------------------------------
# A real server


@dataclass
class Served:
    path: Path
    agent: Agent
    runtime: FakeRuntime


def _serve(directory: Path, max_connections: int = 64) -> Iterator[Served]:
    path = directory / "agent.sock"
    ready = threading.Event()
    holder: list[Served] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            agent, runtime, _ = make_agent()  # the engine belongs to this (serving) thread
            holder.append(Served(path, agent, runtime))
            agent.serve(path, ready=ready.set, max_connections=max_connections)
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "server did not start"
    assert not failure, failure
    try:
        yield holder[0]
    finally:
        holder[0].agent.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        assert not path.exists()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    directory = Path(tempfile.mkdtemp(prefix="coffer-agent-"))
    try:
        yield from _serve(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def raw_conn(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def read_response(sock: socket.socket) -> dict[str, Any] | None:
    payload = read_frame(sock)
    return None if payload is None else decode_message(payload)


def still_serves(path: Path) -> None:
    with AgentClient(path, timeout=5) as client:
        assert client.call("GuestDetailsRequest")["tee"] == "sample"


def test_client_gets_results_and_typed_errors(served: Served) -> None:
    with AgentClient(served.path, timeout=5) as client:
        assert client.call("ListContainersRequest") == {"containers": []}
        with pytest.raises(BlockedByPolicyError) as info:
            client.call("SetPolicyRequest", {"policy": "x"})
        assert "fixed at launch" in info.value.explanation
        served.runtime.fail["signal_process"] = NotFoundError("no container zz")
        try:
            with pytest.raises(ProtocolError) as not_found:
                client.call("SignalProcessRequest", {"container_id": "zz", "exec_id": "", "signal": 9})
        finally:
            del served.runtime.fail["signal_process"]
        assert not_found.value.kind == protocol.NOT_FOUND
        with pytest.raises(ProtocolError) as unknown:
            client.call("FrobnicateRequest")
        assert unknown.value.kind == protocol.INVALID_ARGUMENT
        assert client.call("GuestDetailsRequest")["initdata_digest"]


def test_oversized_frame_gets_an_error_and_the_connection_is_closed(served: Served) -> None:
    with raw_conn(served.path) as sock:
        sock.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        response = read_response(sock)
        assert response is not None
        assert response["error"]["code"] == protocol.INVALID_ARGUMENT
        assert read_response(sock) is None
    still_serves(served.path)


def test_malformed_json_gets_an_error_and_the_connection_stays_usable(served: Served) -> None:
    with raw_conn(served.path) as sock:
        sock.sendall(frame(b"{not json"))
        response = read_response(sock)
        assert response is not None
        assert response["ok"] is False
        assert response["error"]["code"] == protocol.INVALID_ARGUMENT
        sock.sendall(encode_frame({"id": 5, "method": "GuestDetailsRequest", "params": {}}))
        again = read_response(sock)
        assert again is not None
        assert again["id"] == 5
        assert again["ok"] is True


def test_truncated_frame_and_abrupt_close_do_not_hurt_the_server(served: Served) -> None:
    for data in (b"\x00\x00", frame(b'{"id": 1, "method": "GuestDeta')[:20], b""):
        with raw_conn(served.path) as sock:
            sock.sendall(data)
    still_serves(served.path)


def test_response_too_large_for_a_frame_is_an_internal_error(served: Served) -> None:
    served.runtime.results["list_containers"] = {"containers": ["x" * MAX_FRAME]}
    try:
        with AgentClient(served.path, timeout=5) as client:
            with pytest.raises(ProtocolError) as info:
                client.call("ListContainersRequest")
            assert info.value.kind == protocol.INTERNAL
            assert client.call("GuestDetailsRequest")["tee"] == "sample"
    finally:
        del served.runtime.results["list_containers"]


def test_policy_state_is_kept_across_connections(served: Served) -> None:
    with AgentClient(served.path, timeout=5) as first:
        first.call("CreateContainerRequest", create_params("shared"))
    with AgentClient(served.path, timeout=5) as second:
        exec_params = {"container_id": "shared", "exec_id": "e1", "process": {
            "Args": ["echo", "hi"], "Env": APP_SPEC.env_list(), "Cwd": "/",
            "User": {"UID": 1000, "GID": 1000, "AdditionalGids": []}, "Terminal": False,
            "Capabilities": None}}
        assert second.call("ExecProcessRequest", exec_params) == {"exec_id": "e1"}


def test_concurrent_clients_are_all_answered(served: Served) -> None:
    def work(_: int) -> int:
        with AgentClient(served.path, timeout=10) as client:
            answered = 0
            for _ in range(20):
                assert client.call("GuestDetailsRequest")["tee"] == "sample"
                answered += 1
            return answered

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(8))) == [20] * 8


def test_a_blocking_wait_does_not_stall_other_requests(served: Served) -> None:
    served.runtime.wait_seconds = 1.5
    try:
        with ThreadPoolExecutor(1) as pool:
            def wait() -> dict[str, Any]:
                with AgentClient(served.path, timeout=10) as client:
                    params = {"container_id": "c", "exec_id": "", "timeout_s": 5}
                    return client.call("WaitProcessRequest", params)

            pending = pool.submit(wait)
            time.sleep(0.2)
            started = time.monotonic()
            still_serves(served.path)
            assert time.monotonic() - started < 1.0
            assert pending.result(10) == {"exited": True, "status": 0}
    finally:
        served.runtime.wait_seconds = 0.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=256),
    st.binary(max_size=200).map(frame),
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: struct.pack(">I", n)),
    st.builds(lambda m, p: encode_frame({"id": 1, "method": m, "params": p}),
              st.sampled_from(sorted(protocol.METHODS)),
              st.dictionaries(st.text(max_size=10), JSON, max_size=3)),
))
def test_hammering_with_random_input_never_kills_the_server(served: Served, data: bytes) -> None:
    with raw_conn(served.path) as sock:
        sock.settimeout(2)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while (payload := read_frame(sock)) is not None:
                response = decode_message(payload)
                assert response["ok"] in (True, False)
                if response["ok"] is False:
                    assert response["error"]["code"] in protocol.CODES
        except (TransportError, FrameError, ConnectionError):
            pass
    still_serves(served.path)


def test_connections_beyond_the_limit_are_refused_and_the_server_recovers() -> None:
    directory = Path(tempfile.mkdtemp(prefix="coffer-agent-"))
    try:
        for served in _serve(directory, max_connections=2):
            holders = [raw_conn(served.path) for _ in range(2)]
            time.sleep(0.3)
            with raw_conn(served.path) as extra:
                assert read_response(extra) is None  # closed at once
            for sock in holders:
                sock.close()
            time.sleep(0.3)
            still_serves(served.path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_client_reports_a_missing_socket_as_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError):
        AgentClient(tmp_path / "nothing.sock", timeout=1).call("GuestDetailsRequest")


def test_serve_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("not a socket")
    agent, _, _ = make_agent()
    with pytest.raises(CofferError):
        agent.serve(path)
    assert path.read_text() == "not a socket"


def test_shutdown_while_a_client_is_connected_ends_serve() -> None:
    directory = Path(tempfile.mkdtemp(prefix="coffer-agent-"))
    try:
        gen = _serve(directory)
        served = next(gen)
        sock = raw_conn(served.path)
        started = time.monotonic()
        with pytest.raises(StopIteration):
            next(gen)
        assert time.monotonic() - started < 5
        sock.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
