"""Shared builders for the attestation-service tests."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coffer.attestation.binding import runtime_data_digest, runtime_data_preimage
from coffer.attestation.service import AttestationService
from coffer.evidence.collateral import CollateralSource, NoCollateral
from coffer.kbs.store import MemoryStore
from tests.evidence.tpm import builders

NONCE = "q0b3S4s1v6cT8b3bM3n7bZ6W4r3F0s8wTj2vY1QW6cE="
TEE_PUBKEY = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
              "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
              "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}
RUNTIME = {"nonce": NONCE, "tee-pubkey": TEE_PUBKEY}
DIGEST = runtime_data_digest(runtime_data_preimage(NONCE, TEE_PUBKEY))
INITDATA = ('version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n"aa.toml" = \'\'\'\n'
            '[token_configs.kbs]\nurl = "http://127.0.0.1:8080"\n\'\'\'\n'
            '"policy.rego" = \'\'\'\npackage agent_policy\n\n'
            'policy_data := {"containers": ["nginx"]}\n\'\'\'\n')


class Clock:
    """A settable clock for the service."""

    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.at


def service(*, collateral: CollateralSource | None = None, clock: Clock | None = None,
            store: MemoryStore | None = None, **kw: Any) -> AttestationService:
    return AttestationService(store or MemoryStore(), collateral=collateral or NoCollateral(),
                              clock=clock or Clock(), cache_seconds=0.0, **kw)


def trustee_sample(digest: bytes = DIGEST) -> dict[str, Any]:
    return {"svn": "1", "report_data": base64.b64encode(digest).decode()}


PCRS = [bytes([i]) * 32 for i in range(24)]


def tpm_evidence(nonce: bytes, *, key: ec.EllipticCurvePrivateKey,
                 pcrs: list[bytes] | None = None) -> dict[str, Any]:
    """Trustee ``tpm`` primary evidence: a quote over sha256 PCR0-23 signed by an ECDSA AK."""
    values = pcrs or PCRS
    message = builders.quote_for(values, extra=nonce)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"ak_public": base64.b64encode(spki).decode(),
            "tpm_quote": {"message": base64.b64encode(message).decode(),
                          "signature": base64.b64encode(builders.sign_ecdsa(key, message)).decode(),
                          "pcrs": [p.hex() for p in values]}}


def spki_hex(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).hex()


def cpu0(claims: dict[str, Any]) -> dict[str, Any]:
    sub: dict[str, Any] = claims["submods"]["cpu0"]
    return sub


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
