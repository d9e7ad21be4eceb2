"""`make demo`: verify a few pieces of evidence end to end and print their claims.

Until the confidential run exists, Coffer's main job is deciding whether evidence is genuine. The
demo generates `sample` evidence (software, always labelled insecure) and, when the recorded real
hardware evidence is beside this repository (../shared/vectors), verifies AMD SEV-SNP, Azure CVM,
Intel SGX and TDX evidence offline with the vendors' pinned roots, and shows rejections of tampered
and stale evidence naming the step that failed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from coffer.cli import main as coffer  # noqa: E402
from coffer.evidence.sample import make_sample_evidence  # noqa: E402
from evidence import tdx_collateral_dir  # noqa: E402  (bench/evidence.py)

VECTORS = Path(os.environ.get("COFFER_VECTORS", REPO.parent / "shared" / "vectors"))


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(title: str, argv: list[str], *, expect: int) -> bool:
    banner(title)
    print("$ coffer " + " ".join(argv), flush=True)
    code = coffer(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    ok = code == expect
    verdict = "as expected" if ok else f"UNEXPECTED (exit {code}, expected {expect})"
    print(f"--> exit {code}: {verdict}", flush=True)
    return ok


def main() -> int:
    started = time.monotonic()
    results: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="coffer-demo-") as tmp:
        work = Path(tmp)
        sample = work / "sample-evidence.json"
        sample.write_bytes(make_sample_evidence(report_data=b"demo nonce", init_data=b"\x01" * 32))
        results.append(run("sample TEE (software evidence: verifies, but always insecure)",
                           ["evidence", "verify", str(sample), "--tee", "sample",
                            "--expect-report-data", b"demo nonce".hex()], expect=0))

        if not VECTORS.exists():
            print(f"\n(recorded hardware evidence not found at {VECTORS}; set COFFER_VECTORS to include it)")
        else:
            virtee = VECTORS / "virtee-sev/tests/certs_data"
            results.append(run(
                "AMD SEV-SNP, Milan, VCEK-signed report (hex file), AMD roots built in",
                ["evidence", "verify", str(virtee / "report_milan.hex"), "--tee", "snp",
                 "--endorsements", str(virtee / "vcek_milan.der")], expect=0))

            tampered = work / "tampered-report.bin"
            report = bytearray(bytes.fromhex((virtee / "report_milan.hex").read_text()))
            report[0x90] ^= 0x01  # one bit of MEASUREMENT
            tampered.write_bytes(bytes(report))
            results.append(run(
                "the same report with one bit of its measurement flipped",
                ["evidence", "verify", str(tampered), "--tee", "snp", "--endorsements",
                 str(virtee / "vcek_milan.der")], expect=1))

            snp = VECTORS / "go-sev-guest/verify/testdata"
            results.append(run(
                "AMD SEV-SNP report of a guest launched with the DEBUG policy bit: refused by default",
                ["evidence", "verify", str(snp / "attestation.bin"), "--tee", "snp",
                 "--endorsements", str(snp / "vcek.testcer")], expect=1))

            azure = VECTORS / "constellation/internal/attestation/snp/testdata"
            binding = hashlib.sha256((azure / "runtimedata.bin").read_bytes()).hexdigest()
            results.append(run(
                "AMD SEV-SNP on an Azure confidential VM, bound to its runtime data",
                ["evidence", "verify", str(azure / "attestation.bin"), "--tee", "snp", "--endorsements",
                 str(azure / "vcek.cert"), "--expect-report-data", binding], expect=0))

            aws = VECTORS / "constellation/internal/attestation/aws/snp/testdata"
            results.append(run(
                "AMD SEV-SNP on AWS, VLEK-signed, checked today: the VLEK expired on 2025-12-10",
                ["evidence", "verify", str(aws / "report.txt"), "--tee", "snp", "--endorsements",
                 str(aws / "vlek.pem")], expect=1))

            vtpm = VECTORS / "trustee/deps/verifier/test_data/az-snp-vtpm"
            results.append(run(
                "Azure SNP confidential VM: HCL report + vTPM quote, nonce 'challenge'",
                ["evidence", "verify", str(vtpm / "evidence-v1.json"), "--tee", "az-snp-vtpm",
                 "--at", "2026-01-01T00:00:00Z", "--expect-report-data", b"challenge".hex()], expect=0))

            sgx = VECTORS / "dcap-qvl/sample"
            results.append(run(
                "Intel SGX quote v3 with Intel PCS collateral (as of 2025-07-01)",
                ["evidence", "verify", str(sgx / "sgx_quote"), "--tee", "sgx", "--collateral",
                 str(sgx / "sgx_quote_collateral.json"), "--at", "2025-07-01T00:00:00Z"], expect=0))

            tdx = VECTORS / "go-tdx-guest/testing"
            tdx_collateral_dir(tdx, work / "tdx-collateral")
            results.append(run(
                "Intel TDX quote v4: genuine, but its platform TCB is one Intel does not support",
                ["evidence", "verify", str(tdx / "testdata/tdx_prod_quote_SPR_E4.dat"), "--tee", "tdx",
                 "--collateral", str(work / "tdx-collateral"), "--at", "2023-07-01T01:00:00Z"], expect=1))

    elapsed = time.monotonic() - started
    good = sum(results)
    banner(f"demo finished in {elapsed:.1f} s: {good} of {len(results)} outcomes as expected")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
