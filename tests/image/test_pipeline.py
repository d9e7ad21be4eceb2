"""Copy, encrypt and decrypt whole images between OCI layouts: round trips, platform choice, and bad
inputs that must leave nothing at the destination."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coffer.errors import CofferError, FormatError, UsageError, VerificationError
from coffer.image import media, ocicrypt
from coffer.image.layout import OciLayout
from coffer.image.models import Manifest
from coffer.image.pipeline import (
    CopyResult,
    DecryptLayers,
    EncryptLayers,
    LayerTransform,
    copy_image,
    parse_layers,
    parse_platform,
    unpack_from_source,
)
from coffer.image.reference import OciLayoutRef
from coffer.image.transport import OciLayoutDestination, OciLayoutSource
from tests.image.imagebuild import make_image, make_multiarch

AMD64 = parse_platform("linux/amd64")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _recipient(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> ocicrypt.JweRecipient:
    return ocicrypt.JweRecipient(key.public_key())


def run_copy(
    src: Path,
    dst: Path,
    transform: LayerTransform | None = None,
    *,
    tag: str | None = "latest",
    platform: str | None = "linux/amd64",
) -> CopyResult:
    with (
        OciLayoutSource(OciLayoutRef(path=src, tag=tag)) as source,
        OciLayoutDestination(OciLayoutRef(path=dst, tag="latest")) as destination,
    ):
        result = copy_image(source, destination, transform=transform, platform=parse_platform(platform))
        destination.commit()
    return result


def _manifest(path: Path, tag: str = "latest") -> Manifest:
    layout = OciLayout.open(path)
    return layout.read_manifest(layout.resolve(tag))


def _blobs(path: Path, manifest: Manifest) -> list[bytes]:
    layout = OciLayout.open(path)
    return [b"".join(layout.iter_blob(layer)) for layer in manifest.layers]


def test_plain_copy_keeps_every_digest(tmp_path: Path) -> None:
    make_image(tmp_path / "src")
    result = run_copy(tmp_path / "src", tmp_path / "dst")
    assert result.root.digest == OciLayout.open(tmp_path / "src").resolve("latest").digest
    assert _blobs(tmp_path / "dst", _manifest(tmp_path / "dst")) == _blobs(
        tmp_path / "src", _manifest(tmp_path / "src")
    )


def test_jwe_round_trip_restores_layers_byte_for_byte(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_image(tmp_path / "src", gz=True)
    enc = run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]))
    encrypted = _manifest(tmp_path / "enc")
    original = _manifest(tmp_path / "src")
    assert all(layer.media_type == media.OCI_LAYER_GZIP_ENC for layer in encrypted.layers)
    assert all(ocicrypt.ANNOTATION_JWE in layer.annotations for layer in encrypted.layers)
    assert encrypted.config == original.config  # config and diff_ids untouched
    assert [layer.size for layer in encrypted.layers] == [layer.size for layer in original.layers]
    assert enc.manifests[0].config_digest == original.config.digest
    run_copy(
        tmp_path / "enc", tmp_path / "dec", DecryptLayers(ocicrypt.DecryptionKeys(private_keys=(rsa_key,)))
    )
    decrypted = _manifest(tmp_path / "dec")
    assert decrypted.layers == original.layers
    assert _blobs(tmp_path / "dec", decrypted) == _blobs(tmp_path / "src", original)
    assert decrypted.digest == original.digest


def test_only_the_selected_layers_are_encrypted(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_image(tmp_path / "src", n_layers=4)
    run_copy(
        tmp_path / "src",
        tmp_path / "enc",
        EncryptLayers(jwe=[_recipient(rsa_key)], select=parse_layers("last")),
    )
    assert [media.is_encrypted(layer.media_type) for layer in _manifest(tmp_path / "enc").layers] == [
        False,
        False,
        False,
        True,
    ]
    run_copy(
        tmp_path / "src",
        tmp_path / "enc2",
        EncryptLayers(jwe=[_recipient(rsa_key)], select=parse_layers("0,-2")),
    )
    assert [media.is_encrypted(layer.media_type) for layer in _manifest(tmp_path / "enc2").layers] == [
        True,
        False,
        True,
        False,
    ]


def test_layer_index_out_of_range_is_a_usage_error(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_image(tmp_path / "src", n_layers=2)
    with pytest.raises(UsageError, match="out of range"):
        run_copy(
            tmp_path / "src",
            tmp_path / "enc",
            EncryptLayers(jwe=[_recipient(rsa_key)], select=parse_layers("5")),
        )
    assert not (tmp_path / "enc").exists()


def test_kek_round_trip(tmp_path: Path) -> None:
    kek = b"k" * 32
    kid = "kbs:///default/key/app"
    make_image(tmp_path / "src")
    run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(kek=[ocicrypt.KekRecipient(kid, kek)]))
    asked: list[str] = []

    def lookup(name: str) -> bytes | None:
        asked.append(name)
        return kek if name == kid else None

    run_copy(tmp_path / "enc", tmp_path / "dec", DecryptLayers(ocicrypt.DecryptionKeys(kek_for=lookup)))
    assert _blobs(tmp_path / "dec", _manifest(tmp_path / "dec")) == _blobs(
        tmp_path / "src", _manifest(tmp_path / "src")
    )
    assert set(asked) == {kid}


def test_multiarch_encrypts_the_chosen_platform_and_keeps_the_others(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    src = make_multiarch(tmp_path / "src")
    original_index = src.read_nested_index(src.resolve("latest"))
    result = run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]))
    out = OciLayout.open(tmp_path / "enc")
    index = out.read_nested_index(out.resolve("latest"))
    by_arch = {e.platform.architecture: e for e in index.manifests if e.platform}
    original = {e.platform.architecture: e for e in original_index.manifests if e.platform}
    assert by_arch["arm64"] == original["arm64"]  # untouched, same digest
    assert by_arch["amd64"].digest != original["amd64"].digest
    assert all(media.is_encrypted(layer.media_type) for layer in out.read_manifest(by_arch["amd64"]).layers)
    assert not any(
        media.is_encrypted(layer.media_type) for layer in out.read_manifest(by_arch["arm64"]).layers
    )
    assert [m.platform.architecture for m in result.manifests if m.platform] == ["amd64"]
    for layer in out.read_manifest(by_arch["arm64"]).layers:  # the other platform's blobs came along
        out.verify_blob(layer)


def test_all_platforms(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_multiarch(tmp_path / "src")
    result = run_copy(
        tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]), platform="all"
    )
    assert len(result.manifests) == 2


def test_missing_platform_is_a_usage_error_naming_the_available_ones(tmp_path: Path) -> None:
    make_multiarch(tmp_path / "src")
    with pytest.raises(UsageError, match=r"linux/s390x.*linux/amd64, linux/arm64"):
        run_copy(tmp_path / "src", tmp_path / "dst", platform="linux/s390x")
    assert not (tmp_path / "dst").exists()


def test_docker_manifest_becomes_oci_when_encrypted(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_image(tmp_path / "src", docker=True)
    run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]))
    manifest = _manifest(tmp_path / "enc")
    assert manifest.media_type == media.OCI_MANIFEST
    assert manifest.config.media_type == media.OCI_CONFIG
    assert manifest.config.digest == _manifest(tmp_path / "src").config.digest
    assert {layer.media_type for layer in manifest.layers} == {media.OCI_LAYER_GZIP_ENC}


def test_encrypting_an_encrypted_layer_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    make_image(tmp_path / "src")
    run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]))
    with pytest.raises(UsageError, match="already encrypted"):
        run_copy(tmp_path / "enc", tmp_path / "enc2", EncryptLayers(jwe=[_recipient(rsa_key)]))
    assert not (tmp_path / "enc2").exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs: each a typed error, nothing at the destination


@pytest.fixture
def encrypted_image(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    make_image(tmp_path / "src")
    run_copy(tmp_path / "src", tmp_path / "enc", EncryptLayers(jwe=[_recipient(rsa_key)]))
    return tmp_path / "enc"


def _rewrite_blob(layout_dir: Path, digest: str, change: Callable[[bytes], bytes]) -> None:
    path = layout_dir / "blobs" / "sha256" / digest.split(":")[1]
    path.chmod(0o644)
    path.write_bytes(change(path.read_bytes()))


def _flip(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 1]) + data[11:]


def _retarget_layer(
    layout_dir: Path,
    position: int,
    change: Callable[[bytes], bytes],
    annotate: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Rewrite one layer blob and its descriptor consistently (so only the crypto can notice)."""
    import hashlib

    layout = OciLayout.open(layout_dir)
    entry = layout.resolve("latest")
    obj = json.loads(layout.read_blob(entry, 1 << 20))
    layer = obj["layers"][position]
    data = change(b"".join(layout.iter_blob(layout.read_manifest(entry).layers[position])))
    new_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout_dir / "blobs" / "sha256" / new_digest.split(":")[1]).write_bytes(data)
    layer["digest"], layer["size"] = new_digest, len(data)
    if annotate is not None:
        annotate(layer["annotations"])
    desc = layout.write_bytes(json.dumps(obj).encode(), entry.media_type)
    layout.set_ref(desc, "latest")


def _decrypt(tmp_path: Path, src: Path, key: rsa.RSAPrivateKey) -> None:
    run_copy(src, tmp_path / "dec", DecryptLayers(ocicrypt.DecryptionKeys(private_keys=(key,))))


def test_flipped_ciphertext_byte_is_refused_at_the_hmac(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    _retarget_layer(encrypted_image, 1, _flip)
    with pytest.raises(VerificationError) as info:
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert info.value.step == 2
    assert not (tmp_path / "dec").exists()


def test_truncated_ciphertext_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    _retarget_layer(encrypted_image, 0, lambda data: data[:-7])
    with pytest.raises(VerificationError, match="HMAC"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_blob_truncated_on_disk_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    digest = _manifest(encrypted_image).layers[2].digest
    _rewrite_blob(encrypted_image, digest, lambda data: data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_layer_digest_mismatch_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    digest = _manifest(encrypted_image).layers[0].digest
    _rewrite_blob(encrypted_image, digest, _flip)
    with pytest.raises(FormatError, match="content has digest"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_wrong_key_is_refused_at_unwrap(tmp_path: Path, encrypted_image: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(VerificationError) as info:
        _decrypt(tmp_path, encrypted_image, other)
    assert info.value.step == 1
    assert not (tmp_path / "dec").exists()


def test_manifest_digest_mismatch_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    entry = OciLayout.open(encrypted_image).resolve("latest")
    _rewrite_blob(
        encrypted_image, entry.digest, lambda data: data.replace(b'"schemaVersion":2', b'"schemaVersion": 2')
    )
    with pytest.raises(FormatError):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_config_digest_mismatch_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    digest = _manifest(encrypted_image).config.digest
    _rewrite_blob(encrypted_image, digest, lambda data: data.replace(b"/bin/sh", b"/bin/xx"))
    with pytest.raises(FormatError, match="digest"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_unknown_layer_media_type_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    layout = OciLayout.open(encrypted_image)
    entry = layout.resolve("latest")
    obj = json.loads(layout.read_blob(entry, 1 << 20))
    obj["layers"][0]["mediaType"] = "application/x-evil"
    layout.set_ref(layout.write_bytes(json.dumps(obj).encode(), entry.media_type), "latest")
    with pytest.raises(FormatError, match="media type"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_oversized_annotation_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    def bloat(annotations: dict[str, str]) -> None:
        annotations[ocicrypt.ANNOTATION_JWE] += "," + "A" * (300 * 1024)

    _retarget_layer(encrypted_image, 0, lambda data: data, bloat)
    with pytest.raises(CofferError):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_oversized_manifest_is_refused(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    layout = OciLayout.open(encrypted_image)
    entry = layout.resolve("latest")
    obj = json.loads(layout.read_blob(entry, 1 << 20))
    obj["annotations"] = {f"k{i}": "v" * 60000 for i in range(80)}
    layout.set_ref(layout.write_bytes(json.dumps(obj).encode(), entry.media_type), "latest")
    with pytest.raises(FormatError, match=r"exceeds|over|limit"):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert not (tmp_path / "dec").exists()


def test_failed_copy_into_an_existing_layout_leaves_it_as_it_was(
    tmp_path: Path, encrypted_image: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    existing = make_image(tmp_path / "dec", seed="other")
    before = sorted(p.name for p in existing.blob_dir.iterdir())
    index_before = (tmp_path / "dec" / "index.json").read_bytes()
    _retarget_layer(encrypted_image, 2, _flip)
    with pytest.raises(VerificationError):
        _decrypt(tmp_path, encrypted_image, rsa_key)
    assert sorted(p.name for p in existing.blob_dir.iterdir()) == before
    assert (tmp_path / "dec" / "index.json").read_bytes() == index_before


def test_unpack_checks_the_configs_diff_ids(tmp_path: Path) -> None:
    layout = make_image(tmp_path / "src", gz=True)
    entry = layout.resolve("latest")
    manifest = layout.read_manifest(entry)
    config = json.loads(layout.read_blob(manifest.config, 1 << 20))
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    new_config = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    new_manifest = Manifest(media_type=media.OCI_MANIFEST, config=new_config, layers=manifest.layers)
    layout.set_ref(layout.write_manifest(new_manifest), "latest")
    with OciLayoutSource(OciLayoutRef(path=tmp_path / "src", tag="latest")) as source, \
            pytest.raises(FormatError, match="diff_id"):
        unpack_from_source(source, tmp_path / "root")
    assert not (tmp_path / "root").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
