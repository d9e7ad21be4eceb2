"""TPM 2.0 quotes: structure parsers and the ``tpm`` verifier (also used by the Azure vTPM ones)."""

from __future__ import annotations

from coffer.evidence.tpm.structures import (
    TpmsAttest,
    TpmtPublic,
    TpmtSignature,
    parse_attest,
    parse_public,
    parse_public_sized,
    parse_signature,
)
from coffer.evidence.tpm.verifier import (
    HANDLER,
    AttestationKey,
    QuoteParts,
    TpmClaims,
    TpmEvidence,
    TpmHandler,
    load_ak,
    parse_bincode_quote,
    parse_tpm_evidence,
    verify_tpm_evidence,
    verify_tpm_quote,
)

__all__ = [
    "HANDLER",
    "AttestationKey",
    "QuoteParts",
    "TpmClaims",
    "TpmEvidence",
    "TpmHandler",
    "TpmsAttest",
    "TpmtPublic",
    "TpmtSignature",
    "load_ak",
    "parse_attest",
    "parse_bincode_quote",
    "parse_public",
    "parse_public_sized",
    "parse_signature",
    "parse_tpm_evidence",
    "verify_tpm_evidence",
    "verify_tpm_quote",
]
