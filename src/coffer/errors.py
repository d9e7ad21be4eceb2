"""The one exception tree of Coffer.

Every error Coffer raises on purpose is a :class:`CofferError`. Library code translates foreign
exceptions at its boundaries (``raise FormatError(...) from exc``), so callers catch one tree and the
CLI and HTTP edges map each branch to an exit code or status.

Messages never carry secrets: they name what was being read and why it was refused, not its content
beyond public identifiers (digests, offsets, field names).
"""

from __future__ import annotations


class CofferError(Exception):
    """Root of every error Coffer raises on purpose."""


class UsageError(CofferError):
    """The caller asked for something that does not make sense (bad option, unknown TEE name)."""


class ConfigError(CofferError):
    """Operator configuration is missing or inconsistent."""


class UnsupportedError(CofferError):
    """A format version, algorithm or backend that Coffer does not implement."""


class FormatError(CofferError):
    """Input is malformed, truncated, oversized or of an unknown version.

    ``what`` names the structure being read (``"SNP attestation report"``), ``offset`` the byte
    position where reading failed, when there is one.
    """

    def __init__(self, what: str, reason: str, *, offset: int | None = None) -> None:
        self.what = what
        self.reason = reason
        self.offset = offset
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"malformed {what}{where}: {reason}")


class CollateralError(CofferError):
    """Endorsements or collateral needed for a verification are missing, unreachable or unusable."""


class TransportError(CofferError):
    """A network or IPC exchange failed; retrying may help."""


class VerificationError(CofferError):
    """Evidence, a signature, a chain or a freshness check did not hold.

    Every verifier runs numbered steps; the error names the step that failed so that a rejection can
    be audited against the verifier's documented procedure.
    """

    def __init__(self, tee: str, step: int, step_name: str, reason: str) -> None:
        self.tee = tee
        self.step = step
        self.step_name = step_name
        self.reason = reason
        super().__init__(f"{tee} verification failed at step {step} ({step_name}): {reason}")


class PolicyDeniedError(VerificationError):
    """The evidence is genuine, but a policy rule (debug, TCB minimum, ...) refused it."""


class StorageError(CofferError):
    """The storage backend failed (unreachable database, corrupt state, failed migration)."""


class ProtocolError(CofferError):
    """A peer broke the KBS protocol (bad version, malformed body, wrong session, reused nonce).

    ``kind`` is the Trustee error type name reported on the wire (``AttestationError``,
    ``TokenNotFound``, ``PolicyDeny``...), which also decides the HTTP status.
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")
