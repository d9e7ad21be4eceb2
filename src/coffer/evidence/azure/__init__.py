"""Azure confidential VMs: the HCL report (SNP report or TDREPORT plus runtime claims) and the vTPM
quote, verified together as tees ``az-snp-vtpm`` and ``az-tdx-vtpm``."""

from __future__ import annotations

from coffer.evidence.azure.hcl import (
    HclReport,
    TdReport,
    VarData,
    parse_hcl_report,
    parse_td_report,
    parse_var_data,
    td_quote_body,
    td_quote_mismatches,
    var_data_binding_problem,
)
from coffer.evidence.azure.verifier import (
    SNP_VTPM_HANDLER,
    TDX_VTPM_HANDLER,
    AzureVtpmClaims,
    AzureVtpmEvidence,
    ak_from_var_data,
    expected_user_data_matches,
    parse_azure_evidence,
    verify_azure_vtpm,
)

__all__ = [
    "SNP_VTPM_HANDLER",
    "TDX_VTPM_HANDLER",
    "AzureVtpmClaims",
    "AzureVtpmEvidence",
    "HclReport",
    "TdReport",
    "VarData",
    "ak_from_var_data",
    "expected_user_data_matches",
    "parse_azure_evidence",
    "parse_hcl_report",
    "parse_td_report",
    "parse_var_data",
    "td_quote_body",
    "td_quote_mismatches",
    "var_data_binding_problem",
    "verify_azure_vtpm",
]
