"""Memory stays flat whatever the layer size: encrypting and decrypting a 1 GiB layer through the CLI
keeps the peak RSS of each process under 200 MB.

Each step runs ``coffer.cli.main`` in a fresh interpreter that reports its own peak RSS, read from
``VmHWM`` in ``/proc/self/status``: that is per address space, whereas ``getrusage``'s ``ru_maxrss``
carries the peak of the process that forked it (a large pytest worker) across ``exec``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import Manifest

GiB = 1024 * 1024 * 1024
LIMIT_BYTES = 200 * 1000 * 1000

_RUN = """
import json, sys
from coffer.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "maxrss_kib": hwm}))
"""


def _big_layout(root: Path, size: int) -> None:
    """A layout with one ``size``-byte layer (pseudo-random 1 MiB blocks; the bytes need not be a tar)."""
    layout = OciLayout.create(root)
    block = os.urandom(1024 * 1024)

    def chunks() -> object:
        for n in range(size // len(block)):
            yield hashlib.sha256(n.to_bytes(8, "big")).digest() + block[32:]

    layer = layout.write_blob(chunks(), media.OCI_LAYER_TAR)  # type: ignore[arg-type]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
    }
    config_desc = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    manifest = layout.write_manifest(
        Manifest(media_type=media.OCI_MANIFEST, config=config_desc, layers=(layer,))
    )
    layout.set_ref(manifest, "latest")


def _peak_rss(*args: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, done.stdout + done.stderr
    return int(report["maxrss_kib"]) * 1024


@pytest.mark.slow
def test_one_gib_layer_encrypts_and_decrypts_in_flat_memory(tmp_path: Path) -> None:
    _big_layout(tmp_path / "src", GiB)
    key = tmp_path / "key.pem"
    pub = tmp_path / "pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True
    )
    encrypt_rss = _peak_rss(
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--recipient",
        f"jwe:{pub}",
        "--quiet",
        "--json",
    )
    decrypt_rss = _peak_rss(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--key-file",
        str(key),
        "--quiet",
        "--json",
    )
    src = OciLayout.open(tmp_path / "src")
    dec = OciLayout.open(tmp_path / "dec")
    assert dec.read_manifest(dec.resolve("latest")).layers == src.read_manifest(src.resolve("latest")).layers
    print(f"peak RSS: encrypt {encrypt_rss / 1e6:.1f} MB, decrypt {decrypt_rss / 1e6:.1f} MB")
    assert encrypt_rss < LIMIT_BYTES, f"encrypting a 1 GiB layer peaked at {encrypt_rss / 1e6:.1f} MB"
    assert decrypt_rss < LIMIT_BYTES, f"decrypting a 1 GiB layer peaked at {decrypt_rss / 1e6:.1f} MB"
