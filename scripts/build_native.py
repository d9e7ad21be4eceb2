"""Compile the policy engine's request views (src/coffer/policy/_views.py) with mypyc.

The result, src/coffer/policy/_views_native.<abi>.so, makes CreateContainer decisions about a sixth
faster. It is optional: without it (no C compiler, no Python headers) the engine uses the Python
module, and it ignores a compiled copy whose SOURCE_SHA256 is not the hash of the current _views.py,
so a stale build is never used. `make` runs this script; it exits 0 with a note when it cannot build.

Usage: python scripts/build_native.py [--check]   (--check: exit 1 unless an up-to-date build is present)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "coffer" / "policy"
SOURCE = PACKAGE / "_views.py"
NAME = "_views_native"


def built() -> list[Path]:
    """The compiled files present: the module and mypyc's runtime library beside it
    (``_views_native__mypyc``)."""
    return sorted({path for suffix in importlib.machinery.EXTENSION_SUFFIXES
                   for path in PACKAGE.glob(f"{NAME}*{suffix}")})


def up_to_date(digest: str) -> bool:
    stamp = PACKAGE / f".{NAME}.sha256"
    return bool(built()) and stamp.exists() and stamp.read_text().strip() == digest


def build(digest: str) -> str | None:
    """Build the module; None on success, else why not."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (install gcc and the Python headers, e.g. apt-get install gcc python3-dev)"
    with tempfile.TemporaryDirectory(prefix="coffer-native-") as tmp:
        work = Path(tmp)
        package = work / "coffer" / "policy"
        package.mkdir(parents=True)
        (work / "coffer" / "__init__.py").write_text("")
        (package / "__init__.py").write_text("")
        text = SOURCE.read_text("utf-8")
        stamp = ('\n#: The SHA-256 of the _views.py this module was compiled from.\n'
                 f'SOURCE_SHA256: Final = "{digest}"\n')
        (package / f"{NAME}.py").write_text(text + stamp, "utf-8")
        result = subprocess.run(  # noqa: S603 - fixed argument list
            [sys.executable, "-m", "mypyc", f"coffer/policy/{NAME}.py"],
            cwd=work, capture_output=True, text=True, check=False, timeout=600)
        outputs = sorted(package.glob(f"{NAME}*.so"))
        if result.returncode != 0 or not outputs:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            return "mypyc failed: " + " | ".join(tail)
        for old in built():
            old.unlink()
        for output in outputs:
            staged = PACKAGE / f".{output.name}.tmp"
            shutil.copy2(output, staged)
            staged.replace(PACKAGE / output.name)
    (PACKAGE / f".{NAME}.sha256").write_text(digest + "\n")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that an up-to-date build exists")
    args = parser.parse_args()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    if up_to_date(digest):
        print("build_native: coffer.policy._views_native is up to date")
        return 0
    if args.check:
        print("build_native: coffer.policy._views_native is missing or stale", file=sys.stderr)
        return 1
    why = build(digest)
    if why is not None:
        print(f"build_native: note: not compiled ({why}); the policy engine uses the Python views",
              file=sys.stderr)
        return 0
    print("build_native: compiled coffer.policy._views_native")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
