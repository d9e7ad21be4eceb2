"""The TCG PC Client event log (crypto-agile format), and replaying it into PCR values.

Layout (TCG PC Client Platform Firmware Profile, section 10; all integers little-endian):

* The first event is in the SHA-1 format ``TCG_PCR_EVENT``: pcrIndex u32, eventType u32, digest[20],
  eventSize u32, event. In a crypto-agile log its type is EV_NO_ACTION and its data is the
  ``TCG_EfiSpecIDEvent`` ("Spec ID Event03"), which lists the hash algorithms and digest sizes used by
  every later event.
* Every later event is a ``TCG_PCR_EVENT2``: pcrIndex u32, eventType u32, digests (count u32, then
  per digest hashAlg u16 + digest of the size the header gave), eventSize u32, event.

A log without the Spec ID header is parsed as a legacy SHA-1 log (every event in the first format).
Firmware hands over a fixed-size area, so a log ends where the bytes stop or where an event header
is all 0x00 or all 0xFF (unused space); anything after that is ignored and counted in
``trailing_bytes``.

The same format carries confidential-computing event logs (TDX CCEL): there the pcrIndex field is a
measurement-register index (see :mod:`coffer.evidence.eventlog.ccel`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coffer._internal.binreader import Reader
from coffer.errors import FormatError

_WHAT = "TCG event log"
MAX_LOG_BYTES = 64 * 1024 * 1024
MAX_EVENTS = 200_000
MAX_EVENT_DATA = 16 * 1024 * 1024
MAX_ALGORITHMS = 16
MAX_DIGEST_SIZE = 64
MAX_PCR_INDEX = 1023
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"

EV_NO_ACTION = 0x00000003

EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x00000013: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
    0x800000E3: "EV_EFI_SPDM_DEVICE_POLICY",
    0x800000E4: "EV_EFI_SPDM_DEVICE_AUTHORITY",
}

# TPM_ALG_ID -> (hashlib name or None, name used in output)
ALGORITHMS: dict[int, tuple[str | None, str]] = {
    0x0004: ("sha1", "sha1"),
    0x000B: ("sha256", "sha256"),
    0x000C: ("sha384", "sha384"),
    0x000D: ("sha512", "sha512"),
    0x0012: (None, "sm3_256"),
}
_ALG_BY_NAME = {name: alg for alg, (_, name) in ALGORITHMS.items()}
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C


def event_type_name(event_type: int) -> str:
    return EVENT_TYPES.get(event_type, f"EV_UNKNOWN_{event_type:#010x}")


def algorithm_name(alg: int) -> str:
    return ALGORITHMS.get(alg, (None, f"alg_{alg:#06x}"))[1]


@dataclass(frozen=True, kw_only=True)
class Event:
    """One event: the register it extends, its type, its digests by algorithm id, its data, and
    where it starts in the log."""

    pcr_index: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes
    offset: int

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def digest(self, alg: int) -> bytes | None:
        for a, d in self.digests:
            if a == alg:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.pcr_index,
            "type": self.event_type,
            "type_name": self.type_name,
            "digests": [{"alg": algorithm_name(a), "digest": d.hex()} for a, d in self.digests],
            "data": self.data.hex(),
            "offset": self.offset,
        }


@dataclass(frozen=True, kw_only=True)
class SpecIdEvent:
    """The TCG_EfiSpecIDEvent header of a crypto-agile log."""

    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    digest_sizes: tuple[tuple[int, int], ...]  # (algorithm id, digest size)
    vendor_info: bytes


@dataclass(frozen=True, kw_only=True)
class EventLog:
    """A parsed log. ``header`` is the first (SHA-1 format) event, ``spec_id`` its decoded data when
    the log is crypto-agile (None for a legacy SHA-1 log); ``events`` are all later events."""

    header: Event
    spec_id: SpecIdEvent | None
    events: tuple[Event, ...]
    trailing_bytes: int

    @property
    def algorithms(self) -> tuple[int, ...]:
        if self.spec_id is None:
            return (ALG_SHA1,)
        return tuple(alg for alg, _ in self.spec_id.digest_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "crypto-agile" if self.spec_id else "sha1",
            "algorithms": [algorithm_name(a) for a in self.algorithms],
            "events": [e.to_dict() for e in self.events],
            "trailing_bytes": self.trailing_bytes,
        }


def _parse_spec_id(data: bytes) -> SpecIdEvent | None:
    if not data.startswith(SPEC_ID_SIGNATURE):
        return None
    reader = Reader(data, "TCG_EfiSpecIDEvent", offset=len(SPEC_ID_SIGNATURE))
    platform_class = reader.u32("platformClass")
    minor = reader.u8("specVersionMinor")
    major = reader.u8("specVersionMajor")
    errata = reader.u8("specErrata")
    uintn_size = reader.u8("uintnSize")
    count = reader.u32("numberOfAlgorithms")
    if count == 0 or count > MAX_ALGORITHMS:
        raise reader.fail(f"numberOfAlgorithms {count} outside 1..{MAX_ALGORITHMS}")
    sizes: list[tuple[int, int]] = []
    for _ in range(count):
        alg = reader.u16("algorithmId")
        size = reader.u16("digestSize")
        if size == 0 or size > MAX_DIGEST_SIZE:
            raise reader.fail(f"digest size {size} for algorithm {alg:#06x} outside 1..{MAX_DIGEST_SIZE}")
        if any(a == alg for a, _ in sizes):
            raise reader.fail(f"algorithm {alg:#06x} listed twice")
        sizes.append((alg, size))
    vendor_size = reader.u8("vendorInfoSize")
    vendor = reader.read(vendor_size, "vendorInfo")
    return SpecIdEvent(platform_class=platform_class, spec_version=(major, minor, errata),
                       uintn_size=uintn_size, digest_sizes=tuple(sizes), vendor_info=vendor)


def _at_padding(reader: Reader, data: bytes) -> bool:
    """True when the log is over: no bytes left, or the next event header (8 bytes) is unused space."""
    if reader.remaining == 0:
        return True
    head = data[reader.offset : reader.offset + 8]
    return head in (b"\xff" * len(head), b"\x00" * len(head))


def _event_data(reader: Reader) -> bytes:
    size = reader.u32("eventSize")
    if size > MAX_EVENT_DATA:
        raise reader.fail(f"eventSize {size} exceeds {MAX_EVENT_DATA}")
    return reader.read(size, "event data")


def _sha1_event(reader: Reader) -> Event:
    start = reader.offset
    pcr = reader.u32("pcrIndex")
    event_type = reader.u32("eventType")
    digest = reader.read(20, "SHA-1 digest")
    data = _event_data(reader)
    if pcr > MAX_PCR_INDEX:
        raise reader.fail(f"pcrIndex {pcr} exceeds {MAX_PCR_INDEX}", offset=start)
    return Event(pcr_index=pcr, event_type=event_type, digests=((ALG_SHA1, digest),), data=data,
                 offset=start)


def _agile_event(reader: Reader, sizes: dict[int, int]) -> Event:
    start = reader.offset
    pcr = reader.u32("pcrIndex")
    event_type = reader.u32("eventType")
    if pcr > MAX_PCR_INDEX:
        raise reader.fail(f"pcrIndex {pcr} exceeds {MAX_PCR_INDEX}", offset=start)
    count = reader.u32("digest count")
    if count == 0 or count > len(sizes):
        raise reader.fail(f"digest count {count} outside 1..{len(sizes)}")
    digests: list[tuple[int, bytes]] = []
    for _ in range(count):
        alg = reader.u16("hashAlg")
        size = sizes.get(alg)
        if size is None:
            raise reader.fail(f"digest algorithm {alg:#06x} is not declared in the log header")
        if any(a == alg for a, _ in digests):
            raise reader.fail(f"digest algorithm {alg:#06x} appears twice in one event")
        digests.append((alg, reader.read(size, "digest")))
    data = _event_data(reader)
    return Event(pcr_index=pcr, event_type=event_type, digests=tuple(digests), data=data, offset=start)


def parse_event_log(data: bytes) -> EventLog:
    """Parse a TCG event log (crypto-agile, or legacy SHA-1). Raises FormatError on a truncated or
    inconsistent event; unused space after the last event is ignored."""
    if len(data) > MAX_LOG_BYTES:
        raise FormatError(_WHAT, f"{len(data)} bytes exceeds the {MAX_LOG_BYTES}-byte limit")
    reader = Reader(data, _WHAT)
    if _at_padding(reader, data):
        raise FormatError(_WHAT, "the log is empty")
    header = _sha1_event(reader)
    spec_id = _parse_spec_id(header.data) if header.event_type == EV_NO_ACTION else None
    events: list[Event] = []
    if spec_id is None:
        events.append(header)
    sizes = dict(spec_id.digest_sizes) if spec_id else {}
    while not _at_padding(reader, data):
        if len(events) >= MAX_EVENTS:
            raise reader.fail(f"more than {MAX_EVENTS} events")
        events.append(_agile_event(reader, sizes) if spec_id else _sha1_event(reader))
    return EventLog(header=header, spec_id=spec_id, events=tuple(events), trailing_bytes=reader.remaining)


def _resolve_bank(bank: int | str) -> tuple[int, str]:
    alg = _ALG_BY_NAME.get(bank) if isinstance(bank, str) else bank
    if alg is None or alg not in ALGORITHMS or ALGORITHMS[alg][0] is None:
        raise FormatError(_WHAT, f"cannot replay bank {bank!r}")
    name = ALGORITHMS[alg][0]
    assert name is not None
    return alg, name


def startup_locality(event: Event) -> int | None:
    """The locality of a StartupLocality EV_NO_ACTION event in PCR 0, else None."""
    if event.event_type != EV_NO_ACTION or event.pcr_index != 0:
        return None
    if not event.data.startswith(STARTUP_LOCALITY_SIGNATURE) or len(event.data) < 17:
        return None
    return event.data[16]


def replay(events: Iterable[Event], bank: int | str) -> dict[int, bytes]:
    """Replay events into register values: each register starts at zero and every event except
    EV_NO_ACTION extends it with its ``bank`` digest (value = H(value ‖ digest)). A StartupLocality
    event sets PCR 0's starting value to the locality in its last byte. Only registers that some
    event touches appear in the result. An event without a digest for the bank is a FormatError."""
    alg, name = _resolve_bank(bank)
    size = hashlib.new(name).digest_size
    values: dict[int, bytes] = {}
    for event in events:
        locality = startup_locality(event)
        if locality is not None:
            if 0 in values:
                raise FormatError(_WHAT, "StartupLocality event after PCR 0 was extended",
                                  offset=event.offset)
            values[0] = bytes(size - 1) + bytes([locality])
            continue
        if event.event_type == EV_NO_ACTION:
            continue
        digest = event.digest(alg)
        if digest is None:
            raise FormatError(_WHAT, f"event at {event.offset:#x} has no {name} digest",
                              offset=event.offset)
        if len(digest) != size:
            raise FormatError(_WHAT, f"{name} digest of {len(digest)} bytes", offset=event.offset)
        current = values.get(event.pcr_index, bytes(size))
        values[event.pcr_index] = hashlib.new(name, current + digest).digest()
    return values
