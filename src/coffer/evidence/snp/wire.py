"""The JSON form in which the Confidential Containers ``snp`` attester sends a report.

The attester serialises the ``sev`` crate's ``AttestationReport`` with serde: integers as JSON
numbers, byte arrays as arrays of numbers, TCB versions as objects, and the certificates from the
extended report as ``cert_chain: [{"cert_type": "VCEK", "data": [DER bytes]}]``.

The signature covers the binary report, so this module rebuilds the exact 0x4A0 bytes from the fields
(every reserved byte zero, as the firmware writes them) and parses them with the binary parser. A
report that was altered in transit then fails its signature check like a binary one would.
"""

from __future__ import annotations

from typing import Any

from coffer._internal.encoding import load_json_object
from coffer.errors import FormatError
from coffer.evidence.collateral import SnpEndorsements
from coffer.evidence.snp.report import REPORT_SIZE, SIGNED_SIZE, uses_turin_tcb_layout

WHAT = "SNP evidence JSON"

_MAX_CERT_BYTES = 16 * 1024
_MAX_CERTS = 8


def is_json_evidence(data: bytes) -> bool:
    """Whether evidence bytes are the JSON form (a binary report never starts with ``{``)."""
    return data.lstrip()[:1] == b"{"


def _int(obj: dict[str, Any], key: str, bits: int, *, optional: bool = False) -> int | None:
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise FormatError(WHAT, f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise FormatError(WHAT, f"{key} is not an unsigned {bits}-bit integer")
    return value


def _req_int(obj: dict[str, Any], key: str, bits: int) -> int:
    value = _int(obj, key, bits)
    assert value is not None
    return value


def _bytes(obj: dict[str, Any], key: str, size: int) -> bytes:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) != size:
        raise FormatError(WHAT, f"{key} must be an array of {size} bytes")
    # bytes() refuses non-integers and values outside 0..255; the type check refuses true/false.
    try:
        out = bytes(value)
    except (TypeError, ValueError):
        raise FormatError(WHAT, f"{key} holds a value that is not a byte") from None
    if not set(map(type, value)) <= {int}:
        raise FormatError(WHAT, f"{key} holds a value that is not a byte")
    return out


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise FormatError(WHAT, f"{key} must be an object")
    return value


def _tcb(obj: dict[str, Any], key: str, turin: bool) -> bytes:
    tcb = _object(obj, key)
    bl = _req_int(tcb, "bootloader", 8)
    tee = _req_int(tcb, "tee", 8)
    snp = _req_int(tcb, "snp", 8)
    ucode = _req_int(tcb, "microcode", 8)
    fmc = _int(tcb, "fmc", 8, optional=True)
    if turin:
        return bytes([fmc or 0, bl, tee, snp, 0, 0, 0, ucode])
    if fmc is not None:
        raise FormatError(WHAT, f"{key} has an FMC level, which only Turin-layout reports carry")
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


def _version(obj: dict[str, Any], key: str) -> bytes:
    ver = _object(obj, key)
    return bytes([_req_int(ver, "build", 8), _req_int(ver, "minor", 8), _req_int(ver, "major", 8)])


def rebuild_report(fields: dict[str, Any]) -> bytes:
    """The binary ATTESTATION_REPORT described by the serde fields."""
    version = _req_int(fields, "version", 32)
    family = _int(fields, "cpuid_fam_id", 8, optional=True)
    model = _int(fields, "cpuid_mod_id", 8, optional=True)
    step = _int(fields, "cpuid_step", 8, optional=True)
    if version >= 3 and (family is None or model is None or step is None):
        raise FormatError(WHAT, "a version 3+ report needs cpuid_fam_id, cpuid_mod_id and cpuid_step")
    if family is not None:
        turin = uses_turin_tcb_layout(None, family)
    else:
        reported = fields.get("reported_tcb")
        turin = isinstance(reported, dict) and reported.get("fmc") is not None

    out = bytearray()
    out += version.to_bytes(4, "little")
    out += _req_int(fields, "guest_svn", 32).to_bytes(4, "little")
    out += _req_int(fields, "policy", 64).to_bytes(8, "little")
    out += _bytes(fields, "family_id", 16)
    out += _bytes(fields, "image_id", 16)
    out += _req_int(fields, "vmpl", 32).to_bytes(4, "little")
    out += _req_int(fields, "sig_algo", 32).to_bytes(4, "little")
    out += _tcb(fields, "current_tcb", turin)
    out += _req_int(fields, "plat_info", 64).to_bytes(8, "little")
    out += _req_int(fields, "key_info", 32).to_bytes(4, "little")
    out += bytes(4)
    out += _bytes(fields, "report_data", 64)
    out += _bytes(fields, "measurement", 48)
    out += _bytes(fields, "host_data", 32)
    out += _bytes(fields, "id_key_digest", 48)
    out += _bytes(fields, "author_key_digest", 48)
    out += _bytes(fields, "report_id", 32)
    out += _bytes(fields, "report_id_ma", 32)
    out += _tcb(fields, "reported_tcb", turin)
    if version >= 3:
        assert family is not None
        assert model is not None
        assert step is not None
        out += bytes([family, model, step]) + bytes(21)
    else:
        out += bytes(24)
    out += _bytes(fields, "chip_id", 64)
    out += _tcb(fields, "committed_tcb", turin)
    out += _version(fields, "current") + bytes(1)
    out += _version(fields, "committed") + bytes(1)
    out += _tcb(fields, "launch_tcb", turin)
    if version >= 5:
        out += (_int(fields, "launch_mit_vector", 64, optional=True) or 0).to_bytes(8, "little")
        out += (_int(fields, "current_mit_vector", 64, optional=True) or 0).to_bytes(8, "little")
    out += bytes(SIGNED_SIZE - len(out))
    signature = _object(fields, "signature")
    out += _bytes(signature, "r", 72)
    out += _bytes(signature, "s", 72)
    out += bytes(REPORT_SIZE - len(out))
    return bytes(out)


def parse_json_evidence(data: bytes) -> tuple[bytes, SnpEndorsements | None]:
    """The binary report and the endorsement certificates carried in the JSON form."""
    doc = load_json_object(data, WHAT)
    report = rebuild_report(_object(doc, "attestation_report"))
    chain = doc.get("cert_chain")
    if chain is None:
        return report, None
    if not isinstance(chain, list) or len(chain) > _MAX_CERTS:
        raise FormatError(WHAT, f"cert_chain must be an array of at most {_MAX_CERTS} entries")
    leaf: bytes | None = None
    intermediates: list[bytes] = []
    roots: list[bytes] = []
    for entry in chain:
        if not isinstance(entry, dict):
            raise FormatError(WHAT, "a cert_chain entry is not an object")
        kind = entry.get("cert_type")
        raw = entry.get("data")
        if not isinstance(kind, str) or not isinstance(raw, list) or len(raw) > _MAX_CERT_BYTES:
            raise FormatError(WHAT, "a cert_chain entry needs cert_type and data")
        der = _bytes(entry, "data", len(raw))
        kind = kind.upper()
        if kind in ("VCEK", "VLEK"):
            if leaf is not None:
                raise FormatError(WHAT, "cert_chain holds more than one VCEK/VLEK")
            leaf = der
        elif kind in ("ASK", "ASVK"):
            intermediates.append(der)
        elif kind == "ARK":
            roots.append(der)
    if leaf is None:
        return report, None
    chain_ders = tuple(intermediates + roots)
    return report, SnpEndorsements(leaf=leaf, chain=chain_ders, source="evidence cert_chain")
