"""What every attester offers, and the small helpers they share."""

from __future__ import annotations

import base64
from typing import Any, Protocol, runtime_checkable

from coffer.errors import CofferError

REPORT_DATA_SIZE = 64


class AttesterError(CofferError):
    """The TEE interface failed (device or configfs error, a tool exited non-zero, a conflicting
    concurrent request). The message names the interface; it never carries the runtime data."""


@runtime_checkable
class Attester(Protocol):
    """Produces the Trustee ``primary_evidence`` JSON value of one TEE.

    ``evidence(runtime_digest)`` gets the digest of the canonical runtime data (48 bytes of SHA-384
    in protocol 0.4.0) and places it where that TEE's verifier expects it: zero-padded to 64 bytes
    in SNP/TDX report data, the first 32 bytes as TPM qualifying data, exactly as the Azure vTPM
    nonce, base64 in the sample evidence.
    """

    tee: str

    def evidence(self, runtime_digest: bytes) -> Any: ...


def check_digest(runtime_digest: bytes, *, limit: int = REPORT_DATA_SIZE) -> bytes:
    """The digest as bytes, refused when empty or longer than the report-data field."""
    digest = bytes(runtime_digest)
    if not digest or len(digest) > limit:
        raise ValueError(f"runtime-data digest must be 1..{limit} bytes, got {len(digest)}")
    return digest


def pad64(digest: bytes) -> bytes:
    """Zero-pad a digest to the 64-byte REPORT_DATA field (Trustee's ``regularize_data``)."""
    return check_digest(digest).ljust(REPORT_DATA_SIZE, b"\0")


def b64(data: bytes) -> str:
    """Standard base64 with padding (what Trustee's attesters use for binary fields)."""
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    """URL-safe base64 with padding (the Azure vTPM evidence fields)."""
    return base64.urlsafe_b64encode(data).decode("ascii")
