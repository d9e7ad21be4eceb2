"""TDX confidential-computing event log (CCEL): the ACPI table that locates it, and replaying the log
into the runtime measurement registers to compare with a TD quote.

The log area holds a TCG crypto-agile event log (:mod:`coffer.evidence.eventlog.tcg`) with SHA-384
digests. In it the "PCR index" field of each event is the CC measurement-register index of the UEFI CC
measurement protocol: 0 = MRTD, 1 = RTMR0, 2 = RTMR1, 3 = RTMR2, 4 = RTMR3. The RTMRs start at zero and
each event extends one with SHA-384, exactly like a PCR; MRTD is built by the TDX module from the
initial memory pages, so it cannot be replayed from the log and events naming it are only counted.

ACPI CCEL table (all little-endian): the 36-byte ACPI header (signature "CCEL", length, revision,
checksum, OEM ids, creator ids), then CC type u8 (2 = TDX), CC subtype u8, reserved u16, log area
minimum length (LAML) u64 and log area start address (LASA) u64; 56 bytes in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coffer._internal.binreader import Reader
from coffer.errors import FormatError, VerificationError
from coffer.evidence.eventlog.tcg import ALG_SHA384, EventLog, parse_event_log, replay

CCEL_TABLE_SIZE = 56
CC_TYPE_TDX = 2
RTMR_COUNT = 4
MR_NAMES = ("MRTD", "RTMR0", "RTMR1", "RTMR2", "RTMR3")


@dataclass(frozen=True, kw_only=True)
class CcelTable:
    """The ACPI CCEL table."""

    length: int
    revision: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int
    cc_type: int
    cc_subtype: int
    log_area_minimum_length: int
    log_area_start_address: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "revision": self.revision,
            "oem_id": self.oem_id.decode("ascii", "replace"),
            "oem_table_id": self.oem_table_id.decode("ascii", "replace"),
            "cc_type": self.cc_type,
            "cc_subtype": self.cc_subtype,
            "log_area_minimum_length": self.log_area_minimum_length,
            "log_area_start_address": self.log_area_start_address,
        }


def parse_ccel_table(data: bytes) -> CcelTable:
    """Parse the ACPI CCEL table; the signature, length and checksum must be right. Bytes after the
    table's own length are ignored."""
    reader = Reader(data, "ACPI CCEL table")
    if reader.read(4, "signature") != b"CCEL":
        raise reader.fail("signature is not 'CCEL'", offset=0)
    length = reader.u32("length")
    if length < CCEL_TABLE_SIZE or length > len(data):
        raise reader.fail(f"table length {length} outside {CCEL_TABLE_SIZE}..{len(data)}", offset=4)
    if sum(data[:length]) % 256:
        raise reader.fail("checksum does not sum to zero", offset=9)
    revision = reader.u8("revision")
    reader.u8("checksum")
    oem_id = reader.read(6, "OEM ID")
    oem_table_id = reader.read(8, "OEM table ID")
    oem_revision = reader.u32("OEM revision")
    creator_id = reader.read(4, "creator ID")
    creator_revision = reader.u32("creator revision")
    cc_type = reader.u8("CC type")
    cc_subtype = reader.u8("CC subtype")
    reader.u16("reserved")
    laml = reader.u64("log area minimum length")
    lasa = reader.u64("log area start address")
    return CcelTable(length=length, revision=revision, oem_id=oem_id, oem_table_id=oem_table_id,
                     oem_revision=oem_revision, creator_id=creator_id, creator_revision=creator_revision,
                     cc_type=cc_type, cc_subtype=cc_subtype, log_area_minimum_length=laml,
                     log_area_start_address=lasa)


@dataclass(frozen=True, kw_only=True)
class ReplayResult:
    """The replayed registers: ``rtmrs`` are RTMR0..3 (zero when no event extends one), ``events`` the
    number of events, ``extends`` how many events extended each register (index as in the log)."""

    log: EventLog
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    extends: dict[int, int]

    def mismatches(self, expected: Sequence[bytes]) -> list[str]:
        """Which RTMRs differ from ``expected`` (RTMR0..3), as readable descriptions."""
        if len(expected) != RTMR_COUNT:
            raise FormatError("RTMR values", f"expected {RTMR_COUNT} RTMRs, got {len(expected)}")
        return [
            f"RTMR{i}: log replays to {got.hex()}, the quote says {bytes(want).hex()}"
            for i, (got, want) in enumerate(zip(self.rtmrs, expected, strict=True))
            if got != bytes(want)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": len(self.log.events),
            "rtmrs": [r.hex() for r in self.rtmrs],
            "extends": {MR_NAMES[i] if i < len(MR_NAMES) else str(i): n
                        for i, n in sorted(self.extends.items())},
        }


def replay_ccel(log: bytes | EventLog) -> ReplayResult:
    """Parse (if needed) and replay a CC event log into RTMR0..3 with SHA-384."""
    parsed = parse_event_log(log) if isinstance(log, bytes | bytearray) else log
    if parsed.spec_id is None or ALG_SHA384 not in parsed.algorithms:
        raise FormatError("CC event log", "not a crypto-agile log with SHA-384 digests")
    extends: dict[int, int] = {}
    for event in parsed.events:
        if event.event_type != 0x3:  # EV_NO_ACTION
            if event.pcr_index > RTMR_COUNT:
                raise FormatError("CC event log", f"event names measurement register {event.pcr_index}; "
                                  f"only 0 (MRTD) to {RTMR_COUNT} (RTMR3) exist", offset=event.offset)
            extends[event.pcr_index] = extends.get(event.pcr_index, 0) + 1
    values = replay((e for e in parsed.events if e.pcr_index != 0), ALG_SHA384)
    zero = bytes(48)
    rtmrs = (values.get(1, zero), values.get(2, zero), values.get(3, zero), values.get(4, zero))
    return ReplayResult(log=parsed, rtmrs=rtmrs, extends=extends)


def check_ccel_against_rtmrs(
    log: bytes,
    rtmrs: Sequence[bytes],
    *,
    tee: str = "tdx",
    step: int = 1,
    step_name: str = "replay CC event log",
) -> ReplayResult:
    """Replay ``log`` and require RTMR0..3 to equal ``rtmrs`` (from a verified TD quote).

    A malformed log raises FormatError; a mismatch raises VerificationError naming ``step`` (callers
    running their own numbered steps should use :func:`replay_ccel` and ``ReplayResult.mismatches``
    inside their step instead).
    """
    result = replay_ccel(log)
    problems = result.mismatches(rtmrs)
    if problems:
        raise VerificationError(tee, step, step_name, "; ".join(problems))
    return result
