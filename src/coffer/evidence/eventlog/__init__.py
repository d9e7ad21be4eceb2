"""Measured-boot event logs: the TCG PC Client crypto-agile log and the TDX CC event log (CCEL)."""

from __future__ import annotations

from coffer.evidence.eventlog.ccel import (
    CcelTable,
    ReplayResult,
    check_ccel_against_rtmrs,
    parse_ccel_table,
    replay_ccel,
)
from coffer.evidence.eventlog.tcg import Event, EventLog, event_type_name, parse_event_log, replay

__all__ = [
    "CcelTable",
    "Event",
    "EventLog",
    "ReplayResult",
    "check_ccel_against_rtmrs",
    "event_type_name",
    "parse_ccel_table",
    "parse_event_log",
    "replay",
    "replay_ccel",
]
