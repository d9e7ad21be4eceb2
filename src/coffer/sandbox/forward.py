"""Published ports: TCP on the host's loopback, carried over unix sockets into a sandbox's netns.

The sandbox has its own network namespace with only ``lo``, so the host cannot reach
127.0.0.1:CTRPORT inside it. A unix socket path is reachable from both sides (it lives in the file
system, not in a network namespace), so two small forwarders meet there::

    host 127.0.0.1:HOSTPORT --(host forwarder)--> <sandbox>/ports/<CTRPORT>.sock
        --(inner forwarder, in the sandbox's namespaces)--> 127.0.0.1:CTRPORT in the netns

Both are :class:`Forwarder` (a listening socket, a way to connect the other end, one thread per
direction of each connection) and both run as their own process through :func:`main`::

    python -m coffer.sandbox.forward host  --map FD=UNIX_PATH ...   # FD: an inherited listening TCP socket
    python -m coffer.sandbox.forward inner --map UNIX_PATH=PORT ...

The way out (the sandbox reaching a service on the host's loopback, e.g. a local KBS) is the same
pair the other way round: ``egress-inner --map PORT=UNIX_PATH`` listens on 127.0.0.1:PORT in the
netns, ``egress-host --map UNIX_PATH=PORT`` connects to 127.0.0.1:PORT on the host. ``host`` and
``inner`` also take those maps as ``--egress``, so one process per side serves both directions
(every forwarder is an interpreter start on the sandbox's start-up path).

The host side inherits its listening socket from the launcher, so "port already in use" is reported
by the command that asked for the port, not by a background process. Both run until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from coffer.errors import ConfigError, TransportError, UsageError

CHUNK: Final = 64 * 1024
MAX_UNIX_PATH: Final = 107
CONNECT_TIMEOUT: Final = 5.0

Connector = Callable[[], socket.socket]


def bind_unix(path: Path, *, backlog: int = 64) -> socket.socket:
    """A listening unix stream socket at ``path`` (a stale file there is replaced)."""
    text = os.fsencode(path)
    if len(text) > MAX_UNIX_PATH:
        raise ConfigError(f"unix socket path {path} is longer than {MAX_UNIX_PATH} bytes; "
                          "use a shorter state directory (COFFER_STATE_DIR)")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(text)
        os.chmod(text, 0o600)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {path}: {exc.strerror}") from exc
    return sock


def bind_tcp(host: str, port: int, *, backlog: int = 64) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def unix_connector(path: Path) -> Connector:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(os.fsencode(path))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock
    return connect


def tcp_connector(host: str, port: int) -> Connector:
    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        sock.settimeout(None)
        return sock
    return connect


def _pump(source: socket.socket, sink: socket.socket, done: Callable[[], None]) -> None:
    try:
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close so the far side sees EOF and can still answer (HTTP/1.0 style clients).
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        done()


def _splice(client: socket.socket, connector: Connector) -> None:
    try:
        upstream = connector()
    except OSError:
        client.close()
        return
    remaining = [2]
    lock = threading.Lock()

    def done() -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            client.close()
            upstream.close()

    threading.Thread(target=_pump, args=(client, upstream, done), daemon=True).start()
    threading.Thread(target=_pump, args=(upstream, client, done), daemon=True).start()


class Forwarder:
    """Accepts on each listener and splices every connection to what its connector opens."""

    def __init__(self, routes: Sequence[tuple[socket.socket, Connector]]) -> None:
        self._routes = {listener.fileno(): (listener, connector) for listener, connector in routes}
        self._selector = selectors.DefaultSelector()
        for listener, _ in routes:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def serve_forever(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.fd == self._wake_r:
                    return
                listener, connector = self._routes[key.fd]
                try:
                    client, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    continue
                client.setblocking(True)
                threading.Thread(target=_splice, args=(client, connector), daemon=True).start()

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def close(self) -> None:
        self._selector.close()
        for listener, _ in self._routes.values():
            listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# --------------------------------------------------------------------------------------------------
# The forwarder processes


def _parse_maps(kind: str, items: Sequence[str]) -> list[tuple[socket.socket, Connector]]:
    routes: list[tuple[socket.socket, Connector]] = []
    for item in items:
        left, sep, right = item.rpartition("=")
        if not sep or not left or not right:
            raise UsageError(f"--map {item!r} is not LEFT=RIGHT")
        if kind == "host":
            listener = socket.socket(fileno=int(left))
            routes.append((listener, unix_connector(Path(right))))
        elif kind == "egress-host":  # UNIX_PATH=PORT: the sandbox's way out to 127.0.0.1:PORT on the host
            routes.append((bind_unix(Path(left)), tcp_connector("127.0.0.1", int(right))))
        elif kind == "egress-inner":  # PORT=UNIX_PATH: 127.0.0.1:PORT in the sandbox's netns
            routes.append((bind_tcp("127.0.0.1", int(left)), unix_connector(Path(right))))
        else:
            port = int(right)
            if not 1 <= port <= 65535:
                raise UsageError(f"port {port} out of range")
            routes.append((bind_unix(Path(left)), tcp_connector("127.0.0.1", port)))
    return routes


_EGRESS_KIND: Final = {"host": "egress-host", "inner": "egress-inner"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coffer.sandbox.forward")
    parser.add_argument("kind", choices=("host", "inner", "egress-host", "egress-inner"))
    parser.add_argument("--map", action="append", default=[], dest="maps",
                        help="host: LISTEN_FD=UNIX_PATH; inner: UNIX_PATH=PORT; egress-host: UNIX_PATH=PORT; "
                             "egress-inner: PORT=UNIX_PATH")
    parser.add_argument("--egress", action="append", default=[], dest="egress",
                        help="host and inner: also serve these egress-host / egress-inner maps")
    args = parser.parse_args(argv)
    try:
        if args.egress and args.kind not in _EGRESS_KIND:
            raise UsageError(f"--egress goes with host or inner, not {args.kind}")
        routes = _parse_maps(args.kind, args.maps)
        if args.egress:
            routes += _parse_maps(_EGRESS_KIND[args.kind], args.egress)
        forwarder = Forwarder(routes)
    except (UsageError, ConfigError, TransportError, ValueError, OSError) as exc:
        sys.stderr.write(f"forwarder: {exc}\n")
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        forwarder.request_stop()

    # The wake-up pipe stops the loop from a signal handler without racing select().
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    forwarder.serve_forever()
    forwarder.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
