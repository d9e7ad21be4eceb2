"""``coffer kbs admin ...`` and ``coffer kbs audit``: administer a running KBS over its admin API.

``keygen`` and ``token`` work offline (an admin key pair, and bearer tokens signed with it). Every
other command talks HTTP to ``--kbs URL`` (or ``$COFFER_KBS_URL``) with the admin token from
``--token``, ``--token-file`` or ``$COFFER_KBS_ADMIN_TOKEN``.

Resource contents are never printed unless asked for with ``--out -``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from coffer._internal.clock import as_utc, parse_reference_time, utc_now
from coffer._internal.files import read_bounded_text
from coffer.cli._output import Output
from coffer.errors import ProtocolError, UsageError
from coffer.kbs import admin, admin_client

URL_ENV = "COFFER_KBS_URL"
TOKEN_ENV = "COFFER_KBS_ADMIN_TOKEN"  # noqa: S105  (a variable name, not a secret)
MAX_UPLOAD = 2 * 1024 * 1024
MAX_POLICY_FILE = 256 * 1024
DEFAULT_TOKEN_TTL = "1h"  # noqa: S105  (a duration)

_DURATION = re.compile(r"\A(\d+)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

_EPILOG = """\
Remote commands need --kbs URL (or $COFFER_KBS_URL) and an admin token: --token, --token-file or
$COFFER_KBS_ADMIN_TOKEN. Create a key pair with `coffer kbs admin keygen`, put the public key into the
[admin] section of the KBS configuration, then mint tokens with `coffer kbs admin token`.
"""


# --------------------------------------------------------------------------------------------------
# Registration


def _kbs_commands(groups: Any) -> Any:
    """The sub-command table of ``coffer kbs``, created on first use. Same convention as
    :func:`coffer.cli._kbs.kbs_commands` (the table is kept as the parser default ``_kbs_commands``),
    so the two modules can register in either order."""
    parser = getattr(groups, "choices", {}).get("kbs")
    if parser is None:
        parser = groups.add_parser("kbs", help="run and administer the key broker service",
                                   description="Key broker service (KBS) and attestation service.")
        parser.set_defaults(_kbs_commands=parser.add_subparsers(dest="kbs_command", metavar="SUBCOMMAND"))
    commands = parser.get_default("_kbs_commands")
    if commands is None:  # made by someone else without the convention: find its sub-command table
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if commands is None:
        commands = parser.add_subparsers(dest="kbs_command", metavar="SUBCOMMAND")
        parser.set_defaults(_kbs_commands=commands)
    return commands


def register(groups: Any) -> None:
    """Add ``admin`` and ``audit`` under ``coffer kbs`` (creating ``kbs`` if no one else did yet)."""
    kbs = _kbs_commands(groups)

    remote = argparse.ArgumentParser(add_help=False)
    conn = remote.add_argument_group("connection")
    conn.add_argument("--kbs", metavar="URL", default=os.environ.get(URL_ENV),
                      help=f"KBS base URL, e.g. http://127.0.0.1:8080 (default ${URL_ENV})")
    conn.add_argument("--token", metavar="JWT", help=f"admin token (default ${TOKEN_ENV})")
    conn.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the admin token")
    conn.add_argument("--cacert", type=Path, metavar="PEM", help="CA bundle to verify an HTTPS KBS")
    conn.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="HTTP timeout")
    conn.add_argument("--json", action="store_true", help="machine-readable output")

    group = kbs.add_parser("admin", help="administer a running KBS (resources, policies, reference values)",
                           description="Administer a running KBS through its admin API.", epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    group.set_defaults(handler=None)
    cmds = group.add_subparsers(dest="admin_command", metavar="SUBCOMMAND")

    keygen = cmds.add_parser("keygen", help="create an admin signing key pair",
                             description="Write a new admin key pair: <name>.key (private, mode 0600) "
                                         "and <name>.pub (public, for the KBS [admin] configuration).")
    keygen.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR", help="where to write")
    keygen.add_argument("--name", default="admin", help="file name stem (default admin)")
    keygen.add_argument("--kind", choices=("ed25519", "p256"), default="ed25519",
                        help="ed25519 (EdDSA tokens, default) or p256 (ES256 tokens)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(handler=run_keygen)

    token = cmds.add_parser("token", help="mint an admin bearer token",
                            description="Sign an admin token with a private key from `keygen`.")
    token.add_argument("--key", type=Path, required=True, metavar="PRIV", help="admin private key (PEM)")
    token.add_argument("--role", required=True, choices=admin.ROLES, help="role claim")
    token.add_argument("--ttl", default=DEFAULT_TOKEN_TTL, metavar="DURATION",
                       help="lifetime: seconds or N[s|m|h|d] (default 1h)")
    token.add_argument("--issuer", help="iss claim (when the KBS requires one)")
    token.add_argument("--audience", action="append", default=[], help="aud claim (repeatable)")
    token.add_argument("--subject", help="sub claim (who is acting; shows in the audit log)")
    token.add_argument("--kid", help="key id header (default: the key's JWK thumbprint)")
    token.add_argument("--out", type=Path, metavar="FILE", help="write the token to FILE (mode 0600)")
    token.add_argument("--json", action="store_true", help="machine-readable output")
    token.set_defaults(handler=run_token)

    resource = cmds.add_parser("resource", help="store, read, delete and list resources")
    resource.set_defaults(handler=None)
    rcmds = resource.add_subparsers(dest="resource_command", metavar="SUBCOMMAND")
    put = rcmds.add_parser("put", parents=[remote], help="store a resource",
                           description="Store FILE (or stdin with -) as resource REPO/TYPE/TAG.")
    put.add_argument("path", metavar="REPO/TYPE/TAG")
    put.add_argument("file", metavar="FILE", help="content, or - for stdin")
    put.set_defaults(handler=run_resource_put)
    get = rcmds.add_parser("get", parents=[remote], help="read a resource back",
                           description="Fetch a resource's plaintext. It is written only to --out "
                                       "(FILE, or - for stdout); otherwise only its size is shown.")
    get.add_argument("path", metavar="REPO/TYPE/TAG")
    get.add_argument("--out", metavar="FILE", help="write the content here (- for stdout)")
    get.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    get.set_defaults(handler=run_resource_get)
    delete = rcmds.add_parser("delete", parents=[remote], help="delete a resource")
    delete.add_argument("path", metavar="REPO/TYPE/TAG")
    delete.set_defaults(handler=run_resource_delete)
    lst = rcmds.add_parser("list", parents=[remote], help="list resource paths")
    lst.set_defaults(handler=run_resource_list)

    policy = cmds.add_parser("policy", help="set and show the resource and attestation policies")
    policy.set_defaults(handler=None)
    pcmds = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    pset = pcmds.add_parser("set", parents=[remote], help="install a Rego policy",
                            description="Install a Rego policy (compiled by the KBS before it is used).")
    pset.add_argument("kind", choices=("resource", "attestation"))
    pset.add_argument("file", type=Path, metavar="REGO")
    pset.add_argument("--id", default=admin.DEFAULT_ATTESTATION_POLICY_ID,
                      help=f"attestation policy id (default {admin.DEFAULT_ATTESTATION_POLICY_ID})")
    pset.set_defaults(handler=run_policy_set)
    pget = pcmds.add_parser("get", parents=[remote], help="print a policy")
    pget.add_argument("kind", choices=("resource", "attestation"))
    pget.add_argument("--id", default=admin.DEFAULT_ATTESTATION_POLICY_ID,
                      help=f"attestation policy id (default {admin.DEFAULT_ATTESTATION_POLICY_ID})")
    pget.set_defaults(handler=run_policy_get)

    rv = cmds.add_parser("reference-value", help="manage reference values",
                         description="Reference values the attestation policy compares claims with.")
    rv.set_defaults(handler=None)
    rvcmds = rv.add_subparsers(dest="rv_command", metavar="SUBCOMMAND")
    rvadd = rvcmds.add_parser("add", parents=[remote], help="add reference values",
                              description="Add NAME = VALUE... (typed by NAME), or post an RVPS message "
                                          "with --rvps FILE.")
    rvadd.add_argument("name", nargs="?", help="reference value name, e.g. measurement, mr_td, pcr11")
    rvadd.add_argument("values", nargs="*", metavar="VALUE", help="accepted values (hex digests, numbers)")
    rvadd.add_argument("--rvps", type=Path, metavar="FILE", help="an RVPS message (JSON) instead")
    rvadd.add_argument("--expires", metavar="ISO-8601", help="expiry (default: the service's)")
    rvadd.add_argument("--provenance", metavar="TEXT", help="where the values come from")
    rvadd.set_defaults(handler=run_rv_add)
    rvlist = rvcmds.add_parser("list", parents=[remote], help="list reference values")
    rvlist.set_defaults(handler=run_rv_list)
    rvget = rvcmds.add_parser("get", parents=[remote], help="show one reference value")
    rvget.add_argument("name")
    rvget.set_defaults(handler=run_rv_get)
    rvdel = rvcmds.add_parser("delete", parents=[remote], help="delete a reference value")
    rvdel.add_argument("name")
    rvdel.set_defaults(handler=run_rv_delete)

    audit = kbs.add_parser("audit", parents=[remote], help="query the KBS audit log",
                           description="Resource releases and denials, attestations and admin changes.",
                           epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("--since", metavar="ISO-8601", help="events at or after this time")
    audit.add_argument("--until", metavar="ISO-8601", help="events at or before this time")
    audit.add_argument("--resource", metavar="REPO/TYPE/TAG", help="events about this resource/subject")
    audit.add_argument("--action", help="release, deny, attest, attest_failed or admin")
    audit.add_argument("--limit", type=int, default=1000, help="at most this many events (default 1000)")
    audit.set_defaults(handler=run_audit)


# --------------------------------------------------------------------------------------------------
# Offline commands


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise UsageError(f"not a duration: {text!r} (seconds, or N followed by s, m, h or d)")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _write_new(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UsageError(f"{path} exists (use --force to overwrite)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_keygen(args: argparse.Namespace, out: Output) -> int:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = admin.generate_admin_key(args.kind)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    out_dir: Path = args.out_dir
    if not out_dir.exists():
        try:
            out_dir.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create {out_dir}: {exc.strerror}") from exc
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a directory")
    private_path = out_dir / f"{args.name}.key"
    public_path = out_dir / f"{args.name}.pub"
    if not args.force:
        for path in (private_path, public_path):
            if path.exists():
                raise UsageError(f"{path} exists (use --force to overwrite)")
    _write_new(private_path, private_pem, mode=0o600, force=args.force)
    _write_new(public_path, public_pem, mode=0o644, force=args.force)
    out.result({
        "private_key": str(private_path),
        "public_key": str(public_path),
        "algorithm": "EdDSA" if args.kind == "ed25519" else "ES256",
        "kid": admin.key_thumbprint(key.public_key()),
        "config": f'[[admin.keys]]\nid = "{args.name}"\npublic_key = "{public_path.resolve()}"',
    }, title="admin key pair written")
    return 0


def run_token(args: argparse.Namespace, out: Output) -> int:
    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.key}: {exc.strerror}") from exc
    key = admin.load_admin_private_key(pem, str(args.key))
    ttl = parse_duration(args.ttl)
    now = utc_now()
    kid = args.kid or admin.key_thumbprint(key.public_key())
    token = admin.mint_admin_token(key, role=args.role, now=now, ttl=ttl, issuer=args.issuer,
                                   audience=args.audience or None, subject=args.subject, kid=kid)
    if args.out is not None:
        _write_new(args.out, token.encode("ascii") + b"\n", mode=0o600, force=True)
    if args.json:
        out.result({"token": token, "role": args.role, "kid": kid,
                    "expires_at": (now + ttl).replace(microsecond=0).isoformat().replace("+00:00", "Z")})
    elif args.out is None:
        sys.stdout.write(token + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# HTTP


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token).strip()
    if args.token_file is not None:
        try:
            text: str = args.token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the admin token from {args.token_file}") from exc
        if not text:
            raise UsageError(f"{args.token_file} is empty")
        return text
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    raise UsageError(f"no admin token: use --token, --token-file or ${TOKEN_ENV}")


def _base_url(args: argparse.Namespace) -> str:
    url = args.kbs
    if not url:
        raise UsageError(f"no KBS URL: use --kbs URL or ${URL_ENV}")
    if not str(url).startswith(("http://", "https://")):
        raise UsageError(f"--kbs must be an http:// or https:// URL, got {url!r}")
    return str(url).rstrip("/")


def _http_client(args: argparse.Namespace) -> httpx.Client:
    """The HTTP client for one command (tests replace this to talk to an in-process app)."""
    verify: Any = str(args.cacert) if args.cacert is not None else True
    return httpx.Client(base_url=_base_url(args), timeout=args.timeout, verify=verify)


def _call(args: argparse.Namespace, method: str, path: str, *, content: bytes | None = None,
          json_body: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
          headers: Mapping[str, str] | None = None) -> httpx.Response:
    with admin_client.AdminClient(_token(args), client=_http_client(args)) as client:
        return client.request(method, path, content=content, json_body=json_body, params=params,
                              headers=headers)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ProtocolError("SerdeError", "KBS answer is not JSON") from exc


def _resource_path(text: str) -> str:
    return admin_client.resource_path(text)


# --------------------------------------------------------------------------------------------------
# Remote commands


def run_resource_put(args: argparse.Namespace, out: Output) -> int:
    path = _resource_path(args.path)
    if args.file == "-":
        data = sys.stdin.buffer.read(MAX_UPLOAD + 1)
    else:
        try:
            with open(args.file, "rb") as handle:
                data = handle.read(MAX_UPLOAD + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc
    if len(data) > MAX_UPLOAD:
        raise UsageError(f"resource larger than {MAX_UPLOAD} bytes")
    _call(args, "POST", f"/kbs/v0/resource/{path}", content=data,
          headers={"Content-Type": "application/octet-stream"})
    out.result({"ok": True, "resource": path, "size": len(data)}, title=f"stored {path}")
    return 0


def run_resource_get(args: argparse.Namespace, out: Output) -> int:
    path = _resource_path(args.path)
    data = _call(args, "GET", f"/kbs/v0/resources/{path}").content
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    if args.out:
        _write_new(Path(args.out), data, mode=0o600, force=args.force)
    out.result({"ok": True, "resource": path, "size": len(data), "written_to": args.out},
               title=f"resource {path}")
    return 0


def run_resource_delete(args: argparse.Namespace, out: Output) -> int:
    path = _resource_path(args.path)
    _call(args, "DELETE", f"/kbs/v0/resource/{path}")
    out.result({"ok": True, "resource": path, "deleted": True}, title=f"deleted {path}")
    return 0


def run_resource_list(args: argparse.Namespace, out: Output) -> int:
    body = _json(_call(args, "GET", "/kbs/v0/resources"))
    paths = body.get("resources", []) if isinstance(body, dict) else []
    if args.json:
        out.result({"resources": paths})
    else:
        sys.stdout.write("".join(f"{p}\n" for p in paths))
    return 0


def _read_policy(path: Path) -> str:
    return read_bounded_text(path, "policy file", MAX_POLICY_FILE)

def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def run_policy_set(args: argparse.Namespace, out: Output) -> int:
    text = _read_policy(args.file)
    if args.kind == "resource":
        _call(args, "POST", "/kbs/v0/resource-policy", json_body={"policy": _b64url(text)})
        out.result({"ok": True, "policy": "resource-policy"}, title="resource policy installed")
    else:
        _call(args, "POST", "/kbs/v0/attestation-policy",
              json_body={"type": "rego", "policy_id": args.id, "policy": _b64url(text)})
        out.result({"ok": True, "policy": args.id}, title=f"attestation policy {args.id} installed")
    return 0


def run_policy_get(args: argparse.Namespace, out: Output) -> int:
    path = "/kbs/v0/resource-policy" if args.kind == "resource" else f"/kbs/v0/attestation-policy/{args.id}"
    body = _json(_call(args, "GET", path))
    encoded = body.get("policy") if isinstance(body, dict) else None
    if not isinstance(encoded, str):
        raise ProtocolError("SerdeError", "KBS answer has no policy")
    text = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8", "replace")
    if args.json:
        out.result({**{k: v for k, v in body.items() if k != "policy"}, "policy": text})
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def run_rv_add(args: argparse.Namespace, out: Output) -> int:
    if args.rvps is not None:
        if args.name or args.values:
            raise UsageError("give either --rvps FILE or NAME VALUE..., not both")
        try:
            message = json.loads(args.rvps.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read an RVPS message (JSON) from {args.rvps}") from exc
        if not isinstance(message, dict):
            raise UsageError(f"{args.rvps}: an RVPS message is a JSON object")
        body: dict[str, Any] = message
    else:
        if not args.name or not args.values:
            raise UsageError("reference-value add needs NAME and at least one VALUE (or --rvps FILE)")
        body = {"name": args.name, "values": list(args.values)}
        if args.provenance:
            body["provenance"] = args.provenance
        if args.expires:
            body["expires"] = as_utc(parse_reference_time(args.expires)).isoformat().replace("+00:00", "Z")
    answer = _call(args, "POST", "/kbs/v0/reference-value", json_body=body)
    result = _json(answer) if answer.content else {}
    out.result({"ok": True, **(result if isinstance(result, dict) else {})}, title="reference values added")
    return 0


def run_rv_list(args: argparse.Namespace, out: Output) -> int:
    body = _json(_call(args, "GET", "/kbs/v0/reference-value"))
    out.result(body if isinstance(body, dict) else {"reference_values": body}, title="reference values")
    return 0


def run_rv_get(args: argparse.Namespace, out: Output) -> int:
    body = _json(_call(args, "GET", f"/kbs/v0/reference-value/{args.name}"))
    out.result(body if isinstance(body, dict) else {"value": body}, title=f"reference value {args.name}")
    return 0


def run_rv_delete(args: argparse.Namespace, out: Output) -> int:
    _call(args, "DELETE", f"/kbs/v0/reference-value/{args.name}")
    out.result({"ok": True, "name": args.name, "deleted": True}, title=f"deleted {args.name}")
    return 0


def run_audit(args: argparse.Namespace, out: Output) -> int:
    params: dict[str, Any] = {"limit": args.limit, "action": args.action}
    if args.resource:
        params["resource"] = args.resource.removeprefix("kbs:///")
    for name in ("since", "until"):
        value = getattr(args, name)
        if value:
            params[name] = as_utc(parse_reference_time(value)).isoformat().replace("+00:00", "Z")
    body = _json(_call(args, "GET", "/kbs/v0/audit", params=params))
    events = body.get("events", []) if isinstance(body, dict) else []
    if args.json:
        out.result({"events": events})
        return 0
    for event in events:
        claims = event.get("claims") or {}
        who = " ".join(f"{k}={v}" for k, v in claims.items() if not isinstance(v, dict | list))
        detail = f" ({event['detail']})" if event.get("detail") else ""
        sys.stdout.write(f"{event.get('at')} {event.get('action')} {event.get('outcome')} "
                         f"{event.get('subject')}{detail} {who}".rstrip() + "\n")
    return 0
