"""``snp`` and ``tdx`` attesters: reports through configfs-tsm, with the guest-device fallbacks.

configfs-tsm (Linux 6.7+, ``Documentation/ABI/testing/configfs-tsm``): make a directory under
``/sys/kernel/config/tsm/report``, write the 64 report-data bytes to ``inblob``, read ``outblob``
(the SNP ATTESTATION_REPORT or the TDX quote) and ``auxblob`` (SNP: the certificate table of the
extended report), and check ``generation`` did not move in between (another writer of the same
entry) and ``provider`` names the expected TEE. The root is a parameter, and the file operations go
through :class:`ConfigFsOps`, so tests drive a simulated tree.

Without configfs-tsm: ``/dev/sev-guest`` (SNP_GET_EXT_REPORT / SNP_GET_REPORT ioctls) and
``/dev/tdx_guest`` (TDX_CMD_GET_REPORT0 for the TDREPORT, converted to a quote by the quote
generation service over vsock), each behind a small device interface with fakes in the tests.

Evidence JSON (Trustee):

* snp: ``{"attestation_report": {<sev crate serde fields>}, "cert_chain": [{"cert_type": "VCEK",
  "data": [DER bytes]}, ...] | null}``;
* tdx: ``{"quote": "<std base64>", "cc_eventlog": "<std base64 of the ACPI CCEL data>" | null}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coffer.errors import UnsupportedError
from coffer.evidence.snp.report import REPORT_SIZE, uses_turin_tcb_layout
from coffer.guest.attesters.base import AttesterError, b64, pad64

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
SEV_GUEST_DEVICE = Path("/dev/sev-guest")
TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
CCEL_DATA = Path("/sys/firmware/acpi/tables/data/CCEL")

MAX_BLOB = 1 << 20


# --------------------------------------------------------------------------------------------------
# configfs-tsm


class ConfigFsOps:
    """The file operations configfs-tsm needs (the real ones; tests substitute a simulation)."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def read(self, path: Path) -> bytes:
        with path.open("rb") as f:
            return f.read(MAX_BLOB + 1)

    def write(self, path: Path, data: bytes) -> None:
        with path.open("wb", buffering=0) as f:
            f.write(data)


@dataclass(frozen=True)
class TsmReport:
    outblob: bytes
    auxblob: bytes | None
    provider: str
    generation: int


class TsmReportClient:
    """One report request at a time through a fresh configfs-tsm entry (removed afterwards)."""

    def __init__(self, root: Path = TSM_REPORT_ROOT, *, ops: ConfigFsOps | None = None,
                 retries: int = 3) -> None:
        self.root = Path(root)
        self.ops = ops or ConfigFsOps()
        self.retries = retries

    def available(self) -> bool:
        return self.ops.is_dir(self.root)

    def get_report(self, inblob: bytes, *, provider: str | None = None, privlevel: int | None = None
                   ) -> TsmReport:
        if len(inblob) != 64:
            raise ValueError("configfs-tsm inblob must be 64 bytes")
        entry = self.root / f"coffer-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self.ops.mkdir(entry)
        except OSError as exc:
            raise AttesterError(f"configfs-tsm: cannot create a report entry under {self.root}: "
                                f"{exc.strerror}") from exc
        try:
            for _ in range(self.retries):
                report = self._attempt(entry, inblob, privlevel)
                if report is None:
                    continue  # another writer changed the entry between our write and read
                if provider is not None and report.provider != provider:
                    raise AttesterError(f"configfs-tsm provider is {report.provider!r}, "
                                        f"expected {provider!r}")
                return report
            raise AttesterError("configfs-tsm: the report entry kept changing under us (generation)")
        except OSError as exc:
            raise AttesterError(f"configfs-tsm: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):  # best effort
                self.ops.rmdir(entry)

    def _attempt(self, entry: Path, inblob: bytes, privlevel: int | None) -> TsmReport | None:
        ops = self.ops
        if privlevel is not None:
            ops.write(entry / "privlevel", str(privlevel).encode())
        ops.write(entry / "inblob", inblob)
        generation = _read_int(ops.read(entry / "generation"))
        outblob = ops.read(entry / "outblob")
        auxblob = ops.read(entry / "auxblob") if ops.exists(entry / "auxblob") else None
        provider = ops.read(entry / "provider").decode(errors="replace").strip()
        if _read_int(ops.read(entry / "generation")) != generation:
            return None
        if not outblob or len(outblob) > MAX_BLOB:
            raise AttesterError("configfs-tsm returned an empty or oversized outblob")
        return TsmReport(outblob=outblob, auxblob=auxblob or None, provider=provider,
                         generation=generation)


def _read_int(data: bytes) -> int:
    try:
        return int(data.decode().strip())
    except ValueError as exc:
        raise AttesterError("configfs-tsm generation is not a number") from exc


# --------------------------------------------------------------------------------------------------
# SNP: certificate table, serde JSON


CERT_GUIDS: dict[uuid.UUID, str] = {
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): "CRL",
}
_BY_NAME = {name: guid for guid, name in CERT_GUIDS.items()}


def parse_cert_table(table: bytes) -> list[tuple[str, bytes]]:
    """The certificates of an SNP extended-report certificate table (GHCB spec: entries of GUID,
    offset and length (u32 LE) ending with an all-zero entry; offsets from the table's start).
    Unknown GUIDs are returned as ``OTHER(<uuid>)``. Raises AttesterError on a malformed table."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while True:
        if pos + 24 > len(table):
            raise AttesterError("SNP certificate table has no terminating entry")
        raw_guid = table[pos:pos + 16]
        offset = int.from_bytes(table[pos + 16:pos + 20], "little")
        length = int.from_bytes(table[pos + 20:pos + 24], "little")
        pos += 24
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset < pos or offset + length > len(table) or len(out) >= 64:
            raise AttesterError("SNP certificate table entry points outside the table")
        guid = uuid.UUID(bytes=raw_guid)
        name = CERT_GUIDS.get(guid) or CERT_GUIDS.get(uuid.UUID(bytes_le=raw_guid))
        out.append((name or f"OTHER({guid})", table[offset:offset + length]))


def build_cert_table(certs: list[tuple[str, bytes]]) -> bytes:
    """The inverse of :func:`parse_cert_table` (GUIDs in RFC 4122 byte order), for fakes and tools."""
    header = bytearray()
    body = bytearray()
    start = 24 * (len(certs) + 1)
    for name, der in certs:
        header += _BY_NAME[name].bytes + (start + len(body)).to_bytes(4, "little")
        header += len(der).to_bytes(4, "little")
        body += der
    return bytes(header + bytes(24) + body)


def _u(raw: bytes, offset: int, size: int) -> int:
    return int.from_bytes(raw[offset:offset + size], "little")


def _tcb_json(raw: bytes, turin: bool) -> dict[str, Any]:
    if turin:
        return {"fmc": raw[0], "bootloader": raw[1], "tee": raw[2], "snp": raw[3], "microcode": raw[7]}
    return {"fmc": None, "bootloader": raw[0], "tee": raw[1], "snp": raw[6], "microcode": raw[7]}


def snp_report_json(report: bytes) -> dict[str, Any]:
    """An ATTESTATION_REPORT in the serde JSON form of the ``sev`` crate (byte arrays as arrays of
    numbers, TCB versions as objects), as the CoCo ``snp`` attester sends it."""
    if len(report) < REPORT_SIZE:
        raise AttesterError(f"SNP report is {len(report)} bytes, expected {REPORT_SIZE}")
    r = report[:REPORT_SIZE]
    version = _u(r, 0x00, 4)
    family = r[0x188] if version >= 3 else None
    turin = uses_turin_tcb_layout(None, family) if family is not None else False

    def arr(offset: int, size: int) -> list[int]:
        return list(r[offset:offset + size])

    def ver(offset: int) -> dict[str, int]:
        return {"major": r[offset + 2], "minor": r[offset + 1], "build": r[offset]}

    doc: dict[str, Any] = {
        "version": version,
        "guest_svn": _u(r, 0x04, 4),
        "policy": _u(r, 0x08, 8),
        "family_id": arr(0x10, 16),
        "image_id": arr(0x20, 16),
        "vmpl": _u(r, 0x30, 4),
        "sig_algo": _u(r, 0x34, 4),
        "current_tcb": _tcb_json(r[0x38:0x40], turin),
        "plat_info": _u(r, 0x40, 8),
        "key_info": _u(r, 0x48, 4),
        "report_data": arr(0x50, 64),
        "measurement": arr(0x90, 48),
        "host_data": arr(0xC0, 32),
        "id_key_digest": arr(0xE0, 48),
        "author_key_digest": arr(0x110, 48),
        "report_id": arr(0x140, 32),
        "report_id_ma": arr(0x160, 32),
        "reported_tcb": _tcb_json(r[0x180:0x188], turin),
    }
    if version >= 3:
        doc |= {"cpuid_fam_id": r[0x188], "cpuid_mod_id": r[0x189], "cpuid_step": r[0x18A]}
    doc |= {
        "chip_id": arr(0x1A0, 64),
        "committed_tcb": _tcb_json(r[0x1E0:0x1E8], turin),
        "current": ver(0x1E8),
        "committed": ver(0x1EC),
        "launch_tcb": _tcb_json(r[0x1F0:0x1F8], turin),
    }
    if version >= 5:
        doc |= {"launch_mit_vector": _u(r, 0x1F8, 8), "current_mit_vector": _u(r, 0x200, 8)}
    doc["signature"] = {"r": arr(0x2A0, 72), "s": arr(0x2E8, 72)}
    return doc


def snp_evidence_json(report: bytes, cert_table: bytes | None) -> dict[str, Any]:
    chain: list[dict[str, Any]] | None = None
    if cert_table:
        chain = [{"cert_type": name, "data": list(der)} for name, der in parse_cert_table(cert_table)
                 if name in ("ARK", "ASK", "VCEK", "VLEK")]
    return {"attestation_report": snp_report_json(report), "cert_chain": chain or None}


# --------------------------------------------------------------------------------------------------
# /dev/sev-guest


def _iowr(kind: str, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | number


class _GuestRequest(ctypes.Structure):
    _fields_ = [("msg_version", ctypes.c_uint8), ("req_data", ctypes.c_uint64),
                ("resp_data", ctypes.c_uint64), ("exitinfo2", ctypes.c_uint64)]


class _ReportReq(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint8 * 64), ("vmpl", ctypes.c_uint32),
                ("rsvd", ctypes.c_uint8 * 28)]


class _ExtReportReq(ctypes.Structure):
    _fields_ = [("data", _ReportReq), ("certs_address", ctypes.c_uint64), ("certs_len", ctypes.c_uint32)]


SNP_GET_REPORT = _iowr("S", 0x0, ctypes.sizeof(_GuestRequest))
SNP_GET_EXT_REPORT = _iowr("S", 0x2, ctypes.sizeof(_GuestRequest))
_SNP_RESP_SIZE = 4000
_VMM_ERR_INVALID_LEN = 1

IoctlFn = Callable[[int, int, Any], Any]


class SnpDevice(Protocol):
    def get_report(self, report_data: bytes, vmpl: int) -> tuple[bytes, bytes | None]:
        """(ATTESTATION_REPORT, certificate table or None)."""
        ...


class SevGuestDevice:
    """``/dev/sev-guest``: SNP_GET_EXT_REPORT (report and certificates), falling back to
    SNP_GET_REPORT when the host offers no certificates. ``ioctl`` is injectable for tests."""

    def __init__(self, path: Path = SEV_GUEST_DEVICE, *, ioctl: IoctlFn | None = None,
                 opener: Callable[[Path], int] | None = None) -> None:
        import fcntl  # noqa: PLC0415 - Unix only

        self.path = path
        self._ioctl: IoctlFn = ioctl or fcntl.ioctl
        self._open = opener or (lambda p: os.open(p, os.O_RDWR))

    def get_report(self, report_data: bytes, vmpl: int) -> tuple[bytes, bytes | None]:
        fd = self._open(self.path)
        try:
            certs_len = 4 * 4096
            for _ in range(2):
                certs = (ctypes.c_uint8 * certs_len)()
                req = _ExtReportReq()
                ctypes.memmove(req.data.user_data, report_data, 64)
                req.data.vmpl = vmpl
                req.certs_address = ctypes.addressof(certs)
                req.certs_len = certs_len
                resp = (ctypes.c_uint8 * _SNP_RESP_SIZE)()
                guest = _GuestRequest(msg_version=1, req_data=ctypes.addressof(req),
                                      resp_data=ctypes.addressof(resp))
                try:
                    self._ioctl(fd, SNP_GET_EXT_REPORT, guest)
                except OSError:
                    if (guest.exitinfo2 >> 32) == _VMM_ERR_INVALID_LEN and req.certs_len > certs_len:
                        certs_len = int(req.certs_len)
                        continue
                    return self._plain_report(fd, report_data, vmpl), None
                table = bytes(certs)[:certs_len] if req.certs_len else None
                return _report_from_response(bytes(resp)), table
            raise AttesterError("/dev/sev-guest: certificate buffer size negotiation failed")
        finally:
            os.close(fd)

    def _plain_report(self, fd: int, report_data: bytes, vmpl: int) -> bytes:
        req = _ReportReq()
        ctypes.memmove(req.user_data, report_data, 64)
        req.vmpl = vmpl
        resp = (ctypes.c_uint8 * _SNP_RESP_SIZE)()
        guest = _GuestRequest(msg_version=1, req_data=ctypes.addressof(req),
                              resp_data=ctypes.addressof(resp))
        try:
            self._ioctl(fd, SNP_GET_REPORT, guest)
        except OSError as exc:
            raise AttesterError(f"/dev/sev-guest SNP_GET_REPORT failed: {exc.strerror} "
                                f"(exitinfo2 {guest.exitinfo2:#x})") from exc
        return _report_from_response(bytes(resp))


def _report_from_response(resp: bytes) -> bytes:
    """MSG_REPORT_RSP: status (u32), report size (u32), 24 reserved bytes, the report."""
    status = int.from_bytes(resp[0:4], "little")
    size = int.from_bytes(resp[4:8], "little")
    if status != 0:
        raise AttesterError(f"SNP firmware refused the report request (status {status:#x})")
    if size < REPORT_SIZE or 32 + size > len(resp):
        raise AttesterError(f"SNP report response has an invalid size {size}")
    return resp[32:32 + size]


# --------------------------------------------------------------------------------------------------
# /dev/tdx_guest and the quote generation service


class _TdxReportReq(ctypes.Structure):
    _fields_ = [("reportdata", ctypes.c_uint8 * 64), ("tdreport", ctypes.c_uint8 * 1024)]


TDX_CMD_GET_REPORT0 = _iowr("T", 1, ctypes.sizeof(_TdxReportReq))
TDREPORT_SIZE = 1024


class TdxDevice(Protocol):
    def get_quote(self, report_data: bytes) -> bytes: ...


class QuoteService(Protocol):
    def quote(self, tdreport: bytes) -> bytes: ...


class QgsVsock:
    """Intel's TD quote generation service on the host (vsock CID 2, port 4050): a 4-byte
    big-endian length, then a qgs message (header: major 1, minor 0, type, size, error code; all
    u32/u16 little-endian). GET_QUOTE_REQ carries the TDREPORT; GET_QUOTE_RESP the quote."""

    GET_QUOTE_REQ = 0
    GET_QUOTE_RESP = 1

    def __init__(self, cid: int = 2, port: int = 4050, *,
                 connect: Callable[[], socket.socket] | None = None, timeout: float = 30.0) -> None:
        self.cid, self.port, self.timeout = cid, port, timeout
        self._connect = connect or self._vsock

    def _vsock(self) -> socket.socket:
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise UnsupportedError("this Python has no AF_VSOCK")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect((self.cid, self.port))
        return sock

    @classmethod
    def encode_request(cls, tdreport: bytes) -> bytes:
        body = len(tdreport).to_bytes(4, "little") + (0).to_bytes(4, "little") + tdreport
        header = ((1).to_bytes(2, "little") + (0).to_bytes(2, "little")
                  + cls.GET_QUOTE_REQ.to_bytes(4, "little") + (16 + len(body)).to_bytes(4, "little")
                  + (0).to_bytes(4, "little"))
        message = header + body
        return len(message).to_bytes(4, "big") + message

    @classmethod
    def decode_response(cls, message: bytes) -> bytes:
        if len(message) < 24:
            raise AttesterError("QGS response too short")
        kind = int.from_bytes(message[4:8], "little")
        size = int.from_bytes(message[8:12], "little")
        error = int.from_bytes(message[12:16], "little")
        if kind != cls.GET_QUOTE_RESP or size != len(message):
            raise AttesterError("QGS response is not a GET_QUOTE_RESP of the announced size")
        if error != 0:
            raise AttesterError(f"QGS refused the quote request (error {error:#x})")
        id_size = int.from_bytes(message[16:20], "little")
        quote_size = int.from_bytes(message[20:24], "little")
        if 24 + id_size + quote_size != len(message) or quote_size == 0:
            raise AttesterError("QGS response sizes do not add up")
        return message[24 + id_size:]

    def quote(self, tdreport: bytes) -> bytes:
        with self._connect() as sock:
            sock.sendall(self.encode_request(tdreport))
            length = int.from_bytes(_recv_exact(sock, 4), "big")
            if length > MAX_BLOB:
                raise AttesterError("QGS response too large")
            return self.decode_response(_recv_exact(sock, length))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise AttesterError("QGS closed the connection early")
        out += chunk
    return bytes(out)


class TdxGuestDevice:
    """``/dev/tdx_guest``: TDX_CMD_GET_REPORT0 for the TDREPORT, then the quote service."""

    def __init__(self, path: Path = TDX_GUEST_DEVICE, *, quote_service: QuoteService | None = None,
                 ioctl: IoctlFn | None = None, opener: Callable[[Path], int] | None = None) -> None:
        import fcntl  # noqa: PLC0415 - Unix only

        self.path = path
        self.quote_service = quote_service or QgsVsock()
        self._ioctl: IoctlFn = ioctl or fcntl.ioctl
        self._open = opener or (lambda p: os.open(p, os.O_RDWR))

    def get_tdreport(self, report_data: bytes) -> bytes:
        req = _TdxReportReq()
        ctypes.memmove(req.reportdata, report_data, 64)
        fd = self._open(self.path)
        try:
            self._ioctl(fd, TDX_CMD_GET_REPORT0, req)
        except OSError as exc:
            raise AttesterError(f"/dev/tdx_guest TDX_CMD_GET_REPORT0 failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return bytes(req.tdreport)

    def get_quote(self, report_data: bytes) -> bytes:
        return self.quote_service.quote(self.get_tdreport(report_data))


# --------------------------------------------------------------------------------------------------
# The attesters


class SnpAttester:
    """SNP report with report data = the digest zero-padded to 64 bytes, at ``vmpl`` (configfs
    ``privlevel``; None leaves the kernel's default)."""

    tee = "snp"

    def __init__(self, *, tsm_root: Path = TSM_REPORT_ROOT, ops: ConfigFsOps | None = None,
                 device: SnpDevice | None = None, device_path: Path = SEV_GUEST_DEVICE,
                 vmpl: int | None = None) -> None:
        self.tsm = TsmReportClient(tsm_root, ops=ops)
        self.device = device
        self.device_path = device_path
        self.vmpl = vmpl

    def report(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        if self.tsm.available():
            got = self.tsm.get_report(report_data, provider="sev_guest", privlevel=self.vmpl)
            return got.outblob, got.auxblob
        device = self.device
        if device is None and self.device_path.exists():
            device = SevGuestDevice(self.device_path)
        if device is None:
            raise UnsupportedError(f"no SEV-SNP guest interface ({self.tsm.root} or {self.device_path})")
        return device.get_report(report_data, self.vmpl or 0)

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        report, table = self.report(pad64(runtime_digest))
        return snp_evidence_json(report, table)


class TdxAttester:
    """TDX quote with REPORTDATA = the digest zero-padded to 64 bytes, and the CCEL event log."""

    tee = "tdx"

    def __init__(self, *, tsm_root: Path = TSM_REPORT_ROOT, ops: ConfigFsOps | None = None,
                 device: TdxDevice | None = None, device_path: Path = TDX_GUEST_DEVICE,
                 ccel_path: Path | None = CCEL_DATA) -> None:
        self.tsm = TsmReportClient(tsm_root, ops=ops)
        self.device = device
        self.device_path = device_path
        self.ccel_path = ccel_path

    def quote(self, report_data: bytes) -> bytes:
        if self.tsm.available():
            return self.tsm.get_report(report_data, provider="tdx_guest").outblob
        device = self.device
        if device is None and self.device_path.exists():
            device = TdxGuestDevice(self.device_path)
        if device is None:
            raise UnsupportedError(f"no TDX guest interface ({self.tsm.root} or {self.device_path})")
        return device.get_quote(report_data)

    def event_log(self) -> bytes | None:
        if self.ccel_path is None:
            return None
        try:
            return self.ccel_path.read_bytes()
        except OSError:
            return None

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        quote = self.quote(pad64(runtime_digest))
        log = self.event_log()
        return {"quote": b64(quote), "cc_eventlog": b64(log) if log else None}
