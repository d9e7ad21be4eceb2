"""Real ``coffer kbs serve`` processes on 127.0.0.1 for the end-to-end tests, and the ``coffer`` CLI
run as a subprocess.

Every server is a child process with its log in a file of the test's temporary directory; the
``kbs_processes`` fixture (tests/e2e/conftest.py) stops whatever a test started, also when it fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coffer._internal.net import free_port
from coffer.attestation.binding import report_data_for, runtime_data_digest, runtime_data_preimage
from coffer.kbs.jwe import TeeKeyPair

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ERROR_PREFIX = "https://github.com/confidential-containers/kbs/errors/"

# Opens releases to the sample TEE (the default policy refuses it), except under the "forbidden"
# repository, so that a policy denial can be shown too.
SAMPLE_RESOURCE_POLICY = """\
package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	input.submods.cpu0["ear.veraison.annotated-evidence"].sample
	data["resource-path"][0] != "forbidden"
}
"""

# Environment variables of the operator's shell that must not leak into the tests' processes.
_SCRUBBED = ("COFFER_KBS_MASTER_KEY", "COFFER_KBS_ADMIN_TOKEN", "COFFER_KBS_URL", "TPM2TOOLS_TCTI")


def coffer_command() -> list[str]:
    """The ``coffer`` entry point installed next to this interpreter (else ``python -m coffer.cli``)."""
    script = Path(sys.executable).parent / "coffer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "coffer.cli"]


def child_env(extra: Mapping[str, str] | None = None, *, state_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    if state_dir is not None:
        env["COFFER_KBS_STATE_DIR"] = str(state_dir)
    env.update(extra or {})
    return env


def run_coffer(*args: str, check: bool = True, env: Mapping[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``coffer ARGS`` and return its outcome (stdout/stderr as text)."""
    done = subprocess.run([*coffer_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else child_env(), check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"coffer {' '.join(args)} exited {done.returncode}\n"
                             f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")
    return done


def run_json(*args: str, env: Mapping[str, str] | None = None) -> Any:
    return json.loads(run_coffer(*args, env=env).stdout)


@dataclass
class AdminKey:
    """An admin key pair made with ``coffer kbs admin keygen`` and tokens minted with
    ``coffer kbs admin token``."""

    private: Path
    public: Path
    _tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, name: str = "ops") -> AdminKey:
        directory.mkdir(parents=True, exist_ok=True)
        made = run_json("kbs", "admin", "keygen", "--out-dir", str(directory), "--name", name, "--json")
        return cls(private=Path(made["private_key"]), public=Path(made["public_key"]))

    def token(self, role: str = "admin") -> str:
        if role not in self._tokens:
            self._tokens[role] = run_coffer("kbs", "admin", "token", "--key", str(self.private),
                                            "--role", role, "--ttl", "1h").stdout.strip()
        return self._tokens[role]

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}


def write_config(path: Path, *, db: str, master_key: Path, admin: AdminKey | None = None,
                 listen: str | None = None, session_timeout: int | None = None,
                 max_sessions: int | None = None, resource_policy: str | None = None) -> Path:
    lines = [f'db = "{db}"', f'state_dir = "{path.parent / "state"}"']
    if listen is not None:
        lines.append(f'listen = "{listen}"')
    lines += ["[master_key]", f'file = "{master_key}"']
    if session_timeout is not None or max_sessions is not None:
        lines.append("[sessions]")
        if session_timeout is not None:
            lines.append(f"timeout_seconds = {session_timeout}")
        if max_sessions is not None:
            lines.append(f"max_sessions = {max_sessions}")
    if resource_policy is not None:
        policy_file = path.with_suffix(".rego")
        policy_file.write_text(resource_policy)
        lines += ["[policy]", f'resource = "{policy_file}"']
    if admin is not None:
        lines += ["[admin]", "[[admin.keys]]", 'id = "ops"', f'public_key = "{admin.public}"']
    path.write_text("\n".join(lines) + "\n")
    return path


class KbsProcess:
    """One ``coffer kbs serve`` child process on 127.0.0.1:``port``."""

    def __init__(self, config: Path, *, port: int | None = None, db: str | None = None,
                 log: Path | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.db = db
        self.log = log or config.with_name(f"{config.stem}-{self.port}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KbsProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        argv = [*coffer_command(), "kbs", "serve", "--config", str(self.config),
                "--listen", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        if self.db is not None:
            argv += ["--db", self.db]
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=child_env(state_dir=self.config.parent / "state"))
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> KbsProcess:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"kbs serve exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"kbs serve not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL, no chance to clean up (then reap the child)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, size: int = 3000) -> str:
        return self.log_text()[-size:]


# ------------------------------------------------------------------------------------------------
# The RCAR handshake by hand (httpx), for the tests that look at the wire


def auth_body(tee: str = "sample", version: str = "0.4.0") -> dict[str, Any]:
    return {"version": version, "tee": tee,
            "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]}}


def sample_attestation(nonce: str, key: TeeKeyPair, *, bound_nonce: str | None = None,
                       bound_key: TeeKeyPair | None = None) -> dict[str, Any]:
    """An /attest body with Trustee-form sample evidence. The evidence binds ``bound_nonce`` and
    ``bound_key`` (default: the nonce and key the body names), so a mismatch can be forged."""
    pubkey = key.public_jwk()
    bound = (bound_key or key).public_jwk()
    digest = runtime_data_digest(runtime_data_preimage(bound_nonce or nonce, bound, ""))
    report_data = report_data_for("sample", digest)
    return {
        "init-data": None,
        "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
        "tee-evidence": {"primary_evidence": {"svn": "1",
                                              "report_data": base64.b64encode(report_data).decode()},
                         "additional_evidence": ""},
    }


def session_cookie(response: httpx.Response) -> str:
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == "kbs-session-id":
            return rest.split(";", 1)[0]
    raise AssertionError(f"no kbs-session-id cookie in {response.headers}")


def cookie_header(session_id: str) -> dict[str, str]:
    return {"Cookie": f"kbs-session-id={session_id}"}


def assert_error(response: httpx.Response, status: int, kind: str) -> str:
    """The answer is Trustee's ErrorInformation of ``kind`` with ``status``; returns the detail."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"type", "detail"}, body
    assert body["type"] == ERROR_PREFIX + kind, body
    assert isinstance(body["detail"], str)
    return str(body["detail"])


def put_resource(url: str, admin: AdminKey, path: str, data: bytes) -> None:
    answer = httpx.post(f"{url}/kbs/v0/resource/{path}", content=data, headers=admin.headers(), timeout=10)
    assert answer.status_code == 200, answer.text


def set_resource_policy(url: str, admin: AdminKey, text: str) -> None:
    encoded = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()
    answer = httpx.post(f"{url}/kbs/v0/resource-policy", json={"policy": encoded}, headers=admin.headers(),
                        timeout=10)
    assert answer.status_code == 200, answer.text


def admin_get(url: str, admin: AdminKey, path: str, *, role: str = "admin") -> Any:
    answer = httpx.get(f"{url}{path}", headers=admin.headers(role), timeout=10)
    assert answer.status_code == 200, (path, answer.status_code, answer.text)
    return answer.json() if answer.headers.get("content-type", "").startswith("application/json") \
        else answer.content


def state_snapshot(url: str, admin: AdminKey) -> dict[str, Any]:
    """Resources (paths and plaintext digests), resource policy and reference values as one server sees
    them, for comparing replicas and before/after a crash."""
    with httpx.Client(base_url=url, headers=admin.headers(), timeout=10) as http:
        def get(path: str) -> httpx.Response:
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
            return answer

        paths = sorted(get("/kbs/v0/resources").json()["resources"])
        contents = {p: hashlib.sha256(get(f"/kbs/v0/resources/{p}").content).hexdigest() for p in paths}
        return {"resources": contents, "resource_policy": get("/kbs/v0/resource-policy").json(),
                "reference_values": get("/kbs/v0/reference-value").json()}


def flip_char(segment: str, index: int) -> str:
    """A base64url segment with the character at ``index`` changed (to another alphabet character)."""
    replacement = "A" if segment[index] != "A" else "B"
    return segment[:index] + replacement + segment[index + 1:]


def tamper_payload(token: str, change: dict[str, Any]) -> str:
    """The token with its payload replaced (claims updated by ``change``) and the signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(change)
    forged = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=")
    return f"{header}.{forged.decode()}.{signature}"


def audit_events(url: str, admin: AdminKey, **query: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/kbs/v0/audit", params=query, headers=admin.headers(), timeout=10)
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def stop_all(processes: Sequence[KbsProcess]) -> None:
    for process in processes:
        process.stop()
