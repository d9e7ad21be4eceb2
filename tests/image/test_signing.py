"""cosign-compatible keys, simple-signing payloads and ``.sig`` signature manifests."""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UnsupportedError, UsageError
from coffer.image import media
from coffer.image.layout import REF_NAME, OciLayout
from coffer.image.locations import open_destination
from coffer.image.locations import open_source as open_any_source
from coffer.image.models import Descriptor, Index, Manifest, dump_json, sha256_digest
from coffer.image.reference import OciLayoutRef, RegistryRef
from coffer.image.signing import (
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    SigningKey,
    WrongPasswordError,
    build_payload,
    generate_key_pair,
    load_private_key,
    load_public_key,
    parse_payload,
    read_signatures,
    sign_image,
    signature_tag,
)
from coffer.image.transport import OciLayoutDestination, OciLayoutSource, TransportOptions
from tests.support.registry import RegistryServer, registry  # noqa: F401

PASSWORD = b"correct horse"
IDENTITY = "registry.example/team/app:1.0"


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    key: SigningKey


def new_key_pair() -> KeyPair:
    private_pem, public_pem = generate_key_pair(PASSWORD)
    return KeyPair(private_pem, public_pem, load_private_key(private_pem, PASSWORD))


def new_plain_key() -> SigningKey:
    return SigningKey(ec.generate_private_key(ec.SECP256R1()))


# -- image helpers shared with the policy tests ----------------------------------------------------


def make_image(layout: OciLayout, tag: str = "latest", content: bytes = b"L") -> Descriptor:
    config = layout.write_bytes(
        json.dumps(
            {"architecture": "amd64", "os": "linux",
             "rootfs": {"type": "layers", "diff_ids": [sha256_digest(content)]}}
        ).encode(),
        media.OCI_CONFIG,
    )
    layer = layout.write_blob([content], media.OCI_LAYER_TAR)
    manifest = Manifest(media_type=media.OCI_MANIFEST, config=config, layers=(layer,))
    return layout.set_ref(layout.write_manifest(manifest), tag)


def make_layout(path: Path, tag: str = "latest") -> OciLayoutRef:
    make_image(OciLayout.create(path), tag)
    return OciLayoutRef(path=path, tag=tag)


def sign_layout(ref: OciLayoutRef, key: SigningKey, identity: str = IDENTITY,
                manifest_digest: str | None = None) -> str:
    source = OciLayoutSource(ref)
    with OciLayoutDestination(ref) as destination:
        result = sign_image(source, destination, key, docker_reference=identity,
                            manifest_digest=manifest_digest)
        destination.commit()
    return result.manifest_digest


def attach_raw(layout_path: Path, tag_digest: str, payload: bytes, signature_b64: str) -> None:
    """Write a signature manifest by hand (for tampering tests), replacing any existing one."""
    layout = OciLayout.open(layout_path)
    blob = layout.write_bytes(payload, SIMPLESIGNING_MEDIA_TYPE)
    config = layout.write_bytes(
        dump_json({"architecture": "", "os": "", "config": {},
                   "rootfs": {"type": "layers", "diff_ids": [blob.digest]}}),
        media.OCI_CONFIG,
    )
    manifest = dump_json({
        "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
        "config": {"mediaType": media.OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": blob.digest, "size": blob.size,
                    "annotations": {SIGNATURE_ANNOTATION: signature_b64}}],
    })
    stored = layout.write_bytes(manifest, media.OCI_MANIFEST)
    layout.set_ref(stored, signature_tag(tag_digest))


def sign_b64(key: SigningKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload)).decode()


# -- keys ------------------------------------------------------------------------------------------


def test_generated_key_has_cosign_format(keys: KeyPair) -> None:
    text = keys.private_pem.decode()
    assert text.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert text.endswith("-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    body = json.loads(base64.b64decode("".join(text.splitlines()[1:-1])))
    assert body["kdf"]["name"] == "scrypt"
    assert body["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1}
    assert len(base64.b64decode(body["kdf"]["salt"])) == 32
    assert body["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(body["cipher"]["nonce"])) == 24
    assert set(body) == {"kdf", "cipher", "ciphertext"}
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert keys.key.public_key == load_public_key(keys.public_pem)
    assert "hidden" in repr(keys.key)


def test_signature_verifies_with_cryptography(keys: KeyPair) -> None:
    signature = keys.key.sign(b"payload")
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"payload", ec.ECDSA(hashes.SHA256()))


def test_wrong_password_is_refused_without_key_material(keys: KeyPair) -> None:
    with pytest.raises(WrongPasswordError) as info:
        load_private_key(keys.private_pem, b"wrong")
    message = str(info.value)
    assert "wrong password" in message
    assert PASSWORD.decode() not in message
    body_line = keys.private_pem.decode().splitlines()[1]
    assert body_line[:16] not in message


def test_missing_password_for_encrypted_key_is_a_usage_error(keys: KeyPair) -> None:
    with pytest.raises(UsageError, match="password"):
        load_private_key(keys.private_pem)


def _rewrite_body(pem: bytes, label: str, edit: object) -> bytes:
    text = pem.decode()
    body = json.loads(base64.b64decode("".join(text.splitlines()[1:-1])))
    assert callable(edit)
    edit(body)
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    return f"-----BEGIN {label}-----\n{encoded}\n-----END {label}-----\n".encode()


def test_cosign_label_is_accepted(keys: KeyPair) -> None:
    pem = _rewrite_body(keys.private_pem, "ENCRYPTED COSIGN PRIVATE KEY", lambda body: None)
    assert load_private_key(pem, PASSWORD).public_key == keys.key.public_key


def test_flipped_ciphertext_byte_is_refused(keys: KeyPair) -> None:
    def flip(body: dict[str, object]) -> None:
        raw = bytearray(base64.b64decode(str(body["ciphertext"])))
        raw[40] ^= 1
        body["ciphertext"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(WrongPasswordError):
        load_private_key(_rewrite_body(keys.private_pem, "ENCRYPTED SIGSTORE PRIVATE KEY", flip), PASSWORD)


def test_attacker_chosen_scrypt_cost_is_refused(keys: KeyPair) -> None:
    def costly(body: dict[str, dict[str, object]]) -> None:
        body["kdf"]["params"] = {"N": 1 << 24, "r": 8, "p": 1}

    with pytest.raises(UnsupportedError, match="scrypt"):
        load_private_key(_rewrite_body(keys.private_pem, "ENCRYPTED SIGSTORE PRIVATE KEY", costly), PASSWORD)


def test_unknown_cipher_is_refused(keys: KeyPair) -> None:
    def other(body: dict[str, dict[str, object]]) -> None:
        body["cipher"]["name"] = "aes"

    with pytest.raises(UnsupportedError, match="secretbox"):
        load_private_key(_rewrite_body(keys.private_pem, "ENCRYPTED SIGSTORE PRIVATE KEY", other), PASSWORD)


def test_plain_pkcs8_sec1_and_encrypted_pkcs8_are_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pw"))
    expected = SigningKey(key).public_key
    assert load_private_key(pkcs8).public_key == expected
    assert load_private_key(sec1).public_key == expected
    assert load_private_key(enc, b"pw").public_key == expected
    with pytest.raises(WrongPasswordError):
        load_private_key(enc, b"nope")


def test_non_p256_keys_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(UnsupportedError):
        load_private_key(p384)
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(UnsupportedError):
        load_public_key(rsa_pub)


@pytest.mark.parametrize(
    "data",
    [b"", b"not pem", b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"x" * 70_000],
)
def test_malformed_key_files_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        load_public_key(data)
    with pytest.raises(FormatError):
        load_private_key(data, b"pw")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_key_parsers_raise_only_typed_errors(data: bytes) -> None:
    for attempt in (lambda: load_public_key(data), lambda: load_private_key(b"-----BEGIN ENCRYPTED "
                    b"SIGSTORE PRIVATE KEY-----\n" + base64.b64encode(data) + b"\n-----END ENCRYPTED "
                    b"SIGSTORE PRIVATE KEY-----\n", b"pw")):
        with contextlib.suppress(CofferError):
            attempt()


# -- payloads --------------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


def test_payload_round_trip_is_cosign_shaped() -> None:
    data = build_payload("registry.example/team/app", DIGEST)
    assert json.loads(data) == {
        "critical": {"identity": {"docker-reference": "registry.example/team/app"},
                     "image": {"docker-manifest-digest": DIGEST},
                     "type": "cosign container image signature"},
        "optional": None,
    }
    parsed = parse_payload(data)
    assert parsed.docker_reference == "registry.example/team/app"
    assert parsed.manifest_digest == DIGEST
    assert parsed.raw == data


def test_payload_with_containers_image_optional_fields_is_accepted() -> None:
    obj = json.loads(build_payload(IDENTITY, DIGEST))
    obj["optional"] = {"creator": "containers/image 5.23", "timestamp": 1700000000}
    assert parse_payload(json.dumps(obj).encode()).optional == obj["optional"]


def _payload_variant(edit: str) -> bytes:
    obj = json.loads(build_payload(IDENTITY, DIGEST))
    critical = obj["critical"]
    if edit == "extra-top":
        obj["extra"] = 1
    elif edit == "extra-critical":
        critical["extra"] = 1
    elif edit == "gpg-type":
        critical["type"] = "atomic container signature"
    elif edit == "short-digest":
        critical["image"]["docker-manifest-digest"] = "sha256:abc"
    elif edit == "sha512-digest":
        critical["image"]["docker-manifest-digest"] = "sha512:" + "a" * 128
    elif edit == "reference-not-string":
        critical["identity"]["docker-reference"] = 5
    elif edit == "missing-image":
        del critical["image"]
    elif edit == "optional-list":
        obj["optional"] = []
    elif edit == "critical-list":
        obj["critical"] = []
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "edit",
    ["extra-top", "extra-critical", "gpg-type", "short-digest", "sha512-digest", "reference-not-string",
     "missing-image", "optional-list", "critical-list"],
)
def test_malformed_payload_is_refused(edit: str) -> None:
    with pytest.raises(FormatError):
        parse_payload(_payload_variant(edit))


def test_oversized_and_duplicate_key_payloads_are_refused() -> None:
    with pytest.raises(FormatError, match="limit"):
        parse_payload(b" " * 70_000 + build_payload(IDENTITY, DIGEST))
    with pytest.raises(FormatError, match="duplicate"):
        parse_payload(b'{"critical":{},"critical":{}}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_payload_parser_raises_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(CofferError):
        parse_payload(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["docker-reference", "docker-manifest-digest", "type"]), json_values)
def test_payload_parser_handles_any_field_value(field_name: str, value: object) -> None:
    obj = json.loads(build_payload(IDENTITY, DIGEST))
    section = {"docker-reference": obj["critical"]["identity"], "docker-manifest-digest":
               obj["critical"]["image"], "type": obj["critical"]}[field_name]
    section[field_name] = value
    with contextlib.suppress(CofferError):
        parse_payload(json.dumps(obj).encode())


# -- signature manifests in an OCI layout -----------------------------------------------------------


def test_sign_writes_cosign_signature_manifest(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = sign_layout(ref, keys.key)
    layout = OciLayout.open(ref.path)
    entry = layout.resolve(signature_tag(digest))
    assert signature_tag(digest) == "sha256-" + digest.split(":")[1] + ".sig"
    manifest = json.loads(layout.read_blob(entry, 1 << 20))
    assert manifest["mediaType"] == media.OCI_MANIFEST
    assert manifest["config"]["mediaType"] == media.OCI_CONFIG
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    config = json.loads(layout.read_blob(Descriptor.from_obj(manifest["config"]), 1 << 20))
    assert config == {"architecture": "", "os": "", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
    payload = layout.read_blob(Descriptor.from_obj(layer), 1 << 20)
    assert parse_payload(payload).manifest_digest == digest
    assert parse_payload(payload).docker_reference == IDENTITY
    signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    # The image entry is untouched.
    assert layout.resolve("latest").digest == digest


def test_signing_again_appends_and_does_not_duplicate(tmp_path: Path, keys: KeyPair,
                                                        other_key: SigningKey) -> None:
    ref = make_layout(tmp_path / "img")
    digest = sign_layout(ref, keys.key)
    sign_layout(ref, keys.key)  # same payload, same key: nothing new
    sign_layout(ref, other_key)
    sign_layout(ref, keys.key, identity="registry.example/team/app:2.0")
    signatures = read_signatures(OciLayoutSource(ref), digest)
    assert len(signatures) == 3
    assert [s.verify(keys.key.public_key) for s in signatures] == [True, False, True]
    assert signatures[1].verify(other_key.public_key)
    index = OciLayout.open(ref.path).read_index()
    assert sum(1 for e in index.manifests if e.annotations.get(REF_NAME) == signature_tag(digest)) == 1


def test_unsigned_image_has_no_signatures(tmp_path: Path) -> None:
    ref = make_layout(tmp_path / "img")
    source = OciLayoutSource(ref)
    assert read_signatures(source, source.root().digest) == []


def test_failed_sign_leaves_layout_unchanged(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    before = (ref.path / "index.json").read_bytes()
    blobs_before = sorted(p.name for p in (ref.path / "blobs" / "sha256").iterdir())
    with OciLayoutDestination(ref) as destination, pytest.raises(UsageError):
        sign_image(OciLayoutSource(ref), destination, keys.key, docker_reference=IDENTITY,
                   manifest_digest="sha256:" + "0" * 64)
    with OciLayoutDestination(ref) as destination:
        sign_image(OciLayoutSource(ref), destination, keys.key, docker_reference=IDENTITY)
        # no commit: leaving the block aborts
    assert (ref.path / "index.json").read_bytes() == before
    assert sorted(p.name for p in (ref.path / "blobs" / "sha256").iterdir()) == blobs_before


def test_digest_identity_is_refused(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    with OciLayoutDestination(ref) as destination, pytest.raises(UsageError, match="digest"):
        sign_image(OciLayoutSource(ref), destination, keys.key,
                   docker_reference="registry.example/a@sha256:" + "1" * 64)


def test_index_is_signed_by_its_own_digest_and_children_on_request(tmp_path: Path, keys: KeyPair) -> None:
    layout = OciLayout.create(tmp_path / "multi")
    child = make_image(layout, "amd64")
    index = Index(media_type=media.OCI_INDEX, manifests=(
        Descriptor(media_type=child.media_type, digest=child.digest, size=child.size),))
    root = layout.set_ref(layout.write_bytes(index.to_bytes(), media.OCI_INDEX), "latest")
    ref = OciLayoutRef(path=tmp_path / "multi", tag="latest")
    assert sign_layout(ref, keys.key) == root.digest
    assert sign_layout(ref, keys.key, manifest_digest=child.digest) == child.digest
    source = OciLayoutSource(ref)
    assert len(read_signatures(source, root.digest)) == 1
    assert len(read_signatures(source, child.digest)) == 1


@pytest.mark.parametrize(
    "manifest",
    [
        b"[]",
        b'{"schemaVersion":1,"layers":[]}',
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":{}}',
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","config":{},"layers":[]}',
    ],
)
def test_malformed_signature_manifest_is_refused(tmp_path: Path, manifest: bytes) -> None:
    ref = make_layout(tmp_path / "img")
    layout = OciLayout.open(ref.path)
    digest = layout.resolve("latest").digest
    layout.set_ref(layout.write_bytes(manifest, media.OCI_MANIFEST), signature_tag(digest))
    with pytest.raises(FormatError):
        read_signatures(OciLayoutSource(ref), digest)


def test_non_base64_signature_annotation_is_refused(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = OciLayoutSource(ref).root().digest
    attach_raw(ref.path, digest, build_payload(IDENTITY, digest), "not*base64")
    with pytest.raises(FormatError, match="base64"):
        read_signatures(OciLayoutSource(ref), digest)


# -- the registry ----------------------------------------------------------------------------------


def push_test_image(tmp_path: Path, server: RegistryServer) -> RegistryRef:
    """A small image pushed to ``server`` as team/app:1.0 (through Coffer's registry transport)."""
    local = make_layout(tmp_path / "img")
    target = RegistryRef(host=server.host, repository="team/app", tag="1.0")
    options = TransportOptions(insecure=True)
    source = OciLayoutSource(local)
    root = source.root()
    manifest = source.read_manifest(root)
    with open_destination(target, options) as destination:
        for blob in (manifest.config, *manifest.layers):
            destination.put_blob(source.iter_blob(blob), blob.media_type, expected=blob)
        destination.put_manifest(manifest.raw, root.media_type, tag="1.0")
        destination.commit()
    return target


def test_sign_and_read_in_registry(pushed: RegistryRef, keys: KeyPair, other_key: SigningKey) -> None:
    options = TransportOptions(insecure=True)
    for key in (keys.key, other_key):
        with open_any_source(pushed, options) as source, open_destination(pushed, options) as destination:
            result = sign_image(source, destination, key, docker_reference=f"{pushed.name}:1.0")
            destination.commit()
    with open_any_source(pushed, options) as source:
        signatures = read_signatures(source, source.root().digest)
        assert result.manifest_digest == source.root().digest
    assert len(signatures) == 2
    assert signatures[0].verify(keys.key.public_key)
    assert signatures[1].verify(other_key.public_key)
    assert parse_payload(signatures[0].payload).docker_reference == f"{pushed.name}:1.0"
