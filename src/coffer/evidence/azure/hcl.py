"""The Azure confidential-VM HCL report, its variable data, and the TDX TDREPORT it may carry.

The paravisor (HCL) of an Azure confidential VM writes this report into vTPM NV index 0x01400001.
Layout (little-endian):

====== ===== ============================================================================
offset size  content
====== ===== ============================================================================
0x000  32    header: 'HCLA', version u32, report_size u32 (header to end of variable data),
             request_type u32, status u32, reserved 3 x u32
0x020  1184  hardware report: an SEV-SNP ATTESTATION_REPORT (1184 bytes), or a TDX TDREPORT
             (1024 bytes) followed by padding
0x4C0  20    IGVM request data: data_size u32 (= 20 + variable data size), version u32,
             report_type u32 (2 = SNP, 4 = TDX), report_data_hash_type u32 (1 = SHA-256,
             2 = SHA-384, 3 = SHA-512), variable_data_size u32
0x4D4  var   variable data: UTF-8 JSON ("runtime claims": keys HCLAkPub/HCLEkPub as RSA JWKs,
             vm-configuration, user-data)
====== ===== ============================================================================

Bytes after the variable data (the NV index is larger than the report) are ignored.

The hardware report binds the variable data: its REPORT_DATA starts with H(variable data) under the
declared hash and the rest of the 64 bytes is zero. The variable data is hashed as the exact bytes,
never re-serialised.

A TDREPORT is MAC'd by the CPU for the local TD only; it is not a signed statement. The signed
statement is the TD quote made from it, whose body must repeat the TDREPORT's fields.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from coffer._internal.binreader import Reader
from coffer._internal.encoding import hex_decode, load_json_object, to_json_object
from coffer.errors import FormatError

_WHAT = "Azure HCL report"
HCL_SIGNATURE = b"HCLA"
HCL_HEADER_SIZE = 0x20
HW_REPORT_OFFSET = 0x20
HW_REPORT_SIZE = 1184
IGVM_OFFSET = 0x4C0
IGVM_SIZE = 20
VAR_DATA_OFFSET = 0x4D4
MAX_VAR_DATA = 64 * 1024
SNP_REPORT_SIZE = 1184
TD_REPORT_SIZE = 1024

REPORT_TYPE_SNP = 2
REPORT_TYPE_TDX = 4
REPORT_TYPES = {REPORT_TYPE_SNP: "snp", REPORT_TYPE_TDX: "tdx"}
HASH_TYPES = {1: "sha256", 2: "sha384", 3: "sha512"}

SNP_REPORT_DATA_OFFSET = 0x50
TD_REPORT_DATA_OFFSET = 0x80


# --------------------------------------------------------------------------------------------------
# TDREPORT


@dataclass(frozen=True, kw_only=True)
class TdReport:
    """The fields of a TDX TDREPORT (TDREPORT_STRUCT, 1024 bytes) that a TD quote body repeats.

    REPORTMACSTRUCT (0x000, 256 B): REPORTTYPE, CPUSVN, TEE_TCB_INFO_HASH, TEE_INFO_HASH,
    REPORTDATA (0x80), MAC (0xE0). TEE_TCB_INFO (0x100, 239 B): VALID, TEE_TCB_SVN, MRSEAM,
    MRSIGNERSEAM, ATTRIBUTES. TDINFO (0x200, 512 B): ATTRIBUTES, XFAM, MRTD, MRCONFIGID, MROWNER,
    MROWNERCONFIG, RTMR[4], SERVTD_HASH.
    """

    report_type: bytes
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    servtd_hash: bytes

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


def parse_td_report(data: bytes) -> TdReport:
    """Parse a TDREPORT (the first 1024 bytes of ``data``; the rest is ignored)."""
    reader = Reader(data, "TDX TDREPORT")
    if reader.remaining < TD_REPORT_SIZE:
        raise reader.fail(f"needs {TD_REPORT_SIZE} bytes, got {reader.remaining}")
    report_type = reader.read(4, "REPORTTYPE")
    if report_type[0] != 0x81:
        raise reader.fail(f"REPORTTYPE.TYPE is {report_type[0]:#04x}, not 0x81 (TDX)", offset=0)
    reader.skip(12, "reserved")
    cpu_svn = reader.read(16, "CPUSVN")
    tcb_hash = reader.read(48, "TEE_TCB_INFO_HASH")
    info_hash = reader.read(48, "TEE_INFO_HASH")
    report_data = reader.read(64, "REPORTDATA")
    reader.skip(32, "reserved")
    mac = reader.read(32, "MAC")
    reader.skip(8, "TEE_TCB_INFO.VALID")
    tee_tcb_svn = reader.read(16, "TEE_TCB_SVN")
    mr_seam = reader.read(48, "MRSEAM")
    mr_signer_seam = reader.read(48, "MRSIGNERSEAM")
    seam_attributes = reader.read(8, "SEAM ATTRIBUTES")
    reader = Reader(data, "TDX TDREPORT", offset=0x200)
    td_attributes = reader.read(8, "TD ATTRIBUTES")
    xfam = reader.read(8, "XFAM")
    mr_td = reader.read(48, "MRTD")
    mr_config_id = reader.read(48, "MRCONFIGID")
    mr_owner = reader.read(48, "MROWNER")
    mr_owner_config = reader.read(48, "MROWNERCONFIG")
    rtmrs = (reader.read(48, "RTMR0"), reader.read(48, "RTMR1"), reader.read(48, "RTMR2"),
             reader.read(48, "RTMR3"))
    servtd_hash = reader.read(48, "SERVTD_HASH")
    return TdReport(report_type=report_type, cpu_svn=cpu_svn, tee_tcb_info_hash=tcb_hash,
                    tee_info_hash=info_hash, report_data=report_data, mac=mac, tee_tcb_svn=tee_tcb_svn,
                    mr_seam=mr_seam, mr_signer_seam=mr_signer_seam, seam_attributes=seam_attributes,
                    td_attributes=td_attributes, xfam=xfam, mr_td=mr_td, mr_config_id=mr_config_id,
                    mr_owner=mr_owner, mr_owner_config=mr_owner_config, rtmrs=rtmrs,
                    servtd_hash=servtd_hash)


def td_quote_body(quote: bytes) -> bytes:
    """The TD report body (first 584 bytes) of a TDX DCAP quote, v4 or v5, located by the quote's
    own header (the DCAP verifier checks the signature over the same bytes)."""
    reader = Reader(quote, "TDX quote")
    version = reader.u16("version")
    if version == 4:
        reader = Reader(quote, "TDX quote", offset=48)
        return reader.read(584, "TD report body")
    if version == 5:
        reader = Reader(quote, "TDX quote", offset=48)
        body_type = reader.u16("body type")
        size = reader.u32("body size")
        if body_type not in (2, 3) or size < 584:
            raise reader.fail(f"body type {body_type} / size {size} is not a TD report")
        return reader.read(size, "TD report body")[:584]
    raise reader.fail(f"quote version {version} is not a TDX quote (4 or 5)", offset=0)


def td_quote_mismatches(quote: bytes, report: TdReport) -> list[str]:
    """Which fields of a TD quote's body differ from the TDREPORT (empty when they all agree)."""
    body = td_quote_body(quote)
    fields: list[tuple[str, bytes, bytes]] = [
        ("TEE_TCB_SVN", body[0x00:0x10], report.tee_tcb_svn),
        ("MRSEAM", body[0x10:0x40], report.mr_seam),
        ("MRSIGNERSEAM", body[0x40:0x70], report.mr_signer_seam),
        ("SEAMATTRIBUTES", body[0x70:0x78], report.seam_attributes),
        ("TDATTRIBUTES", body[0x78:0x80], report.td_attributes),
        ("XFAM", body[0x80:0x88], report.xfam),
        ("MRTD", body[0x88:0xB8], report.mr_td),
        ("MRCONFIGID", body[0xB8:0xE8], report.mr_config_id),
        ("MROWNER", body[0xE8:0x118], report.mr_owner),
        ("MROWNERCONFIG", body[0x118:0x148], report.mr_owner_config),
        *((f"RTMR{i}", body[0x148 + 48 * i : 0x178 + 48 * i], report.rtmrs[i]) for i in range(4)),
        ("REPORTDATA", body[0x208:0x248], report.report_data),
    ]
    return [name for name, in_quote, in_report in fields if in_quote != in_report]


# --------------------------------------------------------------------------------------------------
# HCL report


@dataclass(frozen=True, kw_only=True)
class HclReport:
    """A parsed HCL report. ``hw_report`` is the whole 1184-byte hardware-report area; use
    :attr:`snp_report` or :attr:`td_report` for the typed view."""

    version: int
    report_size: int
    request_type: int
    status: int
    hw_report: bytes
    igvm_version: int
    report_type: int
    hash_type: int
    var_data: bytes

    @property
    def kind(self) -> str:
        return REPORT_TYPES[self.report_type]

    @property
    def snp_report(self) -> bytes:
        if self.report_type != REPORT_TYPE_SNP:
            raise FormatError(_WHAT, "the hardware report is not an SNP report")
        return self.hw_report[:SNP_REPORT_SIZE]

    @property
    def td_report(self) -> TdReport:
        if self.report_type != REPORT_TYPE_TDX:
            raise FormatError(_WHAT, "the hardware report is not a TDREPORT")
        return parse_td_report(self.hw_report[:TD_REPORT_SIZE])

    @property
    def hw_report_data(self) -> bytes:
        """REPORT_DATA of the hardware report (64 bytes)."""
        offset = SNP_REPORT_DATA_OFFSET if self.report_type == REPORT_TYPE_SNP else TD_REPORT_DATA_OFFSET
        return self.hw_report[offset : offset + 64]

    def var_data_digest(self) -> bytes:
        return hashlib.new(HASH_TYPES[self.hash_type], self.var_data).digest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "report_size": self.report_size,
            "request_type": self.request_type,
            "status": self.status,
            "report_type": self.kind,
            "hash_type": HASH_TYPES[self.hash_type],
            "hw_report_data": self.hw_report_data.hex(),
            "var_data_digest": self.var_data_digest().hex(),
        }
        if self.report_type == REPORT_TYPE_SNP:
            out["snp_report"] = self.snp_report.hex()
        else:
            out["td_report"] = self.td_report.to_dict()
        try:
            out["var_data"] = parse_var_data(self.var_data).to_dict()
        except FormatError as exc:
            out["var_data_error"] = str(exc)
        return out


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report by its length fields; bytes after the variable data are ignored."""
    reader = Reader(data, _WHAT)
    if reader.read(4, "signature") != HCL_SIGNATURE:
        raise reader.fail("signature is not 'HCLA'", offset=0)
    version = reader.u32("version")
    if version not in (1, 2):
        raise reader.fail(f"unsupported HCL report version {version}", offset=4)
    report_size = reader.u32("report_size")
    request_type = reader.u32("request_type")
    status = reader.u32("status")
    reader.skip(12, "reserved")
    hw_report = reader.read(HW_REPORT_SIZE, "hardware report")
    data_size = reader.u32("IGVM data_size")
    igvm_version = reader.u32("IGVM version")
    report_type = reader.u32("IGVM report_type")
    if report_type not in REPORT_TYPES:
        raise reader.fail(f"report_type {report_type} is neither SNP (2) nor TDX (4)")
    hash_type = reader.u32("IGVM report_data_hash_type")
    if hash_type not in HASH_TYPES:
        raise reader.fail(f"report_data_hash_type {hash_type} is not 1 (SHA-256), 2 or 3")
    var_len = reader.u32("IGVM variable_data_size")
    if var_len > MAX_VAR_DATA:
        raise reader.fail(f"variable data size {var_len} exceeds {MAX_VAR_DATA}")
    if data_size != IGVM_SIZE + var_len:
        raise reader.fail(f"IGVM data_size {data_size} != {IGVM_SIZE} + variable data size {var_len}")
    if not VAR_DATA_OFFSET + var_len <= report_size <= len(data):
        raise reader.fail(f"report_size {report_size} does not cover the variable data or exceeds the "
                          f"{len(data)} bytes given", offset=8)
    var_data = reader.read(var_len, "variable data")
    return HclReport(version=version, report_size=report_size, request_type=request_type, status=status,
                     hw_report=hw_report, igvm_version=igvm_version, report_type=report_type,
                     hash_type=hash_type, var_data=var_data)


def var_data_binding_problem(hcl: HclReport, report_data: bytes | None = None) -> str | None:
    """Why the variable data is not bound to the hardware report (None when it is): REPORT_DATA
    must be H(variable data) under the declared hash, followed by zeros. ``report_data`` overrides
    the hardware report's own field (e.g. to check a TD quote's REPORTDATA)."""
    actual = hcl.hw_report_data if report_data is None else report_data
    if len(actual) != 64:
        return f"report data is {len(actual)} bytes, expected 64"
    digest = hcl.var_data_digest()
    if not hmac.compare_digest(actual[: len(digest)], digest):
        return (f"report data {actual[: len(digest)].hex()} is not the {HASH_TYPES[hcl.hash_type]} of "
                f"the variable data ({digest.hex()})")
    if any(actual[len(digest) :]):
        return "report data after the variable-data digest is not zero"
    return None


# --------------------------------------------------------------------------------------------------
# Variable data (runtime claims)


@dataclass(frozen=True, kw_only=True)
class VarData:
    """The runtime-claims JSON: the AK (HCLAkPub) and EK (HCLEkPub) JWKs, vm-configuration, and
    user-data (hex of the 64 bytes written to NV 0x01400002, when present)."""

    ak_jwk: dict[str, Any]
    ek_jwk: dict[str, Any] | None
    vm_configuration: dict[str, Any]
    user_data: str | None
    document: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.document


def _find_key(keys: list[Any], kid: str) -> dict[str, Any] | None:
    found = [k for k in keys if isinstance(k, dict) and k.get("kid") == kid]
    if len(found) > 1:
        raise FormatError("HCL variable data", f"more than one {kid} key")
    return found[0] if found else None


def parse_var_data(var_data: bytes) -> VarData:
    """Parse the variable-data JSON (strict: UTF-8, no duplicate keys). HCLAkPub is required."""
    doc = load_json_object(var_data, "HCL variable data", max_bytes=MAX_VAR_DATA)
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise FormatError("HCL variable data", "'keys' must be a list")
    ak = _find_key(keys, "HCLAkPub")
    if ak is None:
        raise FormatError("HCL variable data", "no HCLAkPub key")
    config = doc.get("vm-configuration", {})
    if not isinstance(config, dict):
        raise FormatError("HCL variable data", "'vm-configuration' must be an object")
    user_data = doc.get("user-data")
    if user_data is not None:
        if not isinstance(user_data, str):
            raise FormatError("HCL variable data", "'user-data' must be a hex string")
        hex_decode(user_data, "HCL variable data user-data")
    return VarData(ak_jwk=ak, ek_jwk=_find_key(keys, "HCLEkPub"), vm_configuration=config,
                   user_data=user_data, document=doc)
