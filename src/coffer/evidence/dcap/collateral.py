"""Intel PCS collateral: TCB Info and QE Identity, parsed and verified from the raw bodies PCS serves.

A body looks like ``{"tcbInfo":{...},"signature":"<hex r||s>"}`` (or ``enclaveIdentity``). Intel signs
the exact bytes of the inner object as they appear in the body, so :func:`signed_member` finds
those bytes with a small scanner instead of re-serialising the parsed JSON. The whole body is also
parsed strictly, and the scanned bytes must decode to the same value, so the two views can never
disagree.

Verification of a body (parse, signer chain to the root, signature) depends only on the bytes, the
chain and the root, so it is done once per distinct input (``lru_cache``). What depends on the
reference time (issueDate/nextUpdate, certificate validity) is checked on every call.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from coffer._internal.encoding import hex_decode, load_json_object, to_json_object
from coffer._internal.memo import IdentityMemo
from coffer.errors import FormatError
from coffer.evidence.x509util import (
    ChainError,
    check_issued_by,
    check_validity,
    cn,
    load_certificate,
    load_crl,
)

TCB_STATUSES = frozenset({
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked",
})

MAX_COLLATERAL_BYTES = 1 << 20
_MAX_JSON_DEPTH = 64


# --------------------------------------------------------------------------------------------
# The raw-member scanner


def _skip_ws(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] in b" \t\r\n":
        pos += 1
    return pos


def _skip_string(data: bytes, pos: int, what: str) -> int:
    """``pos`` is at an opening quote; returns the index after the closing quote."""
    pos += 1
    while pos < len(data):
        char = data[pos]
        if char == 0x5C:  # backslash: skip the escaped character
            pos += 2
            continue
        if char == 0x22:
            return pos + 1
        pos += 1
    raise FormatError(what, "unterminated string", offset=pos)


def _skip_value(data: bytes, pos: int, what: str) -> int:
    """Index just after the JSON value starting at ``pos`` (assumed valid JSON; the caller checks
    the document with a real parser too)."""
    if pos >= len(data):
        raise FormatError(what, "value expected", offset=pos)
    first = data[pos]
    if first == 0x22:
        return _skip_string(data, pos, what)
    if first in b"{[":
        depth = 0
        while pos < len(data):
            char = data[pos]
            if char == 0x22:
                pos = _skip_string(data, pos, what)
                continue
            if char in b"{[":
                depth += 1
                if depth > _MAX_JSON_DEPTH:
                    raise FormatError(what, "nested too deeply", offset=pos)
            elif char in b"}]":
                depth -= 1
                if depth == 0:
                    return pos + 1
            pos += 1
        raise FormatError(what, "unterminated object or array", offset=pos)
    end = pos
    while end < len(data) and data[end] not in b",}] \t\r\n":
        end += 1
    if end == pos:
        raise FormatError(what, "value expected", offset=pos)
    return end


def top_level_members(body: bytes, what: str) -> dict[str, tuple[int, int]]:
    """Spans ``(start, end)`` of the raw value bytes of each member of a top-level JSON object."""
    out: dict[str, tuple[int, int]] = {}
    pos = _skip_ws(body, 0)
    if pos >= len(body) or body[pos] != 0x7B:
        raise FormatError(what, "top level must be a JSON object", offset=pos)
    pos = _skip_ws(body, pos + 1)
    if pos < len(body) and body[pos] == 0x7D:
        pos += 1
    else:
        while True:
            if pos >= len(body) or body[pos] != 0x22:
                raise FormatError(what, "member name expected", offset=pos)
            key_end = _skip_string(body, pos, what)
            try:
                key = json.loads(body[pos:key_end].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise FormatError(what, "malformed member name", offset=pos) from exc
            pos = _skip_ws(body, key_end)
            if pos >= len(body) or body[pos] != 0x3A:
                raise FormatError(what, "':' expected", offset=pos)
            start = _skip_ws(body, pos + 1)
            end = _skip_value(body, start, what)
            if key in out:
                raise FormatError(what, f"duplicate member {key!r}", offset=pos)
            out[key] = (start, end)
            pos = _skip_ws(body, end)
            if pos < len(body) and body[pos] == 0x2C:
                pos = _skip_ws(body, pos + 1)
                continue
            if pos < len(body) and body[pos] == 0x7D:
                pos += 1
                break
            raise FormatError(what, "',' or '}' expected", offset=pos)
    if _skip_ws(body, pos) != len(body):
        raise FormatError(what, "trailing data after the JSON object", offset=pos)
    return out


def signed_member(body: bytes, key: str, what: str) -> tuple[bytes, dict[str, Any], bytes]:
    """``(raw bytes of body[key], parsed body[key], signature)`` of a PCS signed-collateral body."""
    if len(body) > MAX_COLLATERAL_BYTES:
        raise FormatError(what, f"{len(body)} bytes exceeds the {MAX_COLLATERAL_BYTES}-byte limit")
    parsed = load_json_object(body, what, max_bytes=MAX_COLLATERAL_BYTES)
    spans = top_level_members(body, what)
    if key not in spans or key not in parsed:
        raise FormatError(what, f"no {key!r} member")
    start, end = spans[key]
    raw = body[start:end]
    value = parsed[key]
    if not isinstance(value, dict):
        raise FormatError(what, f"{key!r} must be an object")
    try:
        rescanned = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(what, f"the raw {key!r} bytes do not parse on their own") from exc
    if rescanned != value:
        raise FormatError(what, f"the raw {key!r} bytes disagree with the parsed document")
    sig_hex = parsed.get("signature")
    if not isinstance(sig_hex, str):
        raise FormatError(what, "'signature' must be a hex string")
    signature = hex_decode(sig_hex, f"{what} signature")
    if len(signature) != 64:
        raise FormatError(what, f"signature must be 64 bytes (r||s), got {len(signature)}")
    return raw, value, signature


# --------------------------------------------------------------------------------------------
# Typed views of the JSON


def _field(obj: dict[str, Any], name: str, kind: type, what: str) -> Any:
    if name not in obj:
        raise FormatError(what, f"{name!r} is missing")
    value = obj[name]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FormatError(what, f"{name!r} must be an integer")
        if not 0 <= value < 1 << 32:
            raise FormatError(what, f"{name!r} is out of range")
    elif not isinstance(value, kind):
        raise FormatError(what, f"{name!r} must be a {kind.__name__}")
    return value


def _hex_field(obj: dict[str, Any], name: str, size: int, what: str) -> bytes:
    raw = hex_decode(_field(obj, name, str, what), f"{what} {name!r}")
    if len(raw) != size:
        raise FormatError(what, f"{name!r} must be {size} bytes, got {len(raw)}")
    return raw


def _time_field(obj: dict[str, Any], name: str, what: str) -> datetime:
    text = _field(obj, name, str, what)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise FormatError(what, f"{name!r} is not an ISO-8601 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _status(obj: dict[str, Any], what: str) -> str:
    status = _field(obj, "tcbStatus", str, what)
    if status not in TCB_STATUSES:
        raise FormatError(what, f"unknown tcbStatus {status!r}")
    return str(status)


def _advisories(obj: dict[str, Any], what: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise FormatError(what, "'advisoryIDs' must be a list of strings")
    return tuple(ids)


def _list(obj: dict[str, Any], name: str, what: str) -> list[dict[str, Any]]:
    items = _field(obj, name, list, what)
    if not all(isinstance(item, dict) for item in items):
        raise FormatError(what, f"{name!r} must be a list of objects")
    return list(items)


@dataclass(frozen=True, kw_only=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class IdentityLevel:
    """A TCB level of a QE identity or a TDX module identity: keyed by ISVSVN only."""

    isvsvn: int
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class TdxModule:
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes


@dataclass(frozen=True, kw_only=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IdentityLevel, ...]


@dataclass(frozen=True, kw_only=True)
class TcbInfo:
    id: Literal["SGX", "TDX"]
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModule | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


@dataclass(frozen=True, kw_only=True)
class EnclaveIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IdentityLevel, ...]

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


def _svn_list(tcb: dict[str, Any], name: str, what: str) -> tuple[int, ...]:
    items = _list(tcb, name, what)
    if len(items) != 16:
        raise FormatError(what, f"{name!r} must have 16 entries, has {len(items)}")
    svns = tuple(int(_field(item, "svn", int, what)) for item in items)
    if any(s > 0xFF for s in svns):
        raise FormatError(what, f"{name!r} holds an SVN above 255")
    return svns


def _tcb_level(level: dict[str, Any], version: int, tdx: bool, what: str) -> TcbLevel:
    tcb = _field(level, "tcb", dict, what)
    tdx_components: tuple[int, ...] | None = None
    if version >= 3:
        sgx = _svn_list(tcb, "sgxtcbcomponents", what)
        if tdx:
            tdx_components = _svn_list(tcb, "tdxtcbcomponents", what)
    else:
        if tdx:
            raise FormatError(what, "TDX TCB info must be version 3")
        sgx = tuple(int(_field(tcb, f"sgxtcbcomp{i:02d}svn", int, what)) for i in range(1, 17))
    return TcbLevel(sgx_components=sgx, pcesvn=int(_field(tcb, "pcesvn", int, what)),
                    tdx_components=tdx_components, tcb_date=_time_field(level, "tcbDate", what),
                    tcb_status=_status(level, what), advisory_ids=_advisories(level, what))


def _identity_levels(obj: dict[str, Any], what: str) -> tuple[IdentityLevel, ...]:
    levels = []
    for level in _list(obj, "tcbLevels", what):
        tcb = _field(level, "tcb", dict, what)
        levels.append(IdentityLevel(isvsvn=int(_field(tcb, "isvsvn", int, what)),
                                    tcb_date=_time_field(level, "tcbDate", what),
                                    tcb_status=_status(level, what),
                                    advisory_ids=_advisories(level, what)))
    if not levels:
        raise FormatError(what, "'tcbLevels' is empty")
    return tuple(levels)


def tcb_info_from_json(obj: dict[str, Any]) -> TcbInfo:
    what = "TCB info"
    raw_id = _field(obj, "id", str, what) if "id" in obj else "SGX"
    tee_id: Literal["SGX", "TDX"]
    if raw_id == "SGX":
        tee_id = "SGX"
    elif raw_id == "TDX":
        tee_id = "TDX"
    else:
        raise FormatError(what, f"id {raw_id!r} is not SGX or TDX")
    version = int(_field(obj, "version", int, what))
    if version not in (2, 3):
        raise FormatError(what, f"version {version} is not supported (2 or 3)")
    tdx = tee_id == "TDX"
    tdx_module: TdxModule | None = None
    identities: list[TdxModuleIdentity] = []
    if tdx:
        module = _field(obj, "tdxModule", dict, what)
        tdx_module = TdxModule(mrsigner=_hex_field(module, "mrsigner", 48, what),
                               attributes=_hex_field(module, "attributes", 8, what),
                               attributes_mask=_hex_field(module, "attributesMask", 8, what))
        for ident in _list(obj, "tdxModuleIdentities", what) if "tdxModuleIdentities" in obj else []:
            identities.append(TdxModuleIdentity(
                id=str(_field(ident, "id", str, what)),
                mrsigner=_hex_field(ident, "mrsigner", 48, what),
                attributes=_hex_field(ident, "attributes", 8, what),
                attributes_mask=_hex_field(ident, "attributesMask", 8, what),
                tcb_levels=_identity_levels(ident, what)))
    levels = tuple(_tcb_level(level, version, tdx, what) for level in _list(obj, "tcbLevels", what))
    if not levels:
        raise FormatError(what, "'tcbLevels' is empty")
    return TcbInfo(
        id=tee_id, version=version, issue_date=_time_field(obj, "issueDate", what),
        next_update=_time_field(obj, "nextUpdate", what), fmspc=_hex_field(obj, "fmspc", 6, what),
        pce_id=_hex_field(obj, "pceId", 2, what),
        tcb_type=int(_field(obj, "tcbType", int, what)) if "tcbType" in obj else 0,
        tcb_evaluation_data_number=int(_field(obj, "tcbEvaluationDataNumber", int, what)),
        tdx_module=tdx_module, tdx_module_identities=tuple(identities), tcb_levels=levels,
    )


def enclave_identity_from_json(obj: dict[str, Any]) -> EnclaveIdentity:
    what = "QE identity"
    ident = _field(obj, "id", str, what)
    if ident not in ("QE", "TD_QE", "QVE"):
        raise FormatError(what, f"id {ident!r} is not QE, TD_QE or QVE")
    version = int(_field(obj, "version", int, what))
    if version != 2:
        raise FormatError(what, f"version {version} is not supported (2)")
    return EnclaveIdentity(
        id=str(ident), version=version, issue_date=_time_field(obj, "issueDate", what),
        next_update=_time_field(obj, "nextUpdate", what),
        tcb_evaluation_data_number=int(_field(obj, "tcbEvaluationDataNumber", int, what)),
        miscselect=int.from_bytes(_hex_field(obj, "miscselect", 4, what), "big"),
        miscselect_mask=int.from_bytes(_hex_field(obj, "miscselectMask", 4, what), "big"),
        attributes=_hex_field(obj, "attributes", 16, what),
        attributes_mask=_hex_field(obj, "attributesMask", 16, what),
        mrsigner=_hex_field(obj, "mrsigner", 32, what),
        isvprodid=int(_field(obj, "isvprodid", int, what)),
        tcb_levels=_identity_levels(obj, what),
    )


@dataclass(frozen=True)
class SignedBody:
    """A parsed PCS body: the typed content, the exact signed bytes and the raw r||s signature."""

    signed: bytes
    signature: bytes


@lru_cache(maxsize=64)
def parse_tcb_info(body: bytes) -> tuple[TcbInfo, SignedBody]:
    """Parse a raw PCS TCB info body ``{"tcbInfo":...,"signature":...}``."""
    raw, value, signature = signed_member(bytes(body), "tcbInfo", "TCB info")
    return tcb_info_from_json(value), SignedBody(raw, signature)


@lru_cache(maxsize=64)
def parse_qe_identity(body: bytes) -> tuple[EnclaveIdentity, SignedBody]:
    """Parse a raw PCS QE identity body ``{"enclaveIdentity":...,"signature":...}``."""
    raw, value, signature = signed_member(bytes(body), "enclaveIdentity", "QE identity")
    return enclave_identity_from_json(value), SignedBody(raw, signature)


# --------------------------------------------------------------------------------------------
# Chains, signatures, CRLs


_DER_MEMO: IdentityMemo[bytes] = IdentityMemo()


def der_of(cert: x509.Certificate) -> bytes:
    """The DER bytes of a certificate (remembered per object: encoding costs more than the lookup)."""
    der = _DER_MEMO.get((cert,))
    if der is None:
        der = cert.public_bytes(Encoding.DER)
        _DER_MEMO.put((cert,), der)
    return der


def _der(cert: x509.Certificate | bytes) -> bytes:
    return cert if isinstance(cert, bytes) else der_of(cert)


@lru_cache(maxsize=256)
def _verified_chain(ders: tuple[bytes, ...], root_der: bytes, label: str) -> tuple[x509.Certificate, ...]:
    if not ders:
        raise ChainError(f"{label}: empty certificate chain")
    if len(ders) > 4:
        raise ChainError(f"{label}: chain of {len(ders)} certificates is too long")
    root = load_certificate(root_der, "root certificate")
    certs = [load_certificate(d, label) for d in ders]
    if certs[-1].subject == certs[-1].issuer and len(certs) > 1:
        if ders[-1] != root_der:
            raise ChainError(f"{label}: root {cn(certs[-1].subject)!r} is not the trusted Intel SGX Root CA")
        certs = certs[:-1]
    elif ders[-1] == root_der:
        raise ChainError(f"{label}: chain holds only the root certificate")
    full = (*certs, root)
    for child, parent in itertools.pairwise(full):
        check_issued_by(child, parent, f"{label}: {cn(child.subject)!r}")
    return full


def chain_to_root(ders: tuple[bytes, ...], root: x509.Certificate | bytes,
                  label: str) -> tuple[x509.Certificate, ...]:
    """Check ``ders`` (leaf first) chains by signature to ``root`` (a certificate or its DER);
    returns the certificates leaf..root.

    A root certificate at the end of ``ders`` must be byte-identical to ``root``; without one, the
    last certificate must be issued by ``root``. Validity windows are checked separately, by
    :func:`check_chain_validity`. The result is memoised per (chain, root).
    """
    return _verified_chain(tuple(bytes(d) for d in ders), _der(root), label)


def check_chain_validity(chain: tuple[x509.Certificate, ...], at: datetime, label: str) -> None:
    for cert in chain:
        if at < cert.not_valid_before_utc or at > cert.not_valid_after_utc:
            check_validity(cert, at, f"{label}: certificate {cn(cert.subject)!r}")


def raw_p256_key(cert: x509.Certificate, label: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ChainError(f"{label}: signer key is not ECDSA P-256")
    return key


def verify_raw_signature(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, label: str) -> None:
    """ECDSA P-256 / SHA-256 with the signature as 32-byte big-endian r || s."""
    if len(signature) != 64:
        raise ChainError(f"{label}: signature must be 64 bytes")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise ChainError(f"{label}: signature does not verify") from exc


@lru_cache(maxsize=64)
def _verified_body(kind: str, body: bytes, chain: tuple[bytes, ...], root_der: bytes) -> tuple[
        TcbInfo | EnclaveIdentity, tuple[x509.Certificate, ...]]:
    parsed: TcbInfo | EnclaveIdentity
    if kind == "tcb":
        parsed, signed = parse_tcb_info(body)
        label = "TCB info"
    else:
        parsed, signed = parse_qe_identity(body)
        label = "QE identity"
    certs = chain_to_root(chain, root_der, f"{label} issuer chain")
    verify_raw_signature(raw_p256_key(certs[0], label), signed.signature, signed.signed, label)
    return parsed, certs


def _check_window(issue: datetime, next_update: datetime, at: datetime, label: str) -> None:
    if at < issue:
        raise ChainError(f"{label} is not valid before its issueDate {issue.isoformat()}")
    if at > next_update:
        raise ChainError(f"{label} expired at its nextUpdate {next_update.isoformat()}")


def verify_tcb_info(body: bytes, chain: tuple[bytes, ...], at: datetime, *,
                    root: x509.Certificate | bytes) -> tuple[TcbInfo, tuple[x509.Certificate, ...]]:
    """Parse and verify TCB info; returns it and its signer chain (leaf..root). ``root`` is the
    trust anchor or its DER."""
    parsed, certs = _verified_body("tcb", bytes(body), tuple(bytes(c) for c in chain), _der(root))
    assert isinstance(parsed, TcbInfo)
    check_chain_validity(certs, at, "TCB info issuer chain")
    _check_window(parsed.issue_date, parsed.next_update, at, "TCB info")
    return parsed, certs


def verify_qe_identity(body: bytes, chain: tuple[bytes, ...], at: datetime, *,
                       root: x509.Certificate | bytes
                       ) -> tuple[EnclaveIdentity, tuple[x509.Certificate, ...]]:
    """Parse and verify a QE identity; returns it and its signer chain (leaf..root). ``root`` is
    the trust anchor or its DER."""
    parsed, certs = _verified_body("qe", bytes(body), tuple(bytes(c) for c in chain), _der(root))
    assert isinstance(parsed, EnclaveIdentity)
    check_chain_validity(certs, at, "QE identity issuer chain")
    _check_window(parsed.issue_date, parsed.next_update, at, "QE identity")
    return parsed, certs


@lru_cache(maxsize=64)
def _verified_crl(data: bytes, issuer_der: bytes, label: str) -> x509.CertificateRevocationList:
    crl = load_crl(data, label)
    issuer = load_certificate(issuer_der, f"{label} issuer")
    if crl.issuer != issuer.subject:
        raise ChainError(f"{label}: issued by {cn(crl.issuer)!r}, expected {cn(issuer.subject)!r}")
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise ChainError(f"{label}: signature by {cn(issuer.subject)!r} does not verify")
    if crl.next_update_utc is None:
        raise ChainError(f"{label} has no nextUpdate, so it would never expire")
    return crl


def verify_crl(data: bytes, issuer: x509.Certificate | bytes, at: datetime,
               label: str) -> x509.CertificateRevocationList:
    """A CRL (DER, PEM or hex) signed by ``issuer`` (a certificate or its DER) and current at ``at``."""
    crl = _verified_crl(bytes(data), _der(issuer), label)
    if at < crl.last_update_utc:
        raise ChainError(f"{label} is not valid before {crl.last_update_utc.isoformat()}")
    next_update = crl.next_update_utc
    if next_update is not None and at > next_update:
        raise ChainError(f"{label} expired on {next_update.isoformat()}")
    return crl
