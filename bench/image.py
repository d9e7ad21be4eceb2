"""Image encryption and decryption throughput: coffer against Debian's skopeo on the same image, in one run.

The image is an OCI layout of ~256 MiB (four gzip layers of incompressible data, the shape of a real
application image) on the local disk. Each round runs, as separate processes and in alternating order,
``coffer image encrypt`` and ``skopeo copy --encryption-key`` (JWE, RSA-2048 recipient) into fresh
layouts, then ``coffer image decrypt`` and ``skopeo copy --decryption-key`` of the same encrypted image.
Throughput is image bytes / wall time of the whole command (process start included, as a user sees it);
the reported figure is the median over the rounds. Target: coffer >= 1.0x skopeo both ways.

Usage: python bench/image.py [--size-mib 256] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from coffer.image import media  # noqa: E402
from coffer.image.layout import OciLayout  # noqa: E402
from coffer.image.models import Manifest  # noqa: E402

MiB = 1024 * 1024
LAYERS = 4


def _layer(size: int, seed: int) -> tuple[bytes, str]:
    """A gzip tar holding one file of ``size`` pseudo-random bytes; returns (blob, diff_id)."""
    body = bytearray()
    block = os.urandom(MiB)
    for n in range(size // MiB):
        body += hashlib.sha256(f"{seed}-{n}".encode()).digest() + block[32:]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo(f"data/layer{seed}.bin")
        info.size = len(body)
        archive.addfile(info, io.BytesIO(bytes(body)))
    plain = raw.getvalue()
    return gzip.compress(plain, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


def build_image(root: Path, size: int) -> int:
    layout = OciLayout.create(root)
    layers = []
    diff_ids = []
    for seed in range(LAYERS):
        blob, diff_id = _layer(size // LAYERS, seed)
        layers.append(layout.write_bytes(blob, media.OCI_LAYER_GZIP))
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    manifest = layout.write_manifest(
        Manifest(media_type=media.OCI_MANIFEST, config=config_desc, layers=tuple(layers))
    )
    layout.set_ref(manifest, "latest")
    return sum(layer.size for layer in layers)


def _coffer() -> list[str]:
    script = Path(sys.executable).parent / "coffer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "coffer.cli"]


def _timed(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise SystemExit("skopeo is not installed (apt-get install skopeo)")
    work = Path(tempfile.mkdtemp(prefix="coffer-bench-image-"))
    try:
        size = build_image(work / "src", args.size_mib * MiB)
        subprocess.run(
            ["openssl", "genrsa", "-out", str(work / "key.pem"), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(work / "key.pem"), "-pubout", "-out", str(work / "pub.pem")],
            check=True,
            capture_output=True,
        )
        src = f"oci:{work / 'src'}:latest"
        commands = {
            ("encrypt", "coffer"): [
                *_coffer(),
                "image",
                "encrypt",
                src,
                f"oci:{work / 'c-enc'}:latest",
                "--recipient",
                f"jwe:{work / 'pub.pem'}",
                "--quiet",
                "--json",
            ],
            ("encrypt", "skopeo"): [
                skopeo,
                "copy",
                "--quiet",
                "--encryption-key",
                f"jwe:{work / 'pub.pem'}",
                src,
                f"oci:{work / 's-enc'}:latest",
            ],
        }
        # Both decrypt the same encrypted image (skopeo's), so they do identical work.
        dec_src = f"oci:{work / 's-enc'}:latest"
        commands[("decrypt", "coffer")] = [
            *_coffer(),
            "image",
            "decrypt",
            dec_src,
            f"oci:{work / 'c-dec'}:latest",
            "--key-file",
            str(work / "key.pem"),
            "--quiet",
            "--json",
        ]
        commands[("decrypt", "skopeo")] = [
            skopeo,
            "copy",
            "--quiet",
            "--decryption-key",
            str(work / "key.pem"),
            dec_src,
            f"oci:{work / 's-dec'}:latest",
        ]
        outputs = {
            ("encrypt", "coffer"): work / "c-enc",
            ("encrypt", "skopeo"): work / "s-enc",
            ("decrypt", "coffer"): work / "c-dec",
            ("decrypt", "skopeo"): work / "s-dec",
        }
        times: dict[tuple[str, str], list[float]] = {key: [] for key in commands}
        for round_no in range(args.rounds):
            order = ["coffer", "skopeo"] if round_no % 2 == 0 else ["skopeo", "coffer"]
            for op in ("encrypt", "decrypt"):
                for tool in order:
                    if op == "decrypt" and not (work / "s-enc").exists():
                        _timed(commands[("encrypt", "skopeo")], outputs[("encrypt", "skopeo")])
                    times[(op, tool)].append(_timed(commands[(op, tool)], outputs[(op, tool)]))
        result: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            "skopeo": subprocess.run(
                [skopeo, "--version"], check=False, capture_output=True, text=True
            ).stdout.strip(),
            "image_mib": round(size / MiB, 1),
            "rounds": args.rounds,
        }
        for op in ("encrypt", "decrypt"):
            coffer_mbs = size / 1e6 / statistics.median(times[(op, "coffer")])
            skopeo_mbs = size / 1e6 / statistics.median(times[(op, "skopeo")])
            result[op] = {
                "coffer_mb_s": round(coffer_mbs, 1),
                "skopeo_mb_s": round(skopeo_mbs, 1),
                "ratio": round(coffer_mbs / skopeo_mbs, 2),
            }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"image: {result['image_mib']} MiB in {LAYERS} gzip layers; {result['rounds']} rounds; "
                f"{result['skopeo']}"
            )
            for op in ("encrypt", "decrypt"):
                r = result[op]
                print(
                    f"{op}: coffer {r['coffer_mb_s']} MB/s, skopeo {r['skopeo_mb_s']} MB/s, "
                    f"ratio {r['ratio']} (target >= 1.0)"
                )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
