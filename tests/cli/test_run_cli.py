"""``coffer run/ps/logs/exec/stop/rm/inspect`` against process sandboxes with a stand-in agent:
argument parsing, the generated policy allowing exactly the requests sent, outputs, denials."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coffer import cli
from coffer.cli import _run
from coffer.errors import UsageError
from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import Manifest
from coffer.policy.engine import PolicyEngine
from coffer.policy.initdata import parse_initdata_document
from coffer.sandbox.state import STATE_DIR_ENV, StateStore

STANDIN = Path(__file__).resolve().parents[1] / "sandbox" / "standin_agent.py"
IMAGE = "registry.example/coffer/app:1.0"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="process sandboxes need root and unshare (util-linux)")


_BUILD_PARSER = cli.build_parser


def _parser() -> argparse.ArgumentParser:
    parser = _BUILD_PARSER()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "run" not in groups.choices:
        _run.register(groups)
    return parser


@pytest.fixture
def coffer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    root = Path(tempfile.mkdtemp(prefix="cof-"))
    record = root / "requests.jsonl"
    monkeypatch.setenv(STATE_DIR_ENV, str(root))
    monkeypatch.setenv(_run.AGENT_COMMAND_ENV, f"{sys.executable} {STANDIN}")
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    monkeypatch.setattr(cli, "build_parser", _parser)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    run.root = root  # type: ignore[attr-defined]
    run.requests = lambda: [json.loads(line) for line in record.read_text().splitlines()]  # type: ignore[attr-defined]
    yield run
    for sandbox in StateStore(root).records():
        _run._backend().remove(sandbox, force=True)
    shutil.rmtree(root)


def _layout(root: Path) -> Path:
    layout = OciLayout.create(root)
    layer = b"\0" * 1024  # an empty tar archive
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/app"], "Cmd": ["--serve"],
                         "WorkingDir": "/srv", "User": "1000:1000"},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    config_desc = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    manifest = layout.write_manifest(Manifest(media_type=media.OCI_MANIFEST, config=config_desc,
                                              layers=(layout.write_bytes(layer, media.OCI_LAYER_TAR),)))
    layout.set_ref(manifest, IMAGE)
    return root


# --------------------------------------------------------------------------------------------------
# Parsing


def test_publish_and_env_parsing() -> None:
    ports = _run.parse_publish(["8080:80", "1:65535"])
    assert [(p.host, p.container) for p in ports] == [(8080, 80), (1, 65535)]
    parsed = _run.parse_env(["A=1", "B=x=y", "C", "D"], {"C": "from-env"})
    assert parsed == {"A": "1", "B": "x=y", "C": "from-env"}


@pytest.mark.parametrize("bad", ["80", "a:80", "0:80", "80:70000", "127.0.0.1:80:80", ":80"])
def test_malformed_publish_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="-p"):
        _run.parse_publish([bad])


@pytest.mark.parametrize("bad", ["=v", "1A=v", "A B=v"])
def test_malformed_env_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="not a variable name"):
        _run.parse_env([bad], {})


def test_run_without_image_is_a_usage_error(coffer: Any) -> None:
    code, _, err = coffer("run", "-d")
    assert code == 2
    assert "IMAGE" in err or "arguments" in err


# --------------------------------------------------------------------------------------------------
# Lifecycle


@needs_root
def test_run_ps_logs_inspect_stop_rm(coffer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layouts = _layout(tmp_path / "layout")
    code, out, err = coffer("run", "-d", "--name", "web", "--tee", "sample", "--image-layouts", str(layouts),
                            "-e", "GREETING=hi", IMAGE, "--port", "8080")
    assert code == 0, err
    sandbox_id = out.strip()
    assert len(sandbox_id) == 12
    assert "no memory confidentiality" in err

    # The generated policy allows exactly what was asked, and nothing the host did not ask for.
    directory = Path(coffer.root) / "sandboxes" / sandbox_id
    rego = parse_initdata_document((directory / "initdata.toml").read_bytes()).policy
    assert rego is not None
    engine = PolicyEngine(rego)
    requests = {r["method"]: r["params"] for r in coffer.requests()}
    assert engine.decide("CreateSandboxRequest", requests["CreateSandboxRequest"]).allowed
    create = requests["CreateContainerRequest"]
    assert create["OCI"]["Process"]["Args"] == ["/bin/app", "--port", "8080"]  # CMD replaced, Entrypoint kept
    assert "GREETING=hi" in create["OCI"]["Process"]["Env"]
    assert create["OCI"]["Process"]["User"]["UID"] == 1000
    assert create["OCI"]["Process"]["Cwd"] == "/srv"
    assert "@sha256:" in create["image"]
    decision = engine.decide("CreateContainerRequest", create)
    assert decision.allowed, decision.explanation()
    exec_params = {"container_id": create["container_id"], "exec_id": "e", "process": {
        "Args": ["/bin/sh"], "Env": create["OCI"]["Process"]["Env"], "Cwd": "/srv",
        "User": create["OCI"]["Process"]["User"], "Terminal": False, "Capabilities": None}}
    assert not engine.decide("ExecProcessRequest", exec_params).allowed  # exec denied by default

    code, out, _ = coffer("ps")
    assert code == 0
    assert "web" in out
    assert "running" in out
    assert "sample (dev)" in out
    assert "no memory confidentiality" in out
    code, out, _ = coffer("ps", "--json")
    rows = json.loads(out)
    assert rows[0]["name"] == "web"
    assert rows[0]["development"] is True
    assert rows[0]["status"] == "running"

    code, out, _ = coffer("logs", "web")
    assert code == 0
    assert "hello from the container" in out

    code, out, _ = coffer("inspect", "--json", "web")
    assert code == 0
    data = json.loads(out)
    assert data["guest"]["tee"] == "sample"
    assert data["guest"]["initdata_digest"] == data["initdata_digest"]
    assert data["notice"] == "development sandbox: no memory confidentiality"
    assert data["host"]["backend"] == "process"

    code, out, _ = coffer("rm", "web")
    assert code == 2  # running: needs -f or stop first
    code, out, _ = coffer("stop", "web")
    assert code == 0
    assert out.strip() == "web"
    assert any(r["method"] == "DestroySandboxRequest" for r in coffer.requests())
    code, out, _ = coffer("ps")
    assert "web" not in out
    code, out, _ = coffer("ps", "-a")
    assert "exited" in out
    code, out, _ = coffer("rm", "web")
    assert code == 0
    assert not directory.exists()


@needs_root
def test_exec_blocked_by_policy_exits_1(coffer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_DENY", "ExecProcessRequest")
    layouts = _layout(tmp_path / "layout")
    code, _, err = coffer("run", "-d", "--name", "app", "--tee", "sample", "--image-layouts", str(layouts),
                          IMAGE)
    assert code == 0, err
    code, _, err = coffer("exec", "app", "/bin/sh", "-c", "cat /secret")
    assert code == 1
    assert "blocked by policy: " in err


@needs_root
def test_denied_create_container_leaves_no_sandbox(coffer: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_DENY", "CreateContainerRequest")
    layouts = _layout(tmp_path / "layout")
    code, _, err = coffer("run", "-d", "--name", "nope", "--tee", "sample", "--image-layouts", str(layouts),
                          IMAGE)
    assert code == 1
    assert "CreateContainerRequest is blocked by policy: " in err
    assert StateStore(coffer.root).records() == []


@needs_root
def test_foreground_run_streams_logs_and_returns_the_status(coffer: Any, tmp_path: Path) -> None:
    layouts = _layout(tmp_path / "layout")
    code, out, err = coffer("run", "--rm", "--name", "fg", "--tee", "sample", "--image-layouts", str(layouts),
                            IMAGE)
    assert code == 0, err
    assert "hello from the container" in out
    assert StateStore(coffer.root).records() == []


@needs_root
def test_run_with_a_policy_file_uses_its_container(coffer: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nname: pinned\ncontainers:\n"
        f"  - name: app\n    image: registry.example/coffer/app@sha256:{'a' * 64}\n"
        "    args: [/bin/app]\n    env: [PATH=/bin]\n")
    code, out, err = coffer("run", "-d", "--tee", "sample", "--policy", str(policy),
                            f"registry.example/coffer/app@sha256:{'a' * 64}")
    assert code == 0, err
    requests = {r["method"]: r["params"] for r in coffer.requests()}
    assert requests["CreateSandboxRequest"]["name"] == "pinned"
    assert requests["CreateContainerRequest"]["name"] == "app"
    assert requests["CreateContainerRequest"]["OCI"]["Process"]["Args"] == ["/bin/app"]
    code, out, _ = coffer("ps", "--json")
    assert json.loads(out)[0]["name"] == "pinned"


def test_unknown_sandbox_is_a_usage_error(coffer: Any) -> None:
    code, _, err = coffer("logs", "ghost")
    assert code == 2
    assert "no sandbox named 'ghost'" in err
