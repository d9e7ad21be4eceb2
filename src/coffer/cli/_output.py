"""Human and ``--json`` output for the CLI. Commands hand over data; this module decides the form."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from coffer.errors import PolicyDeniedError, VerificationError


class Output:
    def __init__(self, *, json_mode: bool, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.json_mode = json_mode
        self._out = stdout or sys.stdout
        self._err = stderr or sys.stderr

    def result(self, data: Mapping[str, Any], *, title: str = "") -> None:
        """The main result of a command: JSON on stdout, or a readable tree."""
        if self.json_mode:
            self._out.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
            return
        if title:
            self._out.write(title + "\n")
        _write_tree(self._out, data, indent=1 if title else 0)

    def rejection(self, exc: VerificationError) -> None:
        kind = "policy_denied" if isinstance(exc, PolicyDeniedError) else "verification_failed"
        if self.json_mode:
            payload = {
                "ok": False,
                "error": kind,
                "tee": exc.tee,
                "step": exc.step,
                "step_name": exc.step_name,
                "reason": exc.reason,
            }
            self._out.write(json.dumps(payload, indent=2) + "\n")
        self._err.write(f"REJECTED: {exc}\n")

    def error(self, message: str, *, kind: str) -> None:
        if self.json_mode:
            self._out.write(json.dumps({"ok": False, "error": kind, "message": message}, indent=2) + "\n")
        self._err.write(f"coffer: error: {message}\n")


def _write_tree(out: TextIO, data: Any, indent: int) -> None:
    pad = "  " * indent
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, Mapping) and value:
                out.write(f"{pad}{key}:\n")
                _write_tree(out, value, indent + 1)
            elif isinstance(value, list) and value and any(isinstance(v, Mapping | list) for v in value):
                out.write(f"{pad}{key}:\n")
                for item in value:
                    out.write(f"{pad}  -\n")
                    _write_tree(out, item, indent + 2)
            else:
                out.write(f"{pad}{key}: {_scalar(value)}\n")
    else:
        out.write(f"{pad}{_scalar(data)}\n")


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value) if value else "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return "{}"
    return str(value)
