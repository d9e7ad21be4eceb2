"""TCB evaluation of a DCAP quote against verified collateral, following Intel's QVL algorithm.

1. **Platform level**: the first entry of ``tcbLevels`` (they are ordered newest first) whose SGX
   component SVNs are all ≤ the PCK certificate's, whose PCESVN is ≤ the PCK's, and, for TDX, whose
   TDX component SVNs are ≤ TEE_TCB_SVN's, compared from index 2 when TEE_TCB_SVN[1] (the TDX module
   major version) is non-zero and from index 0 otherwise. No match: ``TcbNotSupported``.
2. **TDX module** (TDX only): MRSIGNERSEAM and SEAMATTRIBUTES (masked) must match ``tdxModule``, or,
   when the module major version is non-zero and the TCB info lists ``tdxModuleIdentities``, the
   identity ``TDX_%02X`` (major version); its level is the first with ``isvsvn`` ≤ TEE_TCB_SVN[0].
3. **QE**: the first QE identity level with ``isvsvn`` ≤ the QE report's ISVSVN.
4. **Convergence**: a Revoked component makes the result Revoked; an OutOfDate QE or module turns
   UpToDate/SWHardeningNeeded into OutOfDate and ConfigurationNeeded/ConfigurationAndSWHardeningNeeded
   into OutOfDateConfigurationNeeded. Advisory IDs are the union over the levels used; the TCB date
   is the earliest of their dates.

The result is reported, not judged, except that TcbNotSupported and Revoked are rejections (the
verifier refuses them); OutOfDate and the other statuses go into the claims for the relying party's
policy to decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from coffer.errors import CofferError
from coffer.evidence.dcap.collateral import (
    EnclaveIdentity,
    IdentityLevel,
    TcbInfo,
    TcbLevel,
    TdxModuleIdentity,
)
from coffer.evidence.dcap.pck import PckTcb
from coffer.evidence.dcap.quote import EnclaveReport, TdReportBody

TCB_NOT_SUPPORTED = "TcbNotSupported"
REVOKED = "Revoked"
OUT_OF_DATE = "OutOfDate"
REJECTED_STATUSES = frozenset({TCB_NOT_SUPPORTED, REVOKED})

_OUT_OF_DATE_OF = {
    "UpToDate": "OutOfDate",
    "SWHardeningNeeded": "OutOfDate",
    "ConfigurationNeeded": "OutOfDateConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded": "OutOfDateConfigurationNeeded",
}


class TcbMismatchError(CofferError):
    """The quote's QE or TDX module is not the one the collateral describes."""


@dataclass(frozen=True, kw_only=True)
class TcbResult:
    status: str
    platform_status: str
    qe_status: str
    module_status: str | None
    advisory_ids: tuple[str, ...]
    tcb_date: datetime | None

    @property
    def rejected(self) -> bool:
        return self.status in REJECTED_STATUSES


def platform_level(info: TcbInfo, pck: PckTcb, tee_tcb_svn: bytes | None) -> TcbLevel | None:
    """The first TCB level the platform meets, or ``None`` (TCB not supported)."""
    start = 2 if tee_tcb_svn is not None and tee_tcb_svn[1] > 0 else 0
    for level in info.tcb_levels:
        if any(have < need for have, need in zip(pck.components, level.sgx_components, strict=True)):
            continue
        if pck.pcesvn < level.pcesvn:
            continue
        if info.id == "TDX":
            if tee_tcb_svn is None or level.tdx_components is None:
                continue
            if any(tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
                continue
        return level
    return None


def _first_identity_level(levels: tuple[IdentityLevel, ...], isvsvn: int) -> IdentityLevel | None:
    for level in levels:
        if isvsvn >= level.isvsvn:
            return level
    return None


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    return all((v & m) == (e & m) for v, e, m in zip(value, expected, mask, strict=True))


def check_qe_identity(identity: EnclaveIdentity, qe_report: EnclaveReport) -> IdentityLevel | None:
    """Match the QE report against the QE identity (raises :class:`TcbMismatchError`) and return its TCB
    level, or ``None`` when its ISVSVN is below every level."""
    if qe_report.mr_signer != identity.mrsigner:
        raise TcbMismatchError(f"QE MRSIGNER {qe_report.mr_signer.hex()} is not {identity.mrsigner.hex()}")
    if qe_report.isv_prod_id != identity.isvprodid:
        raise TcbMismatchError(f"QE ISVPRODID {qe_report.isv_prod_id} is not {identity.isvprodid}")
    if (qe_report.misc_select & identity.miscselect_mask) != (identity.miscselect & identity.miscselect_mask):
        raise TcbMismatchError("QE MISCSELECT does not match the QE identity")
    if not _masked_equal(qe_report.attributes, identity.attributes, identity.attributes_mask):
        raise TcbMismatchError("QE ATTRIBUTES do not match the QE identity")
    return _first_identity_level(identity.tcb_levels, qe_report.isv_svn)


def _module_identity(info: TcbInfo, td: TdReportBody) -> TdxModuleIdentity | None:
    major = td.tee_tcb_svn[1]
    if major == 0 or not info.tdx_module_identities:
        return None
    wanted = f"TDX_{major:02X}"
    for identity in info.tdx_module_identities:
        if identity.id.upper() == wanted:
            return identity
    raise TcbMismatchError(f"the TCB info has no TDX module identity {wanted}")


def check_tdx_module(info: TcbInfo, td: TdReportBody) -> tuple[bool, IdentityLevel | None]:
    """Match MRSIGNERSEAM/SEAMATTRIBUTES; returns (module identity used, its level or None)."""
    identity = _module_identity(info, td)
    if identity is not None:
        mrsigner, attributes, mask = identity.mrsigner, identity.attributes, identity.attributes_mask
    elif info.tdx_module is not None:
        mrsigner = info.tdx_module.mrsigner
        attributes, mask = info.tdx_module.attributes, info.tdx_module.attributes_mask
    else:
        raise TcbMismatchError("the TCB info describes no TDX module")
    if td.mr_signer_seam != mrsigner:
        raise TcbMismatchError(f"MRSIGNERSEAM {td.mr_signer_seam.hex()} is not the TDX module signer "
                               f"{mrsigner.hex()}")
    if not _masked_equal(td.seam_attributes, attributes, mask):
        raise TcbMismatchError("SEAMATTRIBUTES do not match the TDX module identity")
    if identity is None:
        return False, None
    return True, _first_identity_level(identity.tcb_levels, td.tee_tcb_svn[0])


def _converge(status: str, component: str) -> str:
    if component == REVOKED:
        return REVOKED
    if component == OUT_OF_DATE:
        return _OUT_OF_DATE_OF.get(status, status)
    return status


def evaluate_tcb(info: TcbInfo, pck: PckTcb, qe_level: IdentityLevel | None,
                 td: TdReportBody | None = None) -> TcbResult:
    """The converged TCB status of a quote (see the module docstring). ``qe_level`` comes from
    :func:`check_qe_identity`; for TDX, the module is matched here (:class:`TcbMismatchError`)."""
    levels: list[TcbLevel | IdentityLevel] = []
    platform = platform_level(info, pck, td.tee_tcb_svn if td is not None else None)
    platform_status = platform.tcb_status if platform is not None else TCB_NOT_SUPPORTED
    if platform is not None:
        levels.append(platform)

    qe_status = qe_level.tcb_status if qe_level is not None else TCB_NOT_SUPPORTED
    if qe_level is not None:
        levels.append(qe_level)

    module_status: str | None = None
    if td is not None:
        used, module_level = check_tdx_module(info, td)
        if used:
            module_status = module_level.tcb_status if module_level is not None else TCB_NOT_SUPPORTED
            if module_level is not None:
                levels.append(module_level)

    components = [qe_status] + ([module_status] if module_status is not None else [])
    if TCB_NOT_SUPPORTED in (platform_status, *components):
        status = TCB_NOT_SUPPORTED
    else:
        status = platform_status
        for component in components:
            status = _converge(status, component)

    advisories: list[str] = []
    for level in levels:
        for advisory in level.advisory_ids:
            if advisory not in advisories:
                advisories.append(advisory)
    tcb_date = min((level.tcb_date for level in levels), default=None)
    return TcbResult(status=status, platform_status=platform_status, qe_status=qe_status,
                     module_status=module_status, advisory_ids=tuple(advisories), tcb_date=tcb_date)
