"""Verification of Intel DCAP quotes (TDX v4/v5, SGX v3) against Intel PCS collateral.

Steps (a rejection names its number):

1. parse quote: lengths, version, TEE type (a TDX verifier refuses an SGX quote and vice versa);
2. verify PCK chain: PCK -> PCK Platform/Processor CA -> the pinned Intel SGX Root CA, signatures
   and validity at ``options.at``; read the PCK's SGX extension (FMSPC, TCB, PCE-ID);
3. verify QE report signature: ECDSA P-256 by the PCK key over the 384-byte QE report;
4. check QE report data: REPORTDATA = SHA-256(attestation key || QE authentication data) || 32 zeros;
5. verify quote signature: ECDSA P-256 by the attestation key over header || body (v3 [0:0x1B0],
   v4 [0:0x278], v5 [0:0x36 + body size]);
6. obtain collateral: an :class:`IntelCollateralQuery` (tee, FMSPC, PCK CA) to the collateral source;
7. verify collateral: TCB info and QE identity signatures over their exact bytes, signer chains to
   the root, issueDate <= at <= nextUpdate, certificate validity; TCB info id/FMSPC/PCE-ID and QE
   identity id match the quote;
8. check revocation: PCK CRL signed by the PCK's CA, root CA CRL signed by the root, both current;
   the PCK, its CA and the collateral signers are not revoked;
9. match QE identity: MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES (masked); QE TCB level;
10. evaluate TCB (Intel QVL algorithm, :mod:`.tcb`): ``TcbNotSupported`` and ``Revoked`` are refused;
    every other status (including OutOfDate) is reported in the claims for the relying party's
    policy to judge, with the advisory IDs and the TCB date;
11. check debug: a debug TD (TDATTRIBUTES bit 0) or enclave (ATTRIBUTES bit 1) is refused unless
    ``options.allow_debug``; allowed debug evidence is labelled ``insecure``;
12. check report data against ``options.expected_report_data`` (a shorter value is zero-padded to 64).

Work that depends only on immutable inputs (PEM chains, certificate signatures, the QE report
signature, collateral parsing and signatures, CRL signatures) is memoised per distinct bytes; the
quote's own signature and every time-dependent check run on every call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coffer._internal.memo import IdentityMemo
from coffer.errors import FormatError
from coffer.evidence.base import Claims, StepRunner, VerifyOptions, check_report_data
from coffer.evidence.collateral import CollateralSource, IntelCollateral, IntelCollateralQuery
from coffer.evidence.dcap.collateral import (
    EnclaveIdentity,
    IdentityLevel,
    TcbInfo,
    chain_to_root,
    check_chain_validity,
    der_of,
    raw_p256_key,
    verify_crl,
    verify_qe_identity,
    verify_tcb_info,
)
from coffer.evidence.dcap.pck import PckCaType, PckExtension, pck_ca_type, pck_extension
from coffer.evidence.dcap.quote import EnclaveReport, Quote, TdReportBody, parse_quote
from coffer.evidence.dcap.roots import intel_sgx_root_ca_der
from coffer.evidence.dcap.tcb import TcbMismatchError, TcbResult, check_qe_identity, evaluate_tcb
from coffer.evidence.x509util import certificate_ders, check_not_revoked, cn, load_certificate

IntelTee = Literal["sgx", "tdx"]


@dataclass(frozen=True, kw_only=True)
class TdxClaims(Claims):
    """Claims of a verified TDX quote. ``debug`` is TDATTRIBUTES bit 0."""

    quote_version: int
    body_type: int | None = None
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    debug: bool
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None
    fmspc: bytes
    pck_ca: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    tcb_date: datetime | None
    platform_tcb_status: str
    qe_tcb_status: str
    tdx_module_tcb_status: str | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for optional in ("body_type", "tee_tcb_svn2", "mr_servicetd", "tdx_module_tcb_status"):
            if out.get(optional) is None:
                out.pop(optional, None)
        return out


@dataclass(frozen=True, kw_only=True)
class SgxClaims(Claims):
    """Claims of a verified SGX quote. ``debug`` is ATTRIBUTES.FLAGS bit 1."""

    quote_version: int
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes
    debug: bool
    misc_select: int
    config_id: bytes
    config_svn: int
    isv_ext_prod_id: bytes
    isv_family_id: bytes
    cpu_svn: bytes
    fmspc: bytes
    pck_ca: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    tcb_date: datetime | None
    platform_tcb_status: str
    qe_tcb_status: str


@lru_cache(maxsize=256)
def _chain_ders(pem: bytes) -> tuple[bytes, ...]:
    return tuple(certificate_ders(pem, "PCK certificate chain"))


@lru_cache(maxsize=256)
def _pck_info(pck_der: bytes) -> tuple[PckExtension, PckCaType]:
    cert = load_certificate(pck_der, "PCK certificate")
    return pck_extension(cert), pck_ca_type(cert.issuer)


@lru_cache(maxsize=256)
def _qe_report_signed_by(pck_der: bytes, qe_report: bytes, signature: bytes) -> bool:
    """Whether the PCK key signed the QE report. The QE report and its signature are fixed per
    platform (not per quote), so the answer is memoised like a certificate signature."""
    key = raw_p256_key(load_certificate(pck_der, "PCK certificate"), "PCK certificate")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), qe_report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@lru_cache(maxsize=1024)
def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError as exc:
        raise FormatError("DCAP quote", "attestation key is not a point on P-256") from exc


# The QE identity match and the TCB evaluation are pure functions of the platform (PCK extension,
# QE report, TDX module fields) and of the collateral objects, which the collateral cache hands out
# unchanged while the collateral bytes are unchanged. Remembering them keeps a warm verification down
# to the quote's own signature check; any change of input misses the memo.
_QE_IDENTITY_MEMO: IdentityMemo[IdentityLevel | None] = IdentityMemo()
_TCB_MEMO: IdentityMemo[TcbResult] = IdentityMemo()


def _check_qe_identity(identity: EnclaveIdentity, qe_report: EnclaveReport) -> IdentityLevel | None:
    memo_key = (identity,)
    found = _QE_IDENTITY_MEMO.get(memo_key, qe_report.raw)
    if found is not None:
        return found
    level = check_qe_identity(identity, qe_report)
    if level is not None:
        _QE_IDENTITY_MEMO.put(memo_key, level, qe_report.raw)
    return level


def _evaluate_tcb(info: TcbInfo, pck: PckExtension, qe_level: IdentityLevel | None,
                  td: TdReportBody | None) -> TcbResult:
    td_fields = None if td is None else (td.tee_tcb_svn, td.mr_signer_seam, td.seam_attributes)
    objects = (info, pck, qe_level)
    found = _TCB_MEMO.get(objects, td_fields)
    if found is not None:
        return found
    result = evaluate_tcb(info, pck.tcb, qe_level, td)
    _TCB_MEMO.put(objects, result, td_fields)
    return result


@dataclass(frozen=True)
class _Outcome:
    quote: Quote
    pck: PckExtension
    pck_ca: PckCaType
    tcb: TcbResult
    debug: bool
    steps: tuple[str, ...]


def _verify(tee: IntelTee, data: bytes, collateral: CollateralSource, options: VerifyOptions,
            root: x509.Certificate | None) -> _Outcome:
    steps = StepRunner(tee)
    at = options.at
    trust = der_of(root) if root is not None else intel_sgx_root_ca_der()

    with steps.step(1, "parse quote"):
        quote = parse_quote(data)
        if quote.is_tdx != (tee == "tdx"):
            kind = "TDX" if quote.is_tdx else "SGX"
            steps.fail(f"this is a {kind} quote, not {tee.upper()}")

    qe = quote.qe
    with steps.step(2, "verify PCK certificate chain"):
        ders = _chain_ders(qe.pck_chain_pem)
        chain = chain_to_root(ders, trust, "PCK certificate chain")
        if len(chain) != 3:
            steps.fail(f"expected PCK, PCK CA and root, got {len(chain)} certificates")
        check_chain_validity(chain, at, "PCK certificate chain")
        pck_cert, pck_ca_cert = chain[0], chain[1]
        pck_der, ca_der = ders[0], ders[1]
        pck, ca_type = _pck_info(pck_der)

    with steps.step(3, "verify QE report signature"):
        if not _qe_report_signed_by(pck_der, qe.qe_report.raw, qe.qe_report_signature):
            steps.fail("the QE report signature by the PCK key does not verify")

    with steps.step(4, "check QE report data"):
        expected = hashlib.sha256(quote.signature_data.attestation_key + qe.qe_auth_data).digest()
        if qe.qe_report.report_data != expected + bytes(32):
            steps.fail("QE report data is not SHA-256(attestation key || QE authentication data)")

    with steps.step(5, "verify quote signature"):
        key = _attestation_key(quote.signature_data.attestation_key)
        sig = quote.signature_data.signature
        der_sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            key.verify(der_sig, quote.signed_bytes, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            steps.fail("the quote signature by the attestation key does not verify")

    with steps.step(6, "obtain collateral"):
        col: IntelCollateral = collateral.intel_collateral(
            IntelCollateralQuery(tee=tee, fmspc=pck.fmspc, pck_ca=ca_type))

    with steps.step(7, "verify collateral"):
        tcb_info, tcb_signers = verify_tcb_info(col.tcb_info, col.tcb_info_issuer_chain, at, root=trust)
        identity, qe_signers = verify_qe_identity(col.qe_identity, col.qe_identity_issuer_chain, at,
                                                  root=trust)
        want_id = "TDX" if tee == "tdx" else "SGX"
        if tcb_info.id != want_id:
            steps.fail(f"TCB info is for {tcb_info.id}, the quote is {want_id}")
        if tee == "tdx" and tcb_info.version < 3:
            steps.fail("TDX needs TCB info version 3")
        if tcb_info.fmspc != pck.fmspc:
            steps.fail(f"TCB info is for FMSPC {tcb_info.fmspc.hex()}, the PCK says {pck.fmspc.hex()}")
        if tcb_info.pce_id != pck.pce_id:
            steps.fail(f"TCB info is for PCE-ID {tcb_info.pce_id.hex()}, the PCK says {pck.pce_id.hex()}")
        want_qe = "TD_QE" if tee == "tdx" else "QE"
        if identity.id != want_qe:
            steps.fail(f"QE identity is for {identity.id}, expected {want_qe}")

    with steps.step(8, "check revocation"):
        pck_crl = verify_crl(col.pck_crl, ca_der, at, "PCK CRL")
        check_not_revoked(pck_crl, pck_cert, "PCK certificate")
        if col.pck_crl_issuer_chain:
            crl_chain = chain_to_root(col.pck_crl_issuer_chain, trust, "PCK CRL issuer chain")
            if (bytes(col.pck_crl_issuer_chain[0]) != ca_der
                    and crl_chain[0].public_key() != pck_ca_cert.public_key()):
                steps.fail("the PCK CRL issuer chain is for another CA than the PCK's")
        if col.root_ca_crl is None:
            steps.fail("the root CA CRL is missing from the collateral")
        root_crl = verify_crl(col.root_ca_crl, trust, at, "root CA CRL")
        for cert in (pck_ca_cert, *tcb_signers[:-1], *qe_signers[:-1]):
            if root_crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                steps.fail(f"intermediate certificate {cn(cert.subject)!r} "
                           f"(serial {cert.serial_number:#x}) is revoked")

    with steps.step(9, "match QE identity"):
        try:
            qe_level = _check_qe_identity(identity, qe.qe_report)
        except TcbMismatchError as exc:
            steps.fail(str(exc))

    body = quote.body
    td = body if isinstance(body, TdReportBody) else None
    with steps.step(10, "evaluate TCB"):
        try:
            result = _evaluate_tcb(tcb_info, pck, qe_level, td)
        except TcbMismatchError as exc:
            steps.fail(str(exc))
        if result.rejected:
            detail = f" (advisories: {', '.join(result.advisory_ids)})" if result.advisory_ids else ""
            steps.deny(f"TCB status {result.status}: platform {result.platform_status}, "
                       f"QE {result.qe_status}"
                       + (f", TDX module {result.module_status}" if result.module_status else "")
                       + detail)

    with steps.step(11, "check debug"):
        if body.debug and not options.allow_debug:
            what = "TD" if td is not None else "enclave"
            steps.deny(f"the {what} runs in debug mode (its memory is readable by the host)")

    with steps.step(12, "check report data"):
        check_report_data(steps, body.report_data, options.expected_report_data, pad_to=64)

    return _Outcome(quote=quote, pck=pck, pck_ca=ca_type, tcb=result, debug=body.debug, steps=steps.done)


def verify_tdx_quote(quote: bytes, collateral: CollateralSource, options: VerifyOptions, *,
                     root: x509.Certificate | None = None) -> TdxClaims:
    """Verify a TDX v4/v5 quote and return its claims. ``root`` replaces the pinned Intel root
    (for tests with synthetic chains only)."""
    out = _verify("tdx", quote, collateral, options, root)
    td = out.quote.td_report
    return TdxClaims(
        tee="tdx", insecure=out.debug, report_data=td.report_data, steps=out.steps,
        quote_version=out.quote.version, body_type=out.quote.body_type,
        tee_tcb_svn=td.tee_tcb_svn, mr_seam=td.mr_seam, mr_signer_seam=td.mr_signer_seam,
        seam_attributes=td.seam_attributes, td_attributes=td.td_attributes, debug=td.debug,
        xfam=td.xfam, mr_td=td.mr_td, mr_config_id=td.mr_config_id, mr_owner=td.mr_owner,
        mr_owner_config=td.mr_owner_config, rtmr0=td.rtmr0, rtmr1=td.rtmr1, rtmr2=td.rtmr2,
        rtmr3=td.rtmr3, tee_tcb_svn2=td.tee_tcb_svn2, mr_servicetd=td.mr_servicetd,
        fmspc=out.pck.fmspc, pck_ca=out.pck_ca, tcb_status=out.tcb.status,
        advisory_ids=out.tcb.advisory_ids, tcb_date=out.tcb.tcb_date,
        platform_tcb_status=out.tcb.platform_status, qe_tcb_status=out.tcb.qe_status,
        tdx_module_tcb_status=out.tcb.module_status,
    )


def verify_sgx_quote(quote: bytes, collateral: CollateralSource, options: VerifyOptions, *,
                     root: x509.Certificate | None = None) -> SgxClaims:
    """Verify an SGX v3 quote and return its claims. ``root`` replaces the pinned Intel root
    (for tests with synthetic chains only)."""
    out = _verify("sgx", quote, collateral, options, root)
    report: EnclaveReport = out.quote.enclave_report
    return SgxClaims(
        tee="sgx", insecure=out.debug, report_data=report.report_data, steps=out.steps,
        quote_version=out.quote.version, mr_enclave=report.mr_enclave, mr_signer=report.mr_signer,
        isv_prod_id=report.isv_prod_id, isv_svn=report.isv_svn, attributes=report.attributes,
        debug=report.debug, misc_select=report.misc_select, config_id=report.config_id,
        config_svn=report.config_svn, isv_ext_prod_id=report.isv_ext_prod_id,
        isv_family_id=report.isv_family_id, cpu_svn=report.cpu_svn,
        fmspc=out.pck.fmspc, pck_ca=out.pck_ca, tcb_status=out.tcb.status,
        advisory_ids=out.tcb.advisory_ids, tcb_date=out.tcb.tcb_date,
        platform_tcb_status=out.tcb.platform_status, qe_tcb_status=out.tcb.qe_status,
    )


class TdxHandler:
    name: ClassVar[str] = "tdx"
    input_kind: ClassVar[Literal["binary", "json"]] = "binary"

    def parse(self, data: bytes) -> Quote:
        return parse_quote(data)

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> TdxClaims:
        return verify_tdx_quote(data, collateral, options)


class SgxHandler:
    name: ClassVar[str] = "sgx"
    input_kind: ClassVar[Literal["binary", "json"]] = "binary"

    def parse(self, data: bytes) -> Quote:
        return parse_quote(data)

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> SgxClaims:
        return verify_sgx_quote(data, collateral, options)


TDX_HANDLER = TdxHandler()
SGX_HANDLER = SgxHandler()
