"""Reference time handling: verifiers take the time to check validity windows against as an
argument and never call ``now()`` themselves, so that recorded evidence verifies reproducibly."""

from __future__ import annotations

from datetime import UTC, datetime

from coffer.errors import UsageError


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_reference_time(text: str) -> datetime:
    """Parse an ISO-8601 time; a time without offset is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"not an ISO-8601 time: {text!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def as_utc(moment: datetime) -> datetime:
    """Make sure a time is aware and in UTC (naive times are taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
