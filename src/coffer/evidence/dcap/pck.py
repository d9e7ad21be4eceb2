"""The Intel SGX extension of PCK certificates (OID 1.2.840.113741.1.13.1), read by hand.

``cryptography`` hands this extension over as opaque bytes. It is a DER ``SEQUENCE OF SEQUENCE
{ OID, value }``; the values used by TCB evaluation are:

* ``.1`` PPID (OCTET STRING, 16), ``.3`` PCE-ID (OCTET STRING, 2), ``.4`` FMSPC (OCTET STRING, 6),
  ``.5`` SGX type (ENUMERATED), ``.6`` platform instance id, ``.7`` configuration (platform CA only);
* ``.2`` TCB: a sequence of ``{ OID .2.N, INTEGER }`` for the 16 component SVNs (N = 1..16),
  PCESVN (N = 17) and CPUSVN (N = 18, OCTET STRING of 16).

The walker below checks every length against its enclosing element, accepts only definite lengths
and low tag numbers, and refuses duplicate or missing entries, so malformed input can only raise
:class:`~coffer.errors.FormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from cryptography import x509

from coffer._internal.encoding import to_json_object
from coffer.errors import FormatError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_WHAT = "PCK SGX extension"

_SEQUENCE = 0x30
_OID = 0x06
_INTEGER = 0x02
_OCTET_STRING = 0x04
_ENUMERATED = 0x0A
_BOOLEAN = 0x01

_MAX_LENGTH_BYTES = 4  # largest length-of-length accepted

PckCaType = Literal["processor", "platform"]
_CA_NAMES: dict[str, PckCaType] = {
    "Intel SGX PCK Processor CA": "processor",
    "Intel SGX PCK Platform CA": "platform",
}


@dataclass(frozen=True, kw_only=True)
class PckTcb:
    components: tuple[int, ...]  # 16 SVNs
    pcesvn: int
    cpusvn: bytes


@dataclass(frozen=True, kw_only=True)
class PckExtension:
    ppid: bytes
    tcb: PckTcb
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read one element at ``pos`` inside ``data[:end]``: (tag, content start, content end)."""
    if pos + 2 > end:
        raise FormatError(_WHAT, "truncated element header", offset=pos)
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise FormatError(_WHAT, "high tag numbers are not used here", offset=pos)
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise FormatError(_WHAT, "indefinite length is not DER", offset=pos - 1)
        if count > _MAX_LENGTH_BYTES or pos + count > end:
            raise FormatError(_WHAT, "length field too long or truncated", offset=pos - 1)
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise FormatError(_WHAT, "length is not minimally encoded", offset=pos - 1)
        pos += count
    if length > end - pos:
        raise FormatError(_WHAT, f"element of {length} bytes overruns its container", offset=pos)
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        tag, c_start, c_end = _tlv(data, pos, end)
        out.append((tag, c_start, c_end))
        pos = c_end
    return out


def _oid(content: bytes, offset: int) -> str:
    if not content or content[-1] & 0x80:
        raise FormatError(_WHAT, "malformed OBJECT IDENTIFIER", offset=offset)
    arcs: list[int] = []
    value = 0
    for i, byte in enumerate(content):
        if value == 0 and byte == 0x80:
            raise FormatError(_WHAT, "OBJECT IDENTIFIER arc is not minimally encoded", offset=offset + i)
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
        if value.bit_length() > 64:
            raise FormatError(_WHAT, "OBJECT IDENTIFIER arc too large", offset=offset + i)
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def _unsigned(content: bytes, offset: int, field: str) -> int:
    if not content:
        raise FormatError(_WHAT, f"{field}: empty INTEGER", offset=offset)
    if content[0] & 0x80:
        raise FormatError(_WHAT, f"{field}: negative value", offset=offset)
    if len(content) > 9:
        raise FormatError(_WHAT, f"{field}: value too large", offset=offset)
    return int.from_bytes(content, "big")


def _entries(data: bytes, start: int, end: int, prefix: str) -> dict[str, tuple[int, int, int]]:
    """The ``SEQUENCE { OID, value }`` children of a container, keyed by the OID arc after ``prefix``."""
    out: dict[str, tuple[int, int, int]] = {}
    for tag, c_start, c_end in _children(data, start, end):
        if tag != _SEQUENCE:
            raise FormatError(_WHAT, "entry is not a SEQUENCE", offset=c_start)
        parts = _children(data, c_start, c_end)
        if len(parts) != 2 or parts[0][0] != _OID:
            raise FormatError(_WHAT, "entry is not { OID, value }", offset=c_start)
        oid = _oid(data[parts[0][1] : parts[0][2]], parts[0][1])
        if not oid.startswith(prefix + "."):
            raise FormatError(_WHAT, f"unexpected OID {oid} under {prefix}", offset=c_start)
        arc = oid[len(prefix) + 1 :]
        if arc in out:
            raise FormatError(_WHAT, f"duplicate entry {oid}", offset=c_start)
        out[arc] = parts[1]
    return out


def _octets(data: bytes, entry: tuple[int, int, int], field: str, size: int | None) -> bytes:
    tag, start, end = entry
    if tag != _OCTET_STRING:
        raise FormatError(_WHAT, f"{field} is not an OCTET STRING", offset=start)
    if size is not None and end - start != size:
        raise FormatError(_WHAT, f"{field} must be {size} bytes, got {end - start}", offset=start)
    return data[start:end]


def _integer(data: bytes, entry: tuple[int, int, int], field: str, tag_expected: int = _INTEGER) -> int:
    tag, start, end = entry
    if tag != tag_expected:
        raise FormatError(_WHAT, f"{field} has tag {tag:#x}, expected {tag_expected:#x}", offset=start)
    return _unsigned(data[start:end], start, field)


def _boolean(data: bytes, entry: tuple[int, int, int], field: str) -> bool:
    tag, start, end = entry
    if tag != _BOOLEAN or end - start != 1:
        raise FormatError(_WHAT, f"{field} is not a BOOLEAN", offset=start)
    return data[start] != 0


def _require(entries: dict[str, tuple[int, int, int]], arc: str, field: str) -> tuple[int, int, int]:
    try:
        return entries[arc]
    except KeyError:
        raise FormatError(_WHAT, f"{field} (.{arc}) is missing") from None


@lru_cache(maxsize=256)
def parse_pck_extension(value: bytes) -> PckExtension:
    """Decode the DER value of the SGX extension (the bytes inside the extension's OCTET STRING)."""
    data = bytes(value)
    tag, start, end = _tlv(data, 0, len(data))
    if tag != _SEQUENCE:
        raise FormatError(_WHAT, "top level is not a SEQUENCE", offset=0)
    if end != len(data):
        raise FormatError(_WHAT, f"{len(data) - end} trailing bytes", offset=end)
    top = _entries(data, start, end, SGX_EXTENSION_OID)

    tcb_tag, tcb_start, tcb_end = _require(top, "2", "TCB")
    if tcb_tag != _SEQUENCE:
        raise FormatError(_WHAT, "TCB is not a SEQUENCE", offset=tcb_start)
    tcb_entries = _entries(data, tcb_start, tcb_end, SGX_EXTENSION_OID + ".2")
    components = tuple(
        _integer(data, _require(tcb_entries, str(i), f"TCB component {i}"), f"TCB component {i}")
        for i in range(1, 17)
    )
    if any(c > 0xFF for c in components):
        raise FormatError(_WHAT, "a TCB component SVN exceeds 255")
    pcesvn = _integer(data, _require(tcb_entries, "17", "PCESVN"), "PCESVN")
    if pcesvn > 0xFFFF:
        raise FormatError(_WHAT, "PCESVN exceeds 65535")
    cpusvn = _octets(data, _require(tcb_entries, "18", "CPUSVN"), "CPUSVN", 16)
    unknown = set(tcb_entries) - {str(i) for i in range(1, 19)}
    if unknown:
        raise FormatError(_WHAT, f"unknown TCB entries {sorted(unknown)}")

    config: dict[str, bool] = {}
    if "7" in top:
        c_tag, c_start, c_end = top["7"]
        if c_tag != _SEQUENCE:
            raise FormatError(_WHAT, "configuration is not a SEQUENCE", offset=c_start)
        for arc, entry in _entries(data, c_start, c_end, SGX_EXTENSION_OID + ".7").items():
            names = {"1": "dynamic_platform", "2": "cached_keys", "3": "smt_enabled"}
            if arc in names:
                config[names[arc]] = _boolean(data, entry, names[arc])

    return PckExtension(
        ppid=_octets(data, _require(top, "1", "PPID"), "PPID", 16),
        tcb=PckTcb(components=components, pcesvn=pcesvn, cpusvn=cpusvn),
        pce_id=_octets(data, _require(top, "3", "PCE-ID"), "PCE-ID", 2),
        fmspc=_octets(data, _require(top, "4", "FMSPC"), "FMSPC", 6),
        sgx_type=_integer(data, _require(top, "5", "SGX type"), "SGX type", _ENUMERATED),
        platform_instance_id=(_octets(data, top["6"], "platform instance id", 16) if "6" in top else None),
        dynamic_platform=config.get("dynamic_platform"),
        cached_keys=config.get("cached_keys"),
        smt_enabled=config.get("smt_enabled"),
    )


def pck_extension(cert: x509.Certificate) -> PckExtension:
    """The SGX extension of a PCK certificate; a certificate without one is a FormatError."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except x509.ExtensionNotFound:
        raise FormatError("PCK certificate", "has no SGX extension (1.2.840.113741.1.13.1)") from None
    except ValueError as exc:
        raise FormatError("PCK certificate", "its extensions do not parse") from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise FormatError("PCK certificate", "SGX extension has an unexpected type")
    return parse_pck_extension(value.value)


def pck_ca_type(issuer: x509.Name) -> PckCaType:
    """``processor`` or ``platform``, from the common name of the PCK's issuer."""
    attrs = issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(attrs[0].value) if attrs else ""
    try:
        return _CA_NAMES[name]
    except KeyError:
        raise FormatError("PCK certificate", f"issuer {name!r} is not an Intel SGX PCK CA") from None
