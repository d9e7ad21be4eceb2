"""A one-line progress display for long transfers, on a terminal only (never with --json or --quiet)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MiB = 1024 * 1024


class ProgressLine:
    """Callable as a :data:`coffer.image.transport.Progress`: redraws at most ten times a second."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._current = ""

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if what == self._current and not finished and now - self._last < 0.1:
            return
        self._last = now
        self._current = what
        if total:
            text = f"{what}: {done / MiB:8.1f} / {total / MiB:.1f} MiB {100 * done // total:3d}%"
        else:
            text = f"{what}: {done / MiB:8.1f} MiB"
        self._stream.write("\r\x1b[K" + text + ("\n" if finished else ""))
        self._stream.flush()
