"""A stand-in for ``coffer-agent`` in the sandbox and CLI tests: the contract's command line, its
launch-measurement check and its wire framing (4-byte big-endian length + JSON), with canned answers.

Run as a script (``python standin_agent.py --socket ... --initdata ... --storage ... --tee ...``).
Extras for tests, from the environment: ``STANDIN_ECHO_PORT`` starts a TCP echo server on
127.0.0.1:PORT (inside the sandbox's netns); ``STANDIN_DENY`` lists methods answered PERMISSION_DENIED;
``STANDIN_LOGS`` is what the container "printed"; ``STANDIN_RECORD`` a file that gets every request
(one JSON line each).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    conn.sendall(struct.pack(">I", len(body)) + body)


class State:
    def __init__(self, args: argparse.Namespace, digest: str) -> None:
        self.args = args
        self.digest = digest
        self.deny = set(filter(None, os.environ.get("STANDIN_DENY", "").split(",")))
        self.logs = os.environ.get("STANDIN_LOGS", "hello from the container\n").encode()
        self.read = False
        self.containers: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()


def _answer(state: State, method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method in state.deny:
        raise PermissionError(f"{method} is blocked by policy: the stand-in denies it")
    if method == "GuestDetailsRequest":
        return {"tee": state.args.tee, "initdata_digest": state.digest, "policy_debug": False,
                "event_log": [{"domain": "coffer", "operation": "InitData", "content": {},
                               "digest": "00" * 32}],
                "register": {"kind": "sample", "index": 0, "value": "00" * 32}, "claims": None,
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "storage_mounted": os.path.ismount(state.args.storage)}
    if method == "CreateContainerRequest":
        cid = params.get("container_id") or "c1"
        state.containers[cid] = {"container_id": cid, "name": params.get("name", ""),
                                 "image": params.get("image", ""), "status": "created", "pid": 0}
        return {"container_id": cid}
    if method == "StartContainerRequest":
        state.containers.setdefault(params["container_id"], {})["status"] = "running"
        return {"pid": 42}
    if method == "ReadStreamRequest":
        if params.get("stream") == "stdout" and not state.read:
            state.read = True
            return {"data": base64.b64encode(state.logs).decode(), "eof": False}
        return {"data": "", "eof": True}
    if method == "WaitProcessRequest":
        return {"exited": True, "status": 0}
    if method == "ListContainersRequest":
        return {"containers": list(state.containers.values())}
    if method == "ExecProcessRequest":
        return {"exec_id": params.get("exec_id", "e1")}
    return {}


def _serve(conn: socket.socket, state: State) -> None:
    with conn:
        while True:
            header = _recv_exact(conn, 4)
            if header is None:
                return
            (length,) = struct.unpack(">I", header)
            if length > 1 << 20:
                return
            body = _recv_exact(conn, length)
            if body is None:
                return
            request = json.loads(body)
            rid = request.get("id", 0)
            if os.environ.get("STANDIN_RECORD"):
                with open(os.environ["STANDIN_RECORD"], "a") as log:
                    log.write(json.dumps(request) + "\n")
            try:
                with state.lock:
                    result = _answer(state, request["method"], request.get("params") or {})
                _send(conn, {"id": rid, "ok": True, "result": result})
            except PermissionError as exc:
                error = {"code": "PERMISSION_DENIED", "message": str(exc)}
                _send(conn, {"id": rid, "ok": False, "error": error})


def _echo(port: int) -> None:
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()

        def pump(c: socket.socket) -> None:
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        threading.Thread(target=pump, args=(conn,), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--initdata", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--tee", required=True)
    parser.add_argument("--tcti")
    parser.add_argument("--kbs")
    parser.add_argument("--registry-insecure", action="store_true")
    parser.add_argument("--image-layouts")
    args = parser.parse_args()
    raw = Path(args.initdata).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if args.tee == "sample":
        measured = (Path(args.storage).parent / "launch-measurement").read_text().strip()
        if measured != digest:
            sys.stderr.write("stand-in agent: initdata digest does not match the launch measurement\n")
            return 1
    else:
        out = subprocess.run(["tpm2_pcrread", "sha256:8"], capture_output=True, text=True, check=True,
                             env={**os.environ, "TPM2TOOLS_TCTI": args.tcti})
        value = out.stdout.strip().rsplit(":", 1)[1].strip().lower().removeprefix("0x")
        expected = hashlib.sha256(b"\0" * 32 + bytes.fromhex(digest)).hexdigest()
        if value != expected:
            sys.stderr.write(f"stand-in agent: PCR 8 {value} is not {expected}\n")
            return 1
    if os.environ.get("STANDIN_ECHO_PORT"):
        threading.Thread(target=_echo, args=(int(os.environ["STANDIN_ECHO_PORT"]),), daemon=True).start()
    state = State(args, digest)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(args.socket)
    server.listen(16)
    sys.stderr.write("stand-in agent: serving\n")
    sys.stderr.flush()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn, state), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
