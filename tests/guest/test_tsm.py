"""``snp`` and ``tdx`` attesters through a simulated configfs-tsm tree and fake guest devices that
serve recorded reports from ../shared/vectors: the evidence JSON they produce verifies with the
evidence library at the vector's reference time. Report-data placement is tested with fakes that
echo the inblob (a recorded report's report data is, of course, the recorded one)."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import PolicyDeniedError, UnsupportedError, VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.evidence.snp.wire import rebuild_report
from coffer.guest.attesters import attester_for
from coffer.guest.attesters.base import AttesterError
from coffer.guest.attesters.tsm import (
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    TDX_CMD_GET_REPORT0,
    QgsVsock,
    SevGuestDevice,
    SnpAttester,
    TdxAttester,
    TdxGuestDevice,
    TsmReportClient,
    build_cert_table,
    parse_cert_table,
    snp_report_json,
)
from tests.conftest import vector_bytes, write_t5_collateral
from tests.guest.fakes import SimulatedTsm

pytestmark = pytest.mark.vectors

DIGEST = hashlib.sha384(b"runtime data").digest()
S1_REPORT = "virtee-sev/tests/certs_data/report_milan.hex"
S1_VCEK = "virtee-sev/tests/certs_data/vcek_milan.der"
E2E = "trustee/attestation-service/tests/e2e/evidence.json"
GTG = "go-tdx-guest/testing/"
SPR_E4 = GTG + "testdata/tdx_prod_quote_SPR_E4.dat"
QUOTE_6 = "trustee/deps/verifier/test_data/tdx_quote_6.dat"
CCEL = "trustee/deps/verifier/test_data/CCEL_data_ovmf"
T5_AT = datetime(2023, 7, 1, 1, 0, tzinfo=UTC)
AT_2026 = datetime(2026, 1, 1, tzinfo=UTC)


def s1_report() -> bytes:
    return bytes.fromhex(vector_bytes(S1_REPORT).decode().strip())


def e2e_report_and_vcek() -> tuple[dict[str, Any], bytes, bytes]:
    doc = json.loads(vector_bytes(E2E))
    vcek = bytes(doc["cert_chain"][0]["data"])
    return doc, rebuild_report(doc["attestation_report"]), vcek


def with_report_data(report: bytes, report_data: bytes) -> bytes:
    return report[:0x50] + report_data + report[0x90:]


def snp_attester(tmp_path: Path, respond: Any, **kw: Any) -> tuple[SnpAttester, SimulatedTsm]:
    fake = SimulatedTsm(tmp_path / "report", "sev_guest", respond, **kw)
    return SnpAttester(tsm_root=fake.root, ops=fake, device_path=tmp_path / "no-device"), fake


def _snp_bytes(evidence: dict[str, Any]) -> bytes:
    return json.dumps(evidence).encode()


# ------------------------------------------------------------------------------------ SNP: vectors


def test_s1_recorded_report_with_vcek_from_auxblob_verifies(tmp_path: Path) -> None:
    report = s1_report()
    table = build_cert_table([("VCEK", vector_bytes(S1_VCEK))])
    attester, fake = snp_attester(tmp_path, lambda _: (report, table))
    evidence = attester.evidence(DIGEST)
    assert fake.inblobs == [DIGEST + bytes(16)]
    assert [c["cert_type"] for c in evidence["cert_chain"]] == ["VCEK"]
    claims = verify("snp", _snp_bytes(evidence),
                    options=VerifyOptions(at=AT_2026, expected_report_data=report[0x50:0x90]))
    assert claims.insecure is False
    assert claims.steps[-1] == "8 check report data"
    assert list(fake.root.iterdir()) == []  # the entry is removed


def test_e2e_report_round_trips_to_the_trustee_json_exactly(tmp_path: Path) -> None:
    doc, report, vcek = e2e_report_and_vcek()
    attester, _ = snp_attester(tmp_path, lambda _: (report, build_cert_table([("VCEK", vcek)])))
    evidence = attester.evidence(DIGEST)
    assert evidence["attestation_report"] == doc["attestation_report"]
    assert evidence["cert_chain"] == doc["cert_chain"]
    claims = verify("snp", _snp_bytes(evidence), options=VerifyOptions(at=AT_2026))
    assert claims.insecure is False


def test_recorded_report_refused_for_other_runtime_data(tmp_path: Path) -> None:
    _, report, vcek = e2e_report_and_vcek()
    attester, _ = snp_attester(tmp_path, lambda _: (report, build_cert_table([("VCEK", vcek)])))
    with pytest.raises(VerificationError) as err:
        verify("snp", _snp_bytes(attester.evidence(DIGEST)),
               options=VerifyOptions(at=AT_2026, expected_report_data=DIGEST))
    assert err.value.step == 8


def test_snp_report_data_is_the_zero_padded_digest(tmp_path: Path) -> None:
    report = s1_report()
    attester, _ = snp_attester(tmp_path, lambda inblob: (with_report_data(report, inblob), None))
    evidence = attester.evidence(DIGEST)
    assert bytes(evidence["attestation_report"]["report_data"]) == DIGEST + bytes(16)
    assert evidence["cert_chain"] is None
    # The signature no longer covers the changed bytes: the verifier must notice.
    with pytest.raises(VerificationError):
        verify("snp", _snp_bytes(evidence), options=VerifyOptions(at=AT_2026))


def test_version_5_turin_fields(tmp_path: Path) -> None:
    raw = bytearray(s1_report())
    raw[0:4] = (5).to_bytes(4, "little")
    raw[0x188:0x18B] = bytes([0x1A, 0x02, 0x00])  # Turin
    for offset in (0x38, 0x180, 0x1E0, 0x1F0):  # Turin TCB layout: bytes 4-6 reserved
        raw[offset:offset + 8] = bytes([1, 2, 3, 4, 0, 0, 0, 9])
    raw[0x1F8:0x200] = (7).to_bytes(8, "little")
    doc = snp_report_json(bytes(raw))
    assert doc["reported_tcb"] == {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 9}
    assert doc["launch_mit_vector"] == 7
    assert rebuild_report(doc) == bytes(raw)


def test_privlevel_is_written_when_a_vmpl_is_asked_for(tmp_path: Path) -> None:
    fake = SimulatedTsm(tmp_path / "report", "sev_guest", lambda _: (s1_report(), None))
    SnpAttester(tsm_root=fake.root, ops=fake, vmpl=2).evidence(DIGEST)
    assert fake.privlevels == [b"2"]


# ------------------------------------------------------------------------------- configfs-tsm rules


def test_generation_race_is_retried(tmp_path: Path) -> None:
    attester, fake = snp_attester(tmp_path, lambda _: (s1_report(), None), interfere=1)
    attester.evidence(DIGEST)
    assert len(fake.inblobs) == 2


def test_persistent_generation_race_is_an_error(tmp_path: Path) -> None:
    attester, fake = snp_attester(tmp_path, lambda _: (s1_report(), None), interfere=10)
    with pytest.raises(AttesterError, match="generation"):
        attester.evidence(DIGEST)
    assert list(fake.root.iterdir()) == []


def test_wrong_provider_is_refused(tmp_path: Path) -> None:
    fake = SimulatedTsm(tmp_path / "report", "tdx_guest", lambda _: (b"q", None))
    with pytest.raises(AttesterError, match="provider"):
        SnpAttester(tsm_root=fake.root, ops=fake).evidence(DIGEST)


def test_empty_outblob_is_refused(tmp_path: Path) -> None:
    attester, _ = snp_attester(tmp_path, lambda _: (b"", None))
    with pytest.raises(AttesterError, match="outblob"):
        attester.evidence(DIGEST)


def test_unwritable_root_is_an_attester_error(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()
    client = TsmReportClient(root / "missing")
    assert not client.available()
    with pytest.raises(AttesterError, match="cannot create"):
        client.get_report(bytes(64))


def test_no_interface_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError):
        SnpAttester(tsm_root=tmp_path / "none", device_path=tmp_path / "none").evidence(DIGEST)
    with pytest.raises(UnsupportedError):
        TdxAttester(tsm_root=tmp_path / "none", device_path=tmp_path / "none").evidence(DIGEST)


def test_digest_longer_than_report_data_is_refused(tmp_path: Path) -> None:
    attester, _ = snp_attester(tmp_path, lambda _: (s1_report(), None))
    with pytest.raises(ValueError, match="digest"):
        attester.evidence(bytes(65))


# ---------------------------------------------------------------------------- certificate table


def test_cert_table_round_trip_and_mixed_endian_guids() -> None:
    certs = [("VCEK", b"\x30\x01v"), ("ASK", b"\x30\x01a"), ("ARK", b"\x30\x01r")]
    assert parse_cert_table(build_cert_table(certs)) == certs
    table = bytearray(build_cert_table([("VCEK", b"x")]))
    table[0:16] = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le
    assert parse_cert_table(bytes(table)) == [("VCEK", b"x")]


def test_cert_table_keeps_unknown_entries_out_of_the_chain() -> None:
    table = bytearray(build_cert_table([("VCEK", b"v"), ("CRL", b"c")]))
    table[24:40] = uuid.UUID(int=5).bytes
    names = [name for name, _ in parse_cert_table(bytes(table))]
    assert names == ["VCEK", f"OTHER({uuid.UUID(int=5)})"]


@pytest.mark.parametrize("table", [b"", bytes(23), build_cert_table([("VCEK", b"v")])[:-25] + b"\xff" * 24])
def test_rejects_malformed_cert_table(table: bytes) -> None:
    with pytest.raises(AttesterError):
        parse_cert_table(table)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_cert_table_parser_only_raises_attester_error(data: bytes) -> None:
    with contextlib.suppress(AttesterError):
        parse_cert_table(data)


# ---------------------------------------------------------------------------------- /dev/sev-guest


class FakeSevIoctl:
    """Plays the sev-guest driver: reads the request through the pointers the attester passed and
    writes MSG_REPORT_RSP (and the certificate table) into its buffers."""

    def __init__(self, report: bytes, table: bytes | None) -> None:
        self.report, self.table = report, table
        self.calls: list[int] = []
        self.user_data = b""

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        self.calls.append(request)
        self.user_data = ctypes.string_at(arg.req_data, 64)
        vmpl = int.from_bytes(ctypes.string_at(arg.req_data + 64, 4), "little")
        assert vmpl == 0
        if request == SNP_GET_EXT_REPORT:
            if self.table is None:
                raise OSError(5, "no certificates")
            certs_address = int.from_bytes(ctypes.string_at(arg.req_data + 96, 8), "little")
            certs_len = int.from_bytes(ctypes.string_at(arg.req_data + 104, 4), "little")
            assert certs_len >= len(self.table)
            ctypes.memmove(certs_address, self.table, len(self.table))
        response = (0).to_bytes(4, "little") + len(self.report).to_bytes(4, "little") + bytes(24)
        ctypes.memmove(arg.resp_data, response + self.report, 32 + len(self.report))
        return 0


def _devnull(_: Path) -> int:
    return os.open(os.devnull, os.O_RDWR)


def test_sev_guest_device_extended_report(tmp_path: Path) -> None:
    doc, report, vcek = e2e_report_and_vcek()
    ioctl = FakeSevIoctl(report, build_cert_table([("VCEK", vcek)]))
    device = SevGuestDevice(tmp_path / "sev-guest", ioctl=ioctl, opener=_devnull)
    attester = SnpAttester(tsm_root=tmp_path / "none", device=device)
    evidence = attester.evidence(DIGEST)
    assert ioctl.calls == [SNP_GET_EXT_REPORT]
    assert ioctl.user_data == DIGEST + bytes(16)
    assert evidence["attestation_report"] == doc["attestation_report"]
    verify("snp", _snp_bytes(evidence), options=VerifyOptions(at=AT_2026))


def test_sev_guest_device_falls_back_to_plain_report(tmp_path: Path) -> None:
    ioctl = FakeSevIoctl(s1_report(), None)
    device = SevGuestDevice(tmp_path / "sev-guest", ioctl=ioctl, opener=_devnull)
    report, table = device.get_report(DIGEST + bytes(16), 0)
    assert ioctl.calls == [SNP_GET_EXT_REPORT, SNP_GET_REPORT]
    assert report == s1_report()
    assert table is None


def test_sev_guest_firmware_error_status(tmp_path: Path) -> None:
    def ioctl(fd: int, request: int, arg: Any) -> int:
        ctypes.memmove(arg.resp_data, (0x16).to_bytes(4, "little"), 4)
        return 0

    device = SevGuestDevice(tmp_path / "sev-guest", ioctl=ioctl, opener=_devnull)
    with pytest.raises(AttesterError, match="status 0x16"):
        device.get_report(bytes(64), 0)


def test_ioctl_numbers_match_the_kernel_uapi() -> None:
    assert SNP_GET_REPORT == 0xC0205300
    assert SNP_GET_EXT_REPORT == 0xC0205302
    assert TDX_CMD_GET_REPORT0 == 0xC4405401


# ------------------------------------------------------------------------------------------- TDX


def tdx_attester(tmp_path: Path, quote: bytes, ccel: bytes | None) -> tuple[TdxAttester, SimulatedTsm]:
    fake = SimulatedTsm(tmp_path / "report", "tdx_guest", lambda _: (quote, None))
    ccel_path = None
    if ccel is not None:
        ccel_path = tmp_path / "CCEL"
        ccel_path.write_bytes(ccel)
    return TdxAttester(tsm_root=fake.root, ops=fake, ccel_path=ccel_path), fake


@pytest.fixture
def t5_dir(tmp_path: Path) -> Path:
    return write_t5_collateral(tmp_path / "collateral")


def test_tdx_quote_and_event_log_from_configfs(tmp_path: Path, t5_dir: Path) -> None:
    from coffer.evidence.dcap import OfflineIntelCollateral

    quote = vector_bytes(SPR_E4)
    ccel = vector_bytes(CCEL)
    attester, fake = tdx_attester(tmp_path, quote, ccel)
    evidence = attester.evidence(DIGEST)
    assert set(evidence) == {"quote", "cc_eventlog"}
    assert fake.inblobs == [DIGEST + bytes(16)]
    assert base64.b64decode(evidence["cc_eventlog"], validate=True) == ccel
    produced = base64.b64decode(evidence["quote"], validate=True)
    assert produced == quote
    # Every signature, chain, CRL and QE-identity step passes; this platform's TCB level is the
    # recorded one (not supported), which is the verdict the vector is known for.
    with pytest.raises(PolicyDeniedError) as err:
        verify("tdx", produced, collateral=OfflineIntelCollateral(t5_dir), options=VerifyOptions(at=T5_AT))
    assert err.value.step == 10


def test_tdx_kbs_shaped_quote_passes_signature_steps(tmp_path: Path) -> None:
    attester, _ = tdx_attester(tmp_path, vector_bytes(QUOTE_6), None)
    evidence = attester.evidence(DIGEST)
    assert evidence["cc_eventlog"] is None
    with pytest.raises(VerificationError) as err:
        verify("tdx", base64.b64decode(evidence["quote"]), options=VerifyOptions(at=AT_2026))
    assert err.value.step == 6  # steps 1-5 passed; no collateral is recorded for this quote


class FakeTdxIoctl:
    def __call__(self, fd: int, request: int, arg: Any) -> int:
        assert request == TDX_CMD_GET_REPORT0
        ctypes.memmove(ctypes.addressof(arg) + 64, b"TDREPORT" + bytes(arg.reportdata), 72)
        return 0


class EchoQuotes:
    def __init__(self) -> None:
        self.reports: list[bytes] = []

    def quote(self, tdreport: bytes) -> bytes:
        self.reports.append(tdreport)
        return b"QUOTE" + tdreport[8:72]


def test_tdx_guest_device_fallback_places_the_digest(tmp_path: Path) -> None:
    service = EchoQuotes()
    device = TdxGuestDevice(tmp_path / "tdx_guest", quote_service=service, ioctl=FakeTdxIoctl(),
                            opener=_devnull)
    attester = TdxAttester(tsm_root=tmp_path / "none", device=device, ccel_path=None)
    evidence = attester.evidence(DIGEST)
    assert len(service.reports[0]) == 1024
    assert base64.b64decode(evidence["quote"]) == b"QUOTE" + DIGEST + bytes(16)


def test_qgs_vsock_protocol_over_a_socket_pair() -> None:
    ours, theirs = socket.socketpair()
    seen: dict[str, Any] = {}

    def server() -> None:
        with theirs:
            length = int.from_bytes(theirs.recv(4, socket.MSG_WAITALL), "big")
            message = theirs.recv(length, socket.MSG_WAITALL)
            seen["header"] = message[:16]
            seen["report"] = message[24:]
            quote = b"Q" * 100
            body = (0).to_bytes(4, "little") + len(quote).to_bytes(4, "little") + quote
            header = ((1).to_bytes(2, "little") + (0).to_bytes(2, "little") + (1).to_bytes(4, "little")
                      + (16 + len(body)).to_bytes(4, "little") + bytes(4))
            reply = header + body
            theirs.sendall(len(reply).to_bytes(4, "big") + reply)

    thread = threading.Thread(target=server)
    thread.start()
    quote = QgsVsock(connect=lambda: ours).quote(b"R" * 1024)
    thread.join(5)
    assert quote == b"Q" * 100
    assert seen["report"] == b"R" * 1024
    assert int.from_bytes(seen["header"][8:12], "little") == 16 + 8 + 1024


def test_qgs_error_response_is_reported() -> None:
    header = ((1).to_bytes(2, "little") + (0).to_bytes(2, "little") + (1).to_bytes(4, "little")
              + (24).to_bytes(4, "little") + (0x12).to_bytes(4, "little"))
    with pytest.raises(AttesterError, match="error 0x12"):
        QgsVsock.decode_response(header + bytes(8))


def test_registry_builds_tsm_attesters(tmp_path: Path) -> None:
    assert isinstance(attester_for("snp", tsm_root=tmp_path), SnpAttester)
    assert isinstance(attester_for("tdx", tsm_root=tmp_path, ccel_path=None), TdxAttester)
