"""AMD VCEK/VLEK certificate extensions (OID arc 1.3.6.1.4.1.3704.1).

AMD encodes the TCB a signing key was derived at, the chip it belongs to and the product in private
X.509 extensions. ``cryptography`` hands them over as opaque bytes; this module decodes them by hand:
an INTEGER (possibly with several content bytes, e.g. ``02 02 00 d9``), an IA5String, or the hardware
id, which KDS has served both as raw bytes and wrapped in an OCTET STRING.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

from coffer.errors import FormatError
from coffer.evidence.x509util import certificate_ders, load_certificate

WHAT = "AMD endorsement certificate extension"

OID_PREFIX = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION = OID_PREFIX + "1"
OID_PRODUCT_NAME = OID_PREFIX + "2"
OID_BL_SPL = OID_PREFIX + "3.1"
OID_TEE_SPL = OID_PREFIX + "3.2"
OID_SNP_SPL = OID_PREFIX + "3.3"
OID_UCODE_SPL = OID_PREFIX + "3.8"
OID_FMC_SPL = OID_PREFIX + "3.9"
OID_HWID = OID_PREFIX + "4"
OID_CSP_ID = OID_PREFIX + "5"

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_IA5STRING = 0x16
_MAX_INTEGER_BYTES = 9  # patch levels are bytes; leave room for a sign byte and be generous
_HWID_SIZES = (64, 8)


@dataclass(frozen=True, kw_only=True)
class EndorsementExtensions:
    """What a VCEK or VLEK certificate says about itself.

    ``product_name`` is verbatim (``Milan-B0``, ``Genoa``, ``Turin``, ``Milan`` for a VLEK);
    ``product`` is its KDS product name (the part before the stepping). ``hwid`` is present on VCEKs
    only, ``csp_id`` on VLEKs only.
    """

    struct_version: int | None
    product_name: str | None
    bl_spl: int | None
    tee_spl: int | None
    snp_spl: int | None
    ucode_spl: int | None
    fmc_spl: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def product(self) -> str | None:
        if self.product_name is None:
            return None
        return self.product_name.split("-", 1)[0]


def _der_header(data: bytes, expected_tag: int, name: str) -> bytes:
    """The content of a single DER TLV that must fill ``data`` exactly."""
    if len(data) < 2:
        raise FormatError(WHAT, f"{name}: {len(data)} bytes is too short for a DER value")
    if data[0] != expected_tag:
        raise FormatError(WHAT, f"{name}: tag {data[0]:#04x}, expected {expected_tag:#04x}")
    first = data[1]
    pos = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise FormatError(WHAT, f"{name}: unsupported DER length form {first:#04x}")
        if pos + count > len(data):
            raise FormatError(WHAT, f"{name}: DER length runs past the end")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
        if length < 0x80 or data[2] == 0:
            raise FormatError(WHAT, f"{name}: DER length is not minimally encoded")
    if pos + length != len(data):
        raise FormatError(WHAT, f"{name}: DER length {length} does not match the {len(data) - pos} "
                          "bytes present")
    return data[pos:]


def decode_der_integer(data: bytes, name: str = "INTEGER") -> int:
    """A non-negative DER INTEGER that fills ``data`` exactly."""
    content = _der_header(data, _TAG_INTEGER, name)
    if not content:
        raise FormatError(WHAT, f"{name}: empty INTEGER")
    if len(content) > _MAX_INTEGER_BYTES:
        raise FormatError(WHAT, f"{name}: INTEGER of {len(content)} bytes is too large")
    if content[0] & 0x80:
        raise FormatError(WHAT, f"{name}: negative INTEGER")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise FormatError(WHAT, f"{name}: INTEGER is not minimally encoded")
    return int.from_bytes(content, "big")


def decode_ia5string(data: bytes, name: str = "IA5String") -> str:
    content = _der_header(data, _TAG_IA5STRING, name)
    if any(b > 0x7F for b in content):
        raise FormatError(WHAT, f"{name}: IA5String holds non-ASCII bytes")
    return content.decode("ascii")


def decode_hwid(data: bytes) -> bytes:
    """The hardware id: raw bytes (64, or 8 on Turin) or the same wrapped in an OCTET STRING."""
    if len(data) in _HWID_SIZES:
        return bytes(data)
    content = _der_header(data, _TAG_OCTET_STRING, "hwID")
    if len(content) not in _HWID_SIZES:
        raise FormatError(WHAT, f"hwID is {len(content)} bytes, expected 64 or 8")
    return content


def parse_extensions(cert: x509.Certificate) -> EndorsementExtensions:
    """Decode the AMD extensions of a VCEK/VLEK certificate (absent ones are None)."""
    raw: dict[str, bytes] = {}
    for ext in cert.extensions:
        oid = ext.oid.dotted_string
        if oid.startswith(OID_PREFIX):
            value = ext.value
            if not isinstance(value, x509.UnrecognizedExtension):
                raise FormatError(WHAT, f"{oid}: unexpected extension type")
            raw[oid] = value.value
    return parse_extension_values(raw)


def parse_extension_values(raw: dict[str, bytes]) -> EndorsementExtensions:
    """Decode AMD extension values given as ``{dotted OID: extension value bytes}``."""

    def integer(oid: str, name: str) -> int | None:
        return decode_der_integer(raw[oid], name) if oid in raw else None

    return EndorsementExtensions(
        struct_version=integer(OID_STRUCT_VERSION, "structVersion"),
        product_name=(decode_ia5string(raw[OID_PRODUCT_NAME], "productName")
                      if OID_PRODUCT_NAME in raw else None),
        bl_spl=integer(OID_BL_SPL, "blSPL"),
        tee_spl=integer(OID_TEE_SPL, "teeSPL"),
        snp_spl=integer(OID_SNP_SPL, "snpSPL"),
        ucode_spl=integer(OID_UCODE_SPL, "ucodeSPL"),
        fmc_spl=integer(OID_FMC_SPL, "fmcSPL"),
        hwid=decode_hwid(raw[OID_HWID]) if OID_HWID in raw else None,
        csp_id=decode_ia5string(raw[OID_CSP_ID], "csp_id") if OID_CSP_ID in raw else None,
    )


@lru_cache(maxsize=256)
def load_cert(data: bytes, what: str) -> x509.Certificate:
    """One certificate (DER or PEM), with every field the verifier reads decoded up front.

    ``cryptography`` decodes names, times, algorithms and keys lazily and refuses a malformed one with
    assorted exception types at first use; touching them here turns each refusal into a FormatError
    before the certificate reaches a chain check.
    """
    try:
        cert = load_certificate(data, what)
        _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc,
             cert.signature_hash_algorithm, cert.signature_algorithm_parameters, cert.public_key(),
             cert.extensions, cert.tbs_certificate_bytes, cert.signature)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(what, f"does not decode ({exc.__class__.__name__})") from exc
    return cert


def cert_ders(data: bytes, what: str) -> list[bytes]:
    """The DER of every certificate in PEM or DER input; refusals become FormatError."""
    try:
        return certificate_ders(data, what)
    except x509.InvalidVersion as exc:
        raise FormatError(what, "unsupported X.509 version") from exc


@lru_cache(maxsize=256)
def parse_endorsement_der(der: bytes) -> tuple[x509.Certificate, EndorsementExtensions]:
    """Load a VCEK/VLEK certificate (DER) and decode its AMD extensions, once per distinct bytes."""
    what = "AMD VCEK/VLEK certificate"
    cert = load_cert(der, what)
    return cert, parse_extensions(cert)
