"""coffer.guest.agent: the policy gate in front of the runtime (a real PolicyEngine, a fake runtime),
error mapping, GuestDetails, the initdata startup checks (sample file, swtpm PCR 8) and the command."""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coffer.attestation.binding import pcr8_for_initdata
from coffer.errors import FormatError, TransportError, UsageError, VerificationError
from coffer.guest import protocol
from coffer.guest.agent import Agent, main, startup_checks, workload_policy_from_rego
from coffer.guest.measure import Measurer, SampleRegister
from coffer.guest.protocol import AgentClient
from coffer.guest.runtime import ContainerRuntime, NotFoundError
from coffer.policy import requests as rq
from coffer.policy.engine import PolicyEngine, compile_policy, split_policy
from coffer.policy.initdata import build_initdata, digests
from coffer.policy.model import (
    AttestationRequirement,
    ContainerPolicy,
    EnvRule,
    HostAccess,
    User,
    WorkloadPolicy,
)
from coffer.sandbox.swtpm import Swtpm
from tests.guest.conftest import requires_swtpm

IMAGE = "registry.example/app@sha256:" + "a" * 64
APP = ContainerPolicy(
    name="app", image=IMAGE, args=("/bin/app", "--serve"),
    env=(EnvRule(name="PATH", value="/usr/bin:/bin"), EnvRule(name="TOKEN", pattern="[a-z]+")),
    user=User(uid=1000, gid=1000), capabilities=(), no_new_privileges=True,
    allow=HostAccess(exec=(("echo", "hi"),), logs=False, stdin=False),
)
LOGS = ContainerPolicy(name="logs", image=IMAGE, args=("/bin/app",),
                       env=(EnvRule(name="PATH", value="/bin"),), allow=HostAccess(logs=True, stdin=True))
POLICY = WorkloadPolicy(name="demo", containers=(APP, LOGS))
DEBUG_POLICY = WorkloadPolicy(name="demo", containers=(APP, LOGS), debug=True)
APP_SPEC = rq.ContainerSpec(
    name="app", image=IMAGE, args=APP.args,
    env=(EnvRule(name="PATH", value="/usr/bin:/bin"), EnvRule(name="TOKEN", value="sekrit")),
    user=User(uid=1000, gid=1000), capabilities=(), no_new_privileges=True)
LOGS_SPEC = rq.ContainerSpec(
    name="logs", image=IMAGE, args=LOGS.args, env=(EnvRule(name="PATH", value="/bin"),),
    capabilities=(), no_new_privileges=True)


def initdata_for(policy: WorkloadPolicy = POLICY) -> bytes:
    return build_initdata(compile_policy(policy))


def create_params(container_id: str = "c1", spec: rq.ContainerSpec = APP_SPEC) -> dict[str, Any]:
    return rq.container_request(container_id=container_id, name=spec.name, image=spec.image, spec=spec)


class FakeRuntime(ContainerRuntime):
    """Records calls; ``fail`` maps a method name to an exception to raise, ``results`` to a result."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, BaseException] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.wait_seconds = 0.0

    def _do(self, name: str, params: Mapping[str, Any] | None, default: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((name, dict(params or {})))
        if name in self.fail:
            raise self.fail[name]
        return self.results.get(name, default)

    def create_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("create_container", params, {"container_id": params.get("container_id")})

    def start_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("start_container", params, {"pid": 42})

    def exec_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("exec_process", params, {"exec_id": params.get("exec_id")})

    def read_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("read_stream", params, {"data": base64.b64encode(b"hello").decode(), "eof": False})

    def write_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("write_stream", params, {"len": 0})

    def close_stdin(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("close_stdin", params, {})

    def wait_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if self.wait_seconds:
            time.sleep(self.wait_seconds)
        return self._do("wait_process", params, {"exited": True, "status": 0})

    def signal_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("signal_process", params, {})

    def remove_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._do("remove_container", params, {})

    def list_containers(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._do("list_containers", params, {"containers": []})

    def destroy(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._do("destroy", params, {})


def make_agent(policy: WorkloadPolicy = POLICY, runtime: FakeRuntime | None = None,
               tee: str = "sample") -> tuple[Agent, FakeRuntime, Measurer]:
    raw = initdata_for(policy)
    runtime = runtime or FakeRuntime()
    measurer = Measurer(SampleRegister())
    measurer.record("InitData", {"algorithm": "sha256", "digest": digests(raw).digest.hex()})
    engine = PolicyEngine(compile_policy(policy))
    return Agent(raw, engine, runtime, measurer, tee, claims=lambda: {"tee": tee}), runtime, measurer


class Request:
    """Builds numbered request objects."""

    def __init__(self) -> None:
        self.next_id = 0

    def __call__(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        return {"id": self.next_id, "method": method, "params": dict(params or {})}


@pytest.fixture
def req() -> Request:
    return Request()


def error_of(response: Mapping[str, Any]) -> tuple[str, str]:
    assert response["ok"] is False, response
    return response["error"]["code"], response["error"]["message"]


# --------------------------------------------------------------------------------------------------
# The policy gate


def test_allowed_create_reaches_the_runtime_with_the_params_unchanged(req: Request) -> None:
    agent, runtime, _ = make_agent()
    params = create_params()
    response = agent.handle(req("CreateContainerRequest", params))
    assert response == {"id": 1, "ok": True, "result": {"container_id": "c1"}}
    assert runtime.calls == [("create_container", params)]


def test_create_with_changed_args_is_blocked_and_never_reaches_the_runtime(req: Request) -> None:
    agent, runtime, _ = make_agent()
    params = create_params()
    params["OCI"]["Process"]["Args"] = ["/bin/sh", "-c", "cat /secrets"]
    code, message = error_of(agent.handle(req("CreateContainerRequest", params)))
    assert code == protocol.PERMISSION_DENIED
    assert message.startswith("CreateContainerRequest is blocked by policy: ")
    assert "args" in message
    assert runtime.calls == []


def test_exec_not_in_the_policy_is_blocked_and_an_allowed_one_passes(req: Request) -> None:
    agent, runtime, _ = make_agent()
    assert agent.handle(req("CreateContainerRequest", create_params()))["ok"]
    bad = rq.exec_request(container_id="c1", args=["/bin/sh"], spec=APP_SPEC)
    code, message = error_of(agent.handle(req("ExecProcessRequest", bad)))
    assert code == protocol.PERMISSION_DENIED
    assert message.startswith("ExecProcessRequest is blocked by policy: ")
    good = rq.exec_request(container_id="c1", args=["echo", "hi"], spec=APP_SPEC)
    assert agent.handle(req("ExecProcessRequest", good))["ok"]
    assert [c[0] for c in runtime.calls] == ["create_container", "exec_process"]


def test_denied_read_stream_returns_no_data_and_names_the_refusal(req: Request) -> None:
    agent, runtime, _ = make_agent()
    agent.handle(req("CreateContainerRequest", create_params()))
    params = {**rq.read_stream_request(container_id="c1"), "max_bytes": 1024}
    response = agent.handle(req("ReadStreamRequest", params))
    assert response["ok"] is True
    assert response["result"]["data"] == ""
    assert response["result"]["eof"] is True
    assert "ReadStreamRequest is blocked by policy" in response["result"]["blocked"]
    assert [c[0] for c in runtime.calls] == ["create_container"]


def test_allowed_read_stream_passes_max_bytes_through(req: Request) -> None:
    agent, runtime, _ = make_agent()
    agent.handle(req("CreateContainerRequest", create_params("c2", LOGS_SPEC)))
    params = {**rq.read_stream_request(container_id="c2"), "max_bytes": 7}
    response = agent.handle(req("ReadStreamRequest", params))
    assert response["result"] == {"data": base64.b64encode(b"hello").decode(), "eof": False}
    assert runtime.calls[-1] == ("read_stream", params)


def test_set_policy_is_always_refused(req: Request) -> None:
    agent, runtime, _ = make_agent()
    code, message = error_of(agent.handle(req("SetPolicyRequest", {"policy": "package agent_policy"})))
    assert code == protocol.PERMISSION_DENIED
    assert "fixed at launch" in message
    assert runtime.calls == []


def test_sandbox_lifecycle_and_always_allowed_calls(req: Request) -> None:
    agent, runtime, _ = make_agent()
    assert agent.handle(req("CreateSandboxRequest", rq.sandbox_request(name="demo")))["ok"]
    code, _ = error_of(agent.handle(req("CreateSandboxRequest", rq.sandbox_request(name="other"))))
    assert code == protocol.PERMISSION_DENIED
    assert agent.handle(req("ListContainersRequest"))["result"] == {"containers": []}
    assert agent.handle(req("DestroySandboxRequest"))["ok"]
    assert [c[0] for c in runtime.calls] == ["list_containers", "destroy"]


def test_known_but_unimplemented_method_is_a_failed_precondition(req: Request) -> None:
    agent, _, _ = make_agent()
    code, message = error_of(agent.handle(req("TtyWinResizeRequest", {"container_id": "c1"})))
    assert code == protocol.FAILED_PRECONDITION
    assert "not supported" in message


@pytest.mark.parametrize(
    ("request_obj", "expected_id"),
    [
        ({"id": 1, "method": "NoSuchRequest", "params": {}}, 1),
        ({"id": 2, "method": 5, "params": {}}, 2),
        ({"id": 3, "method": "ListContainersRequest", "params": []}, 3),
        ({"id": 4, "method": "ListContainersRequest", "params": {}, "extra": 1}, 4),
        ({"id": "5", "method": "ListContainersRequest", "params": {}}, None),
        ({"id": True, "method": "ListContainersRequest", "params": {}}, None),
        ({"id": -1, "method": "ListContainersRequest"}, None),
        ({}, None),
    ],
)
def test_malformed_request_is_invalid_argument(request_obj: dict[str, Any], expected_id: int | None) -> None:
    agent, runtime, _ = make_agent()
    response = agent.handle(request_obj)
    assert response["id"] == expected_id
    assert error_of(response)[0] == protocol.INVALID_ARGUMENT
    assert runtime.calls == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFoundError("no container c1"), protocol.NOT_FOUND),
        (UsageError("signal must be a number"), protocol.INVALID_ARGUMENT),
        (TransportError("registry unreachable"), protocol.UNAVAILABLE),
        (VerificationError("image", 3, "signature", "no valid signature"), protocol.FAILED_PRECONDITION),
        (FormatError("layer", "digest mismatch"), protocol.FAILED_PRECONDITION),
    ],
)
def test_runtime_errors_map_to_wire_codes(req: Request, exc: Exception, code: str) -> None:
    runtime = FakeRuntime()
    runtime.fail["signal_process"] = exc
    agent, _, _ = make_agent(runtime=runtime)
    params = {"container_id": "c1", "signal": 9}
    got_code, message = error_of(agent.handle(req("SignalProcessRequest", params)))
    assert got_code == code
    assert message == str(exc)


def test_foreign_exception_is_internal_without_its_message(req: Request) -> None:
    runtime = FakeRuntime()
    runtime.fail["start_container"] = RuntimeError("password=hunter2")
    agent, _, _ = make_agent(runtime=runtime)
    code, message = error_of(agent.handle(req("StartContainerRequest", {"container_id": "c1"})))
    assert code == protocol.INTERNAL
    assert "hunter2" not in message
    assert "RuntimeError" in message


def test_failed_create_leaves_no_policy_state_behind(req: Request) -> None:
    runtime = FakeRuntime()
    runtime.fail["create_container"] = FormatError("layer", "tampered")
    agent, _, _ = make_agent(runtime=runtime)
    assert error_of(agent.handle(req("CreateContainerRequest", create_params())))[0] == \
        protocol.FAILED_PRECONDITION
    exec_params = rq.exec_request(container_id="c1", args=["echo", "hi"], spec=APP_SPEC)
    code, message = error_of(agent.handle(req("ExecProcessRequest", exec_params)))
    assert code == protocol.PERMISSION_DENIED
    assert "not created" in message
    assert runtime.calls == [("create_container", create_params())]


def test_engine_on_the_wrong_thread_fails_closed(req: Request) -> None:
    agent, runtime, _ = make_agent()
    responses: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: responses.append(
        agent.handle(req("CreateContainerRequest", create_params()))))
    thread.start()
    thread.join()
    assert error_of(responses[0])[0] == protocol.PERMISSION_DENIED
    assert runtime.calls == []


def test_guest_details_reports_tee_initdata_debug_log_and_register(req: Request) -> None:
    agent, _, measurer = make_agent(DEBUG_POLICY)
    result = agent.handle(req("GuestDetailsRequest"))["result"]
    raw = initdata_for(DEBUG_POLICY)
    assert result["tee"] == "sample"
    assert result["initdata_digest"] == digests(raw).digest.hex()
    assert result["policy_debug"] is True
    assert [e["operation"] for e in result["event_log"]] == ["InitData"]
    assert result["register"] == {"kind": "sample", "index": 0, "value": measurer.register.read().hex()}
    assert result["claims"] == {"tee": "sample"}


def test_debug_policy_logs_decisions_without_env_values(
        req: Request, caplog: pytest.LogCaptureFixture) -> None:
    agent, _, _ = make_agent(DEBUG_POLICY)
    with caplog.at_level(logging.INFO, logger="coffer.policy.decisions"):
        agent.handle(req("CreateContainerRequest", create_params()))
    lines = [r.getMessage() for r in caplog.records if r.name == "coffer.policy.decisions"]
    assert lines
    assert "CreateContainerRequest" in lines[0]
    assert "sekrit" not in "".join(lines)


# --------------------------------------------------------------------------------------------------
# The policy document inside policy.rego


def test_workload_policy_round_trips_through_policy_rego() -> None:
    assert workload_policy_from_rego(compile_policy(POLICY)) == POLICY


def test_policy_rego_with_altered_data_is_refused() -> None:
    rules, data = split_policy(compile_policy(POLICY))
    data["containers"][0]["image_regex"] = ".*"
    import json

    text = f"{rules}\npolicy_data := {json.dumps(data)}\n"
    with pytest.raises(FormatError):
        workload_policy_from_rego(text)


# --------------------------------------------------------------------------------------------------
# Startup checks


def write_measurement(tmp_path: Path, text: str) -> Path:
    storage = tmp_path / "storage"
    storage.mkdir()
    (tmp_path / "launch-measurement").write_text(text)
    return storage


def test_sample_launch_measurement_matching_initdata_passes(tmp_path: Path) -> None:
    raw = initdata_for()
    storage = write_measurement(tmp_path, digests(raw).digest.hex() + "\n")
    verified = startup_checks(raw, "sample", storage=storage)
    assert verified.policy == compile_policy(POLICY)


def test_initdata_changed_after_launch_is_refused_at_step_4(tmp_path: Path) -> None:
    storage = write_measurement(tmp_path, digests(initdata_for()).digest.hex())
    with pytest.raises(VerificationError) as info:
        startup_checks(initdata_for(DEBUG_POLICY), "sample", storage=storage)
    assert info.value.step == 4


@pytest.mark.parametrize("text", ["", "zz", "abc", "00" * 600])
def test_garbled_sample_measurement_is_refused_at_step_3(tmp_path: Path, text: str) -> None:
    storage = write_measurement(tmp_path, text)
    with pytest.raises(VerificationError) as info:
        startup_checks(initdata_for(), "sample", storage=storage)
    assert info.value.step == 3


def test_missing_sample_measurement_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VerificationError) as info:
        startup_checks(initdata_for(), "sample", storage=tmp_path / "storage")
    assert info.value.step == 3


def test_garbage_initdata_is_refused_at_step_1(tmp_path: Path) -> None:
    with pytest.raises(VerificationError) as info:
        startup_checks(b"\xff not toml [[[", "sample", storage=tmp_path)
    assert info.value.step == 1


def test_initdata_without_policy_is_refused_at_step_2(tmp_path: Path) -> None:
    raw = b'version = "0.1.0"\nalgorithm = "sha256"\n\n[data]\n'
    with pytest.raises(VerificationError) as info:
        startup_checks(raw, "sample", storage=tmp_path)
    assert info.value.step == 2


def test_tpm_check_compares_pcr8_with_the_initdata_digest(tmp_path: Path) -> None:
    raw = initdata_for()
    good = pcr8_for_initdata(digests(raw).digest)
    startup_checks(raw, "tpm", storage=tmp_path, tcti="x", pcr8_reader=lambda tcti: good)
    with pytest.raises(VerificationError) as info:
        startup_checks(raw, "tpm", storage=tmp_path, pcr8_reader=lambda tcti: b"\0" * 32)
    assert info.value.step == 4


def _tpm2(tcti: str, *args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, env={**os.environ, "TPM2TOOLS_TCTI": tcti})


@requires_swtpm
def test_swtpm_pcr8_extended_with_the_initdata_digest_passes_and_another_is_refused(
        software_tpm: Swtpm, tmp_path: Path) -> None:
    raw = initdata_for()
    _tpm2(software_tpm.tcti, "tpm2_pcrextend", f"8:sha256={digests(raw).digest.hex()}")
    verified = startup_checks(raw, "tpm", storage=tmp_path, tcti=software_tpm.tcti)
    assert verified.digests.digest == digests(raw).digest
    with pytest.raises(VerificationError) as info:
        startup_checks(initdata_for(DEBUG_POLICY), "tpm", storage=tmp_path, tcti=software_tpm.tcti)
    assert info.value.step == 4


# --------------------------------------------------------------------------------------------------
# The command


def test_main_refuses_a_mismatched_initdata_and_never_opens_the_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = write_measurement(tmp_path, "00" * 32)
    (tmp_path / "initdata.toml").write_bytes(initdata_for())
    sock = tmp_path / "agent.sock"
    code = main(["--socket", str(sock), "--initdata", str(tmp_path / "initdata.toml"),
                 "--storage", str(storage), "--tee", "sample"])
    assert code == 1
    assert "refusing to start" in capsys.readouterr().err
    assert not sock.exists()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="coffer-ag-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_agent_command_serves_guest_details_and_stops_on_sigterm(short_dir: Path) -> None:
    raw = initdata_for()
    storage = write_measurement(short_dir, digests(raw).digest.hex())
    (short_dir / "initdata.toml").write_bytes(raw)
    sock = short_dir / "agent.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "coffer.guest.agent", "--socket", str(sock), "--initdata",
         str(short_dir / "initdata.toml"), "--storage", str(storage), "--tee", "sample"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sock.exists() or process.poll() is not None)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        with AgentClient(sock, timeout=10) as client:
            details = client.call("GuestDetailsRequest")
            assert details["initdata_digest"] == digests(raw).digest.hex()
            assert [e["operation"] for e in details["event_log"]] == ["InitData"]
            assert details["register"]["kind"] == "sample"
            with pytest.raises(protocol.BlockedByPolicyError) as info:
                client.call("SetPolicyRequest", {"policy": ""})
            assert "fixed at launch" in info.value.explanation
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not sock.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------------------------------
# The KBS is the workload owner's, named in the measured initdata


def test_the_kbs_comes_from_the_measured_initdata() -> None:
    from coffer.guest.agent import trusted_kbs
    from coffer.policy.initdata import aa_toml_for_kbs, build_initdata

    named = build_initdata("package agent_policy\n", aa_toml=aa_toml_for_kbs("http://127.0.0.1:8080"))
    assert trusted_kbs(named, None) == "http://127.0.0.1:8080"
    assert trusted_kbs(named, "http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(UsageError, match="not the workload's KBS"):
        trusted_kbs(named, "http://host-run-kbs.example")
    unnamed = build_initdata("package agent_policy\n")
    assert trusted_kbs(unnamed, None) is None
    with pytest.raises(UsageError, match="names no KBS"):
        trusted_kbs(unnamed, "http://127.0.0.1:8080")


def test_cdh_kbc_url_is_read_too_and_a_bad_url_is_a_format_error() -> None:
    from coffer.policy.initdata import build_initdata, kbs_url, parse_initdata_document

    doc = build_initdata("p", cdh_toml='[kbc]\nname = "cc_kbc"\nurl = "https://kbs.example"\n')
    assert kbs_url(parse_initdata_document(doc)) == "https://kbs.example"
    bad = build_initdata("p", aa_toml='[token_configs.kbs]\nurl = "file:///etc/passwd"\n')
    with pytest.raises(FormatError, match="http"):
        kbs_url(parse_initdata_document(bad))


def test_sandbox_on_a_tee_the_policy_does_not_name_is_refused_at_step_5(tmp_path: Path) -> None:
    tpm_only = replace(POLICY, attestation=AttestationRequirement(tee=("tpm",)))
    raw = initdata_for(tpm_only)
    storage = write_measurement(tmp_path, digests(raw).digest.hex())
    with pytest.raises(VerificationError) as info:
        startup_checks(raw, "sample", storage=storage)
    assert info.value.step == 5
    good = pcr8_for_initdata(digests(raw).digest)
    assert startup_checks(raw, "tpm", storage=storage, pcr8_reader=lambda tcti: good).policy
    both = replace(POLICY, attestation=AttestationRequirement(tee=("tpm", "sample")))
    raw = initdata_for(both)
    (tmp_path / "launch-measurement").write_text(digests(raw).digest.hex())
    assert startup_checks(raw, "sample", storage=storage).policy
