"""The ``coffer`` command. Thin: it parses arguments, calls the library and prints.

Exit codes: 0 success, 1 the thing asked about was refused (evidence rejected, policy denied),
2 usage errors (bad options, unreadable files), 3 any other Coffer error (collateral unreachable,
configuration).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module
from typing import Final

from coffer import __version__
from coffer.cli._output import Output
from coffer.errors import CofferError, UsageError, VerificationError

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share one exit path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


#: The modules registering the top-level commands, in registration (and help) order.
_MODULES: Final = ("_evidence", "_attest", "_kbs", "_kbs_admin", "_token", "_image", "_policy", "_run",
                   "_quickstart")
#: Which modules define each top-level command. A command line naming one of them imports only those:
#: the modules of the other commands pull in heavy libraries (httpx, cryptography, the KBS server)
#: that ``coffer run`` would otherwise pay for at every start.
_COMMAND_MODULES: Final = {
    "evidence": ("_evidence",),
    "attest": ("_attest",),
    "kbs": ("_kbs", "_kbs_admin"),
    "token": ("_token",),
    "image": ("_image",),
    "policy": ("_policy",),
    **dict.fromkeys(("run", "ps", "logs", "exec", "stop", "rm", "inspect"), ("_run",)),
    "quickstart": ("_quickstart",),
}


def _modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The command modules a command line needs: those of its command, or all of them (help, a
    misspelt command, no command)."""
    for arg in argv:
        if not arg.startswith("-"):
            return _COMMAND_MODULES.get(arg, _MODULES)
        if arg in ("-h", "--help", "--version"):
            break
    return _MODULES


def build_parser() -> argparse.ArgumentParser:
    """The ``coffer`` parser with every command."""
    return _build(_MODULES)


def _build(modules: Sequence[str]) -> argparse.ArgumentParser:
    """The ``coffer`` parser with the commands of ``modules``."""
    parser = _Parser(
        prog="coffer",
        description="Confidential containers with hardware attestation.",
    )
    parser.add_argument("--version", action="version", version=f"coffer {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    for name in modules:
        import_module(f"coffer.cli.{name}").register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args_list
    out = Output(json_mode=json_mode)
    try:
        parser = _build(_modules_for(args_list))
        args = parser.parse_args(args_list)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code: int = args.handler(args, out)
        return code
    except UsageError as exc:
        out.error(str(exc), kind="usage")
        return EXIT_USAGE
    except VerificationError as exc:
        out.rejection(exc)
        return EXIT_REJECTED
    except CofferError as exc:
        out.error(str(exc), kind=type(exc).__name__)
        return EXIT_ERROR
    except KeyboardInterrupt:
        out.error("interrupted", kind="interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
