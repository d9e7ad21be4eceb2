"""Shared shapes of every TEE verifier: options, claims, the numbered-step runner and the handler
interface that the CLI and the attestation service call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Literal, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature

from coffer._internal.clock import as_utc, utc_now
from coffer._internal.encoding import to_json_object
from coffer.errors import (
    CollateralError,
    FormatError,
    PolicyDeniedError,
    UnsupportedError,
    VerificationError,
)
from coffer.evidence.collateral import CollateralSource
from coffer.evidence.x509util import ChainError


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    """What a verification is checked against.

    ``at`` is the reference time for every validity window (certificates, CRLs, collateral).
    ``expected_report_data``, when set, must equal the evidence's report data; shorter values are
    compared against the zero-padded field (the convention of the KBS protocol for SNP/TDX/SGX), and
    each TEE documents its exact rule. Debug-mode guests are refused unless ``allow_debug``.
    ``trusted_keys`` holds DER SubjectPublicKeyInfo of attestation keys the relying party already
    trusts (a TPM AK enrolled out of band); evidence signed by another key is verified but labelled
    insecure.
    """

    at: datetime = field(default_factory=utc_now)
    expected_report_data: bytes | None = None
    allow_debug: bool = False
    trusted_keys: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", as_utc(self.at))


@dataclass(frozen=True, kw_only=True)
class Claims:
    """What verified evidence says. Subclasses add their TEE's fields.

    ``insecure`` is true when the root of trust is local (sample TEE, software TPM): such claims are
    for development and default policies reject them. ``steps`` lists the verification steps that ran,
    in order, for auditing.
    """

    tee: str
    insecure: bool
    report_data: bytes
    steps: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The claims as JSON values: stable snake_case names, byte fields as lowercase hex."""
        return to_json_object(self)

    def with_steps(self, steps: tuple[str, ...]) -> Claims:
        return dataclasses.replace(self, steps=steps)


class StepRunner:
    """Runs a verifier's numbered steps and turns any failure inside one into a
    :class:`VerificationError` that names the step.

    Usage::

        steps = StepRunner("snp")
        with steps.step(1, "parse report"):
            report = parse(data)
        ...
        steps.done  # ("1 parse report", ...)

    The runner is its own context manager (``step`` returns it), which keeps the dozen steps of a
    warm verification cheap; steps do not nest.
    """

    __slots__ = ("_current", "_done", "tee")

    def __init__(self, tee: str) -> None:
        self.tee = tee
        self._done: list[tuple[int, str]] = []
        self._current: tuple[int, str] | None = None

    @property
    def done(self) -> tuple[str, ...]:
        return tuple(f"{number} {name}" for number, name in self._done)

    def step(self, number: int, name: str) -> StepRunner:
        if self._current is not None:
            raise RuntimeError(f"step {number} started inside step {self._current[0]}")
        self._current = (number, name)
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        current = self._current
        self._current = None
        if current is None:
            return
        if exc is None:
            self._done.append(current)
        elif isinstance(exc, InvalidSignature):
            raise VerificationError(self.tee, current[0], current[1], "signature does not verify") from exc
        elif isinstance(exc, FormatError | CollateralError | UnsupportedError | ChainError):
            raise VerificationError(self.tee, current[0], current[1], str(exc)) from exc
        # Anything else (a VerificationError from a nested verifier included) propagates unchanged.

    def fail(self, reason: str) -> NoReturn:
        """Reject inside the running step."""
        if self._current is None:
            raise RuntimeError("StepRunner.fail called outside a step")
        number, name = self._current
        raise VerificationError(self.tee, number, name, reason)

    def deny(self, reason: str) -> NoReturn:
        """Reject inside the running step because a policy rule (not a signature) said no."""
        if self._current is None:
            raise RuntimeError("StepRunner.deny called outside a step")
        number, name = self._current
        raise PolicyDeniedError(self.tee, number, name, reason)


class ParsedEvidence(Protocol):
    """What ``coffer evidence show`` prints: any parsed structure that can describe itself."""

    def to_dict(self) -> dict[str, Any]: ...


class TeeHandler(Protocol):
    """One TEE's entry points. ``input_kind`` tells the CLI whether a file may be hex/base64 text
    (``binary``) or is a JSON document passed through as is (``json``)."""

    name: ClassVar[str]
    input_kind: ClassVar[Literal["binary", "json"]]

    def parse(self, data: bytes) -> ParsedEvidence: ...

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> Claims: ...


def check_report_data(
    steps: StepRunner, actual: bytes, expected: bytes | None, *, pad_to: int | None = None
) -> None:
    """Compare report data with what the relying party expects (inside the running step).

    With ``pad_to``, a shorter expected value is zero-padded to that length first; a longer one is
    refused. Report data is public, so a plain comparison is fine here.
    """
    if expected is None:
        return
    want = expected
    if pad_to is not None:
        if len(want) > pad_to:
            steps.fail(f"expected report data is {len(want)} bytes, the field holds {pad_to}")
        want = want.ljust(pad_to, b"\0")
    if actual != want:
        steps.fail(f"report data {actual.hex()} does not match the expected {want.hex()}")
