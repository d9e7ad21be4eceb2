"""ocicrypt layer cipher: round trips, bad inputs, annotation fuzzing and interop with Debian's skopeo."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError, UnsupportedError, VerificationError
from coffer.image import ocicrypt as oc

# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _encrypt(data: bytes, **kw: Any) -> tuple[bytes, oc.EncryptedLayer]:
    out = io.BytesIO()
    layer = oc.encrypt_layer(io.BytesIO(data), out, chunk_size=kw.pop("chunk_size", 4096), **kw)
    return out.getvalue(), layer


def _decrypt(ct: bytes, annotations: dict[str, str], keys: oc.DecryptionKeys, **kw: Any) -> bytes:
    f, result = oc.decrypt_layer_to_tempfile(io.BytesIO(ct), annotations, keys, chunk_size=4096, **kw)
    with f:
        data = f.read()
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.size == len(data)
    return data


PLAIN = os.urandom(50_000) + b"tail"


# --------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_rsa_jwe(rsa_key: rsa.RSAPrivateKey) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    assert len(ct) == len(PLAIN) == layer.size
    assert layer.digest == "sha256:" + hashlib.sha256(ct).hexdigest()
    assert layer.plaintext_digest == "sha256:" + hashlib.sha256(PLAIN).hexdigest()
    assert set(layer.annotations) == {oc.ANNOTATION_PUBOPTS, oc.ANNOTATION_JWE}
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key,))) == PLAIN


@pytest.mark.parametrize("alg", ["RSA-OAEP", "RSA-OAEP-256"])
def test_round_trip_rsa_algorithms(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key(), alg)])
    jwe = oc.parse_jwe_annotation(layer.annotations[oc.ANNOTATION_JWE])[0]
    assert jwe.protected == {"alg": alg, "enc": "A256GCM"}
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key,))) == PLAIN


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
@pytest.mark.parametrize("alg", ["ECDH-ES+A128KW", "ECDH-ES+A256KW"])
def test_round_trip_ec_jwe(curve: ec.EllipticCurve, alg: str) -> None:
    key = ec.generate_private_key(curve)
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(key.public_key(), alg)])
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(key,))) == PLAIN


def test_round_trip_multiple_recipients_general_serialization(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    recipients = [oc.JweRecipient(k.public_key()) for k in (rsa_key, ec_key)]
    ct, layer = _encrypt(PLAIN, jwe=recipients)
    jwe = oc.parse_jwe_annotation(layer.annotations[oc.ANNOTATION_JWE])[0]
    assert len(jwe.recipients) == 2
    assert jwe.protected == {"enc": "A256GCM"}
    for key in (rsa_key, ec_key):
        assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(key,))) == PLAIN
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key2,)))
    assert err.value.step == 1


def test_round_trip_attestation_agent_kek() -> None:
    kek = os.urandom(32)
    ct, layer = _encrypt(PLAIN, kek=[oc.KekRecipient("kbs:///default/image-kek/1", kek)])
    packets = oc.parse_provider_annotation(layer.annotations[oc.ANNOTATION_PROVIDER_AA])
    assert packets[0].kid == "kbs:///default/image-kek/1"
    assert packets[0].wrap_type == "A256GCM"
    decoded = json.loads(base64.b64decode(layer.annotations[oc.ANNOTATION_PROVIDER_AA]))
    assert list(decoded) == ["kid", "wrapped_data", "iv", "wrap_type"]
    asked: list[str] = []

    def lookup(kid: str) -> bytes | None:
        asked.append(kid)
        return kek

    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(kek_for=lookup)) == PLAIN
    assert asked == ["kbs:///default/image-kek/1"]


def test_both_schemes_coexist(rsa_key: rsa.RSAPrivateKey) -> None:
    kek = os.urandom(32)
    ct, layer = _encrypt(
        PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())], kek=[oc.KekRecipient("kbs:///r/k/1", kek)]
    )
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key,))) == PLAIN
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(kek_for=lambda _kid: kek)) == PLAIN


def test_empty_layer_round_trips(rsa_key: rsa.RSAPrivateKey) -> None:
    ct, layer = _encrypt(b"", jwe=[oc.JweRecipient(rsa_key.public_key())])
    assert ct == b""
    assert _decrypt(ct, layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key,))) == b""


def test_comma_separated_copies_are_each_tried(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    private = oc.unwrap_private_options(layer.annotations, oc.DecryptionKeys(private_keys=(rsa_key,)))
    second = base64.b64encode(oc.jwe_encrypt(private.to_json(), [oc.JweRecipient(rsa_key2.public_key())]))
    annotations = dict(layer.annotations)
    annotations[oc.ANNOTATION_JWE] += "," + second.decode()
    assert _decrypt(ct, annotations, oc.DecryptionKeys(private_keys=(rsa_key2,))) == PLAIN


def test_options_json_matches_go_layout() -> None:
    priv = oc.PrivateOptions(symkey=b"\x01" * 32, nonce=b"\x02" * 16, digest="sha256:" + "ab" * 32)
    assert priv.to_json().startswith(b'{"symkey":"AQEB')
    assert b'"cipheroptions":{"nonce":"AgICAgICAgICAgICAgICAg=="}}' in priv.to_json()
    assert oc.PrivateOptions.from_json(priv.to_json()) == priv
    assert "symkey" not in repr(priv)
    assert "AQEB" not in repr(priv)
    ann = (
        "eyJjaXBoZXIiOiJBRVNfMjU2X0NUUl9ITUFDX1NIQTI1NiIsImhtYWMiOiI0RHUrdndMUVJ3R2RDMHB5MU5VcDBnVnlnMm5Y"
        "N3hNM3ZzcTViRDZwUElRPSIsImNpcGhlcm9wdGlvbnMiOnt9fQ=="
    )
    pub = oc.PublicOptions.from_annotation(ann)
    assert pub.to_annotation() == ann


def test_decrypt_to_path_renames_only_when_verified(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    keys = oc.DecryptionKeys(private_keys=(rsa_key,))
    dest = tmp_path / "layer"
    result = oc.decrypt_layer_to_path(io.BytesIO(ct), dest, layer.annotations, keys, expected_size=len(ct))
    assert dest.read_bytes() == PLAIN
    assert result.digest == layer.plaintext_digest
    bad = bytearray(ct)
    bad[-1] ^= 1
    dest2 = tmp_path / "layer2"
    with pytest.raises(VerificationError):
        oc.decrypt_layer_to_path(io.BytesIO(bytes(bad)), dest2, layer.annotations, keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer"]


# --------------------------------------------------------------------------------------------------
# bad inputs


@pytest.fixture(scope="module")
def encrypted(rsa_key: rsa.RSAPrivateKey) -> tuple[bytes, dict[str, str]]:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    return ct, layer.annotations


def test_rejects_wrong_key(encrypted: tuple[bytes, dict[str, str]], rsa_key2: rsa.RSAPrivateKey) -> None:
    ct, ann = encrypted
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, ann, oc.DecryptionKeys(private_keys=(rsa_key2,)))
    assert (err.value.step, err.value.step_name) == oc.STEP_UNWRAP


def test_rejects_wrong_kek() -> None:
    ct, layer = _encrypt(PLAIN, kek=[oc.KekRecipient("kbs:///r/k/1", os.urandom(32))])
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, layer.annotations, oc.DecryptionKeys(kek_for=lambda _kid: os.urandom(32)))
    assert err.value.step == 1
    with pytest.raises(VerificationError):
        _decrypt(ct, layer.annotations, oc.DecryptionKeys(kek_for=lambda _kid: None))


def test_rejects_missing_key_scheme(
    encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey
) -> None:
    ct, ann = encrypted
    with pytest.raises(VerificationError, match="no wrapped key"):
        _decrypt(ct, {oc.ANNOTATION_PUBOPTS: ann[oc.ANNOTATION_PUBOPTS]}, oc.DecryptionKeys((rsa_key,)))
    with pytest.raises(VerificationError, match="no decryption key"):
        _decrypt(ct, ann, oc.DecryptionKeys(kek_for=lambda _kid: b"x" * 32))


@pytest.mark.parametrize("position", [0, 4095, 4096, len(PLAIN) - 1])
def test_rejects_flipped_ciphertext_byte(
    encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey, position: int
) -> None:
    ct, ann = encrypted
    bad = bytearray(ct)
    bad[position] ^= 0x40
    with pytest.raises(VerificationError) as err:
        _decrypt(bytes(bad), ann, oc.DecryptionKeys(private_keys=(rsa_key,)))
    assert (err.value.step, err.value.step_name) == oc.STEP_HMAC


def test_rejects_truncated_blob(encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey) -> None:
    ct, ann = encrypted
    keys = oc.DecryptionKeys(private_keys=(rsa_key,))
    with pytest.raises(VerificationError, match="HMAC") as err:
        _decrypt(ct[:-1], ann, keys)
    assert err.value.step == 2
    with pytest.raises(VerificationError, match="truncated"):
        _decrypt(ct[:-1], ann, keys, expected_size=len(ct))
    with pytest.raises(VerificationError, match="longer"):
        _decrypt(ct + b"x", ann, keys, expected_size=len(ct))


def test_rejects_flipped_hmac(encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey) -> None:
    ct, ann = encrypted
    pub = oc.PublicOptions.from_annotation(ann[oc.ANNOTATION_PUBOPTS])
    forged = oc.PublicOptions(hmac=bytes([pub.hmac[0] ^ 1]) + pub.hmac[1:])
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, {**ann, oc.ANNOTATION_PUBOPTS: forged.to_annotation()}, oc.DecryptionKeys((rsa_key,)))
    assert err.value.step == 2


def test_rejects_plaintext_digest_mismatch(rsa_key: rsa.RSAPrivateKey) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    private = oc.unwrap_private_options(layer.annotations, oc.DecryptionKeys((rsa_key,)))
    lying = oc.PrivateOptions(symkey=private.symkey, nonce=private.nonce, digest="sha256:" + "0" * 64)
    ann = {
        oc.ANNOTATION_PUBOPTS: layer.annotations[oc.ANNOTATION_PUBOPTS],
        oc.ANNOTATION_JWE: base64.b64encode(
            oc.jwe_encrypt(lying.to_json(), [oc.JweRecipient(rsa_key.public_key())])
        ).decode(),
    }
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, ann, oc.DecryptionKeys((rsa_key,)))
    assert (err.value.step, err.value.step_name) == oc.STEP_DIGEST


@pytest.mark.parametrize("name", [oc.ANNOTATION_PUBOPTS, oc.ANNOTATION_JWE])
def test_rejects_oversized_annotation(
    encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey, name: str
) -> None:
    ct, ann = encrypted
    huge = {**ann, name: "A" * (oc.MAX_ANNOTATION_LEN + 4)}
    with pytest.raises(FormatError, match="limit"):
        _decrypt(ct, huge, oc.DecryptionKeys((rsa_key,)))


def test_rejects_missing_pubopts(encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey) -> None:
    ct, ann = encrypted
    with pytest.raises(FormatError, match="no cipher type"):
        _decrypt(ct, {oc.ANNOTATION_JWE: ann[oc.ANNOTATION_JWE]}, oc.DecryptionKeys((rsa_key,)))


def test_rejects_unknown_cipher_and_missing_hmac() -> None:
    bad = base64.b64encode(b'{"cipher":"AES_128_GCM","hmac":"","cipheroptions":{}}').decode()
    with pytest.raises(UnsupportedError):
        oc.PublicOptions.from_annotation(bad)
    none = base64.b64encode(b'{"cipher":"AES_256_CTR_HMAC_SHA256","cipheroptions":{}}').decode()
    with pytest.raises(FormatError, match="HMAC is not provided"):
        oc.PublicOptions.from_annotation(none)


def test_nothing_written_on_failure_in_tempfile_mode(
    encrypted: tuple[bytes, dict[str, str]], rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    ct, ann = encrypted
    with pytest.raises(VerificationError):
        oc.decrypt_layer_to_tempfile(io.BytesIO(ct[:-3]), ann, oc.DecryptionKeys((rsa_key,)), tmpdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_key_loading(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert isinstance(oc.load_private_key(pem), rsa.RSAPrivateKey)
    der = ec_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert isinstance(oc.load_private_key(der), ec.EllipticCurvePrivateKey)
    pub = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert isinstance(oc.load_public_key(pub), ec.EllipticCurvePublicKey)
    with pytest.raises(FormatError):
        oc.load_private_key(b"junk")
    with pytest.raises(FormatError):
        oc.load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# --------------------------------------------------------------------------------------------------
# property tests: the annotation parsers only ever raise FormatError / UnsupportedError


_PARSERS: list[Callable[[str], object]] = [
    oc.PublicOptions.from_annotation,
    oc.parse_jwe_annotation,
    oc.parse_provider_annotation,
]


def _b64_json(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=10,
)
_field_names = st.sampled_from(
    ["cipher", "hmac", "cipheroptions", "protected", "recipients", "encrypted_key", "iv", "ciphertext",
     "tag", "header", "kid", "wrapped_data", "wrap_type", "version", "provider", "unprotected"]
)  # fmt: skip
_annotation_values = (
    st.text(max_size=200)
    | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
    | st.dictionaries(_field_names, _json_values, max_size=8).map(_b64_json)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_annotation_values, which=st.integers(min_value=0, max_value=len(_PARSERS) - 1))
def test_annotation_parsers_only_raise_format_errors(value: str, which: int) -> None:
    with contextlib.suppress(FormatError, UnsupportedError):
        _PARSERS[which](value)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_real_annotations_only_raise_format_errors(
    data: st.DataObject, rsa_key: rsa.RSAPrivateKey
) -> None:
    kek = b"k" * 32
    _, layer = _encrypt(
        b"abc", jwe=[oc.JweRecipient(rsa_key.public_key())], kek=[oc.KekRecipient("kbs:///a/b/c", kek)]
    )
    name = data.draw(st.sampled_from(sorted(layer.annotations)))
    raw = bytearray(base64.b64decode(layer.annotations[name]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    mutated = {**layer.annotations, name: base64.b64encode(bytes(raw)).decode()}
    keys = oc.DecryptionKeys(private_keys=(rsa_key,), kek_for=lambda _kid: kek)
    try:
        oc.PublicOptions.from_annotation(mutated[oc.ANNOTATION_PUBOPTS])
        oc.unwrap_private_options(mutated, keys)
    except (FormatError, UnsupportedError, VerificationError):
        pass


# --------------------------------------------------------------------------------------------------
# interop with skopeo (Debian package)

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (apt-get install skopeo)")


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def _make_layer() -> tuple[bytes, bytes]:
    """A small gzip tar layer; returns (gzip blob, uncompressed tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in [("etc/secret.txt", b"top secret\n"), ("bin/tool", os.urandom(20_000))]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    tar_bytes = buf.getvalue()
    return gzip.compress(tar_bytes, mtime=0), tar_bytes


def _write_layout(
    layout: Path, config: dict[str, Any], layers: list[tuple[bytes, str, dict[str, str] | None]]
) -> None:
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_put_blob(layout, _compact(config)),
    }
    layer_descs = []
    for blob, media_type, layer_annotations in layers:
        desc: dict[str, Any] = {"mediaType": media_type, **_put_blob(layout, blob)}
        if layer_annotations:
            desc["annotations"] = layer_annotations
        layer_descs.append(desc)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_put_blob(layout, _compact(manifest)),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    (layout / "index.json").write_bytes(_compact(index))


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _read_manifest(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest: dict[str, Any] = json.loads((layout / "blobs" / "sha256" / digest).read_bytes())
    return manifest


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _skopeo(tmp: Path, *args: str) -> None:
    policy = tmp / "policy.json"
    if not policy.exists():
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    assert SKOPEO is not None
    proc = subprocess.run(
        [SKOPEO, "--policy", str(policy), "--tmpdir", str(tmp), "copy", "-q", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"skopeo failed: {proc.stderr}"


@pytest.fixture
def plain_image(tmp_path: Path) -> tuple[Path, bytes, dict[str, Any]]:
    blob, tar_bytes = _make_layer()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]},
    }
    _write_layout(tmp_path / "plain", config, [(blob, "application/vnd.oci.image.layer.v1.tar+gzip", None)])
    return tmp_path / "plain", blob, config


def _pem_files(
    tmp: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: str
) -> tuple[Path, Path]:
    priv = tmp / f"{name}-priv.pem"
    pub = tmp / f"{name}-pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@needs_skopeo
@pytest.mark.slow
@pytest.mark.parametrize("kinds", [("rsa",), ("ec",), ("rsa", "ec")])
def test_skopeo_encrypted_layer_decrypts_with_coffer(
    tmp_path: Path,
    plain_image: tuple[Path, bytes, dict[str, Any]],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    kinds: tuple[str, ...],
) -> None:
    src, blob, _ = plain_image
    keys: dict[str, oc.PrivateKey] = {"rsa": rsa_key, "ec": ec_key}
    args: list[str] = []
    for kind in kinds:
        _, pub = _pem_files(tmp_path, keys[kind], kind)
        args += ["--encryption-key", f"jwe:{pub}"]
    _skopeo(tmp_path, *args, f"oci:{src}:latest", f"oci:{tmp_path / 'enc'}:latest")
    manifest = _read_manifest(tmp_path / "enc")
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
    assert layer["size"] == len(blob)
    annotations = layer["annotations"]
    for kind in kinds:
        dest = tmp_path / f"dec-{kind}"
        with _blob_path(tmp_path / "enc", layer["digest"]).open("rb") as f:
            result = oc.decrypt_layer_to_path(
                f, dest, annotations, oc.DecryptionKeys((keys[kind],)), expected_size=layer["size"]
            )
        assert dest.read_bytes() == blob
        assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()


@needs_skopeo
@pytest.mark.slow
@pytest.mark.parametrize("kinds", [("rsa",), ("ec",), ("rsa", "ec")])
def test_coffer_encrypted_layer_decrypts_with_skopeo(
    tmp_path: Path,
    plain_image: tuple[Path, bytes, dict[str, Any]],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    kinds: tuple[str, ...],
) -> None:
    _, blob, config = plain_image
    keys: dict[str, oc.PrivateKey] = {"rsa": rsa_key, "ec": ec_key}
    ct, enc = _encrypt(blob, jwe=[oc.JweRecipient(keys[k].public_key()) for k in kinds])
    _write_layout(
        tmp_path / "enc",
        config,
        [(ct, "application/vnd.oci.image.layer.v1.tar+gzip+encrypted", enc.annotations)],
    )
    for kind in kinds:
        priv, _ = _pem_files(tmp_path, keys[kind], kind)
        out = tmp_path / f"dec-{kind}"
        _skopeo(
            tmp_path, "--decryption-key", str(priv), f"oci:{tmp_path / 'enc'}:latest", f"oci:{out}:latest"
        )
        (layer,) = _read_manifest(out)["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert "annotations" not in layer or not any(
            k.startswith(oc.ANNOTATION_PREFIX) for k in layer["annotations"]
        )
        assert _blob_path(out, layer["digest"]).read_bytes() == blob


@needs_skopeo
@pytest.mark.slow
def test_skopeo_refuses_coffer_layer_with_flipped_byte(
    tmp_path: Path, plain_image: tuple[Path, bytes, dict[str, Any]], rsa_key: rsa.RSAPrivateKey
) -> None:
    """Sanity check of the oracle: skopeo must also reject a tampered coffer layer."""
    _, blob, config = plain_image
    ct, enc = _encrypt(blob, jwe=[oc.JweRecipient(rsa_key.public_key())])
    bad = bytearray(ct)
    bad[len(bad) // 2] ^= 1
    _write_layout(
        tmp_path / "enc",
        config,
        [(bytes(bad), "application/vnd.oci.image.layer.v1.tar+gzip+encrypted", enc.annotations)],
    )
    priv, _ = _pem_files(tmp_path, rsa_key, "rsa")
    with pytest.raises(AssertionError, match="skopeo failed"):
        _skopeo(
            tmp_path,
            "--decryption-key",
            str(priv),
            f"oci:{tmp_path / 'enc'}:latest",
            f"oci:{tmp_path / 'o'}:latest",
        )


def test_rejects_unsupported_jwe_enc_with_unwrap_step(rsa_key: rsa.RSAPrivateKey) -> None:
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    jwe = json.loads(base64.b64decode(layer.annotations[oc.ANNOTATION_JWE]))
    jwe["protected"] = (
        base64.urlsafe_b64encode(b'{"alg":"RSA-OAEP","enc":"A256CBC-HS512"}').rstrip(b"=").decode()
    )
    ann = {**layer.annotations, oc.ANNOTATION_JWE: base64.b64encode(json.dumps(jwe).encode()).decode()}
    with pytest.raises(VerificationError, match="A256CBC-HS512") as err:
        _decrypt(ct, ann, oc.DecryptionKeys((rsa_key,)))
    assert err.value.step == 1


def test_rejects_protected_header_swap(rsa_key: rsa.RSAPrivateKey) -> None:
    """The protected header is the GCM AAD: rewriting it (even to an equivalent value) must fail."""
    ct, layer = _encrypt(PLAIN, jwe=[oc.JweRecipient(rsa_key.public_key())])
    jwe = json.loads(base64.b64decode(layer.annotations[oc.ANNOTATION_JWE]))
    jwe["protected"] = base64.urlsafe_b64encode(b'{"enc":"A256GCM","alg":"RSA-OAEP"}').rstrip(b"=").decode()
    ann = {**layer.annotations, oc.ANNOTATION_JWE: base64.b64encode(json.dumps(jwe).encode()).decode()}
    with pytest.raises(VerificationError) as err:
        _decrypt(ct, ann, oc.DecryptionKeys((rsa_key,)))
    assert err.value.step == 1
