"""containers-policy.json(5) trust policies and the verification of images against them.

A policy maps scopes to lists of requirements, all of which must hold (AND)::

    {"default": [{"type": "reject"}],
     "transports": {"docker": {"registry.example/app": [
         {"type": "sigstoreSigned", "keyPath": "app.pub",
          "signedIdentity": {"type": "matchRepository"}}]}}}

What Coffer implements, and where it differs from containers/image on purpose:

* transports ``docker``, ``oci`` and ``docker-archive`` are evaluated. Scopes of the other transports
  containers/image knows (``dir``, ``containers-storage``, ...) are parsed strictly and then ignored,
  so one policy file can serve podman, skopeo and Coffer; an unknown transport name is refused (a typo
  would otherwise silently fall back to the default);
* requirements: ``insecureAcceptAnything``, ``reject``, ``sigstoreSigned`` with exactly one of
  ``keyPath``/``keyPaths``/``keyData``/``keyDatas`` (ECDSA P-256 keys; keyless ``fulcio``, ``rekor*`` and
  ``pki`` are refused rather than ignored), and ``signedBy`` (GPG), which is parsed but always denies:
  Coffer has no OpenPGP verifier and fails closed;
* relative ``keyPath`` values are relative to the policy file's directory; keys are loaded when the
  policy is parsed, so a bad key is an error naming its JSON path, not a late denial;
* parsing is strict: size cap, duplicate keys, unknown fields and types are refused, each error naming
  the JSON path (``transports.docker["reg/x"][0].keyPath``).

:func:`verify_image` runs numbered steps (see its docstring) and raises
:class:`~coffer.errors.VerificationError` naming the failed step and the scope, or
:class:`~coffer.errors.PolicyDeniedError` when a ``reject`` (or ``signedBy``) requirement applies.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from coffer.errors import (
    CofferError,
    FormatError,
    PolicyDeniedError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from coffer.image.models import Descriptor, load_json_object
from coffer.image.reference import DockerArchiveRef, ImageRef, OciLayoutRef, RegistryRef, parse_registry_name
from coffer.image.signing import (
    MAX_KEY_FILE_BYTES,
    CosignSignature,
    SimpleSigningPayload,
    VerifyKey,
    load_public_key,
    parse_payload,
    read_signatures,
)
from coffer.image.transport import ImageSource

MAX_POLICY_BYTES: Final = 1024 * 1024
MAX_SCOPES: Final = 4096
MAX_REQUIREMENTS: Final = 64
MAX_KEYS: Final = 64
WHAT: Final = "policy.json"
TEE: Final = "image"

EVALUATED_TRANSPORTS: Final = frozenset({"docker", "oci", "docker-archive"})
IGNORED_TRANSPORTS: Final = frozenset(
    {"atomic", "containers-storage", "dir", "docker-daemon", "oci-archive", "ostree", "sif", "tarball"}
)

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
_WILDCARD_RE: Final = re.compile(r"\*\.[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")

STEP_NAMES: Final = {
    1: "select the requirements for the scope",
    2: "resolve the manifest digest",
    3: "fetch the signatures",
    4: "verify the signature with the policy keys",
    5: "payload digest equals the manifest digest",
    6: "signed identity matches",
    7: "all requirements satisfied",
}


# --------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, kw_only=True)
class SignedIdentity:
    """``signedIdentity``: how the signature's docker reference must relate to the image's."""

    type: str = "matchRepoDigestOrExact"
    docker_reference: RegistryRef | None = None  # exactReference
    docker_repository: RegistryRef | None = None  # exactRepository
    prefix: str | None = None  # remapIdentity
    signed_prefix: str | None = None


@dataclass(frozen=True)
class InsecureAcceptAnything:
    """Accept without any check."""


@dataclass(frozen=True)
class Reject:
    """Refuse every image."""


@dataclass(frozen=True, kw_only=True)
class SignedBy:
    """GPG simple signing: parsed so policies shared with podman load, but always denies."""

    key_type: str
    signed_identity: SignedIdentity


@dataclass(frozen=True, kw_only=True)
class SigstoreSigned:
    """cosign key-based signatures with any of ``keys``."""

    keys: tuple[VerifyKey, ...]
    key_sources: tuple[str, ...]  # for messages: "keyPath /etc/keys/a.pub", "keyData"
    signed_identity: SignedIdentity


Requirement = InsecureAcceptAnything | Reject | SignedBy | SigstoreSigned


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A parsed policy: the default and per-transport scopes (in the file's order)."""

    default: tuple[Requirement, ...]
    transports: Mapping[str, Mapping[str, tuple[Requirement, ...]]] = field(default_factory=dict)
    base_dir: Path | None = None


@dataclass(frozen=True, kw_only=True)
class AcceptedSignature:
    """A signature that satisfied a ``sigstoreSigned`` requirement."""

    key_fingerprint: str
    docker_reference: str
    layer: Descriptor


@dataclass(frozen=True, kw_only=True)
class VerifiedImage:
    """The outcome of an accepted verification; pull the image by ``manifest_digest``."""

    ref: ImageRef
    scope: str
    manifest_digest: str
    root: Descriptor
    requirements: tuple[str, ...]
    signatures: tuple[AcceptedSignature, ...] = ()

    @property
    def signed(self) -> bool:
        return bool(self.signatures)


# --------------------------------------------------------------------------------------------------
# Parsing


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _item(path: str, key: str) -> str:
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _fail(path: str, reason: str) -> FormatError:
    return FormatError(WHAT, f"{path}: {reason}")


def _fields(obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise _fail(_key(path, extra[0]), "unknown field")


def _req(obj: Mapping[str, Any], name: str, path: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise _fail(_key(path, name), "must be a non-empty string")
    return value


def _docker_name(value: str, path: str, *, allow_tag: bool) -> RegistryRef:
    try:
        ref = parse_registry_name(value, default_tag=False)
    except UsageError as exc:
        raise _fail(path, f"invalid docker reference {value[:80]!r}") from exc
    if not allow_tag and (ref.tag is not None or ref.digest is not None):
        raise _fail(path, f"{value[:80]!r} must be a repository without tag or digest")
    return ref


def _parse_identity(obj: object, path: str) -> SignedIdentity:
    if obj is None:
        return SignedIdentity()
    if not isinstance(obj, dict):
        raise _fail(path, "must be an object")
    kind = _req(obj, "type", path)
    if kind in ("matchExact", "matchRepoDigestOrExact", "matchRepository"):
        _fields(obj, {"type"}, path)
        return SignedIdentity(type=kind)
    if kind == "exactReference":
        _fields(obj, {"type", "dockerReference"}, path)
        value = _req(obj, "dockerReference", path)
        ref = _docker_name(value, _key(path, "dockerReference"), allow_tag=True)
        if ref.tag is None and ref.digest is None:
            raise _fail(_key(path, "dockerReference"), "must carry a tag or digest")
        return SignedIdentity(type=kind, docker_reference=ref)
    if kind == "exactRepository":
        _fields(obj, {"type", "dockerRepository"}, path)
        value = _req(obj, "dockerRepository", path)
        return SignedIdentity(
            type=kind, docker_repository=_docker_name(value, _key(path, "dockerRepository"), allow_tag=False)
        )
    if kind == "remapIdentity":
        _fields(obj, {"type", "prefix", "signedPrefix"}, path)
        prefix = _req(obj, "prefix", path)
        signed_prefix = _req(obj, "signedPrefix", path)
        for name, value in (("prefix", prefix), ("signedPrefix", signed_prefix)):
            _check_prefix(value, _key(path, name))
        return SignedIdentity(type=kind, prefix=prefix, signed_prefix=signed_prefix)
    raise _fail(_key(path, "type"), f"unknown signedIdentity type {str(kind)[:60]!r}")


def _check_prefix(value: str, path: str) -> None:
    # A host[:port], a namespace or a repository, never a tag or digest.
    if "@" in value or ("/" in value and ":" in value.rsplit("/", 1)[1]):
        raise _fail(path, f"{value[:80]!r} must not carry a tag or digest")
    host = value.split("/", maxsplit=1)[0]
    if "." not in host and ":" not in host and host != "localhost":
        raise _fail(path, f"{value[:80]!r} must start with a registry host")
    _docker_name(value if "/" in value else f"{value}/x", path, allow_tag=False)


def _read_key_file(value: str, path: str, base_dir: Path | None) -> tuple[VerifyKey, str]:
    key_path = Path(value)
    if not key_path.is_absolute():
        if base_dir is None:
            raise _fail(path, "a relative key path needs the policy file's location")
        key_path = base_dir / key_path
    try:
        with key_path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise _fail(path, f"cannot read key file {key_path}: {exc.strerror}") from exc
    return _load_key(data, path), f"keyPath {key_path}"


def _load_key(data: bytes, path: str) -> VerifyKey:
    try:
        return load_public_key(data, what=path)
    except CofferError as exc:
        raise _fail(path, f"not an ECDSA P-256 public key PEM ({exc})") from exc


def _key_data(value: object, path: str) -> tuple[VerifyKey, str]:
    if not isinstance(value, str) or not value:
        raise _fail(path, "must be a non-empty base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise _fail(path, "is not valid base64") from exc
    return _load_key(data, path), "keyData"


def _parse_sigstore(obj: Mapping[str, Any], path: str, base_dir: Path | None) -> SigstoreSigned:
    unsupported = sorted(
        set(obj) & {"fulcio", "rekorPublicKeyPath", "rekorPublicKeyData", "rekorPublicKeyPaths",
                    "rekorPublicKeyDatas", "pki"}
    )
    if unsupported:
        raise UnsupportedError(
            f"{WHAT}: {_key(path, unsupported[0])}: keyless/Rekor sigstore verification is not supported"
        )
    _fields(obj, {"type", "keyPath", "keyPaths", "keyData", "keyDatas", "signedIdentity"}, path)
    given = [name for name in ("keyPath", "keyPaths", "keyData", "keyDatas") if name in obj]
    if len(given) != 1:
        found = ", ".join(given) or "none"
        raise _fail(path, f"needs exactly one of keyPath, keyPaths, keyData, keyDatas (found {found})")
    name = given[0]
    loaded: list[tuple[VerifyKey, str]] = []
    value = obj[name]
    if name == "keyPath":
        if not isinstance(value, str) or not value:
            raise _fail(_key(path, name), "must be a non-empty string")
        loaded.append(_read_key_file(value, _key(path, name), base_dir))
    elif name == "keyData":
        loaded.append(_key_data(value, _key(path, name)))
    else:
        if not isinstance(value, list) or not value or len(value) > MAX_KEYS:
            raise _fail(_key(path, name), f"must be a list of 1 to {MAX_KEYS} entries")
        for n, item in enumerate(value):
            item_path = f"{_key(path, name)}[{n}]"
            if name == "keyPaths":
                if not isinstance(item, str) or not item:
                    raise _fail(item_path, "must be a non-empty string")
                loaded.append(_read_key_file(item, item_path, base_dir))
            else:
                loaded.append(_key_data(item, item_path))
    return SigstoreSigned(
        keys=tuple(key for key, _ in loaded),
        key_sources=tuple(source for _, source in loaded),
        signed_identity=_parse_identity(obj.get("signedIdentity"), _key(path, "signedIdentity")),
    )


def _parse_signed_by(obj: Mapping[str, Any], path: str) -> SignedBy:
    _fields(obj, {"type", "keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"}, path)
    key_type = _req(obj, "keyType", path)
    if key_type not in ("GPGKeys", "signedByGPGKeys", "signedBySigstorePublicKeys"):
        raise _fail(_key(path, "keyType"), f"unknown key type {key_type[:40]!r}")
    given = [name for name in ("keyPath", "keyPaths", "keyData") if name in obj]
    if len(given) != 1:
        raise _fail(path, f"needs exactly one of keyPath, keyPaths, keyData (found {given or 'none'})")
    return SignedBy(key_type=key_type,
                    signed_identity=_parse_identity(obj.get("signedIdentity"), _key(path, "signedIdentity")))


def _parse_requirement(obj: object, path: str, base_dir: Path | None) -> Requirement:
    if not isinstance(obj, dict):
        raise _fail(path, "must be an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _fail(_key(path, "type"), "must be a string")
    if kind == "insecureAcceptAnything":
        _fields(obj, {"type"}, path)
        return InsecureAcceptAnything()
    if kind == "reject":
        _fields(obj, {"type"}, path)
        return Reject()
    if kind == "sigstoreSigned":
        return _parse_sigstore(obj, path, base_dir)
    if kind == "signedBy":
        return _parse_signed_by(obj, path)
    raise _fail(_key(path, "type"), f"unknown requirement type {kind[:60]!r}")


def _parse_requirements(obj: object, path: str, base_dir: Path | None) -> tuple[Requirement, ...]:
    if not isinstance(obj, list):
        raise _fail(path, "must be a list of requirements")
    if not obj:
        raise _fail(path, "must not be empty (use insecureAcceptAnything or reject explicitly)")
    if len(obj) > MAX_REQUIREMENTS:
        raise _fail(path, f"{len(obj)} requirements, more than {MAX_REQUIREMENTS}")
    return tuple(_parse_requirement(item, f"{path}[{n}]", base_dir) for n, item in enumerate(obj))


def _check_scope(transport: str, scope: str, path: str) -> None:
    if scope == "":
        return
    if transport == "docker":
        if scope.startswith("*."):
            if not _WILDCARD_RE.fullmatch(scope):
                raise _fail(path, "a wildcard scope must be *.domain")
            return
        if "*" in scope:
            raise _fail(path, "'*' is only allowed as the leading label of a host (*.domain)")
        first = scope.split("/", maxsplit=1)[0]
        if "." not in first and ":" not in first and first != "localhost":
            raise _fail(path, "a docker scope must start with a registry host")
        try:
            parse_registry_name(scope if "/" in scope else f"{scope}/x", default_tag=False)
        except UsageError as exc:
            raise _fail(path, "not a valid docker scope") from exc
        return
    if transport in ("oci", "docker-archive") and not scope.startswith("/"):
        raise _fail(path, "scope must be an absolute path")


def parse_policy(data: bytes, *, base_dir: Path | None = None) -> Policy:
    """Parse a containers-policy.json document; ``base_dir`` resolves relative key paths."""
    obj = load_json_object(data, WHAT, MAX_POLICY_BYTES)
    _fields(obj, {"default", "transports"}, "")
    if "default" not in obj:
        raise _fail("default", "is required")
    default = _parse_requirements(obj["default"], "default", base_dir)
    transports_obj = obj.get("transports", {})
    if not isinstance(transports_obj, dict):
        raise _fail("transports", "must be an object")
    transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
    count = 0
    for transport, scopes in transports_obj.items():
        tpath = _key("transports", transport)
        if transport not in EVALUATED_TRANSPORTS | IGNORED_TRANSPORTS:
            raise _fail(tpath, "unknown transport")
        if not isinstance(scopes, dict):
            raise _fail(tpath, "must be an object mapping scopes to requirement lists")
        count += len(scopes)
        if count > MAX_SCOPES:
            raise _fail(tpath, f"more than {MAX_SCOPES} scopes")
        parsed: dict[str, tuple[Requirement, ...]] = {}
        for scope, requirements in scopes.items():
            spath = _item(tpath, scope)
            if transport in EVALUATED_TRANSPORTS:
                _check_scope(transport, scope, spath)
            parsed[scope] = _parse_requirements(requirements, spath, base_dir)
        if transport in EVALUATED_TRANSPORTS:
            transports[transport] = parsed
    return Policy(default=default, transports=transports, base_dir=base_dir)


def load_policy(path: Path) -> Policy:
    """Read and parse a policy file; relative key paths are relative to its directory."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read policy {path}: {exc.strerror}") from exc
    return parse_policy(data, base_dir=path.resolve().parent)


# --------------------------------------------------------------------------------------------------
# Scopes


def _docker_scopes(ref: RegistryRef) -> list[str]:
    candidates: list[str] = []
    if ref.digest is not None:
        candidates.append(f"{ref.name}@{ref.digest}")
    if ref.tag is not None:
        candidates.append(f"{ref.name}:{ref.tag}")
    parts = ref.name.split("/")
    candidates.extend("/".join(parts[:n]) for n in range(len(parts), 0, -1))
    # Wildcards match subdomains of the host (port ignored), most specific first.
    labels = ref.host.rsplit(":", 1)[0].split(".") if not ref.host.startswith("[") else []
    candidates.extend("*." + ".".join(labels[n:]) for n in range(1, len(labels)))
    return candidates


def _path_scopes(path: Path, tag: str | None, *, parents: bool) -> list[str]:
    absolute = path.resolve()
    candidates = [f"{absolute}:{tag}"] if tag else []
    candidates.append(str(absolute))
    if parents:
        candidates.extend(str(parent) for parent in absolute.parents if parent != Path(absolute.anchor))
    return candidates


def scope_candidates(ref: ImageRef) -> tuple[str, list[str]]:
    """The transport name and the scopes that may apply to ``ref``, most specific first."""
    if isinstance(ref, RegistryRef):
        return "docker", _docker_scopes(ref)
    if isinstance(ref, OciLayoutRef):
        return "oci", _path_scopes(ref.path, ref.tag, parents=True)
    return "docker-archive", _path_scopes(ref.path, None, parents=False)


def select_requirements(policy: Policy, ref: ImageRef) -> tuple[str, tuple[Requirement, ...]]:
    """The most specific scope matching ``ref`` and its requirements: a named scope, then the
    transport's ``""`` scope, then ``default``. The scope is returned as a readable name."""
    transport, candidates = scope_candidates(ref)
    scopes = policy.transports.get(transport, {})
    for candidate in [*candidates, ""]:
        if candidate in scopes:
            return f"transports.{transport}[{json.dumps(candidate)}]", scopes[candidate]
    return "default", policy.default


# --------------------------------------------------------------------------------------------------
# Identity


def _image_identity(ref: ImageRef, identity: str | None) -> RegistryRef | None:
    if identity is not None:
        try:
            return parse_registry_name(identity, default_tag=False)
        except UsageError as exc:
            raise UsageError(f"identity {identity[:80]!r} is not a docker reference") from exc
    if isinstance(ref, RegistryRef):
        return ref
    if isinstance(ref, DockerArchiveRef):
        return ref.name
    return None


def _same_ref(a: RegistryRef, b: RegistryRef) -> bool:
    return (a.name, a.tag, a.digest) == (b.name, b.tag, b.digest)


def _match_repo_digest_or_exact(image: RegistryRef, signed: RegistryRef) -> bool:
    if image.digest is not None:
        return image.name == signed.name
    if image.tag is not None:
        return _same_ref(image, signed)
    return False


def _remap(image: RegistryRef, prefix: str, signed_prefix: str) -> RegistryRef | None:
    name = image.name
    if name != prefix and not name.startswith(prefix + "/"):
        return None
    text = signed_prefix + name[len(prefix):]
    if image.tag is not None:
        text += f":{image.tag}"
    if image.digest is not None:
        text += f"@{image.digest}"
    try:
        return parse_registry_name(text, default_tag=False)
    except UsageError:
        return None


def identity_matches(
    rule: SignedIdentity, image: RegistryRef | None, signed: RegistryRef
) -> tuple[bool, str]:
    """Whether a signature for ``signed`` is acceptable for ``image`` under ``rule``, and why not."""
    kind = rule.type
    if kind == "exactReference" and rule.docker_reference is not None:
        ok = _same_ref(rule.docker_reference, signed)
        return ok, f"signed {signed.familiar} is not {rule.docker_reference.familiar}"
    if kind == "exactRepository" and rule.docker_repository is not None:
        ok = rule.docker_repository.name == signed.name
        return ok, f"signed repository {signed.name} is not {rule.docker_repository.name}"
    if image is None:
        return False, f"{kind} needs the image's docker reference (this transport has none; give an identity)"
    if kind == "matchExact":
        ok = (image.tag is not None or image.digest is not None) and _same_ref(image, signed)
        return ok, f"signed {signed.familiar} is not exactly {image.familiar}"
    if kind == "matchRepository":
        return image.name == signed.name, f"signed repository {signed.name} is not {image.name}"
    if kind == "matchRepoDigestOrExact":
        ok = _match_repo_digest_or_exact(image, signed)
        return ok, f"signed {signed.familiar} does not match {image.familiar}"
    if kind != "remapIdentity" or rule.prefix is None or rule.signed_prefix is None:
        return False, f"unusable signedIdentity {kind!r}"
    remapped = _remap(image, rule.prefix, rule.signed_prefix) or image
    return (
        _match_repo_digest_or_exact(remapped, signed),
        f"signed {signed.familiar} does not match {remapped.familiar}",
    )


# --------------------------------------------------------------------------------------------------
# Verification


def _deny(step: int, scope: str, reason: str, *, policy: bool = False) -> VerificationError:
    cls = PolicyDeniedError if policy else VerificationError
    return cls(TEE, step, STEP_NAMES[step], f"{scope}: {reason}")


def _requirement_name(requirement: Requirement) -> str:
    return {
        InsecureAcceptAnything: "insecureAcceptAnything",
        Reject: "reject",
        SignedBy: "signedBy",
        SigstoreSigned: "sigstoreSigned",
    }[type(requirement)]


def _check_sigstore(
    requirement: SigstoreSigned,
    signatures: Sequence[CosignSignature],
    digest: str,
    image_identity: RegistryRef | None,
) -> tuple[int, str, AcceptedSignature | None]:
    """Steps 4-6 for one requirement: the first signature passing all, else the furthest failure."""
    best_step, best_reason = 4, f"no signature verifies with {', '.join(requirement.key_sources)}"
    for signature in signatures:
        key = next((k for k in requirement.keys if signature.verify(k)), None)
        if key is None:
            continue
        # Parse only authenticated bytes.
        try:
            payload: SimpleSigningPayload = parse_payload(signature.payload)
        except CofferError as exc:
            if best_step <= 5:
                best_step, best_reason = 5, f"signed payload is malformed: {exc}"
            continue
        if not hmac.compare_digest(payload.manifest_digest.encode(), digest.encode()):
            if best_step <= 5:
                best_step, best_reason = 5, f"signature is for {payload.manifest_digest}, not {digest}"
            continue
        try:
            signed = parse_registry_name(payload.docker_reference, default_tag=False)
        except UsageError:
            best_step = 6
            best_reason = f"signed identity {payload.docker_reference[:80]!r} is not a docker reference"
            continue
        ok, why = identity_matches(requirement.signed_identity, image_identity, signed)
        if not ok:
            best_step, best_reason = 6, f"{requirement.signed_identity.type}: {why}"
            continue
        return 7, "", AcceptedSignature(key_fingerprint=key.fingerprint,
                                        docker_reference=payload.docker_reference, layer=signature.layer)
    return best_step, best_reason, None


def verify_image(
    policy: Policy, ref: ImageRef, source: ImageSource, *, identity: str | None = None
) -> VerifiedImage:
    """Check ``source`` (opened from ``ref``) against ``policy``; raise unless it is accepted.

    Steps:

    1. select the requirements of the most specific matching scope (default deny is the parser's
       required ``default``);
    2. resolve the manifest digest of the image's root (a digest pinned in ``ref`` must equal it);
    3. fetch the cosign signatures stored under ``sha256-<hex>.sig`` (none → denial);
    4. verify each signature's ECDSA over its payload bytes with the requirement's keys;
    5. the verified payload's ``docker-manifest-digest`` equals the digest of step 2;
    6. the payload's docker reference matches per the requirement's ``signedIdentity``;
    7. every requirement holds (``reject`` and ``signedBy`` never do: :class:`PolicyDeniedError`).

    Steps 2-6 run only when a requirement needs them; a ``reject`` denies without touching the
    image. ``identity`` is the docker reference the image stands for when ``ref`` has none (an
    ``oci:`` layout); identity rules relative to the image need it. The caller must use the image
    by the returned ``manifest_digest``, not by tag, so what was verified is what runs.
    """
    # Step 1
    scope, requirements = select_requirements(policy, ref)
    names = tuple(_requirement_name(r) for r in requirements)
    for n, requirement in enumerate(requirements):
        if isinstance(requirement, Reject):
            raise _deny(7, scope, f"requirement [{n}] reject refuses every image", policy=True)
        if isinstance(requirement, SignedBy):
            raise _deny(7, scope, f"requirement [{n}]: signedBy (GPG) is not supported; use sigstoreSigned",
                        policy=True)
    image_identity = _image_identity(ref, identity)

    # Step 2
    root = source.root()
    digest = root.digest
    if isinstance(ref, RegistryRef) and ref.digest is not None and not hmac.compare_digest(
        ref.digest.encode(), digest.encode()
    ):
        raise _deny(2, scope, f"{source.name} resolved to {digest}, not the pinned {ref.digest}")
    sigstore = [(n, r) for n, r in enumerate(requirements) if isinstance(r, SigstoreSigned)]
    if not sigstore:
        return VerifiedImage(ref=ref, scope=scope, manifest_digest=digest, root=root, requirements=names)

    # Step 3
    try:
        signatures = read_signatures(source, digest)
    except (FormatError, UnsupportedError) as exc:
        raise _deny(3, scope, f"unreadable signatures for {digest}: {exc}") from exc
    if not signatures:
        raise _deny(3, scope, f"no cosign signature for {digest} in {source.name}")

    # Steps 4-6 per requirement, step 7 the AND of them.
    accepted: list[AcceptedSignature] = []
    for n, requirement in sigstore:
        step, reason, found = _check_sigstore(requirement, signatures, digest, image_identity)
        if found is None:
            raise _deny(step, scope, f"requirement [{n}] sigstoreSigned: {reason}")
        accepted.append(found)
    return VerifiedImage(ref=ref, scope=scope, manifest_digest=digest, root=root, requirements=names,
                         signatures=tuple(accepted))
