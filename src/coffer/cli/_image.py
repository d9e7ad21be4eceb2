"""``coffer image ...``: copy, encrypt, decrypt, sign, verify, protect, inspect and unpack images.

Images are named as skopeo and podman users know them: ``oci:PATH[:TAG]``,
``docker-archive:PATH[:REF]`` and ``docker://HOST/REPO:TAG``. The commands are thin: each parses its
options and calls :mod:`coffer.image`.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from coffer.cli._attest import attester_options, kbs_transport, write_private
from coffer.cli._output import Output
from coffer.cli._progress import ProgressLine
from coffer.errors import UsageError
from coffer.guest.attesters import TEES as ATTESTER_TEES
from coffer.guest.attesters import attester_for
from coffer.image import keys as image_keys
from coffer.image import ocicrypt, signing, trust_policy
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
from coffer.image.reference import ImageRef, RegistryRef, parse_reference
from coffer.image.transport import Progress, TransportOptions, no_progress
from coffer.kbs.admin_client import AdminClient
from coffer.kbs.client import KbsClient
from coffer.kbs.jwe import TeeKeyPair

EXIT_OK = 0
EXIT_REFUSED = 1
KBS_URL_ENV = "COFFER_KBS_URL"
ADMIN_TOKEN_ENV = "COFFER_KBS_ADMIN_TOKEN"  # noqa: S105 - a variable name
REGISTRY_PASSWORD_ENV = "COFFER_REGISTRY_PASSWORD"  # noqa: S105 - a variable name
SIGNING_PASSWORD_ENV = "COFFER_SIGNING_PASSWORD"  # noqa: S105 - a variable name
COSIGN_PASSWORD_ENV = "COSIGN_PASSWORD"  # noqa: S105 - a variable name

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

    keygen = commands.add_parser(
        "keygen", help="create a cosign-compatible signing key pair",
        description="Create an ECDSA P-256 key pair in cosign's format: PREFIX.key (encrypted with a "
                    "password) and PREFIX.pub. The password comes from $COFFER_SIGNING_PASSWORD or "
                    "$COSIGN_PASSWORD, else it is asked for on the terminal.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    keygen.add_argument("--output-key-prefix", default="cosign", metavar="PREFIX",
                        help="write PREFIX.key and PREFIX.pub (default cosign)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(handler=run_keygen)

    sign = _command(commands, "sign",
                    "sign an image (cosign key-based simple signing, tag sha256-<digest>.sig)",
                    run_sign, two_refs=False)
    _signing_options(sign)

    verify = _command(commands, "verify", "verify an image's signatures under a containers-policy.json",
                      run_verify, two_refs=False)
    verify.add_argument("--policy", type=Path, required=True, metavar="policy.json",
                        help="containers-policy.json(5): insecureAcceptAnything, reject, sigstoreSigned")
    verify.add_argument("--identity", metavar="HOST/REPO[:TAG]",
                        help="the docker reference an oci: or docker-archive: image stands for")

    protect = _command(commands, "protect", "encrypt and sign an image, and print the values a policy pins",
                       run_protect, two_refs=True)
    _encryption_options(protect)
    _signing_options(protect, option="--sign-key")
    _platform_option(protect, all_allowed=True)

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


def _signing_options(parser: argparse.ArgumentParser, *, option: str = "--key") -> None:
    parser.add_argument(option, dest="sign_key", type=Path, required=True, metavar="cosign.key",
                        help="signing key (cosign format, or PKCS#8 / SEC1 PEM)")
    parser.add_argument("--key-password-file", dest="sign_password_file", type=Path, metavar="FILE",
                        help=f"password of the signing key (else ${SIGNING_PASSWORD_ENV} or "
                             "$COSIGN_PASSWORD, else asked on the terminal)")
    parser.add_argument("--identity", metavar="HOST/REPO[:TAG]",
                        help="the signed docker reference (default: the destination's repository:tag; "
                             "required for oci: images)")


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
    select = parse_layers(args.layers)
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
    return EncryptLayers(jwe=jwe, kek=kek, select=select, progress=progress), report


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
        except image_keys.KeyReleaseRefusedError as exc:
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
            except image_keys.KeyReleaseRefusedError as exc:
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


# --------------------------------------------------------------------------------------------------
# Signing


def _password_from_env() -> bytes | None:
    for name in (SIGNING_PASSWORD_ENV, COSIGN_PASSWORD_ENV):
        if name in os.environ:
            return os.environ[name].encode()
    return None


def _ask_password(prompt: str, *, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise UsageError(f"no password: set ${SIGNING_PASSWORD_ENV} (or $COSIGN_PASSWORD) or use a terminal")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat the password: ") != first:
        raise UsageError("the passwords differ")
    return first.encode()



def _signing_key(args: argparse.Namespace) -> signing.SigningKey:
    data = image_keys.read_key_file(args.sign_key, "signing key")
    if args.sign_password_file is not None:
        raw = image_keys.read_key_file(args.sign_password_file, "password file")
        password: bytes | None = raw.rstrip(b"\r\n")
    else:
        password = _password_from_env()
    if password is None and b"ENCRYPTED" in data:
        password = _ask_password(f"Password for {args.sign_key}: ", confirm=False)
    return signing.load_private_key(data, password)


def _identity(args: argparse.Namespace, ref: ImageRef) -> str:
    if args.identity:
        return str(args.identity)
    if isinstance(ref, RegistryRef):
        return ref.name + (f":{ref.tag}" if ref.tag else "")
    raise UsageError("signing an oci: or docker-archive: image needs --identity HOST/REPO[:TAG] "
                     "(the reference the signature vouches for)")


def _sign(args: argparse.Namespace, ref: ImageRef, key: signing.SigningKey,
          creds: str | None, manifest_digest: str | None = None) -> dict[str, Any]:
    identity = _identity(args, ref)
    options = _options(args, creds)
    with open_source(ref, options) as source, open_destination(ref, options) as destination:
        result = signing.sign_image(source, destination, key, docker_reference=identity,
                                    manifest_digest=manifest_digest)
        destination.commit()
    return {"manifest_digest": result.manifest_digest, "signature_tag": result.signature_tag,
            "signature_manifest": result.signature_manifest.digest, "signatures": result.signature_count,
            "identity": identity, "key_fingerprint": key.public_key.fingerprint}


def run_keygen(args: argparse.Namespace, out: Output) -> int:
    private_path = Path(f"{args.output_key_prefix}.key")
    public_path = Path(f"{args.output_key_prefix}.pub")
    for path in (private_path, public_path):
        if path.exists() and not args.force:
            raise UsageError(f"{path} exists; use --force to overwrite it")
    password = _password_from_env()
    if password is None:
        password = _ask_password("Password for the new private key: ", confirm=True)
    private_pem, public_pem = signing.generate_key_pair(password)
    write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    fingerprint = signing.load_public_key(public_pem).fingerprint
    out.result({"private_key": str(private_path), "public_key": str(public_path), "fingerprint": fingerprint},
               title="signing key pair written")
    return EXIT_OK


def run_sign(args: argparse.Namespace, out: Output) -> int:
    ref = parse_reference(args.image)
    key = _signing_key(args)
    report = _sign(args, ref, key, args.creds)
    out.result({"image": args.image, **report}, title=f"signed {args.image}")
    return EXIT_OK


def run_verify(args: argparse.Namespace, out: Output) -> int:
    ref = parse_reference(args.image)
    policy = trust_policy.load_policy(args.policy)
    with open_source(ref, _options(args, args.creds)) as source:
        verified = trust_policy.verify_image(policy, ref, source, identity=args.identity)
    out.result({
        "image": args.image, "ok": True, "scope": verified.scope, "manifest_digest": verified.manifest_digest,
        "requirements": list(verified.requirements),
        "signatures": [{"key_fingerprint": s.key_fingerprint, "identity": s.docker_reference}
                       for s in verified.signatures],
    }, title=f"verified {args.image}")
    return EXIT_OK


def run_protect(args: argparse.Namespace, out: Output) -> int:
    parse_reference(args.source)
    dst_ref = parse_reference(args.destination)
    key = _signing_key(args)  # before any upload, so a wrong password costs nothing
    _identity(args, dst_ref)
    transform, keys_report = encryption_transform(args, _progress(args))
    result = _run(args, transform, needs_encryption=True)
    # Sign what was just written, not whatever the tag names by now (it may have been moved since).
    signature = _sign(args, dst_ref, key, args.dest_creds, manifest_digest=result.root.digest)
    out.result({
        "image": args.destination,
        "reference_values": {
            "manifest_digest": result.root.digest,
            "media_type": result.root.media_type,
            "manifests": [m.to_json() for m in result.manifests],
            "signature": signature,
        },
        "keys": keys_report,
    }, title=f"protected {args.destination}")
    return EXIT_OK
