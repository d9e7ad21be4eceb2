"""A software TPM shared by the tests of a module (manufactured once, stopped afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer.sandbox import swtpm


def tpm_tools_available() -> bool:
    import shutil

    return swtpm.available() and all(
        shutil.which(tool) for tool in ("tpm2_createak", "tpm2_quote", "tpm2_activatecredential"))


requires_swtpm = pytest.mark.skipif(
    not tpm_tools_available(),
    reason="swtpm / tpm2-tools not installed (apt-get install swtpm swtpm-tools tpm2-tools "
           "libtss2-tcti-swtpm0)")


@pytest.fixture(scope="module")
def software_tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swtpm.Swtpm]:
    if not tpm_tools_available():
        pytest.skip("swtpm / tpm2-tools not installed")
    base: Path = tmp_path_factory.mktemp("swtpm")
    tpm = swtpm.Swtpm(base / "state", ca_dir=base / "ca")
    with tpm:
        yield tpm
    assert not tpm.running
