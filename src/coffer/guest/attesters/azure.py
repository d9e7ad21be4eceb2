"""``az-snp-vtpm`` and ``az-tdx-vtpm`` attesters: Azure confidential VMs, attested through the
paravisor's vTPM.

The guest writes the report data (the runtime-data digest zero-padded to 64 bytes) to vTPM NV
index 0x01400002; the paravisor (HCL) then produces a fresh hardware report whose REPORT_DATA binds
its variable data (which carries that ``user-data`` and the vTPM's AK), and stores the HCL report
in NV index 0x01400001. The vTPM AK (persistent handle 0x81000003) quotes PCRs sha256:0-23 with the
digest itself as qualifying data. For SNP the VCEK comes from the Azure instance metadata service
(THIM); for TDX the TDREPORT inside the HCL report is turned into a TD quote by IMDS
``/acc/tdquote``.

Evidence (Trustee, version 2)::

    az-snp-vtpm: {"version": 2, "tpm_quote": {"signature": hex, "message": hex, "pcrs": [hex x 24]},
                  "hcl_report": "<base64url>", "vcek": "<base64url DER>"}
    az-tdx-vtpm: {"version": 2, "tpm_quote": {...}, "hcl_report": "<base64url>", "td_quote": "<base64url>"}

The vTPM and IMDS are interfaces (:class:`VtpmDevice`, :class:`Imds`); the real ones use tpm2-tools
and HTTP to the link-local metadata address, tests use fakes serving recorded evidence.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path
from typing import Any, Protocol

from coffer.errors import FormatError
from coffer.evidence.tpm import structures as st
from coffer.evidence.x509util import certificate_ders
from coffer.guest.attesters.base import AttesterError, b64url, check_digest, pad64
from coffer.guest.attesters.tpm import Tpm2Tools

HCL_REPORT_NV_INDEX = 0x01400001
REPORT_DATA_NV_INDEX = 0x01400002
VTPM_AK_HANDLE = 0x81000003
TD_REPORT_OFFSET = 0x20
TD_REPORT_SIZE = 1024
EVIDENCE_VERSION = 2
IMDS_BASE = "http://169.254.169.254"


class VtpmDevice(Protocol):
    def nv_write(self, index: int, data: bytes) -> None: ...

    def nv_read(self, index: int) -> bytes: ...

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, list[bytes]]:
        """TPM2_Quote by the vTPM AK over sha256:0-23: (TPMS_ATTEST, raw RSA signature, 24 PCRs)."""
        ...


class Imds(Protocol):
    def vcek(self) -> bytes:
        """The VCEK of this host (DER)."""
        ...

    def td_quote(self, td_report: bytes) -> bytes: ...


class Tpm2ToolsVtpm:
    """The Azure vTPM through tpm2-tools (default TCTI: the TPM device)."""

    def __init__(self, tcti: str | None = None, *, ak_handle: int = VTPM_AK_HANDLE,
                 tools: Tpm2Tools | None = None) -> None:
        self.tools = tools or Tpm2Tools(tcti)
        self.ak_handle = ak_handle

    def nv_write(self, index: int, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="coffer-vtpm-") as work:
            cwd = Path(work)
            (cwd / "data.bin").write_bytes(data)
            try:
                self.tools.run("tpm2_nvreadpublic", f"{index:#x}", cwd=cwd)
            except AttesterError:
                self.tools.run("tpm2_nvdefine", f"{index:#x}", "-C", "o", "-s", str(len(data)),
                               "-a", "ownerread|ownerwrite|authread|authwrite", cwd=cwd)
            self.tools.run("tpm2_nvwrite", f"{index:#x}", "-C", "o", "-i", "data.bin", cwd=cwd)

    def nv_read(self, index: int) -> bytes:
        with tempfile.TemporaryDirectory(prefix="coffer-vtpm-") as work:
            self.tools.run("tpm2_nvread", f"{index:#x}", "-C", "o", "-o", "nv.bin", cwd=Path(work))
            return (Path(work) / "nv.bin").read_bytes()

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, list[bytes]]:
        selection = "sha256:" + ",".join(str(i) for i in range(24))
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="coffer-vtpm-") as work:
                cwd = Path(work)
                self.tools.run("tpm2_pcrread", selection, "-o", "pcrs.bin", cwd=cwd)
                self.tools.run("tpm2_quote", "-c", f"{self.ak_handle:#x}", "-l", selection,
                               "-q", nonce.hex(), "-m", "msg.bin", "-s", "sig.bin", "-f", "plain",
                               "-g", "sha256", cwd=cwd)
                raw = (cwd / "pcrs.bin").read_bytes()
                message = (cwd / "msg.bin").read_bytes()
                signature = (cwd / "sig.bin").read_bytes()
            pcrs = [raw[i * 32:(i + 1) * 32] for i in range(24)]
            attest = st.parse_attest(message)
            if attest.quote is not None and attest.quote.pcr_digest == hashlib.sha256(raw).digest():
                return message, signature, pcrs
        raise AttesterError("vTPM PCR values kept changing while quoting")


class AzureImds:
    """The Azure instance metadata service (link-local; only reachable inside an Azure VM)."""

    def __init__(self, base_url: str = IMDS_BASE, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def vcek(self) -> bytes:
        import httpx  # noqa: PLC0415

        response = httpx.get(f"{self.base_url}/metadata/THIM/amd/certification",
                             headers={"Metadata": "true"}, timeout=self.timeout)
        if response.status_code != 200:
            raise AttesterError(f"IMDS THIM certification: HTTP {response.status_code}")
        try:
            pem = response.json()["vcekCert"]
            return certificate_ders(pem.encode())[0]
        except (ValueError, KeyError, TypeError, IndexError, FormatError) as exc:
            raise AttesterError("IMDS THIM certification: no VCEK certificate in the answer") from exc

    def td_quote(self, td_report: bytes) -> bytes:
        import httpx  # noqa: PLC0415

        body = {"report": base64.urlsafe_b64encode(td_report).decode().rstrip("=")}
        response = httpx.post(f"{self.base_url}/acc/tdquote", json=body, timeout=self.timeout)
        if response.status_code != 200:
            raise AttesterError(f"IMDS tdquote: HTTP {response.status_code}")
        try:
            text = response.json()["quote"]
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (ValueError, KeyError, TypeError) as exc:
            raise AttesterError("IMDS tdquote: no quote in the answer") from exc


class _AzureVtpmAttester:
    tee = ""

    def __init__(self, *, vtpm: VtpmDevice | None = None, imds: Imds | None = None,
                 tcti: str | None = None) -> None:
        self.vtpm: VtpmDevice = vtpm or Tpm2ToolsVtpm(tcti)
        self.imds: Imds = imds or AzureImds()

    def _common(self, runtime_digest: bytes) -> tuple[bytes, dict[str, Any]]:
        digest = check_digest(runtime_digest)
        self.vtpm.nv_write(REPORT_DATA_NV_INDEX, pad64(digest))
        hcl_report = self.vtpm.nv_read(HCL_REPORT_NV_INDEX)
        message, signature, pcrs = self.vtpm.quote(digest)
        if len(pcrs) != 24:
            raise AttesterError(f"the vTPM quote carries {len(pcrs)} PCR values, expected 24")
        quote = {"signature": signature.hex(), "message": message.hex(), "pcrs": [p.hex() for p in pcrs]}
        return hcl_report, {"version": EVIDENCE_VERSION, "tpm_quote": quote,
                            "hcl_report": b64url(hcl_report)}


class AzSnpVtpmAttester(_AzureVtpmAttester):
    tee = "az-snp-vtpm"

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        _, doc = self._common(runtime_digest)
        doc["vcek"] = b64url(self.imds.vcek())
        return doc


class AzTdxVtpmAttester(_AzureVtpmAttester):
    tee = "az-tdx-vtpm"

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        hcl_report, doc = self._common(runtime_digest)
        td_report = hcl_report[TD_REPORT_OFFSET:TD_REPORT_OFFSET + TD_REPORT_SIZE]
        if len(td_report) != TD_REPORT_SIZE:
            raise AttesterError("the HCL report is too short to hold a TDREPORT")
        doc["td_quote"] = b64url(self.imds.td_quote(td_report))
        return doc

