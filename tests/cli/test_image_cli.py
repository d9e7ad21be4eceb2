"""``coffer image`` options, outputs and refusals (in-process; the round trips with real peers are in
test_image_interop_cli.py and tests/e2e/test_image_*.py)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from coffer.cli import main
from coffer.image.layout import OciLayout
from tests.image.imagebuild import make_image, make_multiarch

PASSWORD = "cli-test-password"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def signing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COFFER_SIGNING_PASSWORD", PASSWORD)


@pytest.fixture(scope="module")
def rsa_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rsa")
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "key.pem"), "2048"], check=True, capture_output=True
    )
    subprocess.run(
        ["openssl", "rsa", "-in", str(root / "key.pem"), "-pubout", "-out", str(root / "pub.pem")],
        check=True,
        capture_output=True,
    )
    return root / "key.pem", root / "pub.pem"


def test_keygen_writes_a_pair_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_env: None
) -> None:
    prefix = str(tmp_path / "k")
    code, out, _ = run(capsys, "image", "keygen", "--output-key-prefix", prefix, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["fingerprint"].startswith("sha256:")
    assert (tmp_path / "k.key").stat().st_mode & 0o077 == 0
    assert b"ENCRYPTED SIGSTORE PRIVATE KEY" in (tmp_path / "k.key").read_bytes()
    assert PASSWORD not in out
    code, _, err = run(capsys, "image", "keygen", "--output-key-prefix", prefix)
    assert code == 2
    assert "exists" in err


def test_keygen_without_password_and_terminal_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COFFER_SIGNING_PASSWORD", raising=False)
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "image", "keygen", "--output-key-prefix", str(tmp_path / "k"))
    assert code == 2
    assert "COFFER_SIGNING_PASSWORD" in err
    assert not (tmp_path / "k.key").exists()


def test_sign_oci_needs_an_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_env: None
) -> None:
    make_image(tmp_path / "img")
    run(capsys, "image", "keygen", "--output-key-prefix", str(tmp_path / "k"))
    code, _, err = run(capsys, "image", "sign", f"oci:{tmp_path / 'img'}", "--key", str(tmp_path / "k.key"))
    assert code == 2
    assert "--identity" in err


def test_wrong_signing_password_is_refused_without_echo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "img")
    run(capsys, "image", "keygen", "--output-key-prefix", str(tmp_path / "k"))
    monkeypatch.setenv("COFFER_SIGNING_PASSWORD", "not-the-password")
    code, out, err = run(
        capsys, "image", "sign", f"oci:{tmp_path / 'img'}", "--key", str(tmp_path / "k.key"),
        "--identity", "example.com/app:1",
    )  # fmt: skip
    assert code == 2
    assert "password" in err
    assert "not-the-password" not in out + err
    assert len(OciLayout.open(tmp_path / "img").read_index().manifests) == 1  # no signature stored


def test_sign_then_verify_in_a_layout_and_protect_prints_reference_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_env: None, rsa_pair: tuple[Path, Path]
) -> None:
    _, pub = rsa_pair
    make_image(tmp_path / "src")
    run(capsys, "image", "keygen", "--output-key-prefix", str(tmp_path / "k"))
    code, out, err = run(
        capsys, "image", "protect", f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'dst'}:v1",
        "--recipient", f"jwe:{pub}", "--sign-key", str(tmp_path / "k.key"),
        "--identity", "example.com/app:v1", "--json",
    )  # fmt: skip
    assert code == 0, err
    values = json.loads(out)["reference_values"]
    assert values["signature"]["manifest_digest"] == values["manifest_digest"]
    assert values["manifests"][0]["config_digest"].startswith("sha256:")
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "default": [{"type": "reject"}],
                "transports": {
                    "oci": {str(tmp_path / "dst"): [{"type": "sigstoreSigned", "keyPath": "k.pub"}]}
                },
            }
        )
    )
    code, out, err = run(
        capsys, "image", "verify", f"oci:{tmp_path / 'dst'}:v1", "--policy", str(policy),
        "--identity", "example.com/app:v1", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["manifest_digest"] == values["manifest_digest"]
    # The unsigned source under the same policy: refused by the default scope.
    code, out, _ = run(
        capsys, "image", "verify", f"oci:{tmp_path / 'src'}:latest", "--policy", str(policy), "--json"
    )
    assert code == 1
    assert json.loads(out)["step"] == 7


def test_malformed_policy_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "img")
    policy = tmp_path / "policy.json"
    policy.write_text('{"default":[{"type":"sigstoreSigned"}]}')
    code, _, err = run(capsys, "image", "verify", f"oci:{tmp_path / 'img'}", "--policy", str(policy))
    assert code in (2, 3)
    assert "default[0]" in err


def test_encrypting_into_a_docker_archive_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rsa_pair: tuple[Path, Path]
) -> None:
    _, pub = rsa_pair
    make_image(tmp_path / "src")
    code, _, err = run(
        capsys, "image", "encrypt", f"oci:{tmp_path / 'src'}", f"docker-archive:{tmp_path / 'x.tar'}",
        "--recipient", f"jwe:{pub}",
    )  # fmt: skip
    assert code == 2
    assert "cannot hold encrypted layers" in err
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipient", "pgp:x"], "jwe:"),
        (["--key", "kbs://nope"], "kbs:///"),
        (["--layers", "first"], "--layers"),
        ([], "at least one"),
        (["--recipient", "jwe:/nonexistent.pem"], "cannot read"),
    ],
)
def test_bad_encrypt_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    make_image(tmp_path / "src")
    code, _, err = run(
        capsys, "image", "encrypt", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}", *args
    )
    assert code == 2
    assert message in err
    assert not (tmp_path / "dst").exists()


def test_inspect_lists_platforms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_multiarch(tmp_path / "img")
    code, out, _ = run(capsys, "image", "inspect", f"oci:{tmp_path / 'img'}", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["platforms"] == ["linux/amd64", "linux/arm64"]
    assert {m["architecture"] for m in data["manifests"]} == {"amd64", "arm64"}


def test_unknown_transport_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "image", "inspect", "ftp://x/y")
    assert code == 2
    assert "transport" in err
