"""cosign-compatible image signatures: keys, simple-signing payloads and ``.sig`` signature manifests.

The format is cosign's key-based, tag-discovered one, which containers/image (``use-sigstore-attachments``)
and sigstore-rs (image-rs) read:

* keys are ECDSA P-256. A private key is stored as the PEM block ``ENCRYPTED SIGSTORE PRIVATE KEY``
  whose body is JSON: a scrypt KDF (``N``/``r``/``p``, base64 salt) and a NaCl secretbox (base64 nonce)
  sealing the PKCS#8 DER key. Public keys are SubjectPublicKeyInfo PEM;
* the signed payload is a simple-signing JSON document naming the image's manifest digest and a docker
  reference; the signature is base64(DER ECDSA-SHA256) over the payload's exact bytes;
* signatures of the image whose manifest digest is ``sha256:<hex>`` live in the same repository (or
  layout) under the tag ``sha256-<hex>.sig``: an OCI manifest whose layers are the payloads (media type
  :data:`SIMPLESIGNING_MEDIA_TYPE`), each carrying its signature in the annotation
  :data:`SIGNATURE_ANNOTATION`. Signing again appends a layer.

Signature manifests are not images: their layer type is outside :data:`coffer.image.media.ALLOWED`, so
they are parsed here, by their own strict rules, and never through :class:`~coffer.image.models.Manifest`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import nacl.exceptions
import nacl.secret
import nacl.utils
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from coffer.errors import FormatError, UnsupportedError, UsageError
from coffer.image import media
from coffer.image.models import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    check_digest,
    dump_json,
    load_json_object,
    parse_annotations,
    sha256_digest,
)
from coffer.image.reference import parse_registry_name
from coffer.image.transport import ImageDestination, ImageSource

SIMPLESIGNING_MEDIA_TYPE: Final = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION: Final = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_TYPE: Final = "cosign container image signature"

SIGSTORE_KEY_LABEL: Final = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_KEY_LABEL: Final = "ENCRYPTED COSIGN PRIVATE KEY"

# Payloads are a few hundred bytes; containers/image adds a creator and a timestamp.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_SIGNATURES: Final = 64
MAX_SIGNATURE_CHARS: Final = 4096
MAX_KEY_FILE_BYTES: Final = 64 * 1024
MAX_REFERENCE_CHARS: Final = 1024
MAX_SIGNATURE_CONFIG_BYTES: Final = 256 * 1024

# go-securesystemslib writes N=65536 (its "standard" cost); older cosign wrote 32768 and its "OWASP"
# setting is 131072. Only these are accepted on reading: the parameters come from the key file, and an
# attacker-chosen N would make loading a key cost arbitrary memory and time.
SCRYPT_N: Final = 65536
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_ACCEPTED_SCRYPT: Final = frozenset({(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)})
_SALT_BYTES: Final = 32
_KEY_BYTES: Final = 32

_PEM_RE: Final = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n(.*?)-----END \1-----", re.DOTALL
)
_B64_CHARS_RE: Final = re.compile(rb"[A-Za-z0-9+/=\s]*")


class WrongPasswordError(UsageError):
    """The password does not open the encrypted private key (or the key file was altered)."""


# --------------------------------------------------------------------------------------------------
# Keys


class SigningKey:
    """An ECDSA P-256 private key; its repr never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedError(f"signing keys must be ECDSA P-256, not {key.curve.name}")
        self._key = key

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA-SHA256 signature over ``data``."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    @property
    def public_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def __repr__(self) -> str:
        return "SigningKey(<ECDSA P-256, hidden>)"


class VerifyKey:
    """An ECDSA P-256 public key that checks cosign signatures."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePublicKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedError(f"verification keys must be ECDSA P-256, not {key.curve.name}")
        self._key = key

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (DER) is a valid ECDSA-SHA256 signature of ``payload``."""
        try:
            self._key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of the DER SubjectPublicKeyInfo, for messages (a public identifier)."""
        der = self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return sha256_digest(der)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"VerifyKey({self.fingerprint})"


def _pem_blocks(data: bytes, what: str) -> list[tuple[str, bytes]]:
    if len(data) > MAX_KEY_FILE_BYTES:
        raise FormatError(what, f"{len(data)} bytes exceeds the limit of {MAX_KEY_FILE_BYTES}")
    blocks: list[tuple[str, bytes]] = []
    for match in _PEM_RE.finditer(data):
        label = match.group(1).decode("ascii")
        body = match.group(2)
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        if any(b":" in line for line in lines):
            raise FormatError(what, f"PEM block {label!r} has headers, which are not supported")
        if not _B64_CHARS_RE.fullmatch(body):
            raise FormatError(what, f"PEM block {label!r} is not base64")
        try:
            blocks.append((label, base64.b64decode(b"".join(lines), validate=True)))
        except binascii.Error as exc:
            raise FormatError(what, f"PEM block {label!r} is not valid base64") from exc
    if not blocks:
        raise FormatError(what, "no PEM block found")
    return blocks


def _single_pem(data: bytes, what: str) -> tuple[str, bytes]:
    blocks = _pem_blocks(data, what)
    if len(blocks) != 1:
        raise FormatError(what, f"{len(blocks)} PEM blocks found, expected one")
    return blocks[0]


def _b64_field(obj: Mapping[str, Any], key: str, what: str, size: int | None = None) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(what, f"{key!r} is missing or not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise FormatError(what, f"{key!r} is not valid base64") from exc
    if size is not None and len(raw) != size:
        raise FormatError(what, f"{key!r} is {len(raw)} bytes, expected {size}")
    return raw


def _seal(der: bytes, password: bytes) -> bytes:
    salt = nacl.utils.random(_SALT_BYTES)
    nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
    box_key = Scrypt(salt=salt, length=_KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(password)
    sealed = nacl.secret.SecretBox(box_key).encrypt(der, nonce).ciphertext
    return dump_json(
        {
            "kdf": {
                "name": "scrypt",
                "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
                "salt": base64.b64encode(salt).decode("ascii"),
            },
            "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode("ascii")},
            "ciphertext": base64.b64encode(sealed).decode("ascii"),
        }
    )


def _unseal(body: bytes, password: bytes) -> bytes:
    what = "encrypted cosign private key"
    obj = load_json_object(body, what, MAX_KEY_FILE_BYTES)
    kdf, cipher = obj.get("kdf"), obj.get("cipher")
    if not isinstance(kdf, dict) or not isinstance(cipher, dict):
        raise FormatError(what, "'kdf' and 'cipher' must be objects")
    if kdf.get("name") != "scrypt":
        raise UnsupportedError(f"{what}: key derivation {str(kdf.get('name'))[:40]!r} is not scrypt")
    if cipher.get("name") != "nacl/secretbox":
        raise UnsupportedError(f"{what}: cipher {str(cipher.get('name'))[:40]!r} is not nacl/secretbox")
    params = kdf.get("params")
    if not isinstance(params, dict):
        raise FormatError(what, "'kdf.params' is not an object")
    triple = (params.get("N"), params.get("r"), params.get("p"))
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in triple)
    if not integers or triple not in _ACCEPTED_SCRYPT:
        raise UnsupportedError(f"{what}: scrypt parameters N/r/p {triple!r} are not an accepted setting")
    n, r, p = (int(v) for v in triple)
    salt = _b64_field(kdf, "salt", what)
    if not 16 <= len(salt) <= 64:
        raise FormatError(what, f"salt is {len(salt)} bytes")
    nonce = _b64_field(cipher, "nonce", what, nacl.secret.SecretBox.NONCE_SIZE)
    sealed = _b64_field(obj, "ciphertext", what)
    box_key = Scrypt(salt=salt, length=_KEY_BYTES, n=n, r=r, p=p).derive(password)
    try:
        return nacl.secret.SecretBox(box_key).decrypt(sealed, nonce)
    except nacl.exceptions.CryptoError:
        raise WrongPasswordError(
            "cannot open the cosign private key: wrong password, or the key file was altered"
        ) from None


def _as_signing_key(key: object, what: str) -> SigningKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UnsupportedError(f"{what}: only ECDSA P-256 keys are supported")
    return SigningKey(key)


def generate_key_pair(password: bytes) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair in cosign's format: (encrypted private key PEM, public key PEM).

    The private key is sealed with ``password`` (may be empty, as cosign allows) under scrypt
    N=65536, r=8, p=1 and NaCl secretbox.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = base64.b64encode(_seal(der, password)).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    private_pem = "".join(
        [f"-----BEGIN {SIGSTORE_KEY_LABEL}-----\n", *(line + "\n" for line in lines),
         f"-----END {SIGSTORE_KEY_LABEL}-----\n"]
    ).encode("ascii")
    return private_pem, SigningKey(key).public_key.to_pem()


def load_private_key(data: bytes, password: bytes | None = None) -> SigningKey:
    """Load a signing key: cosign/sigstore encrypted PEM, or plain PKCS#8 / SEC1 / encrypted PKCS#8 PEM.

    A wrong password raises :class:`WrongPasswordError`; messages never include key material.
    """
    what = "private key"
    label, body = _single_pem(data, what)
    if label in (SIGSTORE_KEY_LABEL, COSIGN_KEY_LABEL):
        if password is None:
            raise UsageError("the cosign private key is encrypted; a password is needed")
        der = _unseal(body, password)
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise FormatError(what, "the decrypted key is not a PKCS#8 private key") from exc
        return _as_signing_key(key, what)
    if label in ("PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"):
        encrypted = label == "ENCRYPTED PRIVATE KEY"
        if encrypted and password is None:
            raise UsageError("the private key is encrypted; a password is needed")
        try:
            key = serialization.load_pem_private_key(data, password=password if encrypted else None)
        except ValueError as exc:
            if encrypted:
                raise WrongPasswordError(
                    "cannot open the private key: wrong password, or the key file is damaged"
                ) from None
            raise FormatError(what, f"{label} block is not a valid key") from exc
        except (TypeError, UnsupportedAlgorithm) as exc:
            raise FormatError(what, f"{label} block is not a usable key") from exc
        return _as_signing_key(key, what)
    raise FormatError(what, f"unsupported PEM block {label!r}")


def load_public_key(data: bytes, what: str = "public key") -> VerifyKey:
    """Load an ECDSA P-256 SubjectPublicKeyInfo PEM (``PUBLIC KEY``)."""
    label, body = _single_pem(data, what)
    if label != "PUBLIC KEY":
        raise FormatError(what, f"PEM block {label!r} is not a PUBLIC KEY")
    try:
        key = serialization.load_der_public_key(body)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError(what, "not a valid SubjectPublicKeyInfo") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UnsupportedError(f"{what}: only ECDSA P-256 keys are supported")
    return VerifyKey(key)


# --------------------------------------------------------------------------------------------------
# Simple-signing payloads


@dataclass(frozen=True, kw_only=True)
class SimpleSigningPayload:
    """A parsed cosign payload; ``raw`` holds the exact signed bytes."""

    docker_reference: str
    manifest_digest: str
    optional: Mapping[str, Any] | None = None
    raw: bytes = field(default=b"", repr=False, compare=False)


def build_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The payload bytes cosign signs for ``manifest_digest`` under ``docker_reference``."""
    check_digest(manifest_digest, "manifest digest")
    if not docker_reference or len(docker_reference) > MAX_REFERENCE_CHARS:
        raise UsageError("docker reference is empty or too long")
    return dump_json(
        {
            "critical": {
                "identity": {"docker-reference": docker_reference},
                "image": {"docker-manifest-digest": manifest_digest},
                "type": COSIGN_SIGNATURE_TYPE,
            },
            "optional": None,
        }
    )


def _exact_keys(obj: Mapping[str, Any], keys: set[str], where: str, what: str) -> None:
    extra = set(obj) - keys
    missing = keys - set(obj)
    if extra:
        raise FormatError(what, f"{where} has unexpected field(s) {sorted(extra)[:5]!r}")
    if missing:
        raise FormatError(what, f"{where} is missing {sorted(missing)!r}")


def parse_payload(data: bytes) -> SimpleSigningPayload:
    """Parse a cosign simple-signing payload strictly (the fields containers/image requires, no others)."""
    what = "simple-signing payload"
    obj = load_json_object(data, what, MAX_PAYLOAD_BYTES)
    if "optional" not in obj:
        obj = {**obj, "optional": None}
    _exact_keys(obj, {"critical", "optional"}, "the payload", what)
    critical, optional = obj["critical"], obj["optional"]
    if not isinstance(critical, dict):
        raise FormatError(what, "'critical' is not an object")
    if optional is not None and not isinstance(optional, dict):
        raise FormatError(what, "'optional' is neither an object nor null")
    _exact_keys(critical, {"identity", "image", "type"}, "'critical'", what)
    if critical["type"] != COSIGN_SIGNATURE_TYPE:
        raise FormatError(what, f"critical.type {str(critical['type'])[:60]!r} is not a cosign signature")
    identity, image = critical["identity"], critical["image"]
    if not isinstance(identity, dict) or not isinstance(image, dict):
        raise FormatError(what, "'critical.identity' and 'critical.image' must be objects")
    _exact_keys(identity, {"docker-reference"}, "'critical.identity'", what)
    _exact_keys(image, {"docker-manifest-digest"}, "'critical.image'", what)
    reference = identity["docker-reference"]
    if not isinstance(reference, str) or not reference or len(reference) > MAX_REFERENCE_CHARS:
        raise FormatError(what, "critical.identity.docker-reference is not a non-empty string")
    digest = image["docker-manifest-digest"]
    if not isinstance(digest, str):
        raise FormatError(what, "critical.image.docker-manifest-digest is not a string")
    try:
        check_digest(digest, what)
    except UnsupportedError as exc:
        raise FormatError(what, str(exc)) from exc
    return SimpleSigningPayload(
        docker_reference=reference, manifest_digest=digest, optional=optional, raw=bytes(data)
    )


# --------------------------------------------------------------------------------------------------
# Signature manifests


@dataclass(frozen=True, kw_only=True)
class CosignSignature:
    """One signature found next to an image: the payload bytes, the DER signature and its layer."""

    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    layer: Descriptor

    def verify(self, key: VerifyKey) -> bool:
        return key.verify(self.payload, self.signature)


@dataclass(frozen=True, kw_only=True)
class SignResult:
    """What :func:`sign_image` stored (still to be committed by the caller)."""

    manifest_digest: str
    signature_tag: str
    signature_manifest: Descriptor
    payload: Descriptor
    signature_count: int


def signature_tag(manifest_digest: str) -> str:
    """cosign's tag for the signatures of ``manifest_digest``: ``sha256-<hex>.sig``."""
    check_digest(manifest_digest, "manifest digest")
    return manifest_digest.replace(":", "-", 1) + ".sig"


def _decode_signature(value: str, what: str) -> bytes:
    if len(value) > MAX_SIGNATURE_CHARS:
        raise FormatError(what, "signature annotation is too long")
    # image-rs strips newlines before decoding; tolerating whitespace costs nothing.
    compact = "".join(value.split())
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise FormatError(what, "signature annotation is not valid base64") from exc


def _parse_signature_manifest(data: bytes, media_type: str) -> tuple[Descriptor, list[Descriptor]]:
    what = "signature manifest"
    obj = load_json_object(data, what, MAX_MANIFEST_BYTES)
    if obj.get("schemaVersion") != 2 or isinstance(obj.get("schemaVersion"), bool):
        raise FormatError(what, "schemaVersion is not 2")
    declared = obj.get("mediaType", media_type)
    if declared != media_type or media_type not in media.MANIFEST_TYPES:
        raise FormatError(what, f"media type {str(declared)[:80]!r} is not an image manifest")
    config = Descriptor.from_obj(obj.get("config"), "signature manifest config")
    layers_obj = obj.get("layers")
    if not isinstance(layers_obj, list):
        raise FormatError(what, "'layers' is not a list")
    if len(layers_obj) > MAX_SIGNATURES:
        raise FormatError(what, f"{len(layers_obj)} signatures, more than {MAX_SIGNATURES}")
    layers = [Descriptor.from_obj(item, f"signature layer {n}") for n, item in enumerate(layers_obj)]
    return config, layers


def read_signatures(source: ImageSource, manifest_digest: str) -> list[CosignSignature]:
    """The cosign signatures stored for ``manifest_digest`` in ``source`` (empty if there are none).

    Layers of other media types and layers without a signature annotation are skipped, as cosign does.
    A malformed signature manifest or payload blob raises :class:`FormatError`.
    """
    descriptor = source.resolve_tag(signature_tag(manifest_digest))
    if descriptor is None:
        return []
    data = source.read_document(descriptor, MAX_MANIFEST_BYTES)
    _, layers = _parse_signature_manifest(data, descriptor.media_type)
    found: list[CosignSignature] = []
    for n, layer in enumerate(layers):
        encoded = layer.annotations.get(SIGNATURE_ANNOTATION)
        if layer.media_type != SIMPLESIGNING_MEDIA_TYPE or encoded is None:
            continue
        signature = _decode_signature(encoded, f"signature layer {n}")
        payload = source.read_document(layer, MAX_PAYLOAD_BYTES)
        found.append(CosignSignature(payload=payload, signature=signature, layer=layer))
    return found


def _signature_config(diff_ids: list[str]) -> bytes:
    # The shape containers/image writes (an empty image config whose diff_ids are the payloads).
    return dump_json(
        {"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )


def _choose_digest(source: ImageSource, manifest_digest: str | None) -> str:
    root = source.root()
    if manifest_digest is None or manifest_digest == root.digest:
        return root.digest
    check_digest(manifest_digest, "manifest digest")
    if root.media_type in media.INDEX_TYPES and any(
        entry.digest == manifest_digest for entry in source.read_index(root).manifests
    ):
        return manifest_digest
    raise UsageError(
        f"{manifest_digest} is neither the image {source.name} nor a manifest of its index"
    )


def sign_image(
    source: ImageSource,
    destination: ImageDestination,
    key: SigningKey,
    *,
    docker_reference: str,
    manifest_digest: str | None = None,
) -> SignResult:
    """Sign an image and stage the signature manifest at ``destination`` under ``sha256-<hex>.sig``.

    ``manifest_digest`` defaults to the digest of ``source``'s root (an index's own digest for a
    multi-platform image); it may also name a manifest of the root index. ``docker_reference`` is the
    identity written into the payload (``host/repo[:tag]``, normalised). Existing signatures for the
    digest are kept and the new one appended (an identical one is not added twice).

    ``source`` and ``destination`` should be the same place (the image must be where its signature
    goes). Nothing is visible until the caller calls ``destination.commit()``, so a signature can be
    committed together with the copy of the image it signs.
    """
    if not destination.supports_extra_tags:
        raise UsageError(f"{destination.name} cannot store signatures (no extra tags)")
    ref = parse_registry_name(docker_reference, default_tag=False)
    if ref.digest is not None:
        raise UsageError("the signed identity must be a repository or repository:tag, not a digest")
    identity = ref.name + (f":{ref.tag}" if ref.tag is not None else "")
    digest = _choose_digest(source, manifest_digest)
    payload = build_payload(identity, digest)
    signature = base64.b64encode(key.sign(payload)).decode("ascii")

    tag = signature_tag(digest)
    layers: list[Descriptor] = []
    existing = source.resolve_tag(tag)
    if existing is not None:
        _, old_layers = _parse_signature_manifest(
            source.read_document(existing, MAX_MANIFEST_BYTES), existing.media_type
        )
        for layer in old_layers:
            if not destination.has_blob(layer):
                destination.put_blob(source.iter_blob(layer), layer.media_type, expected=layer)
            layers.append(layer)
    if len(layers) >= MAX_SIGNATURES:
        raise UsageError(f"{digest} already has {len(layers)} signatures, the most Coffer keeps")

    stored = destination.put_blob([payload], SIMPLESIGNING_MEDIA_TYPE)
    new_layer = Descriptor(
        media_type=SIMPLESIGNING_MEDIA_TYPE,
        digest=stored.digest,
        size=stored.size,
        annotations=parse_annotations({SIGNATURE_ANNOTATION: signature}, "signature layer"),
    )
    # ECDSA signatures are randomised, so "identical" means same payload signed by the same key:
    # the old signature still verifies and a second copy adds nothing.
    verifier = key.public_key
    duplicate = any(
        layer.digest == new_layer.digest
        and verifier.verify(payload, _decode_signature(layer.annotations[SIGNATURE_ANNOTATION], "layer"))
        for layer in layers
        if SIGNATURE_ANNOTATION in layer.annotations
    )
    if not duplicate:
        layers.append(new_layer)
    config_bytes = _signature_config([layer.digest for layer in layers])
    config = destination.put_blob([config_bytes], media.OCI_CONFIG)
    manifest = dump_json(
        {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": media.OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [layer.to_obj() for layer in layers],
        }
    )
    manifest_desc = destination.put_manifest(manifest, media.OCI_MANIFEST, tag=tag)
    return SignResult(
        manifest_digest=digest,
        signature_tag=tag,
        signature_manifest=manifest_desc,
        payload=new_layer,
        signature_count=len(layers),
    )


__all__ = [
    "COSIGN_SIGNATURE_TYPE",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING_MEDIA_TYPE",
    "CosignSignature",
    "SignResult",
    "SigningKey",
    "SimpleSigningPayload",
    "VerifyKey",
    "WrongPasswordError",
    "build_payload",
    "generate_key_pair",
    "load_private_key",
    "load_public_key",
    "parse_payload",
    "read_signatures",
    "sign_image",
    "signature_tag",
]
