"""Parsing and verification of TEE evidence: AMD SEV-SNP, Intel TDX and SGX (DCAP), TPM 2.0,
Azure confidential VMs (vTPM + HCL report) and the development-only ``sample`` TEE.

The facade is :func:`verify` and :func:`parse`; each TEE's handler lives in its own subpackage and
is loaded on first use, so a caller that verifies only SNP does not import the DCAP code.
"""

from __future__ import annotations

import importlib

from coffer.errors import UsageError
from coffer.evidence.base import Claims, ParsedEvidence, TeeHandler, VerifyOptions
from coffer.evidence.collateral import CollateralSource, NoCollateral

__all__ = ["TEES", "Claims", "VerifyOptions", "handler", "parse", "verify"]

# TEE name -> "module:attribute" of its handler.
_HANDLERS: dict[str, str] = {
    "snp": "coffer.evidence.snp:HANDLER",
    "tdx": "coffer.evidence.dcap:TDX_HANDLER",
    "sgx": "coffer.evidence.dcap:SGX_HANDLER",
    "tpm": "coffer.evidence.tpm:HANDLER",
    "az-snp-vtpm": "coffer.evidence.azure:SNP_VTPM_HANDLER",
    "az-tdx-vtpm": "coffer.evidence.azure:TDX_VTPM_HANDLER",
    "sample": "coffer.evidence.sample:HANDLER",
}

TEES: tuple[str, ...] = tuple(_HANDLERS)


def handler(tee: str) -> TeeHandler:
    """The handler for a TEE name; an unknown name is a usage error listing the known ones."""
    try:
        target = _HANDLERS[tee]
    except KeyError:
        raise UsageError(f"unknown TEE {tee!r}; known: {', '.join(TEES)}") from None
    module_name, attribute = target.split(":")
    found: TeeHandler = getattr(importlib.import_module(module_name), attribute)
    return found


def parse(tee: str, data: bytes) -> ParsedEvidence:
    """Decode evidence without verifying it (for display)."""
    return handler(tee).parse(data)


def verify(
    tee: str,
    data: bytes,
    *,
    collateral: CollateralSource | None = None,
    options: VerifyOptions | None = None,
) -> Claims:
    """Verify evidence and return its claims, or raise :class:`~coffer.errors.VerificationError`
    naming the step that failed."""
    return handler(tee).verify(data, collateral or NoCollateral(), options or VerifyOptions())
