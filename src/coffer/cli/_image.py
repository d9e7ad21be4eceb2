"""``coffer image ...``: copy, encrypt, decrypt, sign, verify, protect, inspect and unpack images.

Images are named as skopeo and podman users know them: ``oci:PATH[:TAG]``,
``docker-archive:PATH[:REF]`` and ``docker://HOST/REPO:TAG``. The commands are thin: each parses its
options and calls :mod:`coffer.image`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from coffer.cli._attest import attester_options, kbs_transport
from coffer.cli._output import Output
from coffer.cli._progress import ProgressLine
from coffer.errors import ProtocolError, UsageError
from coffer.guest.attesters import TEES as ATTESTER_TEES
from coffer.guest.attesters import attester_for
from coffer.image import keys as image_keys
from coffer.image import ocicrypt
from coffer.image.locations import open_destination, open_source
from coffer.image.pipeline import (
    CopyResult,
    DecryptLayers,
    EncryptLayers,
    LayerTransform,
    copy_image,
    describe_image,
    parse_layers,
    parse_platform,
    unpack_from_source,
)
from coffer.image.reference import ImageRef, parse_reference
from coffer.image.transport import Progress, TransportOptions, no_progress
from coffer.kbs.admin_client import AdminClient
from coffer.kbs.client import KbsClient
from coffer.kbs.jwe import TeeKeyPair

EXIT_OK = 0
EXIT_REFUSED = 1
KBS_URL_ENV = "COFFER_KBS_URL"
ADMIN_TOKEN_ENV = "COFFER_KBS_ADMIN_TOKEN"  # noqa: S105 - a variable name
REGISTRY_PASSWORD_ENV = "COFFER_REGISTRY_PASSWORD"  # noqa: S105 - a variable name

_EPILOG = """\
Image names: oci:PATH[:TAG], docker-archive:PATH[:NAME:TAG|:@N], docker://HOST/REPO[:TAG|@DIGEST].
Registries: https by default (--ca-cert for a private CA); --insecure allows plain http to a loopback
registry only. Credentials: --creds USER[:PASSWORD] (password also from $COFFER_REGISTRY_PASSWORD),
else the containers auth file ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
~/.docker/config.json).
Exit status: 0 success, 1 refused (verification failed, KBS refused), 2 usage error, 3 other error.
"""


# --------------------------------------------------------------------------------------------------
# Registration


def register(groups: Any) -> None:
    parser = groups.add_parser(
        "image", help="protect images: encrypt, decrypt, sign, verify, unpack",
        description="Make an existing image confidential and tamper-evident without rebuilding it.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="image_command", metavar="SUBCOMMAND")

    copy = _command(commands, "copy", "copy an image between oci:, docker-archive: and docker://",
                    run_copy, two_refs=True)
    _platform_option(copy, all_allowed=True)

    encrypt = _command(commands, "encrypt", "encrypt layers (ocicrypt, skopeo/containerd compatible)",
                       run_encrypt, two_refs=True)
    _encryption_options(encrypt)
    _platform_option(encrypt, all_allowed=True)

    decrypt = _command(commands, "decrypt", "decrypt layers with a private key or a key from the KBS",
                       run_decrypt, two_refs=True)
    _decryption_options(decrypt)
    _platform_option(decrypt, all_allowed=True)

    unpack = _command(commands, "unpack", "unpack an image into a root filesystem directory (safely)",
                      run_unpack, two_refs=False)
    unpack.add_argument("directory", type=Path, metavar="DIR", help="new (or empty) directory")
    _decryption_options(unpack, required=False)
    _platform_option(unpack, all_allowed=False)

    inspect = _command(commands, "inspect", "show an image's digests, platforms and layers",
                       run_inspect, two_refs=False)
    _platform_option(inspect, all_allowed=True)

    parser.set_defaults(handler=lambda args, out: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _command(commands: Any, name: str, help_text: str, handler: Any, *,
             two_refs: bool) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if two_refs:
        sub.add_argument("source", metavar="SRC", help="source image")
        sub.add_argument("destination", metavar="DST", help="destination image (must not exist yet)")
        sub.add_argument("--src-creds", metavar="USER[:PASSWORD]", help="source registry credentials")
        sub.add_argument("--dest-creds", metavar="USER[:PASSWORD]", help="destination registry credentials")
    else:
        sub.add_argument("image", metavar="IMAGE", help="image")
        sub.add_argument("--creds", metavar="USER[:PASSWORD]", help="registry credentials")
    sub.add_argument("--insecure", action="store_true",
                     help="allow plain http to a registry on a loopback address")
    sub.add_argument("--ca-cert", type=Path, metavar="PEM", help="CA bundle for registries' TLS")
    sub.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="network timeout")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sub.set_defaults(handler=handler)
    return sub


def _platform_option(parser: argparse.ArgumentParser, *, all_allowed: bool) -> None:
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]" + ("|all" if all_allowed else ""),
                        help="which manifest of a multi-platform image (default: this machine's"
                             + ("; others are copied unchanged" if all_allowed else "") + ")")


def _encryption_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", action="append", default=[], metavar="kbs:///REPO/key/NAME",
                        help="key-encryption key in the KBS (reused if present, else generated and "
                             "uploaded through the admin API); repeatable")
    parser.add_argument("--recipient", action="append", default=[], metavar="jwe:PUBLIC.pem",
                        help="JWE recipient public key or certificate; repeatable")
    parser.add_argument("--layers", default="all", metavar="all|last|N,…",
                        help="which layers to encrypt (0 is the base layer; negative counts from the top)")
    parser.add_argument("--kbs", metavar="URL", help=f"KBS for --key (default ${KBS_URL_ENV})")
    parser.add_argument("--admin-token", metavar="TOKEN",
                        help=f"KBS admin token (default ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--admin-token-file", type=Path, metavar="FILE", help="read the admin token here")
    parser.add_argument("--kbs-ca-cert", type=Path, metavar="PEM", help="CA bundle for an https KBS")


def _decryption_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--key-file", action="append", default=[], type=Path, metavar="PRIVATE.pem",
                        help="JWE private key (PEM or DER); repeatable")
    parser.add_argument("--key-password-file", type=Path, metavar="FILE",
                        help="password of encrypted --key-file keys")
    parser.add_argument("--kbs", metavar="URL",
                        help="fetch key-encryption keys from this KBS after attesting (needs --tee)")
    parser.add_argument("--tee", choices=ATTESTER_TEES, help="TEE whose evidence to present to the KBS")
    parser.add_argument("--attester-option", action="append", default=[], metavar="KEY=VALUE",
                        help="attester option (repeatable), as for `coffer attest`")
    parser.add_argument("--kbs-ca-cert", type=Path, metavar="PEM", help="CA bundle for an https KBS")
    parser.set_defaults(_keys_required=required)


# --------------------------------------------------------------------------------------------------
# Shared plumbing


def _creds(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    user, sep, password = text.partition(":")
    if not user:
        raise UsageError("credentials must be USER[:PASSWORD]")
    return user, (password if sep else os.environ.get(REGISTRY_PASSWORD_ENV))


def _options(args: argparse.Namespace, creds: str | None) -> TransportOptions:
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    user, password = _creds(creds)
    return TransportOptions(username=user, password=password, ca_file=args.ca_cert, insecure=args.insecure,
                            timeout=args.timeout)


def _progress(args: argparse.Namespace) -> Progress:
    if args.quiet or args.json:
        return no_progress
    return ProgressLine()


def _refs(args: argparse.Namespace) -> tuple[ImageRef, ImageRef]:
    return parse_reference(args.source), parse_reference(args.destination)


def _run(args: argparse.Namespace, transform: LayerTransform | None, *,
         needs_encryption: bool = False) -> CopyResult:
    src_ref, dst_ref = _refs(args)
    progress = _progress(args)
    platform = parse_platform(args.platform)
    with open_source(src_ref, _options(args, args.src_creds)) as source, \
            open_destination(dst_ref, _options(args, args.dest_creds)) as destination:
        if needs_encryption and not destination.supports_encryption:
            raise UsageError(f"{dst_ref} cannot hold encrypted layers; write to oci: or docker://")
        result = copy_image(source, destination, transform=transform, platform=platform, progress=progress)
        destination.commit()
    return result


def _report(out: Output, args: argparse.Namespace, result: CopyResult, title: str,
            extra: dict[str, Any] | None = None) -> None:
    data: dict[str, Any] = {"source": args.source, "destination": args.destination, **result.to_json()}
    data.update(extra or {})
    out.result(data, title=title)


def _admin_token(args: argparse.Namespace) -> str:
    if args.admin_token:
        return str(args.admin_token).strip()
    if args.admin_token_file is not None:
        try:
            token: str = args.admin_token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the admin token from {args.admin_token_file}") from exc
        if token:
            return token
    env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if env:
        return env
    raise UsageError("--key kbs:///… needs a KBS admin token: --admin-token, --admin-token-file or "
                     f"${ADMIN_TOKEN_ENV}")


def _kbs_url(args: argparse.Namespace) -> str:
    url: str | None = args.kbs or os.environ.get(KBS_URL_ENV)
    if not url:
        raise UsageError(f"--key kbs:///… needs the KBS: --kbs URL or ${KBS_URL_ENV}")
    return url


def encryption_transform(args: argparse.Namespace,
                         progress: Progress) -> tuple[EncryptLayers, list[dict[str, Any]]]:
    """The encrypt transform for --key/--recipient options, and a report of the keys (no key bytes)."""
    if not args.key and not args.recipient:
        raise UsageError("give at least one --key kbs:///… or --recipient jwe:PUBLIC.pem")
    jwe = [image_keys.jwe_recipient(spec) for spec in args.recipient]
    kek: list[ocicrypt.KekRecipient] = []
    report: list[dict[str, Any]] = [{"type": "jwe", "recipient": spec} for spec in args.recipient]
    if args.key:
        for spec in args.key:
            image_keys.kbs_key_id(spec)  # a bad --key is a usage error before any network call
        with AdminClient(_admin_token(args), base_url=_kbs_url(args), ca_file=args.kbs_ca_cert) as admin:
            for spec in args.key:
                found = image_keys.kek_from_kbs(admin, spec)
                kek.append(found.recipient)
                report.append({"type": "kbs", "kid": found.recipient.kid,
                               "key": "created" if found.created else "reused"})
    return EncryptLayers(jwe=jwe, kek=kek, select=parse_layers(args.layers), progress=progress), report


class _KbsSession:
    """Holds the attested KBS client for a decryption (closed when the command ends)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.client: KbsClient | None = None
        self.lookup: image_keys.AttestedKekLookup | None = None
        if args.kbs is None:
            if args.tee is not None:
                raise UsageError("--tee needs --kbs URL")
            return
        if args.tee is None:
            raise UsageError("--kbs needs --tee (the TEE whose evidence unlocks the keys)")
        try:
            attester = attester_for(args.tee, **attester_options(args.attester_option))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--attester-option for {args.tee}: {exc}") from exc
        self.client = KbsClient(args.kbs, attester, key=TeeKeyPair.generate("ec-p256"),
                                transport=kbs_transport(args.kbs_ca_cert), timeout=args.timeout)
        self.lookup = image_keys.AttestedKekLookup(self.client)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def decryption_keys(args: argparse.Namespace, session: _KbsSession) -> ocicrypt.DecryptionKeys | None:
    password = None
    if args.key_password_file is not None:
        try:
            password = args.key_password_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read {args.key_password_file}: {exc.strerror}") from exc
    private = image_keys.private_keys(args.key_file, password)
    if not private and session.lookup is None:
        if args._keys_required:
            raise UsageError("give --key-file PRIVATE.pem or --kbs URL --tee TEE")
        return None
    return ocicrypt.DecryptionKeys(private_keys=private, kek_for=session.lookup)


# --------------------------------------------------------------------------------------------------
# Commands


def run_copy(args: argparse.Namespace, out: Output) -> int:
    result = _run(args, None)
    _report(out, args, result, title=f"copied to {args.destination}")
    return EXIT_OK


def run_encrypt(args: argparse.Namespace, out: Output) -> int:
    parse_reference(args.source), parse_reference(args.destination)  # usage errors before the KBS
    transform, report = encryption_transform(args, _progress(args))
    result = _run(args, transform, needs_encryption=True)
    _report(out, args, result, title=f"encrypted into {args.destination}", extra={"keys": report})
    return EXIT_OK


def run_decrypt(args: argparse.Namespace, out: Output) -> int:
    session = _KbsSession(args)
    try:
        keys = decryption_keys(args, session)
        assert keys is not None
        try:
            result = _run(args, DecryptLayers(keys, progress=_progress(args)))
        except ProtocolError as exc:
            out.error(f"the KBS refused the key: {exc}", kind=exc.kind)
            return EXIT_REFUSED
    finally:
        session.close()
    extra = {"kbs_keys": list(session.lookup.fetched)} if session.lookup is not None else {}
    _report(out, args, result, title=f"decrypted into {args.destination}", extra=extra)
    return EXIT_OK


def run_unpack(args: argparse.Namespace, out: Output) -> int:
    ref = parse_reference(args.image)
    session = _KbsSession(args)
    try:
        keys = decryption_keys(args, session)
        with open_source(ref, _options(args, args.creds)) as source:
            try:
                result = unpack_from_source(source, args.directory, keys=keys,
                                            platform=parse_platform(args.platform), progress=_progress(args))
            except ProtocolError as exc:
                out.error(f"the KBS refused the key: {exc}", kind=exc.kind)
                return EXIT_REFUSED
    finally:
        session.close()
    out.result({"image": args.image, "directory": str(args.directory),
                "manifest_digest": result.manifest.digest, "config_digest": result.config_digest,
                "layers": result.stats.layers, "entries": result.stats.entries,
                "bytes_written": result.stats.bytes_written}, title=f"unpacked into {args.directory}")
    return EXIT_OK


def run_inspect(args: argparse.Namespace, out: Output) -> int:
    ref = parse_reference(args.image)
    with open_source(ref, _options(args, args.creds)) as source:
        data = describe_image(source, parse_platform(args.platform) if args.platform else None)
    out.result({"image": args.image, **data}, title=args.image)
    return EXIT_OK
