"""Every recorded vector of ../shared/vectors/INDEX.md through the command line, as its row says:
exit status 0 with the claims, or exit status 1 naming the step that failed.

The library-level tests (tests/evidence/...) cover the same rows in more depth; this table proves
that a user typing the documented command gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coffer.cli import main
from tests.conftest import vector_bytes, vector_path, write_t5_collateral


@dataclass(frozen=True)
class Row:
    id: str
    tee: str
    evidence: str  # vector path, or "tmp:NAME" for a file prepared by the test
    args: tuple[str, ...] = ()
    exit: int = 0
    step: int | None = None
    claims: dict[str, object] = field(default_factory=dict)


SNP_AZURE = "constellation/internal/attestation/snp/testdata"
SNP_AWS = "constellation/internal/attestation/aws/snp/testdata"
TRUSTEE = "trustee/deps/verifier/test_data"
# The report data the Trustee az-snp-vtpm v2 and Genoa vectors were produced for (INDEX.md rows).
AZ_V2_REPORT_DATA = ("982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa23387"
                     "48cd0fd9f5f819ef")
AZ_GENOA_REPORT_DATA = ("0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938ca05475f8b46094de"
                        "6b64270ea35d950f")

ROWS = [
    Row("S1 Milan v2 VCEK", "snp", "virtee-sev/tests/certs_data/report_milan.hex",
        ("--endorsements", "V:virtee-sev/tests/certs_data/vcek_milan.der", "--at", "2026-01-01T00:00:00Z"),
        claims={"version": 2, "product": "Milan", "signer": "vcek",
                "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}),
    Row("S1 with its KDS chain file", "snp", "virtee-sev/tests/certs_data/report_milan.hex",
        ("--endorsements", "tmp:virtee-dir", "--at", "2026-01-01T00:00:00Z")),
    Row("S1 byte 21 flipped", "snp", "tmp:s1-flipped",
        ("--endorsements", "V:virtee-sev/tests/certs_data/vcek_milan.der"), exit=1, step=6),
    Row("S2 Milan debug guest, allowed", "snp", "go-sev-guest/verify/testdata/attestation.bin",
        ("--endorsements", "V:go-sev-guest/verify/testdata/vcek.testcer", "--allow-debug",
         "--expect-report-data", "0102030405", "--at", "2025-01-01T00:00:00Z"),
        claims={"policy": {"debug": True}}),
    Row("S2 Milan debug guest, default policy", "snp", "go-sev-guest/verify/testdata/attestation.bin",
        ("--endorsements", "V:go-sev-guest/verify/testdata/vcek.testcer"), exit=1, step=7),
    Row("S2 wrong nonce", "snp", "go-sev-guest/verify/testdata/attestation.bin",
        ("--endorsements", "V:go-sev-guest/verify/testdata/vcek.testcer", "--allow-debug",
         "--expect-report-data", "0102030406"), exit=1, step=8),
    Row("S3 Azure CVM (KDS DER VCEK)", "snp", f"{SNP_AZURE}/attestation.bin",
        ("--endorsements", f"V:{SNP_AZURE}/vcek.cert", "--expect-report-data", "tmp:s3-binding"),
        claims={"id_key_digest": "57e229e0ffe5fa92d0faddff6cae0e61c926fc9ef9afd20a8b8cfcf7129db9338cbe5bf3f"
                                 "6987733a2bf65d06dc38fc1"}),
    Row("S3 Azure CVM (THIM PEM VCEK + chain)", "snp", f"{SNP_AZURE}/attestation.bin",
        ("--endorsements", f"V:{SNP_AZURE}/vcek.pem")),
    Row("S4 AWS VLEK inside its validity", "snp", f"{SNP_AWS}/report.txt",
        ("--endorsements", f"V:{SNP_AWS}/vlek.pem", "--at", "2025-06-01T00:00:00Z"),
        claims={"version": 3, "signer": "vlek"}),
    Row("S4 AWS VLEK after it expired", "snp", f"{SNP_AWS}/report.txt",
        ("--endorsements", f"V:{SNP_AWS}/vlek.pem", "--at", "2025-12-11T00:00:00Z"), exit=1, step=4),
    Row("S12 HCL SNP report with another chip's VCEK", "snp", "tmp:s12-report",
        ("--endorsements", "V:azure-cvm-tooling/az-cvm-vtpm/test/certs.pem"), exit=1, step=5),
    Row("trustee test-report + test-vcek", "snp", f"{TRUSTEE}/snp/test-report.bin",
        ("--endorsements", f"V:{TRUSTEE}/snp/test-vcek.der")),
    Row("trustee test-vlek-report + test-vlek", "snp", f"{TRUSTEE}/snp/test-vlek-report.bin",
        ("--endorsements", f"V:{TRUSTEE}/snp/test-vlek.der", "--at", "2025-06-01T00:00:00Z"),
        claims={"signer": "vlek", "vmpl": 1}),
    Row("trustee CoCo snp attester JSON (Genoa v3)", "snp",
        "trustee/attestation-service/tests/e2e/evidence.json", (), claims={"product": "Genoa"}),
    Row("T2 SGX v3 with collateral", "sgx", "dcap-qvl/sample/sgx_quote",
        ("--collateral", "V:dcap-qvl/sample/sgx_quote_collateral.json", "--at", "2025-07-01T00:00:00Z"),
        claims={"tcb_status": "ConfigurationAndSWHardeningNeeded",
                "advisory_ids": ["INTEL-SA-00289", "INTEL-SA-00615"], "fmspc": "00a067110000"}),
    Row("T2 SGX v3 after the collateral's nextUpdate", "sgx", "dcap-qvl/sample/sgx_quote",
        ("--collateral", "V:dcap-qvl/sample/sgx_quote_collateral.json", "--at", "2025-07-20T00:00:00Z"),
        exit=1, step=7),
    Row("T5 TDX v4, TCB not supported", "tdx", "go-tdx-guest/testing/testdata/tdx_prod_quote_SPR_E4.dat",
        ("--collateral", "tmp:t5-collateral", "--at", "2023-07-01T01:00:00Z"), exit=1, step=10),
    Row("T5 TDX v4 checked in 2053", "tdx", "go-tdx-guest/testing/testdata/tdx_prod_quote_SPR_E4.dat",
        ("--collateral", "tmp:t5-collateral", "--at", "2053-01-01T00:00:00Z"), exit=1, step=2),
    Row("T6 TDX v5 without collateral", "tdx", "go-tdx-guest/testing/testdata/quote_v5_sample.dat",
        ("--at", "2026-02-03T00:00:00Z"), exit=1, step=6),
    Row("T7 TDX v4 (GCP) without collateral", "tdx",
        "go-tdx-guest/testing/testdata/ccel/cos-113-tdx-quote.dat", ("--at", "2026-01-01T00:00:00Z"),
        exit=1, step=6),
    Row("az-snp-vtpm v0", "az-snp-vtpm", f"{TRUSTEE}/az-snp-vtpm/evidence-v0.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", b"challenge".hex())),
    Row("az-snp-vtpm v1", "az-snp-vtpm", f"{TRUSTEE}/az-snp-vtpm/evidence-v1.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", b"challenge".hex())),
    Row("az-snp-vtpm v1 wrong nonce", "az-snp-vtpm", f"{TRUSTEE}/az-snp-vtpm/evidence-v1.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", b"egnellahc".hex()), exit=1, step=8),
    Row("az-snp-vtpm v2 (user data)", "az-snp-vtpm", f"{TRUSTEE}/az-snp-vtpm/evidence-v2.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", AZ_V2_REPORT_DATA)),
    Row("az-snp-vtpm Genoa", "az-snp-vtpm", f"{TRUSTEE}/az-snp-vtpm/evidence-genoa.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", AZ_GENOA_REPORT_DATA)),
    Row("az-tdx-vtpm v1 without Intel collateral", "az-tdx-vtpm", f"{TRUSTEE}/az-tdx-vtpm/evidence-v1.json",
        ("--at", "2026-01-01T00:00:00Z", "--expect-report-data", b"challenge".hex()), exit=1, step=4),
    Row("trustee TPM quote evidence (AK not enrolled: insecure)", "tpm", f"{TRUSTEE}/tpm_evidence.json",
        (), claims={"insecure": True}),
]


def _prepare(name: str, tmp: Path) -> str:
    """Files and values some rows need, derived from the vectors at test time (never committed)."""
    if name == "virtee-dir":
        target = tmp / "virtee"
        target.mkdir()
        shutil.copyfile(vector_path("virtee-sev/tests/certs_data/vcek_milan.der"), target / "vcek.der")
        shutil.copyfile(vector_path("virtee-sev/tests/certs_data/cert_chain_milan"),
                        target / "cert_chain.pem")
        return str(target)
    if name == "s1-flipped":
        text = vector_bytes("virtee-sev/tests/certs_data/report_milan.hex").decode()
        report = bytearray(bytes.fromhex(text))
        report[21] ^= 0xFF
        path = tmp / "s1-flipped.bin"
        path.write_bytes(bytes(report))
        return str(path)
    if name == "s3-binding":
        return hashlib.sha256(vector_bytes(f"{SNP_AZURE}/runtimedata.bin")).hexdigest()
    if name == "s12-report":
        hcl = vector_bytes("azure-cvm-tooling/az-cvm-vtpm/test/hcl-report-snp.bin")
        path = tmp / "s12-report.bin"
        path.write_bytes(hcl[0x20:0x20 + 0x4A0])
        return str(path)
    if name == "t5-collateral":
        return str(write_t5_collateral(tmp / "t5"))
    raise AssertionError(name)


def _argv(row: Row, tmp: Path) -> list[str]:
    def resolve(value: str) -> str:
        if value.startswith("V:"):
            return str(vector_path(value[2:]))
        if value.startswith("tmp:"):
            return _prepare(value[4:], tmp)
        return value

    evidence = resolve(row.evidence if row.evidence.startswith("tmp:") else "V:" + row.evidence)
    return ["evidence", "verify", evidence, "--tee", row.tee, "--json", *(resolve(a) for a in row.args)]


@pytest.mark.vectors
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_vector_through_cli(row: Row, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(row, tmp_path)
    code = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert code == row.exit, out
    if row.exit == 0:
        assert out["ok"] is True
        assert out["tee"] == row.tee
        for key, value in row.claims.items():
            if isinstance(value, dict):
                assert {k: out[key][k] for k in value} == value, key
            else:
                assert out[key] == value, key
    else:
        assert out["ok"] is False
        assert out["step"] == row.step, out
