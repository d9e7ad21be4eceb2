"""Small input files read whole under a size ceiling, with errors that name what the file is for."""

from __future__ import annotations

from pathlib import Path

from coffer.errors import UsageError


def read_bounded(path: Path, what: str, limit: int) -> bytes:
    """The file's bytes; UsageError when it cannot be read or holds more than ``limit`` bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    return data


def read_bounded_text(path: Path, what: str, limit: int) -> str:
    """The file as UTF-8 text (UsageError otherwise), under the same rules as :func:`read_bounded`."""
    data = read_bounded(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text") from exc
