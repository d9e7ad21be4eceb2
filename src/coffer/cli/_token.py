"""``coffer token verify``: check an EAR attestation token against the attestation service's keys."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from coffer._internal.clock import parse_reference_time, utc_now
from coffer.attestation.token import TokenVerifier, b64url_decode
from coffer.cli._output import Output
from coffer.errors import ProtocolError, TransportError, UsageError

MAX_TOKEN_FILE = 1024 * 1024
MAX_JWKS_BYTES = 1024 * 1024

_EPILOG = """\
TOKEN is the compact JWT itself, a file holding it, or - for standard input.
--jwks names the trusted keys: a JWKS/JWK JSON file, or a URL such as
http://kbs.example:8080/.well-known/jwks.json.
Exit status: 0 valid, 1 rejected (bad signature, expired, untrusted key), 2 usage error, 3 other error.
"""


def register(groups: Any) -> None:
    group = groups.add_parser("token", help="inspect and verify attestation tokens",
                              description="Inspect and verify EAR attestation tokens.")
    commands = group.add_subparsers(dest="command", metavar="SUBCOMMAND")
    verify = commands.add_parser(
        "verify", help="verify a token's signature and validity and print its claims",
        description="Verify an EAR token (ES256) against trusted keys and print its claims.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("token", metavar="TOKEN|FILE", help="the token, a file holding it, or -")
    verify.add_argument("--jwks", metavar="FILE|URL", help="trusted keys (JWKS file or URL)")
    verify.add_argument("--at", metavar="ISO-8601", help="check exp/iat at this time (default: now)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(handler=run_verify)
    group.set_defaults(handler=None)


_COMPACT_JWS = re.compile(r"\A[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")


def _is_file(arg: str) -> bool:
    try:
        return len(arg) < 4096 and Path(arg).is_file()
    except OSError:
        return False


def _read_token(arg: str) -> str:
    if arg == "-":
        text = sys.stdin.read(MAX_TOKEN_FILE)
    elif _COMPACT_JWS.match(arg) and not _is_file(arg):
        text = arg
    else:
        path = Path(arg)
        try:
            if path.stat().st_size > MAX_TOKEN_FILE:
                raise UsageError(f"{path}: larger than any token")
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read token file {path}: {exc}") from exc
    token = text.strip()
    if token.startswith("{"):  # {"token": "..."} as /kbs/v0/attest answers
        try:
            doc = json.loads(token)
        except ValueError as exc:
            raise UsageError("the token file is JSON but not valid") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
            raise UsageError("a JSON token file must hold {\"token\": \"...\"}")
        token = doc["token"].strip()
    return token


def _load_jwks(source: str) -> Any:
    if source.startswith(("http://", "https://")):
        import httpx  # noqa: PLC0415

        try:
            response = httpx.get(source, timeout=10, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot fetch {source}: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise TransportError(f"{source} answered HTTP {response.status_code}")
        raw = response.content[:MAX_JWKS_BYTES + 1]
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --jwks {source}: {exc.strerror}") from exc
    if len(raw) > MAX_JWKS_BYTES:
        raise UsageError(f"--jwks {source}: too large")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"--jwks {source}: not JSON") from exc
    if not isinstance(doc, dict | list):
        raise UsageError(f"--jwks {source}: not a JWKS, JWK or list of JWKs")
    return doc


def _summary(claims: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"issuer": claims.get("iss"), "issued_at": claims.get("iat"),
                           "expires_at": claims.get("exp")}
    submods = claims.get("submods")
    if isinstance(submods, dict):
        for name, submod in submods.items():
            if not isinstance(submod, dict):
                continue
            evidence = submod.get("ear.veraison.annotated-evidence")
            common = ("report_data", "init_data", "runtime_data_claims", "init_data_claims")
            tees = [k for k in evidence if k not in common] if isinstance(evidence, dict) else []
            out[name] = {"status": submod.get("ear.status"), "tee": ",".join(tees),
                         "trust_vector": submod.get("ear.trustworthiness-vector"),
                         "policy": submod.get("ear.appraisal-policy-id")}
    return out


def run_verify(args: argparse.Namespace, out: Output) -> int:
    if not args.jwks:
        raise UsageError("--jwks FILE|URL is required: the token is only as good as the key that signed it")
    token = _read_token(args.token)
    verifier = TokenVerifier(_load_jwks(args.jwks))
    if verifier.key_count == 0:
        raise UsageError(f"--jwks {args.jwks}: holds no ES256 (EC P-256) key")
    at = parse_reference_time(args.at) if args.at else utc_now()
    try:
        claims = verifier.verify(token, now=at)
    except ProtocolError as exc:
        out.error(f"token rejected: {exc.detail}", kind="token_rejected")
        return 1
    header = json.loads(b64url_decode(token.split(".")[0], "token header"))
    result = {"ok": True, "verified_at": at.isoformat().replace("+00:00", "Z"),
              "kid": header.get("kid"), "summary": _summary(claims), "claims": claims}
    out.result(result, title="OK: token signature and validity verified")
    return 0
