"""Port forwarding into a network namespace: host TCP -> unix socket -> inner forwarder -> TCP in the
netns, with a real echo server inside a netns made by unshare."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer._internal.net import free_port
from coffer.errors import ConfigError, TransportError
from coffer.sandbox.forward import Forwarder, bind_tcp, bind_unix, unix_connector

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare to make a network namespace")

SRC = str(Path(__file__).resolve().parents[2] / "src")

# In a fresh netns: lo up, an echo server on 127.0.0.1:PORT, then the inner forwarder.
INNER = r"""
import fcntl, socket, struct, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
port = int(sys.argv[2])
server = socket.create_server(("127.0.0.1", port))
def echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def serve():
    while True:
        c, _ = server.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
from coffer.sandbox.forward import main
sys.exit(main(["inner", "--map", f"{sys.argv[1]}={port}"]))
"""


@pytest.fixture
def netns_echo() -> Iterator[tuple[Path, int]]:
    """(unix socket path served by the inner forwarder, the echo port inside the netns)."""
    directory = Path(tempfile.mkdtemp(prefix="cof-fwd-"))
    sock = directory / "p.sock"
    port = free_port()
    process = subprocess.Popen(
        ["unshare", "--net", "--", sys.executable, "-c", INNER, str(sock), str(port)],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        yield sock, port
    finally:
        process.terminate()
        process.wait(5)
        if process.stdout is not None:
            process.stdout.close()
        assert process.returncode == 0  # SIGTERM stops the forwarder cleanly
        shutil.rmtree(directory)


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the echo side sees EOF after the payload
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
    return out


def test_tcp_echo_inside_the_netns_is_reached_through_the_forwarders(netns_echo: tuple[Path, int]) -> None:
    sock, inner_port = netns_echo
    listener = bind_tcp("127.0.0.1", 0)
    host_port = listener.getsockname()[1]
    forwarder = Forwarder([(listener, unix_connector(sock))]).start()
    try:
        assert _roundtrip(host_port, b"hello") == b"hello"
        big = os.urandom(3 * 1024 * 1024 + 17)
        assert _roundtrip(host_port, big) == big
        # Several connections at once.
        conns = [socket.create_connection(("127.0.0.1", host_port), timeout=5) for _ in range(5)]
        for n, conn in enumerate(conns):
            conn.sendall(b"n%d" % n)
        for n, conn in enumerate(conns):
            assert conn.recv(16) == b"n%d" % n
            conn.close()
    finally:
        forwarder.stop()
    with socket.socket() as probe:  # the echo server lives only in the sandbox's netns
        probe.settimeout(1)
        assert probe.connect_ex(("127.0.0.1", inner_port)) != 0 or inner_port == host_port


def test_connection_to_a_missing_inner_side_is_closed_not_hung(tmp_path: Path) -> None:
    listener = bind_tcp("127.0.0.1", 0)
    forwarder = Forwarder([(listener, unix_connector(tmp_path / "absent.sock"))]).start()
    try:
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(10) == b""
    finally:
        forwarder.stop()


def test_busy_host_port_is_a_transport_error() -> None:
    first = bind_tcp("127.0.0.1", 0)
    try:
        with pytest.raises(TransportError, match="cannot listen"):
            bind_tcp("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_too_long_unix_socket_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="longer than"):
        bind_unix(tmp_path / ("x" * 120))


def test_forwarder_process_refuses_bad_maps() -> None:
    result = subprocess.run([sys.executable, "-m", "coffer.sandbox.forward", "inner", "--map", "nonsense"],
                            capture_output=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=20,
                            check=False)
    assert result.returncode == 2
    assert b"LEFT=RIGHT" in result.stderr
