"""TDX CC event log: the ACPI CCEL table, replay into RTMRs, comparison with TD quotes."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as strat

from coffer.errors import FormatError, VerificationError
from coffer.evidence.eventlog import (
    check_ccel_against_rtmrs,
    parse_ccel_table,
    parse_event_log,
    replay_ccel,
)
from tests.conftest import vector_bytes

CCEL_DIR = "go-tdx-guest/testing/testdata/ccel/"
TD_BODY = 48  # v4 quote: the TD 1.0 report body follows the 48-byte header
RTMR_OFFSETS = (328, 376, 424, 472)


def _rtmrs_of(quote: bytes) -> list[bytes]:
    try:
        from coffer.evidence.dcap import parse_quote

        return list(parse_quote(quote).rtmrs)
    except ImportError:  # pragma: no cover - the DCAP parser is built alongside
        return [quote[TD_BODY + o : TD_BODY + o + 48] for o in RTMR_OFFSETS]


def test_parses_go_tdx_guest_ccel_table() -> None:
    table = parse_ccel_table(vector_bytes(CCEL_DIR + "ccel_table.dat"))
    assert table.cc_type == 2
    assert table.log_area_minimum_length == len(vector_bytes(CCEL_DIR + "ccel_data.dat"))
    assert table.to_dict()["oem_id"] == "INTEL "


def test_cos113_ccel_replays_to_quote_rtmrs() -> None:
    quote = vector_bytes(CCEL_DIR + "cos-113-tdx-quote.dat")
    result = check_ccel_against_rtmrs(vector_bytes(CCEL_DIR + "ccel_data.dat"), _rtmrs_of(quote))
    # PCR-index field = CC MR index: 1..4 = RTMR0..3 (verified here: the log extends 1, 2, 3 and the
    # quote has RTMR0..2 set and RTMR3 zero).
    assert result.extends == {1: 16, 2: 7, 3: 20}
    assert result.rtmrs[3] == bytes(48)
    assert result.to_dict()["extends"] == {"RTMR0": 16, "RTMR1": 7, "RTMR2": 20}


def test_rtmr_offsets_agree_with_dcap_parser() -> None:
    quote = vector_bytes(CCEL_DIR + "cos-113-tdx-quote.dat")
    assert _rtmrs_of(quote) == [quote[TD_BODY + o : TD_BODY + o + 48] for o in RTMR_OFFSETS]


def test_flipped_digest_byte_is_a_replay_mismatch() -> None:
    quote = vector_bytes(CCEL_DIR + "cos-113-tdx-quote.dat")
    raw = bytearray(vector_bytes(CCEL_DIR + "ccel_data.dat"))
    first = parse_event_log(bytes(raw)).events[0]
    raw[first.offset + 12 + 2] ^= 0x01  # first byte of its SHA-384 digest
    with pytest.raises(VerificationError) as info:
        check_ccel_against_rtmrs(bytes(raw), _rtmrs_of(quote))
    assert "RTMR" in info.value.reason


def test_wrong_rtmr_in_quote_is_a_mismatch() -> None:
    rtmrs = _rtmrs_of(vector_bytes(CCEL_DIR + "cos-113-tdx-quote.dat"))
    rtmrs[2] = bytes(48)
    with pytest.raises(VerificationError, match="RTMR2"):
        check_ccel_against_rtmrs(vector_bytes(CCEL_DIR + "ccel_data.dat"), rtmrs)


def test_trustee_ccel_data_against_tdx_quote_4() -> None:
    """Trustee only *parses* CCEL_data with tdx_quote_4.dat (parse_tdx_claims_expected.json). The log
    is a td-shim log of 5 events (RTMR0: 2, RTMR1: 3) that does not reproduce the quote's RTMRs, so
    replaying it must be reported as a mismatch, never accepted."""
    expected = json.loads(vector_bytes("trustee/deps/verifier/test_data/parse_tdx_claims_expected.json"))
    log = vector_bytes("trustee/deps/verifier/test_data/CCEL_data")
    quote = vector_bytes("trustee/deps/verifier/test_data/tdx_quote_4.dat")
    result = replay_ccel(log)
    golden = expected["uefi_event_logs"]
    assert [(e.pcr_index, e.type_name) for e in result.log.events] == [
        (g["index"], g["type_name"]) for g in golden]
    body = expected["quote"]["body"]
    rtmrs = _rtmrs_of(quote)
    assert [r.hex() for r in rtmrs] == [body[f"rtmr_{i}"] for i in range(4)]
    assert len(result.mismatches(rtmrs)) == 2
    with pytest.raises(VerificationError):
        check_ccel_against_rtmrs(log, rtmrs)


def test_ovmf_ccel_replays() -> None:
    result = replay_ccel(vector_bytes("trustee/deps/verifier/test_data/CCEL_data_ovmf"))
    assert result.extends == {1: 14, 2: 4, 3: 2}


def test_rejects_wrong_rtmr_count() -> None:
    with pytest.raises(FormatError):
        replay_ccel(vector_bytes(CCEL_DIR + "ccel_data.dat")).mismatches([bytes(48)] * 3)


def test_rejects_non_sha384_log() -> None:
    from tests.evidence.tpm import builders as b

    with pytest.raises(FormatError, match="SHA-384"):
        replay_ccel(b.event_log([(1, 8, b"x")]))


def test_rejects_register_beyond_rtmr3() -> None:
    from tests.evidence.tpm import builders as b

    with pytest.raises(FormatError, match="measurement register 9"):
        replay_ccel(b.event_log([(9, 8, b"x")], algs=(0x000C,)))


def test_table_checksum_is_checked() -> None:
    raw = bytearray(vector_bytes(CCEL_DIR + "ccel_table.dat"))
    raw[40] ^= 0x01
    with pytest.raises(FormatError, match="checksum"):
        parse_ccel_table(bytes(raw))


def test_table_signature_is_checked() -> None:
    raw = b"XCEL" + vector_bytes(CCEL_DIR + "ccel_table.dat")[4:]
    with pytest.raises(FormatError, match="signature"):
        parse_ccel_table(raw)


def test_table_length_is_checked() -> None:
    raw = bytearray(vector_bytes(CCEL_DIR + "ccel_table.dat"))
    raw[4:8] = struct.pack("<I", 200)
    with pytest.raises(FormatError, match="length"):
        parse_ccel_table(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(strat.data())
def test_fuzz_ccel_table(data: strat.DataObject) -> None:
    seed = bytearray(vector_bytes(CCEL_DIR + "ccel_table.dat"))
    if data.draw(strat.booleans()):
        candidate = data.draw(strat.binary(max_size=80))
    else:
        for _ in range(data.draw(strat.integers(1, 3))):
            seed[data.draw(strat.integers(0, len(seed) - 1))] = data.draw(strat.integers(0, 255))
        candidate = bytes(seed[: data.draw(strat.integers(0, len(seed)))])
    with contextlib.suppress(FormatError):
        parse_ccel_table(candidate)
