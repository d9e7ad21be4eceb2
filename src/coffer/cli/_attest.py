"""``coffer attest``: attest this guest to a KBS and fetch resources (the guest side of the protocol)."""

from __future__ import annotations

import argparse
import os
import re
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from coffer.attestation.binding import MAX_INITDATA_BYTES, InitData, initdata_digest
from coffer.cli._output import Output
from coffer.errors import FormatError, ProtocolError, UsageError
from coffer.guest.attesters import TEES as ATTESTER_TEES
from coffer.guest.attesters import attester_for
from coffer.kbs.client import KbsClient, token_claims
from coffer.kbs.jwe import KEY_KINDS, TeeKeyPair
from coffer.kbs.protocol import parse_resource_uri

_INTEGER = re.compile(r"\A(?:0[xX][0-9a-fA-F]+|0|[1-9][0-9]*)\Z")

EXIT_OK = 0
EXIT_REFUSED = 1

_EPILOG = """\
Each --resource is fetched after the handshake and decrypted with this run's ephemeral key.
Secrets are never printed: without --out only their sizes are shown. --out FILE takes one
resource; with several resources --out names a directory (written as DIR/<repo>/<type>/<tag>).
--out - writes the single resource's bytes to standard output (the summary then goes to stderr).
The token claims shown are decoded, not verified (use `coffer token verify`).
Exit status: 0 success, 1 the KBS refused (attestation or policy), 2 usage error, 3 other error.
"""


def register(groups: Any) -> None:
    parser = groups.add_parser(
        "attest", help="attest to a KBS and fetch resources",
        description="Run the KBS handshake (protocol 0.4.0) with this guest's TEE evidence and fetch "
                    "resources.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kbs", required=True, metavar="URL", help="KBS address, e.g. http://127.0.0.1:8080")
    parser.add_argument("--tee", required=True, choices=ATTESTER_TEES, help="TEE whose evidence to send")
    parser.add_argument("--resource", action="append", default=[], metavar="kbs:///REPO/TYPE/TAG",
                        help="resource to fetch (repeatable)")
    parser.add_argument("--out", metavar="FILE|DIR|-", help="where to write fetched resources")
    parser.add_argument("--initdata", type=Path, metavar="FILE",
                        help="initdata TOML to send with the evidence")
    parser.add_argument("--token-out", type=Path, metavar="FILE",
                        help="also write the attestation token here")
    parser.add_argument("--key-type", choices=KEY_KINDS, default="ec-p256",
                        help="ephemeral TEE key the resources are wrapped to (default ec-p256)")
    parser.add_argument("--attester-option", action="append", default=[], metavar="KEY=VALUE",
                        help="attester option (repeatable): tcti=..., root=..., form=signed; "
                             "integer values (42, 0x81010002) are passed as integers")
    parser.add_argument("--ca-cert", type=Path, metavar="PEM", help="CA bundle to verify an https KBS")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="HTTP timeout")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_attest)


def attester_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"--attester-option expects KEY=VALUE, got {pair!r}")
        options[key] = int(value, 0) if _INTEGER.match(value) else value
    return options


def _read_initdata(path: Path) -> tuple[InitData, bytes]:
    """The initdata document to send, and its digest (checked here so a bad file fails early)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_INITDATA_BYTES:
        raise UsageError(f"{path}: initdata larger than {MAX_INITDATA_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        _, digest = initdata_digest(raw)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: initdata is not UTF-8 text") from exc
    except FormatError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    return InitData(format="toml", body=text), digest


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kbs_transport(ca_cert: Path | None) -> httpx.BaseTransport | None:
    """The HTTP transport for a KBS whose TLS certificate chains to ``ca_cert`` (None: the default)."""
    if ca_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"{ca_cert}: not a usable CA bundle ({exc})") from exc
    return httpx.HTTPTransport(verify=context)


def run_attest(args: argparse.Namespace, out: Output) -> int:
    resources = [parse_resource_uri_or_usage(r) for r in args.resource]
    to_stdout = args.out == "-"
    if to_stdout and len(resources) != 1:
        raise UsageError("--out - needs exactly one --resource")
    if args.out is not None and not resources:
        raise UsageError("--out needs a --resource")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    options = attester_options(args.attester_option)
    init_data = None
    if args.initdata is not None:
        init_data, digest = _read_initdata(args.initdata)
        if args.tee == "sample":
            # No host sets a launch-time register for the sample TEE: its evidence carries the digest.
            options.setdefault("init_data", digest)
    try:
        attester = attester_for(args.tee, **options)
    except (TypeError, ValueError) as exc:  # an option the attester does not take, or a bad value
        raise UsageError(f"--attester-option for {args.tee}: {exc}") from exc
    report = Output(json_mode=out.json_mode, stdout=sys.stderr) if to_stdout else out

    summary: dict[str, Any] = {"kbs": args.kbs, "tee": args.tee}
    fetched: list[dict[str, Any]] = []
    with KbsClient(args.kbs, attester, key=TeeKeyPair.generate(args.key_type), init_data=init_data,
                   transport=kbs_transport(args.ca_cert), timeout=args.timeout) as client:
        try:
            token = client.attest()
            for resource in resources:
                data = client.get_resource(resource)
                fetched.append(_deliver(resource, data, args.out, several=len(resources) > 1))
        except ProtocolError as exc:
            report.error(str(exc), kind=exc.kind)
            return EXIT_REFUSED
        if args.token_out is not None:
            write_private(args.token_out, token.encode("ascii") + b"\n")
            summary["token_written_to"] = str(args.token_out)
        if client.report_data is not None:
            summary["report_data"] = client.report_data.hex()
    try:
        summary["token_claims"] = token_claims(token)
    except FormatError:
        summary["token_claims"] = None
    summary["resources"] = fetched
    report.result(summary, title="attested")
    return EXIT_OK


def parse_resource_uri_or_usage(uri: str) -> str:
    try:
        return parse_resource_uri(uri)
    except ProtocolError as exc:
        raise UsageError(f"--resource {uri!r}: expected kbs:///<repository>/<type>/<tag>") from exc


def _deliver(resource: str, data: bytes, target: str | None, *, several: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": resource, "bytes": len(data)}
    if target is None:
        return entry
    if target == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        entry["written_to"] = "-"
        return entry
    path = Path(target) / resource if several else Path(target)
    if not several and path.is_dir():
        path = path / resource.replace("/", "_")
    write_private(path, data)
    entry["written_to"] = str(path)
    return entry
