"""The quickstart's sample Python web app: one standard-library HTTP server, no third-party code.

It runs inside the image on Debian's ``python3.11``; ``PORT`` (default 8000) chooses the port.
``GET /healthz`` answers ``ok``; every other path answers a small JSON document.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "coffer-sample/1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            body, kind = b"ok\n", "text/plain"
        else:
            doc = {"app": "coffer-sample", "hostname": socket.gethostname(), "path": self.path}
            body, kind = json.dumps(doc).encode() + b"\n", "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    # As PID 1 of its container the server gets no default signal handling: stop on TERM and INT.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    port = int(os.environ.get("PORT", "8000"))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - a container port
    sys.stdout.write(f"listening on {port}\n")
    with server:
        server.serve_forever()


if __name__ == "__main__":
    main()
