"""One request over the agent framing (4-byte big-endian length + JSON), for tests that must not
depend on coffer.guest.protocol."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any


def call(path: Path, method: str, params: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        body = json.dumps({"id": 1, "method": method, "params": params}).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
        header = b""
        while len(header) < 4:
            header += conn.recv(4 - len(header))
        (length,) = struct.unpack(">I", header)
        data = b""
        while len(data) < length:
            chunk = conn.recv(length - len(data))
            if not chunk:
                break
            data += chunk
    out: dict[str, Any] = json.loads(data)
    return out
