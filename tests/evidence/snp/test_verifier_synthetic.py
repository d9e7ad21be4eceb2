"""The verifier against chains and reports generated here (own ARK/ASK/ASVK injected via ``roots=``):
the cases no recorded vector covers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from coffer.errors import PolicyDeniedError, VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import EmbeddedSnpEndorsements, SnpEndorsements
from coffer.evidence.snp import SnpClaims, verify_snp_report
from tests.evidence.snp.synth import (
    AT,
    ReportSpec,
    Tcb,
    build_report,
    cert_der,
    chip_id_for,
    endorsement_cert,
    product_roots,
    sign_report,
    trust_store,
)

GENOA_TCB = Tcb(bootloader=10, tee=0, snp=23, microcode=25)
TURIN_TCB = Tcb(bootloader=1, tee=0, snp=2, microcode=71, fmc=3)


def run(
    spec: ReportSpec,
    leaf_der: bytes,
    *,
    chain: tuple[bytes, ...] = (),
    at: datetime = AT,
    roots_for: tuple[str, ...] = ("Milan", "Genoa", "Turin"),
    **kw: object,
) -> SnpClaims:
    report = sign_report(build_report(spec))
    source = EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf_der, chain=chain, source="test"))
    options = VerifyOptions(at=at, **kw)  # type: ignore[arg-type]
    return verify_snp_report(report, source, options, roots=trust_store(*roots_for))


def rejected(step: int, spec: ReportSpec, leaf_der: bytes, **kw: object) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        run(spec, leaf_der, **kw)  # type: ignore[arg-type]
    assert info.value.step == step, str(info.value)
    return info.value


def genoa_spec(**changes: object) -> ReportSpec:
    return ReportSpec(product="Genoa", version=5, reported_tcb=GENOA_TCB).replace(**changes)


def genoa_vcek(**kw: object) -> bytes:
    return cert_der(endorsement_cert("Genoa", tcb=kw.pop("tcb", GENOA_TCB), **kw))  # type: ignore[arg-type]


def test_genoa_v5_report_verifies() -> None:
    claims = run(genoa_spec(), genoa_vcek(), expected_report_data=bytes(range(64)))
    assert claims.product == "Genoa"
    assert claims.version == 5
    assert claims.reported_tcb == {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 25}
    assert claims.steps[-1] == "8 check report data"


def test_turin_v5_report_with_fmc_and_8_byte_hwid_verifies() -> None:
    spec = ReportSpec(product="Turin", version=5, reported_tcb=TURIN_TCB)
    leaf = cert_der(endorsement_cert("Turin", tcb=TURIN_TCB))
    claims = run(spec, leaf)
    assert claims.product == "Turin"
    assert claims.reported_tcb == {"bootloader": 1, "tee": 0, "snp": 2, "microcode": 71, "fmc": 3}
    assert claims.chip_id == chip_id_for("Turin")


def test_rejects_turin_vcek_with_other_fmc_level() -> None:
    spec = ReportSpec(product="Turin", version=5, reported_tcb=TURIN_TCB)
    leaf = cert_der(endorsement_cert("Turin", tcb=Tcb(bootloader=1, tee=0, snp=2, microcode=71, fmc=4)))
    err = rejected(5, spec, leaf)
    assert "fmcSPL" in err.reason


def test_rejects_turin_vcek_of_another_chip() -> None:
    spec = ReportSpec(product="Turin", version=5, reported_tcb=TURIN_TCB)
    leaf = cert_der(endorsement_cert("Turin", tcb=TURIN_TCB, hwid=b"\x99" * 8))
    rejected(5, spec, leaf)


def test_milan_v3_vlek_report_verifies() -> None:
    tcb = Tcb(bootloader=4, tee=0, snp=24, microcode=0xD9)
    spec = ReportSpec(product="Milan", version=3, signing_key=1, reported_tcb=tcb)
    leaf = cert_der(endorsement_cert("Milan", signer="vlek", tcb=tcb))
    claims = run(spec, leaf)
    assert claims.signer == "vlek"
    assert claims.endorsement["csp_id"] == "CN=synthetic-cloud.example"


def test_milan_v2_report_takes_product_from_the_vcek() -> None:
    spec = ReportSpec(product="Milan", version=2)
    claims = run(spec, cert_der(endorsement_cert("Milan", tcb=Tcb())))
    assert claims.product == "Milan"


def test_rejects_expired_vcek() -> None:
    leaf = genoa_vcek(not_before=datetime(2020, 1, 1, tzinfo=UTC), not_after=datetime(2025, 1, 1, tzinfo=UTC))
    err = rejected(4, genoa_spec(), leaf)
    assert "expired" in err.reason


def test_rejects_vcek_not_yet_valid() -> None:
    leaf = genoa_vcek(not_before=datetime(2027, 1, 1, tzinfo=UTC))
    rejected(4, genoa_spec(), leaf)


def test_rejects_vcek_issued_under_wrong_products_ark() -> None:
    # A Genoa report whose VCEK was issued by the Milan ASK: the Milan chain is genuine, but not the
    # report's product.
    leaf = genoa_vcek(issuer_product="Milan")
    milan = product_roots("Milan")
    err = rejected(4, genoa_spec(), leaf, chain=(cert_der(milan.ask), cert_der(milan.ark)))
    assert "Milan" in err.reason


def test_rejects_report_whose_product_has_no_roots() -> None:
    rejected(2, genoa_spec(), genoa_vcek(), roots_for=("Milan",))


def test_rejects_vlek_report_against_a_vcek_chain() -> None:
    spec = genoa_spec(signing_key=1)
    rejected(4, spec, genoa_vcek())


def test_rejects_vcek_report_with_a_vlek() -> None:
    leaf = cert_der(endorsement_cert("Genoa", signer="vlek", tcb=GENOA_TCB))
    rejected(4, genoa_spec(), leaf)


def test_rejects_reported_tcb_below_the_vceks() -> None:
    spec = genoa_spec(reported_tcb=Tcb(bootloader=10, tee=0, snp=22, microcode=25))
    err = rejected(5, spec, genoa_vcek())
    assert "snpSPL" in err.reason


def test_rejects_vcek_for_another_product_name() -> None:
    leaf = genoa_vcek(product_name="Milan-B0")
    rejected(5, genoa_spec(), leaf)


def test_rejects_vcek_report_with_mask_chip_key() -> None:
    rejected(5, genoa_spec(mask_chip_key=True), genoa_vcek())


def test_rejects_unsigned_report() -> None:
    rejected(2, genoa_spec(signing_key=7), genoa_vcek())


def test_rejects_report_signed_by_another_key() -> None:
    leaf = cert_der(endorsement_cert("Genoa", tcb=GENOA_TCB, key_label="other"))
    rejected(6, genoa_spec(), leaf)


def test_debug_policy_is_denied_by_default() -> None:
    with pytest.raises(PolicyDeniedError) as info:
        run(genoa_spec(policy=0x30000 | 1 << 19), genoa_vcek())
    assert info.value.step == 7


def test_debug_policy_is_accepted_with_allow_debug() -> None:
    claims = run(genoa_spec(policy=0x30000 | 1 << 19), genoa_vcek(), allow_debug=True)
    assert claims.policy["debug"] is True


def test_short_expected_report_data_is_zero_padded() -> None:
    spec = genoa_spec(report_data=b"\xab" * 32 + bytes(32))
    run(spec, genoa_vcek(), expected_report_data=b"\xab" * 32)


def test_rejects_supplied_intermediate_not_issued_by_the_ark() -> None:
    # An attacker's "ASK" with the right name, signed by a key of their own.
    rogue_roots = trust_store("Genoa")  # same names, but we swap the ARK below
    genoa = product_roots("Genoa")
    milan = product_roots("Milan")
    leaf = genoa_vcek()
    with pytest.raises(VerificationError) as info:
        verify_snp_report(
            sign_report(build_report(genoa_spec())),
            EmbeddedSnpEndorsements(SnpEndorsements(leaf=leaf, chain=(cert_der(milan.ask),))),
            VerifyOptions(at=AT),
            roots=rogue_roots,
        )
    assert info.value.step == 4
    assert genoa.ark.subject != milan.ask.issuer
