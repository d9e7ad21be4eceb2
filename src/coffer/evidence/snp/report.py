"""The AMD SEV-SNP ATTESTATION_REPORT (SNP firmware ABI, table "ATTESTATION_REPORT structure").

A pure parser: bytes in, a frozen :class:`SnpReport` out, or :class:`~coffer.errors.FormatError`.
Report versions 2 (Milan firmware up to 1.52), 3 (adds the CPUID bytes) and 5 (adds the mitigation
vectors) are understood. The report is 0x4A0 bytes; longer input (Azure prefixes nothing but appends
its IGVM request header) is accepted and the tail ignored.

The layout of a TCB_VERSION depends on the processor generation, so decoding the TCB fields needs the
product. Version 3+ reports name it through their CPUID bytes; a version 2 report does not, and is
decoded with the Milan/Genoa layout until the verifier learns the product from the signing
certificate (:func:`parse_report` with ``product=``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from coffer._internal.binreader import Reader
from coffer._internal.encoding import to_json_object
from coffer.errors import FormatError

WHAT = "SNP attestation report"

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_COMPONENT_SIZE = 72
SUPPORTED_VERSIONS = (2, 3, 5)
ECDSA_P384_SHA384 = 1

PRODUCTS = ("Milan", "Genoa", "Turin")
SignerKind = Literal["vcek", "vlek", "none"]

# GUEST_POLICY bits.
_POLICY_SMT = 1 << 16
_POLICY_RESERVED_ONE = 1 << 17
_POLICY_MIGRATE_MA = 1 << 18
_POLICY_DEBUG = 1 << 19
_POLICY_SINGLE_SOCKET = 1 << 20
_POLICY_CXL_ALLOW = 1 << 21
_POLICY_MEM_AES_256_XTS = 1 << 22
_POLICY_RAPL_DIS = 1 << 23
_POLICY_CIPHERTEXT_HIDING = 1 << 24
_POLICY_PAGE_SWAP_DISABLE = 1 << 25
_POLICY_DEFINED = (1 << 26) - 1

_SIGNING_KEYS: dict[int, SignerKind] = {0: "vcek", 1: "vlek", 7: "none"}


def product_from_cpuid(family: int, model: int) -> str | None:
    """The SNP product (KDS name) of a CPUID family/model, or None when it is not one we know."""
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


def uses_turin_tcb_layout(product: str | None, cpuid_family: int | None) -> bool:
    """Turin and later processors put the FMC SVN first in a TCB_VERSION."""
    if product is not None:
        return product == "Turin"
    return cpuid_family is not None and cpuid_family >= 0x1A


@dataclass(frozen=True, kw_only=True)
class TcbVersion:
    """A decoded TCB_VERSION: the security patch levels of the firmware components.

    ``fmc`` is only present in the Turin layout. ``raw`` keeps the 8 bytes as they were in the report.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None
    raw: bytes = field(default=b"\0" * 8, repr=False)

    @classmethod
    def decode(cls, raw: bytes, *, turin: bool) -> TcbVersion:
        if len(raw) != 8:
            raise FormatError("SNP TCB_VERSION", f"is {len(raw)} bytes, expected 8")
        if turin:
            return cls(fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], raw=raw)
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7], raw=raw)

    def encode(self) -> bytes:
        """The 8-byte TCB_VERSION (reserved bytes zero), in the layout implied by ``fmc``."""
        if self.fmc is not None:
            return bytes([self.fmc, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode])
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])

    def kds_params(self) -> tuple[tuple[str, int], ...]:
        """The AMD KDS query parameters for a certificate at this TCB, in KDS order."""
        params: tuple[tuple[str, int], ...] = (
            ("blSPL", self.bootloader),
            ("teeSPL", self.tee),
            ("snpSPL", self.snp),
            ("ucodeSPL", self.microcode),
        )
        if self.fmc is not None:
            params += (("fmcSPL", self.fmc),)
        return params

    def to_dict(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True, kw_only=True)
class GuestPolicy:
    """The guest policy the VM was launched with (POLICY field)."""

    abi_minor: int
    abi_major: int
    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allow: bool
    mem_aes_256_xts: bool
    rapl_dis: bool
    ciphertext_hiding: bool
    page_swap_disable: bool
    raw: int

    @classmethod
    def decode(cls, value: int) -> GuestPolicy:
        if not value & _POLICY_RESERVED_ONE:
            raise FormatError(WHAT, "guest policy bit 17 is reserved and must be 1", offset=0x008)
        if value & ~_POLICY_DEFINED:
            raise FormatError(WHAT, f"guest policy {value:#x} sets reserved bits 63:26", offset=0x008)
        return cls(
            abi_minor=value & 0xFF,
            abi_major=(value >> 8) & 0xFF,
            smt=bool(value & _POLICY_SMT),
            migrate_ma=bool(value & _POLICY_MIGRATE_MA),
            debug=bool(value & _POLICY_DEBUG),
            single_socket=bool(value & _POLICY_SINGLE_SOCKET),
            cxl_allow=bool(value & _POLICY_CXL_ALLOW),
            mem_aes_256_xts=bool(value & _POLICY_MEM_AES_256_XTS),
            rapl_dis=bool(value & _POLICY_RAPL_DIS),
            ciphertext_hiding=bool(value & _POLICY_CIPHERTEXT_HIDING),
            page_swap_disable=bool(value & _POLICY_PAGE_SWAP_DISABLE),
            raw=value,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["abi"] = f"{self.abi_major}.{self.abi_minor}"
        return out


@dataclass(frozen=True, kw_only=True)
class PlatformInfo:
    """PLATFORM_INFO: how the platform was configured when the report was made."""

    smt_enabled: bool
    tsme_enabled: bool
    ecc_enabled: bool
    rapl_disabled: bool
    ciphertext_hiding_enabled: bool
    alias_check_complete: bool
    tio_enabled: bool
    raw: int

    @classmethod
    def decode(cls, value: int) -> PlatformInfo:
        return cls(
            smt_enabled=bool(value & 1),
            tsme_enabled=bool(value & 2),
            ecc_enabled=bool(value & 4),
            rapl_disabled=bool(value & 8),
            ciphertext_hiding_enabled=bool(value & 0x10),
            alias_check_complete=bool(value & 0x20),
            tio_enabled=bool(value & 0x80),
            raw=value,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class SignerInfo:
    """The key-information word at 0x48: which key signed the report."""

    signing_key: SignerKind
    mask_chip_key: bool
    author_key_en: bool
    raw: int

    @classmethod
    def decode(cls, value: int) -> SignerInfo:
        if value >> 5:
            raise FormatError(WHAT, f"signer info {value:#x} sets reserved bits 31:5", offset=0x048)
        code = (value >> 2) & 7
        if code not in _SIGNING_KEYS:
            raise FormatError(WHAT, f"signing key code {code} is reserved", offset=0x048)
        return cls(
            signing_key=_SIGNING_KEYS[code],
            mask_chip_key=bool(value & 2),
            author_key_en=bool(value & 1),
            raw=value,
        )


@dataclass(frozen=True, kw_only=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True, kw_only=True)
class SnpReport:
    """A parsed ATTESTATION_REPORT. ``raw`` is exactly the 0x4A0 report bytes (trailing input dropped);
    ``product`` is the KDS product name when known (from CPUID, or supplied for a version 2 report)."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    signer_info: SignerInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_family: int | None
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    product: str | None
    raw: bytes = field(repr=False)

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (0x000-0x29F)."""
        return self.raw[:SIGNED_SIZE]

    @property
    def is_turin_layout(self) -> bool:
        return uses_turin_tcb_layout(self.product, self.cpuid_family)

    def kds_hwid(self) -> bytes:
        """The hardware id AMD KDS indexes VCEKs by: CHIP_ID, or its first 8 bytes on Turin."""
        return self.chip_id[:8] if self.is_turin_layout else self.chip_id

    def to_dict(self) -> dict[str, Any]:
        out = to_json_object(self)
        for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
            out[name] = getattr(self, name).to_dict()
        out["policy"] = self.policy.to_dict()
        out["current_version"] = str(self.current_version)
        out["committed_version"] = str(self.committed_version)
        out["signature_r"] = f"{self.signature_r:096x}"
        out["signature_s"] = f"{self.signature_s:096x}"
        return out


def parse_report(data: bytes, *, product: str | None = None) -> SnpReport:
    """Parse an ATTESTATION_REPORT (at least 0x4A0 bytes; anything after them is ignored).

    ``product`` names the processor generation of a version 2 report (which carries no CPUID); for a
    version 3+ report it must agree with the CPUID bytes when given.
    """
    if len(data) < REPORT_SIZE:
        raise FormatError(WHAT, f"is {len(data)} bytes, at least {REPORT_SIZE} expected")
    if product is not None and product not in PRODUCTS:
        raise FormatError(WHAT, f"unknown product {product!r}")
    raw = bytes(data[:REPORT_SIZE])
    r = Reader(raw, WHAT)
    version = r.u32("VERSION")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(WHAT, f"report version {version} is not supported (2, 3 or 5)", offset=0)
    guest_svn = r.u32("GUEST_SVN")
    policy = GuestPolicy.decode(r.u64("POLICY"))
    family_id = r.read(16, "FAMILY_ID")
    image_id = r.read(16, "IMAGE_ID")
    vmpl = r.u32("VMPL")
    signature_algo = r.u32("SIGNATURE_ALGO")
    if signature_algo != ECDSA_P384_SHA384:
        raise FormatError(WHAT, f"signature algorithm {signature_algo} is not ECDSA P-384 with SHA-384",
                          offset=0x034)
    current_tcb_raw = r.read(8, "CURRENT_TCB")
    platform_info = PlatformInfo.decode(r.u64("PLATFORM_INFO"))
    signer_info = SignerInfo.decode(r.u32("signer info"))
    r.zeros(4, "reserved 0x04C")
    report_data = r.read(64, "REPORT_DATA")
    measurement = r.read(48, "MEASUREMENT")
    host_data = r.read(32, "HOST_DATA")
    id_key_digest = r.read(48, "ID_KEY_DIGEST")
    author_key_digest = r.read(48, "AUTHOR_KEY_DIGEST")
    report_id = r.read(32, "REPORT_ID")
    report_id_ma = r.read(32, "REPORT_ID_MA")
    reported_tcb_raw = r.read(8, "REPORTED_TCB")
    cpuid_family: int | None = None
    cpuid_model: int | None = None
    cpuid_stepping: int | None = None
    if version >= 3:
        cpuid_family = r.u8("CPUID_FAM_ID")
        cpuid_model = r.u8("CPUID_MOD_ID")
        cpuid_stepping = r.u8("CPUID_STEP")
        r.zeros(21, "reserved 0x18B")
    else:
        r.zeros(24, "reserved 0x188")
    chip_id = r.read(64, "CHIP_ID")
    committed_tcb_raw = r.read(8, "COMMITTED_TCB")
    current_version = _firmware_version(r, "CURRENT")
    r.zeros(1, "reserved 0x1EB")
    committed_version = _firmware_version(r, "COMMITTED")
    r.zeros(1, "reserved 0x1EF")
    launch_tcb_raw = r.read(8, "LAUNCH_TCB")
    launch_mit_vector: int | None = None
    current_mit_vector: int | None = None
    if version >= 5:
        launch_mit_vector = r.u64("LAUNCH_MIT_VECTOR")
        current_mit_vector = r.u64("CURRENT_MIT_VECTOR")
    r.zeros(SIGNED_SIZE - r.offset, "reserved before SIGNATURE")
    signature_r = int.from_bytes(r.read(SIGNATURE_COMPONENT_SIZE, "SIGNATURE R"), "little")
    signature_s = int.from_bytes(r.read(SIGNATURE_COMPONENT_SIZE, "SIGNATURE S"), "little")
    r.zeros(r.remaining, "reserved part of SIGNATURE")

    detected: str | None = None
    if cpuid_family is not None and cpuid_model is not None:
        detected = product_from_cpuid(cpuid_family, cpuid_model)
    if version >= 3 and product is not None and detected is not None and detected != product:
        raise FormatError(WHAT, f"CPUID says {detected}, not {product}", offset=0x188)
    resolved = detected or product
    turin = uses_turin_tcb_layout(resolved, cpuid_family)

    def tcb(raw_tcb: bytes) -> TcbVersion:
        return TcbVersion.decode(raw_tcb, turin=turin)

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb(current_tcb_raw),
        platform_info=platform_info,
        signer_info=signer_info,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=tcb(reported_tcb_raw),
        cpuid_family=cpuid_family,
        cpuid_model=cpuid_model,
        cpuid_stepping=cpuid_stepping,
        chip_id=chip_id,
        committed_tcb=tcb(committed_tcb_raw),
        current_version=current_version,
        committed_version=committed_version,
        launch_tcb=tcb(launch_tcb_raw),
        launch_mit_vector=launch_mit_vector,
        current_mit_vector=current_mit_vector,
        signature_r=signature_r,
        signature_s=signature_s,
        product=resolved,
        raw=raw,
    )


def _firmware_version(r: Reader, which: str) -> FirmwareVersion:
    build = r.u8(f"{which}_BUILD")
    minor = r.u8(f"{which}_MINOR")
    major = r.u8(f"{which}_MAJOR")
    return FirmwareVersion(major=major, minor=minor, build=build)
