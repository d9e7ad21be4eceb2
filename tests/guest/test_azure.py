"""Azure vTPM attesters with a fake vTPM and IMDS serving the recorded Trustee evidence: the
produced evidence is the recorded document and verifies at its reference time; the report data
goes to NV 0x01400002 padded to 64 bytes and into the quote unpadded."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from coffer.errors import VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.guest.attesters import attester_for
from coffer.guest.attesters.azure import (
    HCL_REPORT_NV_INDEX,
    REPORT_DATA_NV_INDEX,
    AzSnpVtpmAttester,
    AzTdxVtpmAttester,
)
from coffer.guest.attesters.base import AttesterError
from tests.conftest import vector_bytes

pytestmark = pytest.mark.vectors

D = "trustee/deps/verifier/test_data/"
AT = datetime(2026, 1, 1, tzinfo=UTC)
V2_REPORT_DATA = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeVtpm:
    """Serves a recorded HCL report and quote; records what the attester wrote and asked."""

    def __init__(self, hcl: bytes, quote: dict[str, Any]) -> None:
        self.nv = {HCL_REPORT_NV_INDEX: hcl}
        self.recorded_quote = quote
        self.nonces: list[bytes] = []
        self.writes: list[tuple[int, bytes]] = []

    def nv_write(self, index: int, data: bytes) -> None:
        self.writes.append((index, data))
        self.nv[index] = data

    def nv_read(self, index: int) -> bytes:
        return self.nv[index]

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, list[bytes]]:
        self.nonces.append(nonce)
        q = self.recorded_quote
        return (bytes.fromhex(q["message"]), bytes.fromhex(q["signature"]),
                [bytes.fromhex(p) for p in q["pcrs"]])


class FakeImds:
    def __init__(self, vcek: bytes = b"", td_quote: bytes = b"") -> None:
        self._vcek, self._td_quote = vcek, td_quote
        self.td_reports: list[bytes] = []

    def vcek(self) -> bytes:
        return self._vcek

    def td_quote(self, td_report: bytes) -> bytes:
        self.td_reports.append(td_report)
        return self._td_quote


def snp_fakes() -> tuple[dict[str, Any], FakeVtpm, FakeImds]:
    doc = json.loads(vector_bytes(D + "az-snp-vtpm/evidence-v2.json"))
    return doc, FakeVtpm(_b64url(doc["hcl_report"]), doc["tpm_quote"]), FakeImds(vcek=_b64url(doc["vcek"]))


def test_az_snp_vtpm_reproduces_the_recorded_v2_evidence() -> None:
    doc, vtpm, imds = snp_fakes()
    evidence = AzSnpVtpmAttester(vtpm=vtpm, imds=imds).evidence(V2_REPORT_DATA)
    assert evidence == doc
    assert vtpm.writes == [(REPORT_DATA_NV_INDEX, V2_REPORT_DATA + bytes(16))]
    assert vtpm.nonces == [V2_REPORT_DATA]
    claims = verify("az-snp-vtpm", json.dumps(evidence).encode(),
                    options=VerifyOptions(at=AT, expected_report_data=V2_REPORT_DATA))
    assert claims.insecure is False
    assert claims.steps[-1] == "10 check user data"


def test_az_snp_vtpm_recorded_evidence_refused_for_other_runtime_data() -> None:
    _, vtpm, imds = snp_fakes()
    other = hashlib.sha384(b"other").digest()
    evidence = AzSnpVtpmAttester(vtpm=vtpm, imds=imds).evidence(other)
    assert vtpm.nonces == [other]
    with pytest.raises(VerificationError) as err:
        verify("az-snp-vtpm", json.dumps(evidence).encode(),
               options=VerifyOptions(at=AT, expected_report_data=other))
    assert err.value.step == 8


def test_az_tdx_vtpm_passes_the_tdreport_to_imds() -> None:
    doc = json.loads(vector_bytes(D + "az-tdx-vtpm/evidence-v1.json"))
    hcl = _b64url(doc["hcl_report"])
    td_quote = _b64url(doc["td_quote"])
    vtpm, imds = FakeVtpm(hcl, doc["tpm_quote"]), FakeImds(td_quote=td_quote)
    evidence = AzTdxVtpmAttester(vtpm=vtpm, imds=imds).evidence(b"challenge")
    assert imds.td_reports == [hcl[0x20:0x20 + 1024]]
    assert evidence == {**doc, "version": 2}
    assert vtpm.nonces == [b"challenge"]
    assert vtpm.writes == [(REPORT_DATA_NV_INDEX, b"challenge" + bytes(55))]
    # The recorded TD quote has no recorded PCS collateral: HCL, binding and AK steps pass, then
    # the TD quote stops at its collateral, as for the recorded document itself.
    with pytest.raises(VerificationError) as err:
        verify("az-tdx-vtpm", json.dumps(evidence).encode(),
               options=VerifyOptions(at=AT, expected_report_data=b"challenge"))
    assert err.value.step == 4
    assert "collateral" in err.value.reason.lower() or "TD quote" in err.value.reason


def test_az_tdx_vtpm_rejects_short_hcl_report() -> None:
    vtpm = FakeVtpm(b"HCLA" + bytes(100), {"message": "", "signature": "", "pcrs": ["00" * 32] * 24})
    with pytest.raises(AttesterError, match="TDREPORT"):
        AzTdxVtpmAttester(vtpm=vtpm, imds=FakeImds()).evidence(b"n")


def test_quote_with_missing_pcrs_is_refused() -> None:
    doc, vtpm, imds = snp_fakes()
    vtpm.recorded_quote = {**doc["tpm_quote"], "pcrs": doc["tpm_quote"]["pcrs"][:8]}
    with pytest.raises(AttesterError, match="24"):
        AzSnpVtpmAttester(vtpm=vtpm, imds=imds).evidence(V2_REPORT_DATA)


def test_registry_builds_azure_attesters() -> None:
    _, vtpm, imds = snp_fakes()
    assert isinstance(attester_for("az-snp-vtpm", vtpm=vtpm, imds=imds), AzSnpVtpmAttester)
    assert isinstance(attester_for("az-tdx-vtpm", vtpm=vtpm, imds=imds), AzTdxVtpmAttester)


def test_tpm2_tools_vtpm_against_a_software_tpm(software_tpm: Any) -> None:
    """The real vTPM path (tpm2-tools) on swtpm set up like an Azure vTPM: an AK at 0x81000003 and
    an HCL report in NV 0x01400001; NV 0x01400002 is defined on first write."""
    import subprocess
    import tempfile
    from pathlib import Path

    from coffer.evidence.tpm import verify_tpm_quote
    from coffer.guest.attesters.azure import VTPM_AK_HANDLE, Tpm2ToolsVtpm
    from coffer.guest.attesters.tpm import TpmAttester

    tcti = software_tpm.tcti
    ak = TpmAttester(tcti, ak_handle=VTPM_AK_HANDLE).ensure_ak()
    fake_hcl = b"HCLA" + bytes(range(256)) * 2
    env = {"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"}
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "hcl").write_bytes(fake_hcl)
        subprocess.run(["tpm2_nvdefine", f"{HCL_REPORT_NV_INDEX:#x}", "-C", "o", "-s", str(len(fake_hcl)),
                        "-a", "ownerread|ownerwrite|authread|authwrite"], env=env, check=True,
                       capture_output=True)
        subprocess.run(["tpm2_nvwrite", f"{HCL_REPORT_NV_INDEX:#x}", "-C", "o", "-i", "hcl"], cwd=work,
                       env=env, check=True, capture_output=True)
    vtpm = Tpm2ToolsVtpm(tcti)
    vtpm.nv_write(REPORT_DATA_NV_INDEX, V2_REPORT_DATA + bytes(16))
    vtpm.nv_write(REPORT_DATA_NV_INDEX, bytes(64))  # second write: the index exists now
    assert vtpm.nv_read(REPORT_DATA_NV_INDEX) == bytes(64)
    assert vtpm.nv_read(HCL_REPORT_NV_INDEX) == fake_hcl
    message, signature, pcrs = vtpm.quote(V2_REPORT_DATA)
    assert len(signature) == 256  # plain RSASSA signature, as the Azure evidence carries it
    claims = verify_tpm_quote(message, signature, pcrs, ak.spki_der,
                              options=VerifyOptions(expected_report_data=V2_REPORT_DATA))
    assert claims.report_data == V2_REPORT_DATA
    evidence = AzSnpVtpmAttester(vtpm=vtpm, imds=FakeImds(vcek=b"\x30\x00")).evidence(V2_REPORT_DATA)
    assert _b64url(evidence["hcl_report"]) == fake_hcl
