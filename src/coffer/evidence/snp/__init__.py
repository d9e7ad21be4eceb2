"""AMD SEV-SNP evidence: the ATTESTATION_REPORT parser, VCEK/VLEK endorsements, the built-in AMD
roots and the verifier."""

from __future__ import annotations

from coffer.evidence.snp.endorsements import KdsFetcher, OfflineSnpEndorsements
from coffer.evidence.snp.report import SnpReport, TcbVersion, parse_report
from coffer.evidence.snp.roots import ProductRoots, SnpTrustStore, builtin_roots
from coffer.evidence.snp.verifier import SnpClaims, SnpHandler, parse_evidence, verify_snp_report

HANDLER = SnpHandler()

__all__ = [
    "HANDLER",
    "KdsFetcher",
    "OfflineSnpEndorsements",
    "ProductRoots",
    "SnpClaims",
    "SnpHandler",
    "SnpReport",
    "SnpTrustStore",
    "TcbVersion",
    "builtin_roots",
    "parse_evidence",
    "parse_report",
    "verify_snp_report",
]
