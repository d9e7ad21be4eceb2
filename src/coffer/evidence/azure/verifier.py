"""Verification of Azure confidential-VM evidence: tees ``az-snp-vtpm`` and ``az-tdx-vtpm``.

The evidence ties three statements together: the hardware report (SNP report signed by the VCEK, or
a TD quote signed through Intel's PCK chain) binds the HCL variable data by hash; the variable data
carries the vTPM attestation key (HCLAkPub); the AK signs a TPM quote over the PCRs and the
verifier's nonce. Accepted JSON forms (those of the Trustee attesters):

* SNP v0: ``{"quote": {signature, message, pcrs}, "report": [HCL bytes], "vcek": "<PEM>"}``
* SNP v1/v2: ``{"version": 1|2, "tpm_quote": {hex fields}, "hcl_report": "<base64url>",
  "vcek": "<base64url DER>"}``
* TDX v0: ``{"tpm_quote": {...}, "hcl_report": [bytes], "td_quote": [bytes]}``
* TDX v1: ``{"version": 1, "tpm_quote": {hex}, "hcl_report": "<base64url>", "td_quote": "<base64url>"}``

Steps (SNP / TDX):

1. parse evidence;
2. parse HCL report (its report type must match the tee);
3. var-data binding: the hardware report's REPORT_DATA = H(variable data) ‖ zeros;
4. hardware report: SNP — :func:`coffer.evidence.snp.verify_snp_report` with the VCEK carried in the
   evidence tried before the caller's collateral, and VMPL must be 0 (the paravisor's report);
   TDX — :func:`coffer.evidence.dcap.verify_tdx_quote` of ``td_quote``;
5. (TDX only) the TD quote body repeats the TDREPORT of the HCL report (TCB, TD info, REPORTDATA);
6. attestation key: HCLAkPub of the variable data (RSA JWK);
7. the TPM quote steps of :mod:`coffer.evidence.tpm.verifier`: signature by the AK, attestation
   structure, nonce (extraData == ``options.expected_report_data`` exactly), PCR digest;
8. (evidence version 2) user data: the variable data's ``user-data`` must be the hex of the expected
   report data zero-padded to 64 bytes (compared case-insensitively).

The hardware verifier runs without the caller's expected report data (its REPORT_DATA is the
variable-data digest, checked in step 3); the nonce is checked against the TPM quote.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn

from coffer._internal.encoding import load_json_object
from coffer.errors import FormatError, PolicyDeniedError, UnsupportedError, VerificationError
from coffer.evidence.azure.hcl import (
    HASH_TYPES,
    REPORT_TYPE_SNP,
    REPORT_TYPE_TDX,
    VarData,
    parse_hcl_report,
    parse_var_data,
    td_quote_mismatches,
    var_data_binding_problem,
)
from coffer.evidence.base import Claims, StepRunner, VerifyOptions
from coffer.evidence.collateral import (
    ChainedSource,
    CollateralSource,
    EmbeddedSnpEndorsements,
    SnpEndorsements,
)
from coffer.evidence.tpm import structures as st
from coffer.evidence.tpm.verifier import (
    AttestationKey,
    QuoteParts,
    decode_blob,
    decode_quote_object,
    pcr_values,
    rsa_jwk_to_ak,
    run_quote_steps,
)
from coffer.evidence.x509util import certificate_ders

SNP_TEE = "az-snp-vtpm"
TDX_TEE = "az-tdx-vtpm"
MAX_EVIDENCE_BYTES = 1024 * 1024
MAX_HCL_REPORT = 16 * 1024
MAX_TD_QUOTE = 64 * 1024
HCL_VMPL = 0
_SNP_VMPL_OFFSET = 0x30


# --------------------------------------------------------------------------------------------------
# Evidence


@dataclass(frozen=True, kw_only=True)
class AzureVtpmEvidence:
    """Decoded Azure vTPM evidence. ``vcek`` (SNP) is DER; ``td_quote`` is set for TDX."""

    tee: str
    version: int
    hcl_report: bytes
    quote: QuoteParts
    vcek: bytes | None = None
    td_quote: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tee": self.tee, "version": self.version}
        try:
            out["hcl_report"] = parse_hcl_report(self.hcl_report).to_dict()
        except FormatError as exc:
            out["hcl_report_error"] = str(exc)
        try:
            out["tpm_attest"] = st.parse_attest(self.quote.message).to_dict()
        except FormatError as exc:
            out["tpm_attest_error"] = str(exc)
        out["tpm_signature"] = self.quote.signature.hex()
        out["pcrs"] = [p.hex() for p in self.quote.pcrs]
        if self.vcek is not None:
            out["vcek"] = self.vcek.hex()
        if self.td_quote is not None:
            out["td_quote"] = self.td_quote.hex()
        return out


def _vcek_der(value: object) -> bytes:
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        raw = value.encode()
    else:
        raw = decode_blob(value, "vcek", max_len=16 * 1024)
    ders = certificate_ders(raw, "VCEK")
    if len(ders) != 1:
        raise FormatError("VCEK", f"expected one certificate, found {len(ders)}")
    return ders[0]


def parse_azure_evidence(data: bytes, tee: str) -> AzureVtpmEvidence:
    """Decode any of the accepted JSON forms of ``tee`` (``az-snp-vtpm`` or ``az-tdx-vtpm``)."""
    what = f"{tee} evidence"
    doc = load_json_object(data, what, max_bytes=MAX_EVIDENCE_BYTES)
    version = doc.get("version", 0)
    if type(version) is not int or version not in (0, 1, 2):
        raise FormatError(what, f"unsupported evidence version {version!r}")
    if tee == SNP_TEE:
        if version == 0:
            allowed, quote_key, hcl_key = {"quote", "report", "vcek"}, "quote", "report"
        else:
            allowed = {"version", "tpm_quote", "hcl_report", "vcek"}
            quote_key, hcl_key = "tpm_quote", "hcl_report"
    elif tee == TDX_TEE:
        allowed = {"tpm_quote", "hcl_report", "td_quote"} | ({"version"} if "version" in doc else set())
        quote_key, hcl_key = "tpm_quote", "hcl_report"
    else:
        raise UnsupportedError(f"not an Azure vTPM tee: {tee!r}")
    if set(doc) != allowed:
        raise FormatError(what, f"version {version} evidence has fields {sorted(allowed)}, got {sorted(doc)}")
    return AzureVtpmEvidence(
        tee=tee,
        version=version,
        hcl_report=decode_blob(doc[hcl_key], "hcl_report", max_len=MAX_HCL_REPORT),
        quote=decode_quote_object(doc[quote_key], quote_key),
        vcek=_vcek_der(doc["vcek"]) if tee == SNP_TEE else None,
        td_quote=decode_blob(doc["td_quote"], "td_quote", max_len=MAX_TD_QUOTE) if tee == TDX_TEE else None,
    )


# --------------------------------------------------------------------------------------------------
# Lower-level checks (also usable on the raw azure-cvm-tooling files)


def ak_from_var_data(var_data: bytes | VarData) -> AttestationKey:
    """The attestation key (HCLAkPub JWK) of HCL variable data; FormatError when unreadable."""
    parsed = var_data if isinstance(var_data, VarData) else parse_var_data(var_data)
    return rsa_jwk_to_ak(parsed.ak_jwk, "HCLAkPub JWK")


def expected_user_data_matches(user_data: str | None, expected: bytes) -> bool:
    """Whether var-data ``user-data`` is the hex of ``expected`` zero-padded to 64 bytes
    (case-insensitive)."""
    if user_data is None or len(expected) > 64:
        return False
    return user_data.lower() == expected.ljust(64, b"\0").hex()


def _snp_vmpl(report: bytes) -> int:
    return int.from_bytes(report[_SNP_VMPL_OFFSET : _SNP_VMPL_OFFSET + 4], "little")


def _sub_failure(steps: StepRunner, label: str, exc: VerificationError) -> NoReturn:
    reason = f"{label} rejected at {exc.tee} step {exc.step} ({exc.step_name}): {exc.reason}"
    if isinstance(exc, PolicyDeniedError):
        steps.deny(reason)
    steps.fail(reason)


# --------------------------------------------------------------------------------------------------
# Claims and verification


@dataclass(frozen=True, kw_only=True)
class AzureVtpmClaims(Claims):
    """Claims of verified Azure vTPM evidence. ``report_data`` is the TPM quote's extraData (the
    nonce); ``snp`` or ``tdx`` holds the hardware verifier's claims (nested in ``to_dict()``);
    ``tpm`` the quoted PCRs (``{"pcrs": {"sha256": {"0": ..., ...}}}``), signature scheme, clock,
    firmware version and qualified signer."""

    evidence_version: int
    hcl: dict[str, Any]
    ak_public_sha256: bytes
    tpm: dict[str, Any]
    snp: Claims | None = None
    tdx: Claims | None = None
    vm_configuration: dict[str, Any]
    user_data: bytes | None = None


def verify_azure_vtpm(
    data: bytes | AzureVtpmEvidence,
    tee: str,
    collateral: CollateralSource,
    options: VerifyOptions,
) -> AzureVtpmClaims:
    """Verify Azure vTPM evidence (JSON, or already decoded) for ``tee``."""
    steps = StepRunner(tee)
    with steps.step(1, "parse evidence"):
        evidence = data if isinstance(data, AzureVtpmEvidence) else parse_azure_evidence(data, tee)
        if evidence.tee != tee:
            steps.fail(f"evidence is for {evidence.tee}, not {tee}")
        if tee == TDX_TEE and evidence.td_quote is None:
            steps.fail("az-tdx-vtpm evidence needs a TD quote")
        pcrs = pcr_values(evidence.quote.pcrs, "tpm_quote.pcrs")

    with steps.step(2, "parse HCL report"):
        hcl = parse_hcl_report(evidence.hcl_report)
        wanted = REPORT_TYPE_SNP if tee == SNP_TEE else REPORT_TYPE_TDX
        if hcl.report_type != wanted:
            steps.fail(f"the HCL report carries a {hcl.kind} report, {tee} needs "
                       f"{'snp' if wanted == REPORT_TYPE_SNP else 'tdx'}")
        td_report = hcl.td_report if tee == TDX_TEE else None

    with steps.step(3, "check var-data binding"):
        problem = var_data_binding_problem(hcl)
        if problem:
            steps.fail(problem)

    hw_options = dataclasses.replace(options, expected_report_data=None)
    snp_claims: Claims | None = None
    tdx_claims: Claims | None = None
    hw_insecure = False
    n = 4
    if tee == SNP_TEE:
        with steps.step(n, "verify SNP report"):
            from coffer.evidence.snp import verify_snp_report  # noqa: PLC0415

            source: CollateralSource = collateral
            if evidence.vcek is not None:
                embedded = EmbeddedSnpEndorsements(SnpEndorsements(leaf=evidence.vcek, source="evidence"))
                source = ChainedSource([embedded, collateral])
            try:
                claims = verify_snp_report(hcl.snp_report, source, hw_options)
            except VerificationError as exc:
                _sub_failure(steps, "SNP report", exc)
            vmpl = _snp_vmpl(hcl.snp_report)
            if vmpl != HCL_VMPL:
                steps.fail(f"the SNP report comes from VMPL {vmpl}; the HCL reports from VMPL {HCL_VMPL}")
            snp_claims = claims
            hw_insecure = claims.insecure
    else:
        assert evidence.td_quote is not None
        assert td_report is not None
        with steps.step(n, "verify TD quote"):
            try:
                from coffer.evidence.dcap import verify_tdx_quote  # noqa: PLC0415
            except ImportError as exc:
                raise UnsupportedError("TDX quote verification is not available") from exc
            try:
                tclaims = verify_tdx_quote(evidence.td_quote, collateral, hw_options)
            except VerificationError as exc:
                _sub_failure(steps, "TD quote", exc)
            tdx_claims = tclaims
            hw_insecure = tclaims.insecure
        n += 1
        with steps.step(n, "match TD quote to TDREPORT"):
            differing = td_quote_mismatches(evidence.td_quote, td_report)
            if differing:
                steps.fail(f"the TD quote body differs from the HCL TDREPORT in {', '.join(differing)}")

    n += 1
    with steps.step(n, "read attestation key"):
        var_data = parse_var_data(hcl.var_data)
        ak = ak_from_var_data(var_data)

    verified = run_quote_steps(steps, n + 1, ak=ak, message=evidence.quote.message,
                               signature=evidence.quote.signature, pcrs=pcrs,
                               expected_nonce=options.expected_report_data)
    n = verified.next_step
    # Older attesters leave user-data unrelated to the nonce, so only version 2 evidence is held to
    # it. The version field is unsigned: a v2 document relabelled v1 loses the HCL report's own
    # freshness but not the TPM quote's nonce check (step above), which binds the same AK.
    if evidence.version >= 2:
        with steps.step(n, "check user data"):
            expected = options.expected_report_data
            if expected is not None and not expected_user_data_matches(var_data.user_data, expected):
                steps.fail("the HCL user-data is not the expected report data")

    user_data = bytes.fromhex(var_data.user_data) if var_data.user_data is not None else None
    attest = verified.attest
    tpm_claims: dict[str, Any] = {
        "pcrs": verified.pcr_claims(),
        "signature_scheme": verified.signature_scheme,
        "clock": attest.clock_info,
        "firmware_version": attest.firmware_version,
        "qualified_signer": attest.qualified_signer,
    }
    return AzureVtpmClaims(
        tee=tee,
        insecure=hw_insecure,
        report_data=attest.extra_data,
        steps=steps.done,
        evidence_version=evidence.version,
        hcl={"version": hcl.version, "report_type": hcl.kind, "hash_type": HASH_TYPES[hcl.hash_type]},
        ak_public_sha256=ak.sha256,
        tpm=tpm_claims,
        snp=snp_claims,
        tdx=tdx_claims,
        vm_configuration=var_data.vm_configuration,
        user_data=user_data,
    )


class _AzureHandler:
    name: ClassVar[str]
    input_kind: ClassVar[Literal["binary", "json"]] = "json"

    def parse(self, data: bytes) -> AzureVtpmEvidence:
        return parse_azure_evidence(data, self.name)

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> Claims:
        return verify_azure_vtpm(data, self.name, collateral, options)


class SnpVtpmHandler(_AzureHandler):
    """The ``az-snp-vtpm`` TEE handler."""

    name: ClassVar[str] = SNP_TEE


class TdxVtpmHandler(_AzureHandler):
    """The ``az-tdx-vtpm`` TEE handler."""

    name: ClassVar[str] = TDX_TEE


SNP_VTPM_HANDLER = SnpVtpmHandler()
TDX_VTPM_HANDLER = TdxVtpmHandler()

