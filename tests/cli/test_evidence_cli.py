from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coffer.cli import main
from coffer.evidence.sample import make_sample_evidence


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.json"
    path.write_bytes(make_sample_evidence(report_data=b"\x01\x02"))
    return path


def test_verify_json_output_and_exit_0(sample_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evidence", "verify", str(sample_file), "--tee", "sample", "--json",
                 "--expect-report-data", "0102"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["tee"] == "sample"
    assert out["insecure"] is True


def test_verify_rejection_names_step_and_exits_1(
    sample_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evidence", "verify", str(sample_file), "--tee", "sample", "--json",
                 "--expect-report-data", "ff"])
    assert code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out == {**out, "ok": False, "step": 4, "step_name": "report data"}
    assert "REJECTED" in captured.err


def test_human_output_labels_insecure(sample_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "verify", str(sample_file), "--tee", "sample"]) == 0
    assert "INSECURE" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["evidence", "verify", "x"],  # --tee missing
        ["evidence", "verify", "x", "--tee", "nope"],
        ["evidence", "verify", "/nonexistent/file", "--tee", "sample"],
        ["evidence", "verify", "SAMPLE", "--tee", "sample", "--expect-report-data", "xyz"],
        ["evidence", "verify", "SAMPLE", "--tee", "sample", "--at", "yesterday"],
        ["evidence", "verify", "SAMPLE", "--tee", "snp", "--endorsements", "/nonexistent"],
        ["evidence", "bogus"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], sample_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(sample_file) if a == "SAMPLE" else a for a in argv]
    assert main(argv) == 2


def test_show_guesses_the_tee(sample_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "show", str(sample_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tee"] == "sample"
    assert out["report_data"] == "0102"


def test_show_unknown_format_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01junk")
    assert main(["evidence", "show", str(path)]) == 2
    assert "--tee" in capsys.readouterr().err


def test_installed_entry_point_runs(sample_file: Path) -> None:
    exe = Path(sys.executable).with_name("coffer")
    proc = subprocess.run([str(exe), "evidence", "verify", str(sample_file), "--tee", "sample", "--json"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
