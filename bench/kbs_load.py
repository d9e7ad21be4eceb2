"""KBS load: N concurrent guests doing full RCAR handshakes against a real ``coffer kbs serve``.

The script starts ``coffer kbs serve`` on 127.0.0.1 (a free port) over a SQLite store in a temporary
directory (or ``--db URL``), uploads a resource through the admin API (an Ed25519 admin key made for
the run) and installs an allow-all resource policy (the default policy refuses the ``sample`` TEE).
Then ``--clients`` virtual guests, each on its own keep-alive HTTP/1.1 connection, loop for
``--seconds``: fresh TEE key → ``/auth`` → sample evidence bound to the runtime data → ``/attest`` →
``GET /resource`` with the session cookie → JWE decrypted and compared with the uploaded bytes.

The load generator is deliberately light (raw asyncio HTTP/1.1, no HTTP library) because it shares
the machine with the server; the CPU time of both sides over the measured window is reported.

Reference: the cryptography of one handshake, server and client side, run in a loop in this process
(TEE key generation, sample evidence signing and verification, EAR token signing and verification,
JWE encryption and decryption). The ratio ``handshakes/s ÷ crypto-only handshakes/s`` says how close
the whole service (HTTP, JSON, store, policy) comes to the unavoidable cryptographic cost (on one core).

Targets (2-core machine, 64 clients): >= 300 handshakes/s, p99 < 250 ms, 0 errors.

Usage: python bench/kbs_load.py [--clients 64] [--seconds 10] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coffer._internal.net import free_port
from coffer.attestation.binding import report_data_for, runtime_data_digest, runtime_data_preimage
from coffer.attestation.token import TokenSigner, TokenVerifier
from coffer.evidence import verify as verify_evidence
from coffer.evidence.base import VerifyOptions
from coffer.guest.attesters.sample import SampleAttester
from coffer.kbs import jwe
from coffer.kbs.admin import generate_admin_key, mint_admin_token
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.protocol import SESSION_COOKIE, parse_challenge
from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY
from coffer.kbs.store import MemoryStore

RESOURCE = "default/bench/secret"
SECRET = os.urandom(64)
TARGET_RATE = 300.0
TARGET_P99_MS = 250.0


# --------------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client (one connection per virtual guest)


class HttpError(Exception):
    pass


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Answer:
        reader, writer = await self._connect()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {status_line!r}")
        answer_headers = []
        length = 0
        close = False
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            answer_headers.append((name, value))
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise HttpError("chunked answers are not expected from the KBS")
            elif name == "connection" and value.lower() == "close":
                close = True
        payload = await reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return Answer(int(parts[1]), answer_headers, payload)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def session_cookie(answer: Answer) -> str:
    for header in answer.header("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == SESSION_COOKIE:
            return rest.split(";", 1)[0].strip()
    raise HttpError("no session cookie")


# --------------------------------------------------------------------------------------------------
# One guest


AUTH_BODY = json.dumps({"version": "0.4.0", "tee": "sample",
                        "extra-params": {"supported-hash-algorithms": ["sha384"]}}).encode()


async def handshake(conn: Connection, attester: SampleAttester) -> None:
    key = TeeKeyPair.generate()
    auth = await conn.request("POST", "/kbs/v0/auth", body=AUTH_BODY)
    if auth.status != 200:
        raise HttpError(f"/auth: HTTP {auth.status} {auth.body[:200]!r}")
    cookie = {"Cookie": f"{SESSION_COOKIE}={session_cookie(auth)}"}
    challenge = parse_challenge(auth.body)
    pubkey = key.public_jwk()
    runtime = runtime_data_preimage(challenge.nonce, pubkey, "")
    digest = runtime_data_digest(runtime, challenge.hash_algorithm())
    body = {"init-data": None, "runtime-data": {"nonce": challenge.nonce, "tee-pubkey": pubkey},
            "tee-evidence": {"primary_evidence": attester.evidence(digest), "additional_evidence": ""}}
    attest = await conn.request("POST", "/kbs/v0/attest", body=json.dumps(body).encode(), headers=cookie)
    if attest.status != 200:
        raise HttpError(f"/attest: HTTP {attest.status} {attest.body[:200]!r}")
    resource = await conn.request("GET", f"/kbs/v0/resource/{RESOURCE}", headers=cookie)
    if resource.status != 200:
        raise HttpError(f"/resource: HTTP {resource.status} {resource.body[:200]!r}")
    if key.decrypt(json.loads(resource.body)) != SECRET:
        raise HttpError("the decrypted resource differs from the uploaded one")


@dataclass
class Totals:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)


async def guest(host: str, port: int, form: str, *, start: float, stop: float, totals: Totals) -> None:
    attester = SampleAttester(form=form)  # type: ignore[arg-type]
    conn = Connection(host, port)
    try:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            try:
                await handshake(conn, attester)
            except (HttpError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if began >= start:
                    totals.errors += 1
                    if len(totals.first_errors) < 5:
                        totals.first_errors.append(f"{type(exc).__name__}: {exc}")
                await conn.close()
                continue
            if began >= start:  # handshakes started during warm-up are not counted
                totals.latencies.append(time.perf_counter() - began)
    finally:
        await conn.close()


async def run_load(host: str, port: int, clients: int, *, warmup: float, seconds: float, form: str,
                   on_start: Callable[[], None]) -> tuple[Totals, float]:
    totals = Totals()
    now = time.perf_counter()
    start = now + warmup
    stop = start + seconds
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + warmup, on_start)
    await asyncio.gather(*(guest(host, port, form, start=start, stop=stop, totals=totals)
                           for _ in range(clients)))
    # Handshakes that started before `stop` and finished after it are counted; divide by the time
    # until the last one ended.
    return totals, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Crypto-only reference


def crypto_only_rate(form: str, seconds: float) -> tuple[float, dict[str, float]]:
    """Handshakes/s of the cryptography alone (one core), and microseconds per part."""
    store = MemoryStore()
    signer = TokenSigner(store)
    verifier = TokenVerifier(signer.jwks())
    attester = SampleAttester(form="signed")
    parts: dict[str, float] = {"tee key generation": 0.0, "evidence sign + verify": 0.0,
                               "EAR token sign + verify": 0.0, "JWE encrypt + decrypt": 0.0}
    rounds = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        key = TeeKeyPair.generate()
        pubkey = key.public_jwk()
        t1 = time.perf_counter()
        digest = os.urandom(48)
        if form == "signed":
            evidence = attester.evidence(digest)
            verify_evidence("sample", json.dumps(evidence).encode(),
                            options=VerifyOptions(at=datetime.now(UTC),
                                                  expected_report_data=report_data_for("sample", digest)))
        t2 = time.perf_counter()
        iat = int(time.time())
        claims = {"iat": iat, "exp": iat + 300, "iss": "bench",
                  "submods": {"cpu0": {"ear.status": "affirming", "ear.veraison.annotated-evidence": {
                      "runtime_data_claims": {"nonce": base64.b64encode(os.urandom(32)).decode(),
                                              "tee-pubkey": pubkey}}}}}
        verifier.verify(signer.issue(claims), now=datetime.now(UTC))
        t3 = time.perf_counter()
        if key.decrypt(jwe.encrypt(SECRET, pubkey)) != SECRET:
            raise RuntimeError("JWE round trip failed")
        t4 = time.perf_counter()
        parts["tee key generation"] += t1 - t0
        parts["evidence sign + verify"] += t2 - t1
        parts["EAR token sign + verify"] += t3 - t2
        parts["JWE encrypt + decrypt"] += t4 - t3
        rounds += 1
    total = sum(parts.values())
    return rounds / total, {k: v / rounds * 1e6 for k, v in parts.items()}


# --------------------------------------------------------------------------------------------------
# Server


def process_tree_cpu(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return sum(times.get(pid, 0.0) for pid in tree)


def machine_busy_cpu() -> float:
    """CPU seconds all processes of the machine have used (user + system + steal, /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    host: str
    port: int
    log: Path


def start_server(workdir: Path, *, db: str | None, workers: int, extra: list[str]) -> tuple[Server, Any]:
    admin_key = generate_admin_key("ed25519")
    (workdir / "admin.pub").write_bytes(admin_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    key_fd = os.open(workdir / "master.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner only
    with os.fdopen(key_fd, "w") as key_file:
        key_file.write(os.urandom(32).hex())
    port = free_port()
    config = workdir / "kbs.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'db = "{db or "sqlite:///" + str(workdir / "state.db")}"\n'
        '[master_key]\nfile = "master.key"\n'
        '[sessions]\nmax_sessions = 100000\n'
        '[admin]\n[[admin.keys]]\nid = "bench"\npublic_key = "admin.pub"\n'
        '[[admin.acls]]\nrole = "admin"\nallowed_endpoints = "^/kbs/v0/.*$"\n')
    log = workdir / "server.log"
    entry = Path(sys.executable).with_name("coffer")
    launcher = [str(entry)] if entry.exists() else [
        sys.executable, "-c", "import sys; from coffer.cli import main; sys.exit(main(sys.argv[1:]))"]
    command = [*launcher, "kbs", "serve", "--config", str(config), "--log-level", "warning"]
    if workers != 1:
        command += ["--workers", str(workers)]
    command += extra
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", "127.0.0.1", port, log)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"coffer kbs serve exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError("coffer kbs serve did not become ready")
        time.sleep(0.1)
    return server, admin_key


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


async def provision(server: Server, admin_key: Any) -> None:
    token = mint_admin_token(admin_key, role="admin", ttl=timedelta(minutes=30))
    auth = {"Authorization": f"Bearer {token}"}
    conn = Connection(server.host, server.port)
    try:
        put = await conn.request("POST", f"/kbs/v0/resource/{RESOURCE}", body=SECRET,
                                 headers={**auth, "Content-Type": "application/octet-stream"})
        if put.status != 200:
            raise RuntimeError(f"resource upload: HTTP {put.status} {put.body!r}")
        policy = base64.urlsafe_b64encode(ALLOW_ALL_RESOURCE_POLICY.encode()).rstrip(b"=").decode()
        answer = await conn.request("POST", "/kbs/v0/resource-policy",
                                    body=json.dumps({"policy": policy}).encode(), headers=auth)
        if answer.status != 200:
            raise RuntimeError(f"resource policy: HTTP {answer.status} {answer.body!r}")
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=64, help="concurrent guests (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured duration (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured warm-up (default 2)")
    parser.add_argument("--workers", type=int, default=0,
                        help="server worker processes (default: the server's default)")
    parser.add_argument("--form", choices=("signed", "trustee"), default="signed",
                        help="sample evidence form: signed (ECDSA P-256, default) or Trustee's unsigned")
    parser.add_argument("--db", help="store URL instead of SQLite in a temporary directory")
    parser.add_argument("--crypto-seconds", type=float, default=2.0, help="crypto-only loop duration")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("server_args", nargs="*", help="extra arguments for coffer kbs serve (after --)")
    args = parser.parse_args(argv)

    crypto_rate, crypto_parts = crypto_only_rate(args.form, args.crypto_seconds)

    workdir = Path(tempfile.mkdtemp(prefix="coffer-kbs-load-"))
    server: Server | None = None
    try:
        server, admin_key = start_server(workdir, db=args.db, workers=args.workers or 1,
                                         extra=args.server_args)
        asyncio.run(provision(server, admin_key))
        marks: dict[str, float] = {}
        pid = server.process.pid

        def on_start() -> None:
            marks["server_cpu"] = process_tree_cpu(pid)
            marks["client_cpu"] = time.process_time()
            marks["machine_cpu"] = machine_busy_cpu()
            marks["wall"] = time.perf_counter()

        totals, elapsed = asyncio.run(run_load(server.host, server.port, args.clients, warmup=args.warmup,
                                               seconds=args.seconds, form=args.form, on_start=on_start))
        wall = time.perf_counter() - marks["wall"]
        server_cpu = process_tree_cpu(pid) - marks["server_cpu"]
        client_cpu = time.process_time() - marks["client_cpu"]
        other_cpu = max(0.0, machine_busy_cpu() - marks["machine_cpu"] - server_cpu - client_cpu)
    finally:
        if server is not None:
            stop_server(server)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    done = len(totals.latencies)
    rate = done / elapsed if elapsed > 0 else 0.0
    lat = sorted(totals.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"CPython {platform.python_version()}",
        "clients": args.clients, "workers": args.workers or 1, "form": args.form,
        "seconds": round(elapsed, 2), "handshakes": done, "handshakes_per_s": round(rate, 1),
        "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
        "errors": totals.errors, "first_errors": totals.first_errors,
        "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
        "other_processes_cpu_s": round(other_cpu, 2),
        "server_cpu_share": round(server_cpu / wall / (os.cpu_count() or 1), 3),
        "client_cpu_share": round(client_cpu / wall / (os.cpu_count() or 1), 3),
        "server_cpu_ms_per_handshake": round(server_cpu / done * 1000, 3) if done else None,
        "client_cpu_ms_per_handshake": round(client_cpu / done * 1000, 3) if done else None,
        "crypto_only_per_s": round(crypto_rate, 1),
        "crypto_only_us": {k: round(v, 1) for k, v in crypto_parts.items()},
        "ratio_to_crypto_only": round(rate / crypto_rate, 3),
        "targets_met": rate >= TARGET_RATE and pct(0.99) < TARGET_P99_MS and totals.errors == 0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"KBS load: {args.clients} clients, {result['workers']} worker(s), "
              f"{args.form} sample evidence, "
              f"{elapsed:.1f} s measured ({result['machine']})")
        print(f"  handshakes/s   {rate:8.1f}   (target >= {TARGET_RATE:.0f})")
        print(f"  latency p50    {pct(0.50):8.1f} ms")
        print(f"  latency p99    {pct(0.99):8.1f} ms   (target < {TARGET_P99_MS:.0f} ms)")
        print(f"  errors         {totals.errors:8d}   (target 0)")
        for line in totals.first_errors:
            print(f"    {line}")
        print(f"  CPU: server {server_cpu:.1f} s ({result['server_cpu_ms_per_handshake']} ms/handshake), "
              f"load client {client_cpu:.1f} s ({result['client_cpu_ms_per_handshake']} ms/handshake) "
              f"over {wall:.1f} s wall x {os.cpu_count()} CPUs; other processes {other_cpu:.1f} s")
        print(f"  crypto-only    {crypto_rate:8.1f} handshakes/s on one core: "
              + ", ".join(f"{k} {v:.0f} us" for k, v in crypto_parts.items()))
        print(f"  ratio          {rate / crypto_rate:8.3f}   (handshakes/s ÷ crypto-only handshakes/s)")
        print("  targets " + ("met" if result["targets_met"] else "NOT met"))
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
