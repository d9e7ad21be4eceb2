"""TCG crypto-agile event log parser and replay: Trustee golden outputs, synthetic logs, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as strat

from coffer.errors import FormatError
from coffer.evidence.eventlog.tcg import (
    ALG_SHA256,
    ALG_SHA384,
    event_type_name,
    parse_event_log,
    replay,
)
from tests.conftest import vector_bytes
from tests.evidence.tpm import builders as b

GOLDEN_DIR = "trustee/deps/eventlog/test_data/"
GOLDEN = ["CCEL_data", "CCEL_data_ovmf", "CCEL_data_grub", "CCEL_data_grub_gke", "CCEL_data_csv",
          "CCEL_AAEL_alibabacloud"]
_ALG_NAMES = {"SHA-384": "sha384", "SHA-256": "sha256", "SHA-1": "sha1", "SM3": "sm3_256"}


@pytest.mark.parametrize("name", GOLDEN)
def test_matches_trustee_golden_output(name: str) -> None:
    """Every event (register index, type name, digests, event data) equals the golden parse; the
    golden lists the events after the Spec ID header, EV_NO_ACTION ones included."""
    log = parse_event_log(vector_bytes(GOLDEN_DIR + name))
    golden = json.loads(vector_bytes(GOLDEN_DIR + name + "_out.json"))["uefi_event_logs"]
    assert len(log.events) == len(golden)
    for event, want in zip(log.events, golden, strict=True):
        assert event.pcr_index == want["index"]
        assert event.type_name == want["type_name"]
        assert [(d["alg"], d["digest"]) for d in event.to_dict()["digests"]] == [
            (_ALG_NAMES[d["alg"]], d["digest"]) for d in want["digests"]]
        assert event.data == base64.b64decode(want["event"])


def test_unpaired_gcp_log_parses() -> None:
    log = parse_event_log(vector_bytes(GOLDEN_DIR + "CCEL_data_gcp"))
    assert log.spec_id is not None
    assert log.algorithms == (ALG_SHA384,)
    assert len(log.events) == 21
    assert log.trailing_bytes > 0


def test_csv_log_uses_sm3() -> None:
    log = parse_event_log(vector_bytes(GOLDEN_DIR + "CCEL_data_csv"))
    assert log.to_dict()["algorithms"] == ["sm3_256"]
    with pytest.raises(FormatError, match="cannot replay"):
        replay(log.events, "sm3_256")


def test_event_type_names() -> None:
    assert event_type_name(3) == "EV_NO_ACTION"
    assert event_type_name(0xD) == "EV_IPL"
    assert event_type_name(0x80000001) == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert event_type_name(0x800000E0) == "EV_EFI_VARIABLE_AUTHORITY"
    assert event_type_name(0x12345) == "EV_UNKNOWN_0x00012345"


EVENTS = [(0, 0x80000008, b"fw"), (1, 0x80000001, b"var"), (0, 4, b"\0\0\0\0"), (5, 3, b"ignored"),
          (1, 4, b"\0\0\0\0")]


@pytest.mark.parametrize("pad", [b"", b"\xff", b"\x00"])
def test_synthetic_replay_two_banks(pad: bytes) -> None:
    log = parse_event_log(b.event_log(EVENTS, algs=(ALG_SHA256, ALG_SHA384), padding_byte=pad))
    assert len(log.events) == 5
    assert log.trailing_bytes == len(pad) * 64
    assert replay(log.events, "sha256") == b.replay_expected(EVENTS, "sha256")
    assert replay(log.events, ALG_SHA384) == b.replay_expected(EVENTS, "sha384")
    assert 5 not in replay(log.events, ALG_SHA256)  # EV_NO_ACTION is not extended


def test_startup_locality_sets_pcr0_start() -> None:
    locality = (0, 3, b"StartupLocality\0\x03")
    log = parse_event_log(b.event_log([locality, (0, 8, b"crtm")]))
    start = {0: bytes(31) + b"\x03"}
    assert replay(log.events, "sha256") == b.replay_expected([(0, 8, b"crtm")], start=start)


def test_legacy_sha1_log() -> None:
    raw = b"".join(struct.pack("<II", pcr, t) + hashlib.sha1(d).digest() + struct.pack("<I", len(d)) + d
                   for pcr, t, d in [(0, 8, b"a"), (4, 0xD, b"b")])
    log = parse_event_log(raw)
    assert log.spec_id is None
    assert len(log.events) == 2
    assert replay(log.events, "sha1") == b.replay_expected([(0, 8, b"a"), (4, 0xD, b"b")], "sha1")


def test_replay_of_missing_bank_is_format_error() -> None:
    log = parse_event_log(b.event_log(EVENTS))
    with pytest.raises(FormatError, match="no sha384 digest"):
        replay(log.events, ALG_SHA384)


def test_rejects_truncated_event() -> None:
    with pytest.raises(FormatError, match="truncated"):
        parse_event_log(b.event_log(EVENTS)[:-3])


def test_rejects_undeclared_digest_algorithm() -> None:
    raw = b.spec_id_header([ALG_SHA256]) + b.event2(0, 8, b"x", [ALG_SHA384])
    with pytest.raises(FormatError, match="not declared"):
        parse_event_log(raw)


def test_rejects_huge_digest_count() -> None:
    raw = b.spec_id_header([ALG_SHA256]) + struct.pack("<III", 0, 8, 1000)
    with pytest.raises(FormatError, match="digest count"):
        parse_event_log(raw)


def test_rejects_lying_event_size() -> None:
    raw = bytearray(b.event_log(EVENTS[:1]))
    raw[-6:-2] = struct.pack("<I", 0x7FFFFFFF)  # eventSize of the last event (data is 2 bytes)
    with pytest.raises(FormatError):
        parse_event_log(bytes(raw))


def test_rejects_empty_log() -> None:
    with pytest.raises(FormatError, match="empty"):
        parse_event_log(b"\xff" * 100)


# ---------------------------------------------------------------------------------------------
# Property tests


def _seed() -> bytes:
    return b.event_log(EVENTS, algs=(ALG_SHA256, ALG_SHA384))


@settings(max_examples=150, deadline=None)
@given(strat.binary(max_size=400))
def test_fuzz_random_log(data: bytes) -> None:
    try:
        log = parse_event_log(data)
        replay(log.events, "sha1")
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(strat.data())
def test_fuzz_mutated_log(data: strat.DataObject) -> None:
    raw = bytearray(_seed())
    for _ in range(data.draw(strat.integers(1, 4))):
        raw[data.draw(strat.integers(0, len(raw) - 1))] = data.draw(strat.integers(0, 255))
    raw = raw[: data.draw(strat.integers(0, len(raw)))]
    try:
        log = parse_event_log(bytes(raw))
        replay(log.events, "sha256")
    except FormatError:
        pass
