"""Start-up of a protected NGINX with ``coffer run -d`` against ``runc run`` of the same plain image.

Both start from an image already on the machine. Coffer's side is the whole confidential path: the
CLI creates a process sandbox (namespaces, a per-sandbox swtpm with PCR 8 extended by the initdata
digest), the agent checks initdata, attests to a local KBS with the TPM, receives the layer keys,
verifies the cosign signature, decrypts, unpacks and starts the container with runc; the clock stops
at the first HTTP 200 through the published port. The reference is ``runc run -d`` of the plain image
already unpacked into a bundle (host network, a free port), to its first HTTP 200. Rounds alternate
between the two; medians are reported. Targets: ratio <= 3 and coffer under 1.5 s. The run also
times unpack + ``runc run`` of the plain image, whose ratio to ``runc run`` alone is a floor for any
runtime that unpacks the image when it starts, as Coffer's guest must (it decrypts, verifies and
unpacks into storage the host cannot see).

Usage (root): python bench/run.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from coffer._internal.net import free_port  # noqa: E402
from coffer.image.locations import open_source  # noqa: E402
from coffer.image.pipeline import unpack_from_source  # noqa: E402
from coffer.policy.document import dump_policy  # noqa: E402
from coffer.quickstart import demo, images  # noqa: E402
from coffer.quickstart.trust import coffer_command, setup_dev_trust  # noqa: E402

RUNC = "/usr/sbin/runc"
DEADLINE = 30.0


def first_200(port: int, started: float) -> float:
    """Seconds from ``started`` until ``GET /`` on 127.0.0.1:port answers 200."""
    while time.monotonic() - started < DEADLINE:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/")
            if connection.getresponse().status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.005)
    raise SystemExit(f"no HTTP 200 on port {port} within {DEADLINE} s")


def runc_bundle(work: Path, layout: Path, tag: str, port: int) -> Path:
    """The plain image unpacked into a runc bundle that serves on the host network at ``port``."""
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    with open_source(f"oci:{layout}:{tag}") as source:
        unpack_from_source(source, bundle / "rootfs")
    (bundle / "rootfs" / "etc" / "nginx" / "bench.conf").write_text(images.nginx_config(port))
    subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/usr/sbin/nginx", "-c", "/etc/nginx/bench.conf"]
    spec["root"]["readonly"] = False
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID", "CAP_NET_BIND_SERVICE", "CAP_KILL"]
    for key in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][key] = caps
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _runc_to_200(bundle: Path, name: str, port: int, started: float) -> float:
    """``runc run -d`` of ``bundle``; seconds from ``started`` to its first HTTP 200 (then deleted)."""
    subprocess.run(
        [RUNC, "run", "-d", "--bundle", str(bundle), name],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    elapsed = first_200(port, started)
    subprocess.run([RUNC, "delete", "--force", name], check=False, capture_output=True)
    return elapsed


def time_runc(bundle: Path, port: int, n: int) -> float:
    return _runc_to_200(bundle, f"bench-nginx-{os.getpid()}-{n}", port, time.monotonic())


def time_runc_with_unpack(work: Path, layout: Path, tag: str, port: int, n: int) -> float:
    """The same, counting the unpack of the plain image into a fresh bundle (what any runtime does
    for an image it has not unpacked yet)."""
    started = time.monotonic()
    bundle = runc_bundle(work / f"u{n}", layout, tag, port)
    elapsed = _runc_to_200(bundle, f"bench-nginx-u-{os.getpid()}-{n}", port, started)
    shutil.rmtree(work / f"u{n}", ignore_errors=True)
    return elapsed


def time_coffer(env: dict[str, str], args: list[str], port: int, n: int) -> float:
    name = f"bench{n}"
    started = time.monotonic()
    subprocess.run(
        [*coffer_command(), "run", "-d", "--name", name, "-p", f"{port}:80", *args],
        env=env,
        check=True,
        capture_output=True,
    )
    elapsed = first_200(port, started)
    subprocess.run([*coffer_command(), "rm", "-f", name], env=env, check=False, capture_output=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, runc)")
    work = Path(tempfile.mkdtemp(prefix="cof-b"))
    state = work / "s"
    trust = None
    try:
        built = images.build_image_detailed("nginx", work / "images")
        trust = setup_dev_trust(work, state)
        env = trust.env()
        sign_key, public_key, password_file = demo.write_signing_key(work / "keys")
        reference = demo.image_reference("nginx")
        protected = work / "protected"
        demo.run_coffer(
            demo.protect_command(
                built.layout,
                built.tag,
                protected,
                reference,
                key=demo.key_uri("nginx"),
                kbs=trust.kbs.url,
                token_file=trust.kbs.token_file,
                sign_key=sign_key,
                password_file=password_file,
            ),
            env=env,
        )
        policy = demo.run_policy("bench", reference, protected, public_key=public_key.read_bytes())
        policy_file = work / "policy.yaml"
        policy_file.write_bytes(dump_policy(policy))
        coffer_args = [
            "--kbs",
            trust.kbs.url,
            "--image-layouts",
            str(protected),
            "--policy",
            str(policy_file),
            policy.containers[0].image,
        ]
        runc_port = free_port()
        bundle = runc_bundle(work, built.layout, built.tag, runc_port)
        times: dict[str, list[float]] = {"coffer": [], "runc": [], "runc+unpack": []}
        for n in range(args.rounds):
            order = ("coffer", "runc", "runc+unpack") if n % 2 == 0 else ("runc+unpack", "runc", "coffer")
            for tool in order:
                if tool == "runc":
                    times["runc"].append(time_runc(bundle, runc_port, n))
                elif tool == "runc+unpack":
                    times["runc+unpack"].append(
                        time_runc_with_unpack(work, built.layout, built.tag, free_port(), n)
                    )
                else:
                    times["coffer"].append(time_coffer(env, coffer_args, free_port(), n))
        coffer_s = statistics.median(times["coffer"])
        runc_s = statistics.median(times["runc"])
        unpack_s = statistics.median(times["runc+unpack"])
        result: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "rounds": args.rounds,
            "coffer_run_to_first_200_s": round(coffer_s, 3),
            "runc_run_to_first_200_s": round(runc_s, 3),
            "ratio": round(coffer_s / runc_s, 2),
            "runc_unpack_and_run_to_first_200_s": round(unpack_s, 3),
            "ratio_vs_unpack_and_run": round(coffer_s / unpack_s, 2),
            # What unpacking the plain image alone adds to runc's start: any runtime that unpacks the
            # image when it starts (as the guest must: the host may not hold the plaintext) is at
            # least this ratio from the unpacked reference.
            "unpack_floor_ratio": round(unpack_s / runc_s, 2),
            "coffer_all_s": [round(t, 3) for t in times["coffer"]],
            "runc_all_s": [round(t, 3) for t in times["runc"]],
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"protected NGINX, {args.rounds} rounds on {result['machine']}")
            print(f"coffer run -d -> first HTTP 200: {coffer_s:.3f} s (median; target < 1.5 s)")
            print(f"runc run -d   -> first HTTP 200: {runc_s:.3f} s (median, plain image already unpacked)")
            print(f"ratio {result['ratio']} (target <= 3)")
            print(
                f"unpack + runc run -> first HTTP 200: {unpack_s:.3f} s (median); "
                f"ratio {result['ratio_vs_unpack_and_run']}"
            )
            print(
                f"unpacking alone puts any unpack-at-start runtime at >= {result['unpack_floor_ratio']}x "
                "the unpacked runc reference (coffer's guest must decrypt, verify and unpack at start)"
            )
        return 0
    finally:
        if trust is not None:
            subprocess.run(
                [*coffer_command(), "rm", "-f", *[f"bench{n}" for n in range(args.rounds)]],
                env=trust.env(),
                check=False,
                capture_output=True,
            )
            trust.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
