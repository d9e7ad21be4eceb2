"""``coffer policy`` commands in-process: check, compile, initdata, digest, explain and generate."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from coffer.cli import main
from coffer.policy import initdata

DIGEST = "sha256:" + "1" * 64
POLICY = f"""\
version: 1
name: web
attestation: {{tee: [snp, tdx]}}
containers:
  - name: nginx
    image: docker.io/library/nginx:1.25@{DIGEST}
    args: [nginx, -g, "daemon off;"]
    env: [PATH=/usr/bin]
    user: {{uid: 101, gid: 101}}
    capabilities: [CHOWN, NET_BIND_SERVICE]
    read_only_root: true
    allow: {{exec: [[nginx, -s, reload]], logs: true}}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_check_passes_a_clean_policy_and_flags_a_risky_one(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "policy", "check", str(policy_file), "--json")
    assert code == 0, out
    risky = tmp_path / "risky.yaml"
    risky.write_text(
        POLICY.replace(f"@{DIGEST}", "")
        .replace("env: [PATH=/usr/bin]", "env: [PATH=/usr/bin, {name: LD_PRELOAD, pattern: '.*'}]")
        .replace("exec: [[nginx, -s, reload]]", "exec_patterns: ['.*']")
    )
    code, out, _ = run(capsys, "policy", "check", str(risky), "--json")
    assert code == 1
    wheres = {f["where"] for f in json.loads(out)["findings"]}
    assert any("image" in w for w in wheres)
    assert any("env" in w for w in wheres)
    assert any("exec_patterns" in w for w in wheres)


def test_digest_is_over_the_initdata_bytes_and_placed_per_tee(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "initdata.toml"
    assert run(capsys, "policy", "initdata", str(policy_file), "-o", str(toml))[0] == 0
    expected = hashlib.sha256(toml.read_bytes()).hexdigest()
    code, out, _ = run(capsys, "policy", "digest", str(policy_file), "--json")
    assert code == 0
    values = json.loads(out)
    assert values["digest"] == expected
    assert values["snp_hostdata"] == expected
    assert values["tdx_mrconfigid"] == expected + "00" * 16
    code, out, _ = run(capsys, "policy", "digest", "--initdata", str(toml), "--json")
    assert json.loads(out)["digest"] == expected
    # A changed policy changes the digest.
    policy_file.write_text(POLICY.replace("logs: true", "logs: false"))
    code, out, _ = run(capsys, "policy", "digest", str(policy_file), "--json")
    assert json.loads(out)["digest"] != expected


def test_annotation_decodes_to_the_initdata(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "policy", "initdata", str(policy_file), "--annotation")
    assert code == 0
    doc = gzip.decompress(base64.b64decode(out.strip()))
    assert initdata.parse_initdata_document(doc).policy is not None
    code, rego, _ = run(capsys, "policy", "compile", str(policy_file))
    assert initdata.parse_initdata_document(doc).policy == rego
    assert "\npackage agent_policy\n" in rego


def test_explain_replays_requests_in_order(
    tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "r.json"
    requests.write_text(
        json.dumps(
            [
                {"request": "SetPolicyRequest", "input": {"policy": "package x"}},
                {"request": "GuestDetailsRequest", "input": {}},
            ]
        )
    )
    code, out, _ = run(capsys, "policy", "explain", "--policy", str(policy_file), "--request", str(requests))
    assert code == 1
    assert "DENIED: SetPolicyRequest" in out
    assert "fixed at launch" in out
    assert "ALLOWED: GuestDetailsRequest" in out
    code, out, _ = run(
        capsys, "policy", "explain", "--policy", str(policy_file), "--request", str(requests), "--json"
    )
    decisions = json.loads(out)["decisions"]
    assert [d["allowed"] for d in decisions] == [False, True]


def test_malformed_policy_points_at_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("    user:", "    usr:"))
    code, _, err = run(capsys, "policy", "check", str(bad))
    assert code in (2, 3)
    assert "bad.yaml:9" in err
    assert "usr" in err


def test_generate_without_pull_needs_digests_and_annotates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        f"""\
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  containers:
    - name: nginx
      image: docker.io/library/nginx:1.25@{DIGEST}
      command: [nginx, -g, "daemon off;"]
"""
    )
    out_file = tmp_path / "out.yaml"
    code, out, err = run(
        capsys, "policy", "generate", str(manifest), "--no-pull", "-o", str(out_file),
        "--policy-dir", str(tmp_path / "policies"), "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["workloads"][0]["name"] == "web"
    text = out_file.read_text()
    assert "runtimeClassName: coffer" in text
    assert initdata.ANNOTATION in text
    assert (tmp_path / "policies" / "web.policy.yaml").exists()
    # The policy written beside it loads and says the same thing.
    code, _, _ = run(capsys, "policy", "check", str(tmp_path / "policies" / "web.policy.yaml"))
    assert code in (0, 1)
