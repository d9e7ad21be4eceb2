"""Runtime measurements of the guest: an event log extended into a measurement register.

Each event is ``{"domain": "coffer", "operation": OP, "content": {...}, "digest": HEX}`` where the
digest is SHA-256 over the canonical JSON of the content
(:func:`coffer.attestation.binding.canonical_json`), and operations are ``InitData`` (content
``{"algorithm", "digest"}``), ``PullImage`` (``{"image", "digest"}``, the manifest digest) and
``CreateContainer`` (``{"container_id", "name", "config_sha256"}``). Each event's digest is extended
into a register as ``new = SHA-256(old || digest)``, so a verifier replays the log
(:func:`replay`) and compares the result with the register value it attested.

Registers:

* :class:`TpmRegister`: a TPM PCR, by default PCR 23 of the SHA-256 bank, through ``tpm2_pcrextend``
  and ``tpm2_pcrread``. PCR 23 is the TCG "application support" PCR, which software may reset at
  locality 0; the agent resets it once at start so the log replays from zero. Anyone who can talk to
  the TPM can reset it too, which is acceptable only because the process sandbox's swtpm is a
  development root of trust; VM backends use RTMRs or a PCR the guest alone controls.
* :class:`SampleRegister`: a value kept in the agent's memory (the ``sample`` TEE; proves nothing).

:func:`read_pcr8` reads the PCR that holds the initdata launch measurement on (v)TPM platforms.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from coffer.attestation.binding import canonical_json
from coffer.errors import CofferError, FormatError, UsageError
from coffer.guest.attesters.tpm import Tpm2Tools

DOMAIN: Final = "coffer"
OPERATIONS: Final = ("InitData", "PullImage", "CreateContainer")
DEBUG_PCR: Final = 23
INITDATA_PCR: Final = 8
DIGEST_SIZE: Final = 32
MAX_EVENTS: Final = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MeasurementError(CofferError):
    """A measurement could not be recorded or read (the register failed)."""


def content_digest(content: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of an event's content."""
    return hashlib.sha256(canonical_json(content)).digest()


def extend(value: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(value + digest).digest()


def replay(event_log: Iterable[Mapping[str, Any]], initial: bytes = b"\0" * DIGEST_SIZE) -> bytes:
    """The register value a log leads to; FormatError when an entry's digest does not match its
    content (a tampered log)."""
    value = initial
    for index, entry in enumerate(event_log):
        content = entry.get("content")
        digest = entry.get("digest")
        if not isinstance(content, Mapping) or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise FormatError("event log", f"entry {index} lacks content or a sha256 hex digest")
        if content_digest(content).hex() != digest:
            raise FormatError("event log", f"entry {index} ({entry.get('operation')!r}): digest does not "
                              "match its content")
        value = extend(value, bytes.fromhex(digest))
    return value


class Register(ABC):
    """Where event digests are extended."""

    kind: str
    index: int

    @abstractmethod
    def extend(self, digest: bytes) -> None: ...

    @abstractmethod
    def read(self) -> bytes: ...

    def reset(self) -> None:  # noqa: B027 - a no-op default; TPM PCR 23 overrides it
        """Start from zero (before the first event)."""


class SampleRegister(Register):
    """A register kept in memory: ``sha256(old || digest)`` from 32 zero bytes."""

    kind = "sample"

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._value = b"\0" * DIGEST_SIZE

    def extend(self, digest: bytes) -> None:
        self._value = extend(self._value, digest)

    def read(self) -> bytes:
        return self._value

    def reset(self) -> None:
        self._value = b"\0" * DIGEST_SIZE


def _pcr_value(tools: Tpm2Tools, pcr: int) -> bytes:
    with tempfile.TemporaryDirectory(prefix="coffer-pcr-") as work:
        out = Path(work) / "pcr.bin"
        try:
            tools.run("tpm2_pcrread", f"sha256:{pcr}", "-o", str(out))
            value = out.read_bytes()
        except (CofferError, OSError) as exc:
            raise MeasurementError(f"reading PCR {pcr}: {exc}") from exc
    if len(value) != DIGEST_SIZE:
        raise MeasurementError(f"PCR {pcr} read gave {len(value)} bytes, not {DIGEST_SIZE} "
                               "(is the sha256 bank active?)")
    return value


class TpmRegister(Register):
    """A SHA-256 PCR of a TPM reached through ``tcti`` (``None``: the tools' default device)."""

    kind = "pcr"

    def __init__(self, tcti: str | None, pcr: int = DEBUG_PCR, *, tools: Tpm2Tools | None = None) -> None:
        if not 0 <= pcr < 24:
            raise UsageError(f"PCR index must be 0..23, not {pcr}")
        self.index = pcr
        self._tools = tools or Tpm2Tools(tcti, timeout=30.0)

    def extend(self, digest: bytes) -> None:
        if len(digest) != DIGEST_SIZE:
            raise UsageError("a sha256 digest is 32 bytes")
        try:
            self._tools.run("tpm2_pcrextend", f"{self.index}:sha256={digest.hex()}")
        except CofferError as exc:
            raise MeasurementError(f"extending PCR {self.index}: {exc}") from exc

    def read(self) -> bytes:
        return _pcr_value(self._tools, self.index)

    def reset(self) -> None:
        try:
            self._tools.run("tpm2_pcrreset", str(self.index))
        except CofferError as exc:
            raise MeasurementError(f"resetting PCR {self.index}: {exc}") from exc


def read_pcr8(tcti: str | None) -> bytes:
    """PCR 8 of the SHA-256 bank (the initdata launch measurement on TPM platforms)."""
    return _pcr_value(Tpm2Tools(tcti, timeout=30.0), INITDATA_PCR)


class Measurer:
    """The event log and its register. Calling it (``measurer(operation, content)``) records one
    event: the runtime's measurement hook. Thread-safe."""

    def __init__(self, register: Register) -> None:
        self.register = register
        self._log: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, operation: str, content: Mapping[str, Any]) -> dict[str, Any]:
        """Append an event and extend the register; MeasurementError when the register fails (the
        caller must then not go on: an unmeasured container would not show in the claims)."""
        if operation not in OPERATIONS:
            raise UsageError(f"unknown measurement operation {operation!r}")
        try:
            digest = content_digest(content)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{operation} content is not canonical JSON: {exc}") from exc
        entry = {"domain": DOMAIN, "operation": operation, "content": dict(content), "digest": digest.hex()}
        with self._lock:
            if len(self._log) >= MAX_EVENTS:
                raise MeasurementError(f"the event log is full ({MAX_EVENTS} events)")
            # Extend first: a log entry without its extend would make the replay disagree.
            self.register.extend(digest)
            self._log.append(entry)
        return entry

    def __call__(self, operation: str, content: dict[str, Any]) -> None:
        self.record(operation, content)

    @property
    def event_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e, content=dict(e["content"])) for e in self._log]

    def register_info(self) -> dict[str, Any]:
        """``{"kind", "index", "value"}`` for GuestDetails."""
        with self._lock:
            value = self.register.read()
        return {"kind": self.register.kind, "index": self.register.index, "value": value.hex()}
