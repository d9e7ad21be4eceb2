"""Intel DCAP quotes: SGX v3, TDX v4 and v5, parsed by their length fields.

A quote is a 48-byte header, a body (an SGX enclave report or a TD report), and signature data
whose length is declared just before it. Everything after the declared signature data is ignored:
real quote files are padded with zeros, and one public sample even ends in ASCII text.

The parser is pure (bytes in, frozen dataclasses or :class:`~coffer.errors.FormatError` out) and
checks nothing cryptographic; :mod:`coffer.evidence.dcap.verifier` does that.

Layout summary (all integers little-endian):

* header: version u16, attestation key type u16 (2 = ECDSA P-256), TEE type u32 (0 SGX, 0x81 TDX),
  QE SVN u16, PCE SVN u16, QE vendor id (16), user data (20);
* v3/v4 body at 0x30 (384-byte enclave report, or 584-byte TD 1.0 report for TDX v4);
  v5: body type u16 and body size u32 at 0x30, body at 0x36;
* signature data length u32, then ECDSA signature r||s (64), attestation key X||Y (64) and the
  certification data: v4/v5 carry type 6 (QE report certification data) wrapping a type 5 PCK chain,
  v3 carries the QE report inline followed by the type 5 chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from coffer._internal.binreader import Reader
from coffer._internal.encoding import to_json_object
from coffer.errors import FormatError

_WHAT = "DCAP quote"

HEADER_SIZE = 48
ENCLAVE_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648

ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

BODY_SGX = 1
BODY_TD10 = 2
BODY_TD15 = 3
_BODY_SIZES = {BODY_SGX: ENCLAVE_REPORT_SIZE, BODY_TD10: TD10_REPORT_SIZE, BODY_TD15: TD15_REPORT_SIZE}

CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

# Signature data is a few KiB in practice (a PEM chain of three certificates); refuse anything
# absurd before slicing.
MAX_SIGNATURE_DATA = 64 * 1024

SGX_DEBUG_FLAG = 1 << 1  # ATTRIBUTES.FLAGS bit 1
TD_DEBUG_FLAG = 1 << 0  # TDATTRIBUTES bit 0


@dataclass(frozen=True, kw_only=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


@dataclass(frozen=True, kw_only=True)
class EnclaveReport:
    """An SGX enclave report (384 bytes): the body of an SGX quote and the QE's own report."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.attributes[:8], "little") & SGX_DEBUG_FLAG)

    def to_dict(self) -> dict[str, Any]:
        out = to_json_object(self)
        out.pop("raw", None)
        out["debug"] = self.debug
        return out


@dataclass(frozen=True, kw_only=True)
class TdReportBody:
    """A TD report body: TD 1.0 (584 bytes) or TD 1.5 (648 bytes, adds TEE_TCB_SVN2 and MRSERVICETD)."""

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
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_DEBUG_FLAG)

    def to_dict(self) -> dict[str, Any]:
        out = to_json_object(self)
        if self.tee_tcb_svn2 is None:
            out.pop("tee_tcb_svn2")
            out.pop("mr_servicetd")
        out["debug"] = self.debug
        return out


@dataclass(frozen=True, kw_only=True)
class QeCertificationData:
    """What the quoting enclave adds: its report signed by the PCK key, the authentication data whose
    hash it binds, and the PCK certificate chain (PEM, leaf first)."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_type: int
    pck_chain_pem: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "qe_report": self.qe_report.to_dict(),
            "qe_report_signature": self.qe_report_signature.hex(),
            "qe_auth_data": self.qe_auth_data.hex(),
            "pck_chain_type": self.pck_chain_type,
            "pck_chain_pem": self.pck_chain_pem.decode("ascii", "replace"),
        }


@dataclass(frozen=True, kw_only=True)
class QuoteSignatureData:
    signature: bytes
    attestation_key: bytes
    certification_type: int
    certification: QeCertificationData

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature.hex(),
            "attestation_key": self.attestation_key.hex(),
            "certification_type": self.certification_type,
            "certification": self.certification.to_dict(),
        }


@dataclass(frozen=True, kw_only=True)
class Quote:
    """A parsed DCAP quote. ``signed_bytes`` is what the attestation key signed (header and body,
    including the v5 body descriptor)."""

    header: QuoteHeader
    body_type: int | None  # v5 only
    body: EnclaveReport | TdReportBody
    signature_data: QuoteSignatureData
    signed_bytes: bytes
    size: int  # bytes used by the quote; anything after it in the input was ignored

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def is_tdx(self) -> bool:
        return isinstance(self.body, TdReportBody)

    @property
    def td_report(self) -> TdReportBody:
        if not isinstance(self.body, TdReportBody):
            raise FormatError(_WHAT, "this is an SGX quote, it has no TD report")
        return self.body

    @property
    def enclave_report(self) -> EnclaveReport:
        if not isinstance(self.body, EnclaveReport):
            raise FormatError(_WHAT, "this is a TDX quote, it has no enclave report")
        return self.body

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR0..3 of a TDX quote (for event-log replay)."""
        return self.td_report.rtmrs

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    @property
    def qe(self) -> QeCertificationData:
        return self.signature_data.certification

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tee": "tdx" if self.is_tdx else "sgx", "header": self.header.to_dict()}
        if self.body_type is not None:
            out["body_type"] = self.body_type
        out["body"] = self.body.to_dict()
        out["signature_data"] = self.signature_data.to_dict()
        out["size"] = self.size
        return out


_ENCLAVE_LAYOUT = struct.Struct("<16sI12x16s16s32s32x32s32x64sHHH42x16s64s")
assert _ENCLAVE_LAYOUT.size == ENCLAVE_REPORT_SIZE
_TD_FIELDS = (("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
              ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48), ("mr_owner", 48),
              ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
              ("report_data", 64))
_TD10_LAYOUT = struct.Struct("<" + "".join(f"{n}s" for _, n in _TD_FIELDS))
_TD15_LAYOUT = struct.Struct(_TD10_LAYOUT.format + "16s48s")
assert _TD10_LAYOUT.size == TD10_REPORT_SIZE
assert _TD15_LAYOUT.size == TD15_REPORT_SIZE


def parse_enclave_report(data: bytes, what: str = "SGX enclave report") -> EnclaveReport:
    """Decode a 384-byte enclave report (the input must be exactly that long)."""
    if len(data) != ENCLAVE_REPORT_SIZE:
        raise FormatError(what, f"expected {ENCLAVE_REPORT_SIZE} bytes, got {len(data)}")
    (cpu_svn, misc_select, isv_ext_prod_id, attributes, mr_enclave, mr_signer, config_id, isv_prod_id,
     isv_svn, config_svn, isv_family_id, report_data) = _ENCLAVE_LAYOUT.unpack(data)
    return EnclaveReport(
        cpu_svn=cpu_svn, misc_select=misc_select, isv_ext_prod_id=isv_ext_prod_id,
        attributes=attributes, mr_enclave=mr_enclave, mr_signer=mr_signer, config_id=config_id,
        isv_prod_id=isv_prod_id, isv_svn=isv_svn, config_svn=config_svn,
        isv_family_id=isv_family_id, report_data=report_data, raw=bytes(data),
    )


def parse_td_report_body(data: bytes, body_type: int = BODY_TD10,
                         what: str = "TD report body") -> TdReportBody:
    """Decode a TD report body: 584 bytes for TD 1.0 (body type 2), 648 for TD 1.5 (type 3)."""
    if body_type not in (BODY_TD10, BODY_TD15):
        raise FormatError(what, f"body type {body_type} is not a TD report")
    size = _BODY_SIZES[body_type]
    if len(data) != size:
        raise FormatError(what, f"expected {size} bytes for body type {body_type}, got {len(data)}")
    if body_type == BODY_TD10:
        values = _TD10_LAYOUT.unpack(data)
        return TdReportBody(**{name: value for (name, _), value in zip(_TD_FIELDS, values, strict=True)})
    values = _TD15_LAYOUT.unpack(data)
    fields = {name: value for (name, _), value in zip(_TD_FIELDS, values[:-2], strict=True)}
    return TdReportBody(**fields, tee_tcb_svn2=values[-2], mr_servicetd=values[-1])


def _parse_header(r: Reader) -> QuoteHeader:
    version = r.u16("version")
    if version not in (3, 4, 5):
        raise r.fail(f"quote version {version} is not supported (3, 4 or 5)", offset=0)
    att_key_type = r.u16("attestation key type")
    if att_key_type != ATT_KEY_ECDSA_P256:
        raise r.fail(f"attestation key type {att_key_type} is not supported (2 = ECDSA P-256)", offset=2)
    tee_type = r.u32("TEE type")
    if version == 3:
        if tee_type != 0:
            raise r.fail("reserved bytes of a v3 header must be zero", offset=4)
    elif tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise r.fail(f"TEE type {tee_type:#x} is not SGX (0) or TDX (0x81)", offset=4)
    qe_svn = r.u16("QE SVN")
    pce_svn = r.u16("PCE SVN")
    qe_vendor_id = r.read(16, "QE vendor id")
    user_data = r.read(20, "user data")
    return QuoteHeader(version=version, att_key_type=att_key_type, tee_type=tee_type, qe_svn=qe_svn,
                       pce_svn=pce_svn, qe_vendor_id=qe_vendor_id, user_data=user_data)


@lru_cache(maxsize=256)
def _parse_qe_report(raw: bytes) -> EnclaveReport:
    # The QE report is the same in every quote of a platform; parsing it once keeps the warm path
    # short and hands the QE identity check the same object each time.
    return parse_enclave_report(raw, "QE report")


def _parse_qe_block(r: Reader, what: str) -> QeCertificationData:
    """QE report ‖ QE report signature ‖ QE auth data (u16 length) ‖ certification data (type 5)."""
    qe_report = _parse_qe_report(r.read(ENCLAVE_REPORT_SIZE, "QE report"))
    qe_report_signature = r.read(64, "QE report signature")
    auth_len = r.u16("QE authentication data size")
    qe_auth_data = r.read(auth_len, "QE authentication data")
    cert_type = r.u16("PCK certification data type")
    cert_size = r.u32("PCK certification data size")
    if cert_type != CERT_PCK_CHAIN:
        raise r.fail(f"{what}: certification data type {cert_type} is not supported "
                     f"(only {CERT_PCK_CHAIN} = PCK certificate chain)")
    chain = r.read(cert_size, "PCK certificate chain")
    return QeCertificationData(qe_report=qe_report, qe_report_signature=qe_report_signature,
                               qe_auth_data=qe_auth_data, pck_chain_type=cert_type,
                               pck_chain_pem=chain.rstrip(b"\0"))


def _parse_signature_data(sig: Reader, version: int) -> QuoteSignatureData:
    signature = sig.read(64, "quote signature")
    attestation_key = sig.read(64, "attestation key")
    if version == 3:
        certification = _parse_qe_block(sig, "v3 signature data")
        return QuoteSignatureData(signature=signature, attestation_key=attestation_key,
                                  certification_type=CERT_PCK_CHAIN, certification=certification)
    cert_type = sig.u16("certification data type")
    cert_size = sig.u32("certification data size")
    if cert_type != CERT_QE_REPORT:
        raise sig.fail(f"certification data type {cert_type} is not supported "
                       f"(only {CERT_QE_REPORT} = QE report certification data)")
    inner_start = sig.offset
    inner = Reader(sig.read(cert_size, "QE report certification data"), "QE report certification data")
    try:
        certification = _parse_qe_block(inner, "QE report certification data")
    except FormatError as exc:
        where = None if exc.offset is None else inner_start + exc.offset
        raise FormatError(exc.what, exc.reason, offset=where) from exc
    return QuoteSignatureData(signature=signature, attestation_key=attestation_key,
                              certification_type=cert_type, certification=certification)


def parse_quote(data: bytes) -> Quote:
    """Decode an SGX v3 or TDX v4/v5 quote. Bytes after the declared signature data are ignored."""
    data = bytes(data)
    r = Reader(data, _WHAT)
    header = _parse_header(r)
    body_type: int | None = None
    body: EnclaveReport | TdReportBody
    if header.version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        expected = _BODY_SIZES.get(body_type)
        if expected is None:
            raise r.fail(f"body type {body_type} is not supported (1 SGX, 2 TD 1.0, 3 TD 1.5)", offset=0x30)
        if body_size != expected:
            raise r.fail(f"body type {body_type} must be {expected} bytes, header says {body_size}",
                         offset=0x32)
        if (body_type == BODY_SGX) != (header.tee_type == TEE_TYPE_SGX):
            raise r.fail(f"body type {body_type} does not match TEE type {header.tee_type:#x}", offset=0x30)
        raw_body = r.read(body_size, "quote body")
        if body_type == BODY_SGX:
            body = parse_enclave_report(raw_body)
        else:
            body = parse_td_report_body(raw_body, body_type)
    elif header.tee_type == TEE_TYPE_TDX:
        body = parse_td_report_body(r.read(TD10_REPORT_SIZE, "TD report body"), BODY_TD10)
    else:
        body = parse_enclave_report(r.read(ENCLAVE_REPORT_SIZE, "enclave report"))
    signed_end = r.offset
    sig_len = r.u32("signature data size")
    if sig_len > MAX_SIGNATURE_DATA:
        raise r.fail(f"signature data size {sig_len} exceeds {MAX_SIGNATURE_DATA}", offset=signed_end)
    sig_start = r.offset
    sig = Reader(r.read(sig_len, "signature data"), f"{_WHAT} signature data")
    try:
        signature_data = _parse_signature_data(sig, header.version)
    except FormatError as exc:
        where = None if exc.offset is None else sig_start + exc.offset
        raise FormatError(_WHAT, f"{exc.what}: {exc.reason}", offset=where) from exc
    return Quote(header=header, body_type=body_type, body=body, signature_data=signature_data,
                 signed_bytes=data[:signed_end], size=r.offset)
