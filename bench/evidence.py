"""Evidence verification throughput per TEE, against the raw signature-verify rate of the same key
type measured in the same run.

Each case verifies one recorded real piece of evidence from ../shared/vectors with its collateral
already loaded (warm caches), as the attestation service does for a stream of attestations from the
same platforms. The reference is one bare ``cryptography`` signature verification with the evidence's
own key type (ECDSA P-384 for SNP, ECDSA P-256 for DCAP quotes, RSA-2048 for TPM quotes), so the ratio
says how much of the verifier's time is the unavoidable signature check. Targets: SNP >= 0.8,
TDX/SGX >= 0.5.

Usage: python bench/evidence.py [--seconds S] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from coffer import evidence
from coffer.errors import VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import CollateralSource
from coffer.evidence.sources import CollateralSettings, build_collateral_source

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(os.environ.get("COFFER_VECTORS", REPO.parent / "shared" / "vectors"))


@dataclass
class Case:
    name: str
    tee: str
    evidence: bytes
    source: CollateralSource
    options: VerifyOptions
    reference: Callable[[], None]
    reference_name: str
    target: float | None
    note: str = ""
    expect_rejection: bool = False
    verifier: Callable[[], object] | None = None  # instead of the facade (synthetic roots)


def _rate(func: Callable[[], Any], seconds: float) -> float:
    """Calls per second of ``func`` over about ``seconds``."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        func()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _paired_rates(verify: Callable[[], Any], reference: Callable[[], Any], seconds: float,
                  rounds: int = 15) -> tuple[float, float, float]:
    """Median verification rate, median reference rate and median per-round ratio.

    The two are measured in alternating short slices, so that the machine's drift (other load,
    frequency changes) affects both alike; the ratio of each round is taken before the median.
    """
    verify()
    reference()
    slice_ = seconds / rounds
    verify_rates: list[float] = []
    reference_rates: list[float] = []
    ratios: list[float] = []
    for _ in range(rounds):
        v = _rate(verify, slice_)
        r = _rate(reference, slice_)
        verify_rates.append(v)
        reference_rates.append(r)
        ratios.append(v / r)
    return statistics.median(verify_rates), statistics.median(reference_rates), statistics.median(ratios)


def _ecdsa_reference(curve: ec.EllipticCurve, digest: hashes.HashAlgorithm, size: int) -> Callable[[], None]:
    key = ec.generate_private_key(curve)
    message = os.urandom(size)
    signature = key.sign(message, ec.ECDSA(digest))
    public = key.public_key()
    return lambda: public.verify(signature, message, ec.ECDSA(digest))


def _rsa_reference(size: int) -> Callable[[], None]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = os.urandom(size)
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    public = key.public_key()
    return lambda: public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _cases(workdir: Path) -> list[Case]:
    cases: list[Case] = []
    p384 = _ecdsa_reference(ec.SECP384R1(), hashes.SHA384(), 0x2A0)
    p256 = _ecdsa_reference(ec.SECP256R1(), hashes.SHA256(), 0x278)
    rsa2048 = _rsa_reference(122)

    snp = VECTORS / "virtee-sev/tests/certs_data"
    if snp.exists():
        cases.append(Case(
            "snp (Milan, VCEK)", "snp", bytes.fromhex((snp / "report_milan.hex").read_text()),
            build_collateral_source(CollateralSettings(endorsements=snp / "vcek_milan.der")),
            VerifyOptions(at=_at("2025-01-01T00:00:00")), p384, "ECDSA P-384 verify", 0.8))

    sgx = VECTORS / "dcap-qvl/sample"
    if sgx.exists():
        cases.append(Case(
            "sgx (quote v3)", "sgx", (sgx / "sgx_quote").read_bytes(),
            build_collateral_source(CollateralSettings(collateral_dir=sgx / "sgx_quote_collateral.json")),
            VerifyOptions(at=_at("2025-07-01T00:00:00")), p256, "ECDSA P-256 verify", 0.5))

    tdx = VECTORS / "go-tdx-guest/testing"
    if tdx.exists():
        collateral = workdir / "tdx-collateral"
        tdx_collateral_dir(tdx, collateral)
        cases.append(Case(
            "tdx (quote v4)", "tdx", (tdx / "testdata/tdx_prod_quote_SPR_E4.dat").read_bytes(),
            build_collateral_source(CollateralSettings(collateral_dir=collateral)),
            VerifyOptions(at=_at("2023-07-01T01:00:00")), p256, "ECDSA P-256 verify", None,
            note="recorded quote: every signature, chain, CRL and collateral check runs, then the "
                 "expected rejection at the TCB step (Intel does not support that platform's TCB)",
            expect_rejection=True))

    cases.append(_synthetic_tdx_case(p256))

    tpm = VECTORS / "trustee/deps/verifier/test_data/az-snp-vtpm"
    if tpm.exists():
        cases.append(Case(
            "az-snp-vtpm (SNP + vTPM)", "az-snp-vtpm", (tpm / "evidence-v1.json").read_bytes(),
            build_collateral_source(CollateralSettings()),
            VerifyOptions(at=_at("2026-01-01T00:00:00"), expected_report_data=b"challenge"),
            p384, "ECDSA P-384 verify", None))

    from coffer.evidence.sample import make_sample_evidence  # noqa: PLC0415

    cases.append(Case(
        "sample", "sample", make_sample_evidence(report_data=b"bench"),
        build_collateral_source(CollateralSettings()), VerifyOptions(), p256, "ECDSA P-256 verify", None))
    del rsa2048
    return cases


def _synthetic_tdx_case(reference: Callable[[], None]) -> Case:
    """A TDX v4 platform built with the test suite's generator (own root, PCK with the SGX
    extension, signed PCS-format collateral), so that a whole successful verification is measured."""
    sys.path.insert(0, str(REPO))
    from tests.evidence.dcap import synth  # noqa: PLC0415

    from coffer.evidence.dcap import verify_tdx_quote  # noqa: PLC0415
    from coffer.evidence.dcap.sources import StaticIntelCollateral  # noqa: PLC0415

    platform_ = synth.build()
    source = StaticIntelCollateral(platform_.collateral)
    options = VerifyOptions(at=synth.NOW)
    return Case(
        "tdx (quote v4, synthetic)", "tdx", platform_.quote, source, options, reference,
        "ECDSA P-256 verify", 0.5,
        note="generated platform and collateral (test root): a full successful verification",
        verifier=lambda: verify_tdx_quote(platform_.quote, source, options, root=platform_.root))


def tdx_collateral_dir(testing: Path, target: Path) -> None:
    """go-tdx-guest's PCS fixtures, renamed into Coffer's offline collateral layout."""
    from coffer.evidence.dcap.sources import LAYOUT  # noqa: PLC0415

    sources = {
        "tcb_info": "testdata/sample_tcbInfo_response",
        "tcb_info_issuer_chain": "derived_tcb_info_issuer_chain.pem",
        "qe_identity": "testdata/sample_qeIdentity_response",
        "qe_identity_issuer_chain": "derived_qe_identity_issuer_chain.pem",
        "pck_crl": "testdata/pckcrl",
        "pck_crl_issuer_chain": "derived_pck_crl_issuer_chain.pem",
        "root_ca_crl": "testdata/rootcrl.der",
    }
    target.mkdir(parents=True, exist_ok=True)
    for key, relative in sources.items():
        shutil.copyfile(testing / relative, target / LAYOUT[key])


def _verify_once(case: Case) -> Callable[[], None]:
    def run() -> None:
        try:
            if case.verifier is not None:
                case.verifier()
            else:
                evidence.verify(case.tee, case.evidence, collateral=case.source, options=case.options)
        except VerificationError:
            if not case.expect_rejection:
                raise
        else:
            if case.expect_rejection:
                raise AssertionError(f"{case.name}: expected a rejection")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per case for each of the two rates")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not VECTORS.exists():
        print(f"note: {VECTORS} not found; only the sample TEE is measured", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases(Path(tmp)):
            verify_rate, reference_rate, ratio = _paired_rates(
                _verify_once(case), case.reference, args.seconds)
            rows.append({
                "case": case.name, "verifications_per_s": round(verify_rate, 1),
                "reference": case.reference_name, "reference_per_s": round(reference_rate, 1),
                "ratio": round(ratio, 3), "target": case.target,
                "meets_target": None if case.target is None else ratio >= case.target,
                "note": case.note,
            })

    if args.json:
        report = {"machine": _machine(), "date": datetime.now(UTC).isoformat(), "rows": rows}
        print(json.dumps(report, indent=2))
        return 0
    print(f"machine: {_machine()}   date: {datetime.now(UTC).date()}")
    print(f"{'case':28} {'verif/s':>10} {'reference':>22} {'ref/s':>10} {'ratio':>7} {'target':>7}")
    for row in rows:
        target = "-" if row["target"] is None else f">={row['target']}"
        mark = "" if row["meets_target"] is None else (" ok" if row["meets_target"] else " MISSED")
        print(f"{row['case']:28} {row['verifications_per_s']:>10} {row['reference']:>22} "
              f"{row['reference_per_s']:>10} {row['ratio']:>7} {target:>7}{mark}")
        if row["note"]:
            print(f"    note: {row['note']}")
    return 0


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    except OSError:
        pass
    return (f"{model}{platform.machine()}, {os.cpu_count()} cpus, "
            f"{platform.python_implementation()} {platform.python_version()}")


if __name__ == "__main__":
    raise SystemExit(main())
