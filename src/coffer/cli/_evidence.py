"""``coffer evidence show`` and ``coffer evidence verify``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coffer import evidence
from coffer._internal.clock import parse_reference_time, utc_now
from coffer._internal.encoding import decode_binary_file, hex_decode
from coffer.cli._output import Output
from coffer.errors import FormatError, UsageError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.detect import detect_tee
from coffer.evidence.sources import (
    DEFAULT_KDS_URL,
    DEFAULT_PCS_URL,
    CollateralSettings,
    build_collateral_source,
)

MAX_EVIDENCE_FILE = 16 * 1024 * 1024

_VERIFY_EPILOG = """\
Evidence files may be raw binary, hex or base64 (JSON evidence is read as is).
Endorsements (SNP): a VCEK/VLEK certificate file (DER or PEM), or a directory with vcek.der|vcek.pem
or vlek.der|vlek.pem and optionally cert_chain.pem. AMD roots are built in.
Collateral (TDX/SGX): a directory with tcb_info.json, qe_identity.json, tcb_info_issuer_chain.pem,
qe_identity_issuer_chain.pem, pck_crl.der, pck_crl_issuer_chain.pem and root_ca_crl.der.
Exit status: 0 verified, 1 rejected (the failed step is named), 2 usage error, 3 other error.
"""


def register(groups: Any) -> None:
    group = groups.add_parser("evidence", help="decode and verify TEE evidence",
                              description="Decode and verify TEE evidence.")
    commands = group.add_subparsers(dest="command", metavar="SUBCOMMAND")

    show = commands.add_parser("show", help="print the decoded fields of an evidence file",
                               description="Print the decoded fields of an evidence file (nothing is "
                                           "verified).")
    show.add_argument("file", type=Path, help="evidence file (binary, hex, base64 or JSON)")
    show.add_argument("--tee", choices=evidence.TEES, help="evidence type (guessed when omitted)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)

    verify = commands.add_parser(
        "verify", help="verify evidence and print its claims",
        description="Verify evidence against the vendor's roots and print its claims.",
        epilog=_VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("file", type=Path, help="evidence file (binary, hex, base64 or JSON)")
    verify.add_argument("--tee", required=True, choices=evidence.TEES, help="evidence type")
    verify.add_argument("--endorsements", type=Path, metavar="PATH",
                        help="SNP: VCEK/VLEK certificate file or directory")
    verify.add_argument("--collateral", type=Path, metavar="DIR", help="TDX/SGX: Intel collateral directory")
    verify.add_argument("--at", metavar="ISO-8601", help="reference time for validity windows (default: now)")
    verify.add_argument("--expect-report-data", metavar="HEX",
                        help="required report data (zero-padded to the field size where the TEE does)")
    verify.add_argument("--allow-debug", action="store_true",
                        help="accept debug-mode guests (never in production)")
    verify.add_argument("--trusted-ak", type=Path, action="append", default=[], metavar="PEM",
                        help="TPM: an attestation key already trusted (repeatable)")
    verify.add_argument("--fetch", action="store_true",
                        help="fetch missing endorsements/collateral from AMD KDS and Intel PCS (cached)")
    verify.add_argument("--kds-url", default=DEFAULT_KDS_URL, help=argparse.SUPPRESS)
    verify.add_argument("--pcs-url", default=DEFAULT_PCS_URL, help=argparse.SUPPRESS)
    verify.add_argument("--cache-dir", type=Path, 
                        help="collateral cache (default ~/.cache/coffer/collateral)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(handler=run_verify)

    group.set_defaults(handler=None)


def _read_evidence(path: Path, tee: str | None) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_EVIDENCE_FILE:
            raise UsageError(f"{path}: {size} bytes is larger than any evidence ({MAX_EVIDENCE_FILE} max)")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    if tee is not None and evidence.handler(tee).input_kind == "json":
        return data
    if data.lstrip().startswith(b"{"):
        return data
    return decode_binary_file(data, str(path))


def run_show(args: argparse.Namespace, out: Output) -> int:
    data = _read_evidence(args.file, args.tee)
    tee = args.tee or detect_tee(data)
    if tee is None:
        raise UsageError(f"{args.file}: cannot tell which TEE produced this; pass --tee")
    try:
        parsed = evidence.parse(tee, data)
    except FormatError as exc:
        raise UsageError(f"{args.file}: {exc}") from exc
    fields = parsed.to_dict()
    out.result({"tee": tee, **{k: v for k, v in fields.items() if k != "tee"}},
               title=f"{args.file} ({tee} evidence, not verified)")
    return 0


def _load_trusted_keys(paths: list[Path]) -> tuple[bytes, ...]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    keys: list[bytes] = []
    for path in paths:
        try:
            raw = path.read_bytes()
            key = (serialization.load_pem_public_key(raw) if b"-----BEGIN" in raw
                   else serialization.load_der_public_key(raw))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--trusted-ak {path}: not a readable PEM or DER public key") from exc
        keys.append(key.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return tuple(keys)


def run_verify(args: argparse.Namespace, out: Output) -> int:
    for option, path in (("--endorsements", args.endorsements), ("--collateral", args.collateral)):
        if path is not None and not path.exists():
            raise UsageError(f"{option} {path}: no such file or directory")
    data = _read_evidence(args.file, args.tee)
    expected = None
    if args.expect_report_data is not None:
        try:
            expected = hex_decode(args.expect_report_data, "--expect-report-data")
        except FormatError as exc:
            raise UsageError(str(exc)) from exc
    options = VerifyOptions(
        at=parse_reference_time(args.at) if args.at else utc_now(),
        expected_report_data=expected,
        allow_debug=args.allow_debug,
        trusted_keys=_load_trusted_keys(args.trusted_ak),
    )
    source = build_collateral_source(CollateralSettings(
        endorsements=args.endorsements,
        collateral_dir=args.collateral,
        fetch=args.fetch,
        kds_url=args.kds_url,
        pcs_url=args.pcs_url,
        cache_dir=args.cache_dir,
    ))
    claims = evidence.verify(args.tee, data, collateral=source, options=options)
    body = claims.to_dict()
    result = {"ok": True, "verified_at": options.at.isoformat().replace("+00:00", "Z"), **body}
    title = f"OK: {args.tee} evidence verified"
    if claims.insecure:
        title += " (INSECURE: development root of trust, not hardware)"
    out.result(result, title=title)
    return 0
