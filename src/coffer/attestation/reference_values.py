"""Reference values: the measurements and settings an operator approves, with where each came from
and until when it holds.

A reference value has a name (``measurement``, ``mr_td``, ``pcr11``, ``trusted_ak``...) and a set of
accepted values. Each accepted value carries its own provenance (who or what registered it: an admin,
an RVPS message) and an optional expiry; expired values are ignored (and eventually dropped), so a
measurement approved "until the next release" stops passing on its own.

Names are typed: the value of a known name is checked and normalised when it is registered (hex
digests to lowercase of the right length, TCB minimums to objects of small integers, attestation keys
to their DER SubjectPublicKeyInfo in hex), so a policy compares like with like. Other names (custom
policies) take JSON scalars.

Storage: one entry per name in namespace ``as_reference_values`` of the shared store, updated with
compare-and-set so replicas adding values concurrently do not lose each other's writes. The appraisal
reads a :meth:`ReferenceValues.snapshot` (name -> list of live values), cached briefly.

The RVPS ``sample`` message of Trustee is accepted by :meth:`ReferenceValues.ingest_rvps`::

    {"version": "0.1.0", "type": "sample", "payload": "<base64 of {\"name\": [\"value\", ...]}>"}
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from coffer._internal.clock import as_utc, parse_reference_time, utc_now
from coffer._internal.encoding import b64_decode, load_json_object
from coffer.errors import FormatError, StorageError, UsageError
from coffer.kbs.store import NS_REFERENCE_VALUES, Store

_WHAT = "reference value"
NAME_RE = re.compile(r"\A[A-Za-z0-9_.\-]{1,64}\Z")
MAX_VALUES_PER_NAME = 1024
MAX_SCALAR_CHARS = 4096
RVPS_VERSION = "0.1.0"
DEFAULT_RVPS_EXPIRY = timedelta(days=365)
_RVPS_EXPIRY_KEYS = ("expiry", "expiration")  # payload keys carrying the expiry, not values
_CAS_ATTEMPTS = 16

# Hex digests: name -> accepted byte lengths.
_HEX_NAMES: dict[str, tuple[int, ...]] = {
    "measurement": (48,),
    "snp_launch_measurement": (48,),
    "host_data": (32,),
    "id_key_digest": (48,),
    "author_key_digest": (48,),
    "mr_td": (48,),
    "mr_config_id": (48,),
    "mr_owner": (48,),
    "mr_owner_config": (48,),
    "mr_seam": (48,),
    "xfam": (8,),
    "mr_signer": (32,),
    "mr_enclave": (32,),
    "config_id": (64,),
    "launch_digest": tuple(range(1, 65)),
    **{f"rtmr{i}": (48,) for i in range(4)},
    **{f"pcr{i}": (20, 32, 48, 64) for i in range(24)},
}
# Non-negative integers.
_INT_NAMES = {"svn": 2**32, "isv_prod_id": 2**16, "isv_svn": 2**16, "guest_svn": 2**32}
# Minimum TCB objects (component -> minimum level).
_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")
# Accepted Intel TCB statuses.
_STATUS_NAMES = ("tdx_tcb_status", "sgx_tcb_status")
_INTEL_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                   "ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded")
TRUSTED_AK = "trusted_ak"


def value_type(name: str) -> str:
    """The type of a reference-value name: hex, int, tcb, tcb_status, public_key or scalar."""
    if name in _HEX_NAMES:
        return "hex"
    if name in _INT_NAMES:
        return "int"
    if name == "snp_tcb_min":
        return "tcb"
    if name in _STATUS_NAMES:
        return "tcb_status"
    if name == TRUSTED_AK:
        return "public_key"
    return "scalar"


def _normalise_hex(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FormatError(_WHAT, f"{name}: a hex string is expected")
    text = value.strip().lower()
    text = text.removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise FormatError(_WHAT, f"{name}: not a hex string") from None
    if len(raw) not in _HEX_NAMES[name]:
        sizes = _HEX_NAMES[name]
        want = f"{sizes[0]}" if len(sizes) == 1 else f"one of {sizes}" if len(sizes) < 8 else "1..64"
        raise FormatError(_WHAT, f"{name}: {len(raw)} bytes, expected {want}")
    return raw.hex()


def _normalise_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if type(value) is not int or not 0 <= value < _INT_NAMES[name]:
        raise FormatError(_WHAT, f"{name}: an integer in [0, {_INT_NAMES[name]}) is expected")
    return value


def _normalise_tcb(name: str, value: Any) -> dict[str, int]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise FormatError(_WHAT, f"{name}: a TCB object is expected") from None
    if not isinstance(value, Mapping) or not value:
        raise FormatError(_WHAT, f"{name}: a non-empty object of TCB components is expected")
    out: dict[str, int] = {}
    for key, level in value.items():
        if key not in _TCB_COMPONENTS:
            raise FormatError(_WHAT, f"{name}: unknown TCB component {key!r} (known: {_TCB_COMPONENTS})")
        if type(level) is not int or not 0 <= level <= 255:
            raise FormatError(_WHAT, f"{name}.{key}: an integer in [0, 255] is expected")
        out[key] = level
    return dict(sorted(out.items()))


def _normalise_status(name: str, value: Any) -> str:
    if value not in _INTEL_STATUSES:
        raise FormatError(_WHAT, f"{name}: one of {', '.join(_INTEL_STATUSES)} is expected")
    return str(value)


def _normalise_public_key(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FormatError(_WHAT, f"{name}: a PEM, base64 or hex public key is expected")
    text = value.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            try:
                raw = bytes.fromhex(text)
            except ValueError:
                raw = b64_decode(text, f"{name} public key")
            key = serialization.load_der_public_key(raw)
    except (ValueError, FormatError, binascii.Error) as exc:
        raise FormatError(_WHAT, f"{name}: not a PEM, base64 or hex DER public key") from exc
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der.hex()


def _normalise_scalar(name: str, value: Any) -> str | int | bool:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str) and len(value) <= MAX_SCALAR_CHARS:
        return value
    raise FormatError(_WHAT, f"{name}: a string, integer or boolean is expected")


_NORMALISERS: dict[str, Callable[[str, Any], Any]] = {
    "hex": _normalise_hex,
    "int": _normalise_int,
    "tcb": _normalise_tcb,
    "tcb_status": _normalise_status,
    "public_key": _normalise_public_key,
    "scalar": _normalise_scalar,
}


def normalise(name: str, value: Any) -> Any:
    """Check a value for ``name`` and return its canonical form (FormatError when it does not fit)."""
    check_name(name)
    return _NORMALISERS[value_type(name)](name, value)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise FormatError(_WHAT, f"name {name!r} must match {NAME_RE.pattern}")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class ValueRecord:
    """One accepted value of a reference value, with its provenance and expiry."""

    value: Any
    provenance: dict[str, Any]
    added_at: datetime
    expires_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "provenance": dict(self.provenance), "added_at": _iso(self.added_at),
                "expires_at": _iso(self.expires_at)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ValueRecord:
        expires = doc.get("expires_at")
        return cls(value=doc["value"], provenance=dict(doc.get("provenance") or {}),
                   added_at=parse_reference_time(str(doc["added_at"])),
                   expires_at=parse_reference_time(str(expires)) if expires else None)


@dataclass(frozen=True, kw_only=True)
class ReferenceValue:
    """A named reference value: its type and its accepted (live) values."""

    name: str
    type: str
    records: tuple[ValueRecord, ...] = field(default=())

    @property
    def values(self) -> list[Any]:
        return [r.value for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "values": [r.to_dict() for r in self.records]}


def _decode_entry(name: str, raw: bytes) -> list[ValueRecord]:
    try:
        doc = json.loads(raw)
        return [ValueRecord.from_dict(item) for item in doc["values"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"reference value {name!r} is stored in an unreadable form") from exc


def _encode_entry(name: str, records: Iterable[ValueRecord]) -> bytes:
    return json.dumps({"name": name, "values": [r.to_dict() for r in records]},
                      separators=(",", ":"), sort_keys=True).encode()


class ReferenceValues:
    """The reference-value registry over a :class:`~coffer.kbs.store.Store`.

    ``cache_seconds`` bounds how long :meth:`snapshot` may serve values read earlier (writes through
    this object invalidate it at once; writes by another replica are seen within that time).
    """

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utc_now,
                 cache_seconds: float = 1.0) -> None:
        self._store = store
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._snapshot: tuple[float, dict[str, builtins.list[Any]]] | None = None

    # -- reading ----------------------------------------------------------------------------------

    def get(self, name: str, *, now: datetime | None = None) -> ReferenceValue | None:
        """The live values of ``name``, or None when it has none."""
        check_name(name)
        at = as_utc(now) if now is not None else self._clock()
        entry = self._store.get(NS_REFERENCE_VALUES, name, now=at)
        if entry is None:
            return None
        records = tuple(r for r in _decode_entry(name, entry.value) if r.live(at))
        if not records:
            return None
        return ReferenceValue(name=name, type=value_type(name), records=records)

    def list(self, *, now: datetime | None = None) -> builtins.list[ReferenceValue]:
        """Every reference value with live values, ordered by name."""
        at = as_utc(now) if now is not None else self._clock()
        out: builtins.list[ReferenceValue] = []
        for entry in self._store.list_entries(NS_REFERENCE_VALUES, now=at, limit=100_000):
            records = tuple(r for r in _decode_entry(entry.key, entry.value) if r.live(at))
            if records:
                out.append(ReferenceValue(name=entry.key, type=value_type(entry.key), records=records))
        return out

    def snapshot(self, *, now: datetime | None = None) -> dict[str, builtins.list[Any]]:
        """name -> live values, for the appraisal policy (``data.reference``). Cached briefly."""
        tick = time.monotonic()
        with self._lock:
            cached = self._snapshot
            if now is None and cached is not None and tick - cached[0] < self._cache_seconds:
                return cached[1]
        fresh = {rv.name: rv.values for rv in self.list(now=now)}
        if now is None:
            with self._lock:
                self._snapshot = (tick, fresh)
        return fresh

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    # -- writing ----------------------------------------------------------------------------------

    def add(self, name: str, values: Iterable[Any], *, provenance: Mapping[str, Any] | None = None,
            expires_at: datetime | None = None) -> ReferenceValue:
        """Accept ``values`` for ``name`` (normalised by its type). A value already present gets the
        new provenance and expiry. Returns the live state after the change."""
        check_name(name)
        normalised = [normalise(name, v) for v in values]
        if not normalised:
            raise FormatError(_WHAT, f"{name}: no values given")
        now = self._clock()
        expiry = as_utc(expires_at) if expires_at is not None else None
        if expiry is not None and expiry <= now:
            raise UsageError(f"reference value {name}: expiry {_iso(expiry)} is in the past")
        prov = dict(provenance or {"source": "api"})
        new = [ValueRecord(value=v, provenance=prov, added_at=now, expires_at=expiry) for v in normalised]
        self._update(name, lambda old: [r for r in old if r.live(now) and r.value not in normalised] + new)
        self.invalidate()
        found = self.get(name, now=now)
        assert found is not None  # we just wrote live values
        return found

    def delete(self, name: str, value: Any = None) -> bool:
        """Remove ``name`` entirely, or only one of its values. True when something was removed."""
        check_name(name)
        if value is None:
            removed = self._store.delete(NS_REFERENCE_VALUES, name)
            self.invalidate()
            return removed
        target = normalise(name, value)
        removed_any = False

        def drop(old: builtins.list[ValueRecord]) -> builtins.list[ValueRecord]:
            nonlocal removed_any
            kept = [r for r in old if r.value != target]
            removed_any = len(kept) != len(old)
            return kept

        self._update(name, drop)
        self.invalidate()
        return removed_any

    def _update(self, name: str,
                change: Callable[[builtins.list[ValueRecord]], builtins.list[ValueRecord]]) -> None:
        now = self._clock()
        for _ in range(_CAS_ATTEMPTS):
            entry = self._store.get(NS_REFERENCE_VALUES, name, now=now)
            old = _decode_entry(name, entry.value) if entry is not None else []
            records = change(old)
            if len(records) > MAX_VALUES_PER_NAME:
                raise UsageError(f"reference value {name}: more than {MAX_VALUES_PER_NAME} values")
            if not records:
                if entry is not None:
                    self._store.delete(NS_REFERENCE_VALUES, name)
                return
            expiries = [r.expires_at for r in records]
            entry_expiry = None if any(e is None for e in expiries) else max(e for e in expiries if e)
            raw = _encode_entry(name, records)
            if entry is None:
                if self._store.create(NS_REFERENCE_VALUES, name, raw, expires_at=entry_expiry, now=now):
                    return
            elif self._store.compare_and_set(NS_REFERENCE_VALUES, name, raw, expected_version=entry.version,
                                             expires_at=entry_expiry):
                return
        raise StorageError(f"reference value {name!r}: too many concurrent updates")

    # -- RVPS messages ----------------------------------------------------------------------------

    def ingest_rvps(self, message: bytes | Mapping[str, Any], *,
                    source: str = "rvps") -> builtins.list[ReferenceValue]:
        """Register the values of a Trustee RVPS message (type ``sample``: unsigned; the operator is
        the authority). ``expiry`` in the payload may be given as an RFC 3339 time, else 12 months."""
        doc = load_json_object(message, "RVPS message") if isinstance(message, bytes) else dict(message)
        if doc.get("version") != RVPS_VERSION:
            raise FormatError("RVPS message", f"version must be {RVPS_VERSION!r}")
        kind = doc.get("type")
        if kind != "sample":
            raise FormatError("RVPS message", f"type {kind!r} is not supported (only 'sample')")
        payload = doc.get("payload")
        if not isinstance(payload, str):
            raise FormatError("RVPS message", "payload must be a base64 string")
        try:
            decoded = base64.b64decode(payload, validate=True) if len(payload) % 4 == 0 else b""
        except binascii.Error:
            decoded = b""
        if not decoded:
            decoded = b64_decode(payload, "RVPS payload")
        values = load_json_object(decoded, "RVPS sample payload")
        now = self._clock()
        expires_at = now + DEFAULT_RVPS_EXPIRY
        # Both spellings are metadata, never reference values; when both are given they must agree.
        stamps: builtins.list[datetime] = []
        for key in _RVPS_EXPIRY_KEYS:
            if key in values:
                stamp = values.pop(key)
                try:
                    stamps.append(parse_reference_time(str(stamp)))
                except UsageError as exc:
                    raise FormatError("RVPS sample payload", f"{key} is not an RFC 3339 time") from exc
        if stamps:
            if any(stamp != stamps[0] for stamp in stamps):
                raise FormatError("RVPS sample payload", "expiry and expiration name different times")
            expires_at = stamps[0]
        prepared: builtins.list[tuple[str, builtins.list[Any]]] = []
        for name, listed in values.items():
            check_name(name)
            items = listed if isinstance(listed, list) else [listed]
            prepared.append((name, [normalise(name, v) for v in items]))
        provenance = {"source": source, "type": "sample", "version": RVPS_VERSION}
        return [self.add(name, items, provenance=provenance, expires_at=expires_at)
                for name, items in prepared if items]
