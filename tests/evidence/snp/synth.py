"""Synthetic AMD chains and SNP reports for tests: our own ARK/ASK/ASVK (RSA-PSS), VCEK/VLEK
(P-384 with the AMD extensions) and reports built field by field and signed with the leaf key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from coffer.evidence.snp.roots import ProductRoots, SnpTrustStore

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2031, 1, 1, tzinfo=UTC)
AT = datetime(2026, 1, 1, tzinfo=UTC)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1."

CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Synthetic Test Devices"),
    ])


@lru_cache(maxsize=16)
def rsa_key(label: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@lru_cache(maxsize=16)
def ec_key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _cert(
    subject: str,
    issuer: str,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    extensions: dict[str, bytes] | None = None,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for oid, value in (extensions or {}).items():
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)


@lru_cache(maxsize=8)
def product_roots(product: str) -> ProductRoots:
    ark_key = rsa_key(f"ark-{product}")
    ark = _cert(f"ARK-{product}", f"ARK-{product}", ark_key.public_key(), ark_key, ca=True)
    ask = _cert(f"SEV-{product}", f"ARK-{product}", rsa_key(f"ask-{product}").public_key(), ark_key, ca=True)
    asvk = _cert(f"SEV-VLEK-{product}", f"ARK-{product}", rsa_key(f"asvk-{product}").public_key(),
                 ark_key, ca=True)
    return ProductRoots(ark=ark, ask=ask, asvk=asvk)


def trust_store(*products: str) -> SnpTrustStore:
    return SnpTrustStore({p: product_roots(p) for p in products or ("Milan", "Genoa", "Turin")})


def der_int(value: int) -> bytes:
    content = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(content)]) + content


def ia5(text: str) -> bytes:
    return bytes([0x16, len(text)]) + text.encode()


@dataclass(frozen=True)
class Tcb:
    bootloader: int = 3
    tee: int = 0
    snp: int = 8
    microcode: int = 115
    fmc: int | None = None

    def encode(self, turin: bool) -> bytes:
        if turin:
            return bytes([self.fmc or 0, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode])
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])


def endorsement_cert(
    product: str,
    *,
    signer: str = "vcek",
    tcb: Tcb = Tcb(),
    hwid: bytes | None = None,
    key_label: str = "leaf",
    issuer_product: str | None = None,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
    product_name: str | None = None,
) -> x509.Certificate:
    """A VCEK/VLEK with AMD extensions, issued by the ASK/ASVK of ``issuer_product`` (default the
    same product)."""
    issuer_product = issuer_product or product
    exts: dict[str, bytes] = {
        _AMD + "1": der_int(1 if product == "Turin" else 0),
        _AMD + "2": ia5(product_name or (f"{product}-B0" if signer == "vcek" and product == "Milan"
                                         else product)),
        _AMD + "3.1": der_int(tcb.bootloader),
        _AMD + "3.2": der_int(tcb.tee),
        _AMD + "3.3": der_int(tcb.snp),
        _AMD + "3.8": der_int(tcb.microcode),
    }
    if product == "Turin":
        exts[_AMD + "3.9"] = der_int(tcb.fmc or 0)
    if signer == "vcek":
        default_hwid = chip_id_for(product)[: 8 if product == "Turin" else 64]
        exts[_AMD + "4"] = hwid if hwid is not None else default_hwid
        subject, issuer, issuer_key = "SEV-VCEK", f"SEV-{issuer_product}", rsa_key(f"ask-{issuer_product}")
    else:
        exts[_AMD + "5"] = ia5("CN=synthetic-cloud.example")
        subject, issuer = "SEV-VLEK", f"SEV-VLEK-{issuer_product}"
        issuer_key = rsa_key(f"asvk-{issuer_product}")
    return _cert(subject, issuer, ec_key(key_label).public_key(), issuer_key, ca=False, extensions=exts,
                 not_before=not_before, not_after=not_after)


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def chip_id_for(product: str) -> bytes:
    if product == "Turin":
        return bytes(range(0x41, 0x49)) + bytes(56)
    return bytes(range(0x10, 0x50))


@dataclass(frozen=True)
class ReportSpec:
    product: str = "Genoa"
    version: int = 5
    policy: int = 0x30000
    vmpl: int = 0
    signing_key: int = 0
    mask_chip_key: bool = False
    reported_tcb: Tcb = Tcb()
    report_data: bytes = bytes(range(64))
    measurement: bytes = b"\x11" * 48
    host_data: bytes = b"\x22" * 32
    chip_id: bytes | None = None
    family_id: bytes = b"\x33" * 16
    image_id: bytes = b"\x44" * 16
    extra: dict[str, int] = field(default_factory=dict)

    def replace(self, **changes: object) -> ReportSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def build_report(spec: ReportSpec) -> bytes:
    """An unsigned ATTESTATION_REPORT, written independently of the parser."""
    turin = spec.product == "Turin"
    tcb = spec.reported_tcb.encode(turin)
    rep = bytearray(0x4A0)

    def put(offset: int, data: bytes) -> None:
        rep[offset : offset + len(data)] = data

    put(0x000, spec.version.to_bytes(4, "little"))
    put(0x004, (7).to_bytes(4, "little"))
    put(0x008, spec.policy.to_bytes(8, "little"))
    put(0x010, spec.family_id)
    put(0x020, spec.image_id)
    put(0x030, spec.vmpl.to_bytes(4, "little"))
    put(0x034, (1).to_bytes(4, "little"))
    put(0x038, tcb)
    put(0x040, (0x25).to_bytes(8, "little"))
    put(0x048, ((spec.signing_key << 2) | (2 if spec.mask_chip_key else 0)).to_bytes(4, "little"))
    put(0x050, spec.report_data)
    put(0x090, spec.measurement)
    put(0x0C0, spec.host_data)
    put(0x140, b"\x55" * 32)
    put(0x160, b"\xff" * 32)
    put(0x180, tcb)
    if spec.version >= 3:
        put(0x188, bytes(CPUID[spec.product]))
    chip = spec.chip_id if spec.chip_id is not None else (
        bytes(64) if spec.signing_key == 1 else chip_id_for(spec.product))
    put(0x1A0, chip)
    put(0x1E0, tcb)
    put(0x1E8, bytes([40, 55, 1]))
    put(0x1EC, bytes([40, 55, 1]))
    put(0x1F0, tcb)
    if spec.version >= 5:
        put(0x1F8, (3).to_bytes(8, "little"))
        put(0x200, (3).to_bytes(8, "little"))
    return bytes(rep)


def sign_report(unsigned: bytes, key_label: str = "leaf") -> bytes:
    der_sig = ec_key(key_label).sign(unsigned[:0x2A0], ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der_sig)
    out = bytearray(unsigned)
    out[0x2A0:0x2E8] = r.to_bytes(72, "little")
    out[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(out)


def expired_window() -> tuple[datetime, datetime]:
    return AT - timedelta(days=400), AT - timedelta(days=1)
