"""Guess which TEE produced a piece of evidence, for ``coffer evidence show`` without ``--tee``.

Only the framing is looked at (version fields, magic numbers, JSON keys); nothing is verified, and
``verify`` always requires the TEE to be named, so a guess can never choose a weaker verifier.
"""

from __future__ import annotations

import json

_SNP_REPORT_SIZE = 0x4A0


def detect_tee(data: bytes) -> str | None:
    """The most likely TEE name for ``data`` (already decoded from hex/base64), or None."""
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        return _detect_json(stripped)
    if len(data) >= 4 and data[:4] == b"HCLA":
        return "az-snp-vtpm" if len(data) > 0x4C8 and data[0x4C8] == 2 else "az-tdx-vtpm"
    if len(data) >= 48:
        version = int.from_bytes(data[0:2], "little")
        key_type = int.from_bytes(data[2:4], "little")
        tee_type = int.from_bytes(data[4:8], "little")
        if version in (3, 4, 5) and key_type == 2:
            if tee_type == 0x81:
                return "tdx"
            if tee_type == 0:
                return "sgx"
    if len(data) >= _SNP_REPORT_SIZE:
        version = int.from_bytes(data[0:4], "little")
        algo = int.from_bytes(data[0x34:0x38], "little")
        if 2 <= version <= 5 and algo == 1:
            return "snp"
    return None


def _detect_json(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    keys = set(doc)
    if "attestation_report" in keys:
        return "snp"
    if "hcl_report" in keys or ("report" in keys and "quote" in keys):
        return "az-tdx-vtpm" if "td_quote" in keys else "az-snp-vtpm"
    if "ak_public" in keys and "tpm_quote" in keys:
        return "tpm"
    if {"svn", "report_data", "signature"} <= keys:
        return "sample"
    return None
