"""Shared fixtures: access to the recorded hardware evidence in ../shared/vectors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.postgres"]

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = Path(os.environ.get("COFFER_VECTORS", REPO_ROOT.parent / "shared" / "vectors"))


def vector_path(relative: str) -> Path:
    """Path of a recorded vector; skips the test with a clear reason when it is absent."""
    path = VECTORS_DIR / relative
    if not path.exists():
        pytest.skip(f"test vector {relative} not found under {VECTORS_DIR} (set COFFER_VECTORS)")
    return path


def vector_bytes(relative: str) -> bytes:
    return vector_path(relative).read_bytes()


@pytest.fixture
def vector() -> Callable[[str], bytes]:
    """``vector("go-sev-guest/verify/testdata/attestation.bin")`` -> the file's bytes, or skip."""
    return vector_bytes
