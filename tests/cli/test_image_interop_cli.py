"""Whole-image interop through the ``coffer image`` commands with Debian's skopeo and umoci:
skopeo-encrypted (JWE) images decrypt with coffer, coffer-encrypted images decrypt with skopeo, the
layers come back byte-identical, and umoci unpacks coffer's decrypted image to the same tree as the
original."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from coffer.cli import main
from coffer.image import media
from coffer.image.layout import OciLayout
from tests.image.imagebuild import layer_blobs
from tests.image.test_umoci_interop import _build_layout, _snapshot

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
pytestmark = pytest.mark.skipif(
    SKOPEO is None or UMOCI is None, reason="skopeo and umoci are needed (apt-get install skopeo umoci)"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "key.pem"), "2048"], check=True, capture_output=True
    )
    subprocess.run(
        ["openssl", "rsa", "-in", str(root / "key.pem"), "-pubout", "-out", str(root / "pub.pem")],
        check=True,
        capture_output=True,
    )
    return root / "key.pem", root / "pub.pem"


def skopeo(tmp: Path, *args: str) -> None:
    policy = tmp / "policy.json"
    policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    assert SKOPEO is not None
    done = subprocess.run(
        [SKOPEO, "--policy", str(policy), "copy", "-q", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def coffer(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    code = main([*args, "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result: dict[str, object] = json.loads(captured.out)
    return result


def _media_types(path: Path) -> list[str]:
    layout = OciLayout.open(path)
    return [layer.media_type for layer in layout.read_manifest(layout.resolve("latest")).layers]


def test_skopeo_encrypted_image_decrypts_with_coffer(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    original = _build_layout(tmp_path / "src")
    skopeo(
        tmp_path,
        "--encryption-key",
        f"jwe:{pub}",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
    )
    assert set(_media_types(tmp_path / "enc")) == {media.OCI_LAYER_GZIP_ENC}
    coffer(
        capsys,
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--key-file",
        str(key),
    )
    assert layer_blobs(tmp_path / "dec") == original


def test_coffer_encrypted_image_decrypts_with_skopeo(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    original = _build_layout(tmp_path / "src")
    coffer(
        capsys,
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--recipient",
        f"jwe:{pub}",
    )
    assert set(_media_types(tmp_path / "enc")) == {media.OCI_LAYER_GZIP_ENC}
    skopeo(
        tmp_path,
        "--decryption-key",
        str(key),
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
    )
    assert layer_blobs(tmp_path / "dec") == original


@pytest.mark.skipif(os.geteuid() != 0, reason="umoci keeps ownership only as root; compare as root")
def test_umoci_unpacks_coffers_decrypted_image_to_the_original_tree(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = keys
    assert UMOCI is not None
    _build_layout(tmp_path / "src")
    coffer(
        capsys,
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--recipient",
        f"jwe:{pub}",
    )
    coffer(
        capsys,
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--key-file",
        str(key),
    )
    for name in ("src", "dec"):
        subprocess.run(
            [UMOCI, "unpack", "--image", f"{tmp_path / name}:latest", str(tmp_path / f"bundle-{name}")],
            check=True,
            capture_output=True,
        )
    assert _snapshot(tmp_path / "bundle-dec" / "rootfs") == _snapshot(tmp_path / "bundle-src" / "rootfs")
    # Coffer's own unpack, straight from the encrypted image, gives the same tree again.
    coffer(
        capsys,
        "image",
        "unpack",
        f"oci:{tmp_path / 'enc'}:latest",
        str(tmp_path / "ours"),
        "--key-file",
        str(key),
    )
    assert _snapshot(tmp_path / "ours") == _snapshot(tmp_path / "bundle-src" / "rootfs")
