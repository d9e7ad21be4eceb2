"""Intel DCAP quotes: TDX v4/v5 and SGX v3, verified against Intel PCS collateral.

* :func:`parse_quote` decodes a quote (pure, by length fields); :func:`parse_td_report_body`
  decodes a TD report body on its own. ``parse_quote(data).rtmrs`` gives RTMR0..3 of a TDX quote.
* :func:`verify_tdx_quote` / :func:`verify_sgx_quote` run the numbered steps documented in
  :mod:`coffer.evidence.dcap.verifier` and return :class:`TdxClaims` / :class:`SgxClaims`.
* :class:`OfflineIntelCollateral` and :class:`PcsFetcher` supply collateral.
"""

from __future__ import annotations

from coffer.evidence.dcap.quote import (
    EnclaveReport,
    Quote,
    TdReportBody,
    parse_enclave_report,
    parse_quote,
    parse_td_report_body,
)
from coffer.evidence.dcap.sources import OfflineIntelCollateral, PcsFetcher, StaticIntelCollateral
from coffer.evidence.dcap.verifier import (
    SGX_HANDLER,
    TDX_HANDLER,
    SgxClaims,
    TdxClaims,
    verify_sgx_quote,
    verify_tdx_quote,
)

__all__ = [
    "SGX_HANDLER",
    "TDX_HANDLER",
    "EnclaveReport",
    "OfflineIntelCollateral",
    "PcsFetcher",
    "Quote",
    "SgxClaims",
    "StaticIntelCollateral",
    "TdReportBody",
    "TdxClaims",
    "parse_enclave_report",
    "parse_quote",
    "parse_td_report_body",
    "verify_sgx_quote",
    "verify_tdx_quote",
]
