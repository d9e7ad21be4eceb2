"""``coffer quickstart``: build, protect, attest and run NGINX, Redis, Memcached and a Python app in
development sandboxes, show what is refused, then clean up (:mod:`coffer.quickstart.demo`)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from coffer.cli._output import Output

EXIT_OK = 0
EXIT_FAILED = 3

_EPILOG = """\
Needs root, runc, util-linux (unshare), swtpm, swtpm-tools and tpm2-tools; the first run downloads
the Debian packages of the sample images (cached in $COFFER_CACHE, default ~/.cache/coffer).
The sandboxes are development sandboxes: the host kernel can read their memory.
Exit status: 0 every step gave the expected result, 2 usage error, 3 a step failed (it says which).
"""


def register(groups: Any) -> None:
    parser: argparse.ArgumentParser = groups.add_parser(
        "quickstart", help="the confidential run end to end: four protected apps, attested, checked",
        description="Build NGINX, Redis, Memcached and a Python app from Debian packages, start a local "
                    "KBS, encrypt and sign the images, run them in sandboxes that attest for their keys, "
                    "check each with a real client, show that exec, a tampered image and a changed "
                    "policy are refused, print the attestation claims, and clean up.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="where images, keys, policies and the KBS state go (default: a temporary "
                             "directory, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the four sandboxes running and keep the work directory")
    parser.add_argument("--json", action="store_true",
                        help="the report as JSON on stdout (progress on stderr)")
    parser.set_defaults(handler=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace, out: Output) -> int:
    from coffer.quickstart.demo import format_report, run_quickstart  # noqa: PLC0415 - heavy imports

    stream = sys.stderr if out.json_mode else sys.stdout

    def progress(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="coffer-quickstart-")) if temporary else args.work_dir
    try:
        report = run_quickstart(work_dir, progress=progress, keep=args.keep)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    if out.json_mode:
        out.result(report.to_json())
    else:
        stream.write(format_report(report) + "\n")
    return EXIT_OK if report.ok else EXIT_FAILED
