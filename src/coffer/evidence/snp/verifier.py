"""Verification of an AMD SEV-SNP attestation report.

Steps (a rejection names the step it happened in):

1. parse report: the binary ATTESTATION_REPORT, or the CoCo ``snp`` attester JSON rebuilt into it.
2. determine product and signing key: the product from the CPUID bytes (version 3+; a version 2
   report leaves candidates to try), the key from the signer info (VCEK or VLEK; unsigned refused).
3. obtain endorsement: certificates carried in the evidence first, then the caller's source, asked
   with the product, signer, hardware id and the REPORTED_TCB patch levels in KDS order.
4. verify endorsement chain: VCEK <- ASK (VLEK <- ASVK) <- ARK of the report's product, every link
   RSASSA-PSS, every certificate valid at ``options.at``, the ARK equal to the built-in pinned one,
   supplied intermediates issued by it.
5. check endorsement against report: product name, the bl/tee/snp/ucode (and fmc on Turin) levels
   against REPORTED_TCB, the hardware id against CHIP_ID (VCEK; CHIP_ID[0:8] on Turin), or for a VLEK
   the absence of a hardware id; a VCEK-signed report must not have MASK_CHIP_KEY set.
6. verify report signature: ECDSA P-384 / SHA-384 over bytes 0x000-0x29F with the endorsed key.
7. check guest policy: a debug guest is refused unless ``options.allow_debug``.
8. check report data: REPORT_DATA against ``options.expected_report_data`` zero-padded to 64 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coffer._internal.memo import IdentityMemo
from coffer.errors import CollateralError, FormatError
from coffer.evidence.base import Claims, StepRunner, VerifyOptions, check_report_data
from coffer.evidence.collateral import (
    ChainedSource,
    CollateralSource,
    EmbeddedSnpEndorsements,
    SnpEndorsementQuery,
    SnpEndorsements,
    SnpSigner,
)
from coffer.evidence.snp.certs import EndorsementExtensions, load_cert, parse_endorsement_der
from coffer.evidence.snp.report import SnpReport, parse_report, uses_turin_tcb_layout
from coffer.evidence.snp.roots import ProductRoots, SnpTrustStore, builtin_roots
from coffer.evidence.snp.wire import is_json_evidence, parse_json_evidence
from coffer.evidence.x509util import AMD_RSA_PSS, ChainError, check_issued_by, check_validity, cn

TEE = "snp"


@dataclass(frozen=True, kw_only=True)
class SnpClaims(Claims):
    """What a verified SNP report says. Byte fields are hex in ``to_dict()``; TCB values are objects
    with ``bootloader``, ``tee``, ``snp``, ``microcode`` (and ``fmc`` on Turin)."""

    version: int
    product: str
    signer: str
    measurement: bytes
    host_data: bytes
    chip_id: bytes
    reported_tcb: dict[str, int]
    current_tcb: dict[str, int]
    committed_tcb: dict[str, int]
    launch_tcb: dict[str, int]
    current_version: str
    committed_version: str
    policy: dict[str, Any]
    vmpl: int
    platform_info: dict[str, Any]
    id_key_digest: bytes
    author_key_digest: bytes
    family_id: bytes
    image_id: bytes
    guest_svn: int
    report_id: bytes
    report_id_ma: bytes
    cpuid: dict[str, int] | None  # family, model, stepping (report version 3 and later)
    launch_mit_vector: int | None  # mitigation vectors (report version 5)
    current_mit_vector: int | None
    endorsement: dict[str, str]


def _v2_candidates(report: SnpReport, store: SnpTrustStore) -> tuple[str, ...]:
    """Products a version 2 report may come from, most likely first. A CHIP_ID with only its first
    8 bytes set is the Turin shape."""
    order = ["Milan", "Genoa", "Turin"]
    if any(report.chip_id[:8]) and not any(report.chip_id[8:]):
        order = ["Turin", "Milan", "Genoa"]
    return tuple(p for p in order if store.get(p) is not None)


def _decoded_as(report: SnpReport, product: str) -> SnpReport:
    """The report with its TCB fields decoded in ``product``'s layout. A version 2 report carries no
    product; when the layout is the one it was decoded with, the same object is returned (the caller
    keeps the product it settled on), otherwise it is parsed again for that product."""
    if report.product == product or uses_turin_tcb_layout(product, None) == report.is_turin_layout:
        return report
    return parse_report(report.raw, product=product)


def _query(report: SnpReport, product: str, signer: SnpSigner) -> SnpEndorsementQuery:
    as_product = _decoded_as(report, product)
    return SnpEndorsementQuery(
        product=product,
        signer=signer,
        hwid=as_product.kds_hwid(),
        tcb_params=as_product.reported_tcb.kds_params(),
    )


def _obtain(
    source: CollateralSource, report: SnpReport, signer: SnpSigner, candidates: tuple[str, ...]
) -> SnpEndorsements:
    errors: list[str] = []
    for product in candidates:
        try:
            return source.snp_endorsements(_query(report, product, signer))
        except CollateralError as exc:
            errors.append(f"{product}: {exc}" if len(candidates) > 1 else str(exc))
    raise CollateralError("; ".join(errors) or "no product to ask for")


def _product_of_endorsement(
    cert: x509.Certificate, ext: EndorsementExtensions, store: SnpTrustStore, signer: SnpSigner
) -> str | None:
    """The product a certificate belongs to: its productName, else the product whose intermediate
    issued it."""
    if ext.product is not None and store.get(ext.product) is not None:
        return ext.product
    for product in store.products:
        roots = store.get(product)
        if roots is not None and roots.intermediate(signer).subject == cert.issuer:
            return product
    return None


def _verify_chain(
    leaf: x509.Certificate,
    *,
    supplied: tuple[bytes, ...],
    roots: ProductRoots,
    product: str,
    signer: SnpSigner,
    options: VerifyOptions,
) -> None:
    ark = roots.ark
    expected_mid = roots.intermediate(signer)
    mid_role = "ASVK" if signer == "vlek" else "ASK"
    leaf_role = signer.upper()
    mid: x509.Certificate | None = None
    for der in supplied:
        if der in roots.intermediate_ders or der == roots.ark_der:
            continue  # the built-in certificate itself
        cert = load_cert(der, "supplied AMD chain certificate")
        if cert.subject == cert.issuer:  # a root, and not the built-in one (that was skipped above)
            raise ChainError(
                f"supplied root {cn(cert.subject)!r} is not the built-in AMD ARK-{product} "
                f"(the report is from a {product})"
            )
        check_issued_by(cert, ark, f"supplied {cn(cert.subject)!r}", rsa_pss=AMD_RSA_PSS)
        if cert.subject == expected_mid.subject and mid is None:
            mid = cert  # a re-issued intermediate, checked against the ARK above
    if mid is None:
        mid = expected_mid
    # The trust store checked the ARK's own signature and the built-in intermediates when it was
    # built; supplied intermediates were checked above. Validity windows depend on the time, so they
    # are checked on every call. Names are compared (in check_issued_by) only until the pair is known.
    try:
        check_issued_by(leaf, mid, leaf_role, rsa_pss=AMD_RSA_PSS)
    except ChainError:
        if leaf.issuer != mid.subject:
            raise ChainError(
                f"the {leaf_role} is issued by {cn(leaf.issuer)!r}, not by the {product} {mid_role} "
                f"{cn(mid.subject)!r}"
            ) from None
        raise
    check_validity(ark, options.at, f"ARK-{product}")
    check_validity(mid, options.at, f"{mid_role} of {product}")
    check_validity(leaf, options.at, leaf_role)


_NAMES_MEMO: IdentityMemo[tuple[str, str]] = IdentityMemo()


def _common_names(cert: x509.Certificate) -> tuple[str, str]:
    """Subject and issuer CN (decoding names is slow in cryptography; certificates are immutable)."""
    names = _NAMES_MEMO.get((cert,))
    if names is None:
        names = (cn(cert.subject), cn(cert.issuer))
        _NAMES_MEMO.put((cert,), names)
    return names


@lru_cache(maxsize=256)
def _signing_key(der: bytes) -> ec.EllipticCurvePublicKey:
    cert, _ = parse_endorsement_der(der)
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FormatError("AMD VCEK/VLEK certificate", "the key is not an EC P-384 key")
    return key


def _check_extensions(
    steps: StepRunner, report: SnpReport, ext: EndorsementExtensions, product: str, signer: SnpSigner
) -> None:
    role = signer.upper()
    if ext.product is None:
        steps.fail(f"the {role} has no productName extension")
    if ext.product != product:
        steps.fail(f"the {role} is for {ext.product_name}, the report is from a {product}")
    tcb = report.reported_tcb
    pairs: list[tuple[str, int | None, int]] = [
        ("blSPL", ext.bl_spl, tcb.bootloader),
        ("teeSPL", ext.tee_spl, tcb.tee),
        ("snpSPL", ext.snp_spl, tcb.snp),
        ("ucodeSPL", ext.ucode_spl, tcb.microcode),
    ]
    if tcb.fmc is not None:
        pairs.append(("fmcSPL", ext.fmc_spl, tcb.fmc))
    elif ext.fmc_spl is not None:
        steps.fail(f"the {role} has an fmcSPL, which a {product} TCB does not have")
    for name, cert_value, report_value in pairs:
        if cert_value is None:
            steps.fail(f"the {role} has no {name} extension")
        if cert_value != report_value:
            steps.fail(f"{role} {name} is {cert_value}, REPORTED_TCB says {report_value}")
    if signer == "vcek":
        if report.signer_info.mask_chip_key:
            steps.fail("MASK_CHIP_KEY is set, so the VCEK did not sign this report")
        if ext.hwid is None:
            steps.fail("the certificate has no hwID: it is not a VCEK (signer info says VCEK)")
        expected = report.kds_hwid()
        if ext.hwid != expected:
            steps.fail(f"the VCEK belongs to chip {ext.hwid.hex()[:16]}..., the report is from chip "
                       f"{expected.hex()[:16]}...")
    elif ext.hwid is not None:
        steps.fail("the certificate has a hwID: it is a VCEK, but signer info says VLEK")


def verify_snp_report(
    report: bytes,
    collateral: CollateralSource,
    options: VerifyOptions,
    *,
    roots: SnpTrustStore | None = None,
) -> SnpClaims:
    """Verify an SNP report (binary, or the CoCo attester JSON) and return its claims.

    ``roots`` replaces the built-in AMD roots (tests only). Raises
    :class:`~coffer.errors.VerificationError` naming the step that failed.
    """
    store = roots if roots is not None else builtin_roots()
    steps = StepRunner(TEE)

    embedded: SnpEndorsements | None = None
    with steps.step(1, "parse report"):
        raw = report
        if is_json_evidence(report):
            raw, embedded = parse_json_evidence(report)
        parsed = parse_report(raw)

    with steps.step(2, "determine product and signing key"):
        kind = parsed.signer_info.signing_key
        if kind == "none":
            steps.fail("the report is not signed (signing key: none)")
        signer: SnpSigner = kind
        if parsed.version >= 3:
            if parsed.product is None:
                steps.fail(f"CPUID family {parsed.cpuid_family:#x} model {parsed.cpuid_model:#x} is not an "
                           "SNP product Coffer knows (Milan, Genoa, Turin)")
            if store.get(parsed.product) is None:
                steps.fail(f"no AMD roots for {parsed.product}")
            candidates: tuple[str, ...] = (parsed.product,)
        else:
            candidates = _v2_candidates(parsed, store)
            if not candidates:
                steps.fail("no AMD roots to try")

    source: CollateralSource = collateral
    if embedded is not None:
        source = ChainedSource([EmbeddedSnpEndorsements(embedded), collateral])
    with steps.step(3, "obtain endorsement"):
        endorsement = _obtain(source, parsed, signer, candidates)

    with steps.step(4, "verify endorsement chain"):
        cert, ext = parse_endorsement_der(endorsement.leaf)
        product = parsed.product
        if product is None:
            product = _product_of_endorsement(cert, ext, store, signer)
            if product is None:
                steps.fail(f"the {signer.upper()} (productName {ext.product_name!r}, issuer "
                           f"{cn(cert.issuer)!r}) belongs to no product with AMD roots")
            parsed = _decoded_as(parsed, product)
        product_roots = store.get(product)
        if product_roots is None:
            steps.fail(f"no AMD roots for {product}")
        _verify_chain(cert, supplied=endorsement.chain, roots=product_roots, product=product, signer=signer,
                      options=options)
        key = _signing_key(endorsement.leaf)

    with steps.step(5, "check endorsement against report"):
        _check_extensions(steps, parsed, ext, product, signer)

    with steps.step(6, "verify report signature"):
        signature = encode_dss_signature(parsed.signature_r, parsed.signature_s)
        key.verify(signature, parsed.signed_bytes, ec.ECDSA(hashes.SHA384()))

    with steps.step(7, "check guest policy"):
        if parsed.policy.debug and not options.allow_debug:
            steps.deny("the guest policy allows debugging (DEBUG=1), so the host can read guest memory")

    with steps.step(8, "check report data"):
        check_report_data(steps, parsed.report_data, options.expected_report_data, pad_to=64)

    subject_cn, issuer_cn = _common_names(cert)
    return SnpClaims(
        tee=TEE,
        # A debug guest (accepted only with allow_debug) can be read by the host.
        insecure=parsed.policy.debug,
        report_data=parsed.report_data,
        steps=steps.done,
        version=parsed.version,
        product=product,
        signer=signer,
        measurement=parsed.measurement,
        host_data=parsed.host_data,
        chip_id=parsed.chip_id,
        reported_tcb=parsed.reported_tcb.to_dict(),
        current_tcb=parsed.current_tcb.to_dict(),
        committed_tcb=parsed.committed_tcb.to_dict(),
        launch_tcb=parsed.launch_tcb.to_dict(),
        current_version=str(parsed.current_version),
        committed_version=str(parsed.committed_version),
        policy=parsed.policy.to_dict(),
        vmpl=parsed.vmpl,
        platform_info=parsed.platform_info.to_dict(),
        id_key_digest=parsed.id_key_digest,
        author_key_digest=parsed.author_key_digest,
        family_id=parsed.family_id,
        image_id=parsed.image_id,
        guest_svn=parsed.guest_svn,
        report_id=parsed.report_id,
        report_id_ma=parsed.report_id_ma,
        cpuid=None if parsed.cpuid_family is None else {
            "family": parsed.cpuid_family, "model": parsed.cpuid_model or 0,
            "stepping": parsed.cpuid_stepping or 0},
        launch_mit_vector=parsed.launch_mit_vector,
        current_mit_vector=parsed.current_mit_vector,
        endorsement={
            "source": endorsement.source,
            "subject": subject_cn,
            "issuer": issuer_cn,
            "product_name": ext.product_name or "",
            **({"csp_id": ext.csp_id} if ext.csp_id else {}),
        },
    )


def parse_evidence(data: bytes) -> SnpReport:
    """Decode SNP evidence (binary report or attester JSON) without verifying it."""
    if is_json_evidence(data):
        raw, _ = parse_json_evidence(data)
        return parse_report(raw)
    return parse_report(data)


class SnpHandler:
    """The ``snp`` entry of the evidence registry."""

    name: ClassVar[str] = "snp"
    input_kind: ClassVar[Literal["binary", "json"]] = "binary"

    def parse(self, data: bytes) -> SnpReport:
        return parse_evidence(data)

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> SnpClaims:
        return verify_snp_report(data, collateral, options)
