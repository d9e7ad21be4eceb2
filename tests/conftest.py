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


# go-tdx-guest's PCS fixtures for the T5 quote, by Coffer's offline collateral layout key.
T5_COLLATERAL = {
    "tcb_info": "go-tdx-guest/testing/testdata/sample_tcbInfo_response",
    "tcb_info_issuer_chain": "go-tdx-guest/testing/derived_tcb_info_issuer_chain.pem",
    "qe_identity": "go-tdx-guest/testing/testdata/sample_qeIdentity_response",
    "qe_identity_issuer_chain": "go-tdx-guest/testing/derived_qe_identity_issuer_chain.pem",
    "pck_crl": "go-tdx-guest/testing/testdata/pckcrl",
    "pck_crl_issuer_chain": "go-tdx-guest/testing/derived_pck_crl_issuer_chain.pem",
    "root_ca_crl": "go-tdx-guest/testing/testdata/rootcrl.der",
}


def write_t5_collateral(target: Path) -> Path:
    """The T5 (tdx_prod_quote_SPR_E4) collateral written into ``target`` in the offline layout."""
    from coffer.evidence.dcap.sources import LAYOUT

    target.mkdir(parents=True, exist_ok=True)
    for key, relative in T5_COLLATERAL.items():
        (target / LAYOUT[key]).write_bytes(vector_bytes(relative))
    return target


@pytest.fixture
def vector() -> Callable[[str], bytes]:
    """``vector("go-sev-guest/verify/testdata/attestation.bin")`` -> the file's bytes, or skip."""
    return vector_bytes
