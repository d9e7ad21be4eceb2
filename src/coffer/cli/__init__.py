"""The ``coffer`` command. Thin: it parses arguments, calls the library and prints.

Exit codes: 0 success, 1 the thing asked about was refused (evidence rejected, policy denied),
2 usage errors (bad options, unreadable files), 3 any other Coffer error (collateral unreachable,
configuration).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from coffer import __version__
from coffer.cli import _attest, _evidence, _image, _kbs, _kbs_admin, _policy, _quickstart, _run, _token
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coffer",
        description="Confidential containers with hardware attestation.",
    )
    parser.add_argument("--version", action="version", version=f"coffer {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    _evidence.register(groups)
    _attest.register(groups)
    _kbs.register(groups)
    _kbs_admin.register(groups)
    _token.register(groups)
    _image.register(groups)
    _policy.register(groups)
    _run.register(groups)
    _quickstart.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args_list
    out = Output(json_mode=json_mode)
    try:
        parser = build_parser()
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
