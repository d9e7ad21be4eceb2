"""``coffer quickstart`` as a user runs it: every step passes, the report says what was shown, nothing
is left behind; and the demo's helpers refuse bad input with typed errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from coffer.cli import _quickstart
from coffer.cli._output import Output
from coffer.errors import CofferError, UnsupportedError, UsageError
from coffer.image.layout import OciLayout
from coffer.quickstart.demo import format_report, preflight, tamper_layer
from coffer.sandbox.process import mounts_under


def _preflight_reason() -> str | None:
    try:
        preflight()
    except UnsupportedError as exc:
        return str(exc)
    return None


_SKIP = _preflight_reason()
needs_root = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@needs_root
def test_quickstart_command_shows_everything_and_leaves_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    _quickstart.register(parser.add_subparsers())
    args = parser.parse_args(["quickstart", "--work-dir", str(tmp_path / "work"), "--json"])
    code = args.handler(args, Output(json_mode=True))
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    if report["error"] and "cannot build" in report["error"]:
        pytest.skip(f"sample images unavailable: {report['error']}")
    assert code == 0, captured.err
    assert report["ok"] is True
    assert [s["step"] for s in report["steps"]] == list(range(1, 12))
    assert all(s["ok"] for s in report["steps"])
    assert report["seconds"] < 180
    assert set(report["apps"]) == {"nginx", "redis", "memcached", "python"}
    assert all(app["check"] for app in report["apps"].values())
    assert "blocked by policy" in report["refusals"]["exec"]
    assert "digest" in report["refusals"]["tampered_image"]
    assert "PCR 8" in report["refusals"]["changed_policy"]
    assert report["claims"]["ear_status"] == "affirming"
    assert report["claims"]["ak_trusted"] is True
    operations = [e["operation"] for e in report["claims"]["event_log"]]
    assert operations == ["InitData", "PullImage", "CreateContainer"]
    assert report["development"] is True
    # Progress went to stderr, one numbered line per step.
    for number in range(1, 12):
        assert f"[{number}/11]" in captured.err
    # The state directory is gone and nothing is mounted or running from it.
    state = Path(report["state_dir"])
    assert not state.exists()
    assert [m for m in mounts_under(Path("/tmp")) if m.startswith(str(state))] == []
    assert not any(str(state) in " ".join(_cmdline(pid)) for pid in _pids())


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_tampering_an_image_the_layout_does_not_hold_is_a_usage_error(tmp_path: Path) -> None:
    OciLayout.create(tmp_path / "empty")
    with pytest.raises(UsageError, match="no image named"):
        tamper_layer(tmp_path / "empty", "coffer.local/demo/nginx:1")


def test_tampering_something_that_is_no_layout_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(CofferError):
        tamper_layer(tmp_path, "coffer.local/demo/nginx:1")


def test_failed_report_says_why(tmp_path: Path) -> None:
    from coffer.quickstart.demo import DemoReport

    report = DemoReport(work_dir=tmp_path, state_dir=tmp_path / "state", ok=False, seconds=1.0,
                        error="the KBS was not ready")
    text = format_report(report)
    assert "FAILED" in text
    assert "the KBS was not ready" in text
    assert "no memory confidentiality" in text
    assert report.to_json()["ok"] is False
