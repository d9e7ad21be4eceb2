"""Reference values: typing, provenance, expiry, concurrent writers and RVPS messages."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coffer.attestation.reference_values import ReferenceValues, normalise, value_type
from coffer.errors import FormatError, UsageError
from coffer.kbs.store import NS_REFERENCE_VALUES, MemoryStore
from tests.attestation.helpers import Clock

M1 = "AB" * 48
M2 = "cd" * 48


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> ReferenceValues:
    return ReferenceValues(MemoryStore(), clock=clock, cache_seconds=0.0)


def test_add_normalises_and_records_provenance(registry: ReferenceValues, clock: Clock) -> None:
    rv = registry.add("measurement", [M1], provenance={"source": "admin", "sub": "alice"})
    assert rv.type == "hex"
    assert rv.values == [M1.lower()]
    record = rv.records[0]
    assert record.provenance == {"source": "admin", "sub": "alice"}
    assert record.added_at == clock.at
    assert record.expires_at is None
    assert registry.get("measurement") == rv
    assert registry.snapshot() == {"measurement": [M1.lower()]}


def test_values_accumulate_and_re_adding_updates_provenance(registry: ReferenceValues) -> None:
    registry.add("measurement", [M1], provenance={"source": "a"})
    registry.add("measurement", [M2], provenance={"source": "b"})
    rv = registry.add("measurement", [M1], provenance={"source": "c"})
    assert sorted(rv.values) == sorted([M1.lower(), M2])
    assert {r.value: r.provenance["source"] for r in rv.records} == {M1.lower(): "c", M2: "b"}


@pytest.mark.parametrize(("name", "value"), [
    ("measurement", "ab" * 32),         # 32 bytes, a measurement has 48
    ("measurement", "zz" * 48),
    ("host_data", "00" * 48),
    ("mr_td", 5),
    ("pcr11", "00" * 31),
    ("snp_tcb_min", {"bootloader": 300}),
    ("snp_tcb_min", {"nonsense": 1}),
    ("snp_tcb_min", {}),
    ("svn", -1),
    ("tdx_tcb_status", "Fine"),
    ("trusted_ak", "not a key"),
    ("custom", {"nested": "object"}),
    ("bad name!", "x"),
])
def test_rejects_values_of_the_wrong_type(registry: ReferenceValues, name: str, value: object) -> None:
    with pytest.raises(FormatError):
        registry.add(name, [value])
    assert registry.list() == []


def test_typed_names() -> None:
    assert value_type("rtmr2") == "hex"
    assert value_type("pcr23") == "hex"
    assert value_type("pcr24") == "scalar"
    assert value_type("snp_tcb_min") == "tcb"
    assert value_type("trusted_ak") == "public_key"
    assert normalise("svn", "7") == 7
    assert normalise("snp_tcb_min", '{"snp": 8, "bootloader": 3}') == {"bootloader": 3, "snp": 8}
    assert normalise("pcr0", "0x" + "AA" * 32) == "aa" * 32


def test_trusted_ak_accepts_pem_base64_and_hex() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for form in (pem.decode(), base64.b64encode(der).decode(), der.hex()):
        assert normalise("trusted_ak", form) == der.hex()


def test_expired_values_stop_counting(registry: ReferenceValues, clock: Clock) -> None:
    registry.add("measurement", [M1], expires_at=clock.at + timedelta(hours=1))
    registry.add("measurement", [M2])
    assert len(registry.get("measurement").values) == 2  # type: ignore[union-attr]
    clock.at += timedelta(hours=2)
    assert registry.get("measurement").values == [M2]  # type: ignore[union-attr]
    assert registry.snapshot() == {"measurement": [M2]}


def test_name_disappears_when_all_values_expire(registry: ReferenceValues, clock: Clock) -> None:
    registry.add("mr_td", ["01" * 48], expires_at=clock.at + timedelta(minutes=1))
    clock.at += timedelta(minutes=2)
    assert registry.get("mr_td") is None
    assert registry.list() == []


def test_expiry_in_the_past_is_refused(registry: ReferenceValues, clock: Clock) -> None:
    with pytest.raises(UsageError):
        registry.add("mr_td", ["01" * 48], expires_at=clock.at - timedelta(seconds=1))


def test_delete_one_value_or_the_name(registry: ReferenceValues) -> None:
    registry.add("measurement", [M1, M2])
    assert registry.delete("measurement", M1.lower()) is True
    assert registry.delete("measurement", M1) is False
    assert registry.get("measurement").values == [M2]  # type: ignore[union-attr]
    assert registry.delete("measurement", M2) is True
    assert registry.get("measurement") is None
    registry.add("measurement", [M1])
    assert registry.delete("measurement") is True
    assert registry.delete("measurement") is False


def test_two_replicas_sharing_a_store_see_each_others_values(clock: Clock) -> None:
    store = MemoryStore()
    a = ReferenceValues(store, clock=clock, cache_seconds=0.0)
    b = ReferenceValues(store, clock=clock, cache_seconds=0.0)
    a.add("measurement", [M1])
    b.add("measurement", [M2])
    assert sorted(a.get("measurement").values) == sorted([M1.lower(), M2])  # type: ignore[union-attr]


def test_compare_and_set_retries_a_lost_race(clock: Clock) -> None:
    store = MemoryStore()
    registry = ReferenceValues(store, clock=clock, cache_seconds=0.0)
    registry.add("measurement", [M1])
    original = store.compare_and_set
    raced = {"done": False}

    def racing(*args: object, **kwargs: object) -> object:
        if not raced["done"]:
            raced["done"] = True
            other = ReferenceValues(store, clock=clock, cache_seconds=0.0)
            other.add("measurement", ["ee" * 48])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    store.compare_and_set = racing  # type: ignore[method-assign,assignment]
    registry.add("measurement", [M2])
    found = registry.get("measurement")
    assert found is not None
    assert sorted(found.values) == sorted([M1.lower(), M2, "ee" * 48])


def test_snapshot_cache_is_invalidated_by_local_writes(clock: Clock) -> None:
    registry = ReferenceValues(MemoryStore(), clock=clock, cache_seconds=3600.0)
    assert registry.snapshot() == {}
    registry.add("measurement", [M1])
    assert registry.snapshot() == {"measurement": [M1.lower()]}


def _rvps(payload: dict[str, object], **over: object) -> dict[str, object]:
    return {"version": "0.1.0", "type": "sample",
            "payload": base64.b64encode(json.dumps(payload).encode()).decode(), **over}


def test_ingests_trustee_rvps_sample_message(registry: ReferenceValues, clock: Clock) -> None:
    added = registry.ingest_rvps(_rvps({"snp_launch_measurement": [M1], "svn": ["1"], "custom": "x"}),
                                 source="admin:alice")
    assert [rv.name for rv in added] == ["snp_launch_measurement", "svn", "custom"]
    svn = registry.get("svn")
    assert svn is not None
    assert svn.values == [1]
    record = svn.records[0]
    assert record.provenance == {"source": "admin:alice", "type": "sample", "version": "0.1.0"}
    assert record.expires_at == clock.at + timedelta(days=365)


def test_rvps_message_bytes_and_explicit_expiry(registry: ReferenceValues) -> None:
    message = json.dumps(_rvps({"mr_td": ["01" * 48], "expiry": "2027-01-01T00:00:00Z"})).encode()
    (rv,) = registry.ingest_rvps(message)
    assert rv.records[0].expires_at is not None
    assert rv.records[0].expires_at.year == 2027


def test_rvps_expiry_and_expiration_together_are_metadata(registry: ReferenceValues) -> None:
    # Both keys present used to leave "expiration" behind as a reference value.
    stamp = "2027-01-01T00:00:00Z"
    (rv,) = registry.ingest_rvps(_rvps({"mr_td": ["01" * 48], "expiry": stamp, "expiration": stamp}))
    assert rv.name == "mr_td"
    assert rv.records[0].expires_at is not None
    assert rv.records[0].expires_at.year == 2027
    assert registry.get("expiration") is None
    assert registry.get("expiry") is None
    (only,) = registry.ingest_rvps(_rvps({"mr_seam": ["02" * 48], "expiration": "2028-01-01T00:00:00+00:00"}))
    assert only.records[0].expires_at is not None
    assert only.records[0].expires_at.year == 2028


def test_rvps_rejects_conflicting_expiry_and_expiration(registry: ReferenceValues) -> None:
    with pytest.raises(FormatError, match="different times"):
        registry.ingest_rvps(_rvps({"mr_td": ["01" * 48], "expiry": "2027-01-01T00:00:00Z",
                                    "expiration": "2028-01-01T00:00:00Z"}))
    with pytest.raises(FormatError, match="expiration is not"):
        registry.ingest_rvps(_rvps({"mr_td": ["01" * 48], "expiry": "2027-01-01T00:00:00Z",
                                    "expiration": ""}))
    assert registry.list() == []


@pytest.mark.parametrize("message", [
    _rvps({"x": ["1"]}, version="0.2.0"),
    _rvps({"x": ["1"]}, type="corim"),
    {"version": "0.1.0", "type": "sample", "payload": "***"},
    {"version": "0.1.0", "type": "sample", "payload": base64.b64encode(b"[1]").decode()},
    _rvps({"measurement": ["00"]}),
])
def test_rejects_bad_rvps_messages(registry: ReferenceValues, message: dict[str, object]) -> None:
    with pytest.raises(FormatError):
        registry.ingest_rvps(message)
    assert registry.list() == []


def test_entries_are_stored_in_the_reference_value_namespace(clock: Clock) -> None:
    store = MemoryStore()
    ReferenceValues(store, clock=clock).add("mr_td", ["01" * 48])
    (entry,) = store.list_entries(NS_REFERENCE_VALUES, now=clock.at)
    assert entry.key == "mr_td"
    assert json.loads(entry.value)["values"][0]["value"] == "01" * 48
