"""coffer.guest.measure: the event log replays to the register (sample and swtpm PCR 23), tampered
logs are refused, and a failing register leaves no unmeasured entry."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from coffer.attestation.binding import canonical_json, pcr8_for_initdata
from coffer.errors import FormatError, UsageError
from coffer.guest.measure import (
    MeasurementError,
    Measurer,
    Register,
    SampleRegister,
    TpmRegister,
    content_digest,
    read_pcr8,
    replay,
)
from coffer.sandbox.swtpm import Swtpm
from tests.guest.conftest import requires_swtpm

PULL = {"image": "registry.example/app@sha256:" + "a" * 64, "digest": "sha256:" + "a" * 64}
CREATE = {"container_id": "c1", "name": "app", "config_sha256": "b" * 64}


def record_all(measurer: Measurer) -> None:
    measurer.record("InitData", {"algorithm": "sha256", "digest": "c" * 64})
    measurer.record("PullImage", PULL)
    measurer("CreateContainer", dict(CREATE))


def test_sample_register_value_is_the_replay_of_the_log() -> None:
    measurer = Measurer(SampleRegister())
    record_all(measurer)
    log = measurer.event_log
    assert [e["operation"] for e in log] == ["InitData", "PullImage", "CreateContainer"]
    assert all(e["domain"] == "coffer" for e in log)
    assert log[1]["digest"] == hashlib.sha256(canonical_json(PULL)).hexdigest()
    value = b"\0" * 32
    for entry in log:
        value = hashlib.sha256(value + bytes.fromhex(entry["digest"])).digest()
    assert replay(log) == value == measurer.register.read()
    assert measurer.register_info() == {"kind": "sample", "index": 0, "value": value.hex()}


def test_event_log_is_a_copy() -> None:
    measurer = Measurer(SampleRegister())
    record_all(measurer)
    measurer.event_log[1]["content"]["image"] = "evil"
    assert measurer.event_log[1]["content"] == PULL


def test_tampered_log_entry_is_refused_by_replay() -> None:
    measurer = Measurer(SampleRegister())
    record_all(measurer)
    log = measurer.event_log
    log[2]["content"]["name"] = "other"
    with pytest.raises(FormatError, match="entry 2"):
        replay(log)


@pytest.mark.parametrize("entry", [{}, {"content": {}, "digest": "zz"}, {"content": [], "digest": "0" * 64}])
def test_malformed_log_entry_is_refused(entry: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        replay([entry])


def test_unknown_operation_is_refused() -> None:
    with pytest.raises(UsageError):
        Measurer(SampleRegister()).record("RunAnything", {})


class BrokenRegister(Register):
    kind = "pcr"
    index = 23

    def extend(self, digest: bytes) -> None:
        raise MeasurementError("the TPM is gone")

    def read(self) -> bytes:
        return b"\0" * 32


def test_failed_extend_leaves_no_log_entry() -> None:
    measurer = Measurer(BrokenRegister())
    with pytest.raises(MeasurementError):
        measurer.record("PullImage", PULL)
    assert measurer.event_log == []


def test_content_that_is_not_json_is_refused() -> None:
    with pytest.raises((UsageError, FormatError)):
        Measurer(SampleRegister()).record("PullImage", {"image": float("nan")})


@requires_swtpm
def test_swtpm_pcr23_holds_the_replay_of_the_log(software_tpm: Swtpm) -> None:
    register = TpmRegister(software_tpm.tcti)
    register.reset()
    assert register.read() == b"\0" * 32
    measurer = Measurer(register)
    record_all(measurer)
    assert register.read() == replay(measurer.event_log)
    assert measurer.register_info()["kind"] == "pcr"
    assert measurer.register_info()["index"] == 23
    register.reset()
    assert register.read() == b"\0" * 32


@requires_swtpm
def test_read_pcr8_sees_the_launch_extend(software_tpm: Swtpm) -> None:
    before = read_pcr8(software_tpm.tcti)
    digest = content_digest({"x": 1})
    TpmRegister(software_tpm.tcti, pcr=8).extend(digest)
    after = read_pcr8(software_tpm.tcti)
    assert after == hashlib.sha256(before + digest).digest()
    if before == b"\0" * 32:
        assert after == pcr8_for_initdata(digest)


def test_tpm_register_without_a_tpm_fails_with_a_typed_error() -> None:
    register = TpmRegister("swtpm:path=/nonexistent/coffer-no-tpm")
    with pytest.raises(MeasurementError):
        register.extend(b"\0" * 32)
    with pytest.raises(MeasurementError):
        register.read()


def test_pcr_index_is_checked() -> None:
    with pytest.raises(UsageError):
        TpmRegister(None, pcr=24)
