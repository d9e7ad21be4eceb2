"""Strict parsing of manifests, indexes, configs and descriptors; media type helpers."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UnsupportedError
from coffer.image import media
from coffer.image.models import (
    MAX_ANNOTATION_VALUE,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    check_digest,
    parse_manifest_or_index,
    sha256_digest,
)

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def manifest_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media.OCI_MANIFEST,
        "config": {"mediaType": media.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [{"mediaType": media.OCI_LAYER_GZIP, "digest": D2, "size": 20}],
    }
    obj.update(changes)
    return obj


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_parses_manifest_and_keeps_raw_digest() -> None:
    data = enc(manifest_obj(annotations={"k": "v"}))
    manifest = Manifest.parse(data)
    assert manifest.config.digest == D1
    assert manifest.layers[0].size == 20
    assert manifest.annotations == {"k": "v"}
    assert manifest.digest == sha256_digest(data)
    again = Manifest.parse(manifest.to_bytes())
    assert again == manifest


def test_encrypted_layer_descriptor_round_trip() -> None:
    layer = {
        "mediaType": media.OCI_LAYER_GZIP_ENC,
        "digest": D2,
        "size": 20,
        "annotations": {"org.opencontainers.image.enc.pubopts": "e30="},
    }
    manifest = Manifest.parse(enc(manifest_obj(layers=[layer])))
    assert media.is_encrypted(manifest.layers[0].media_type)
    assert media.decrypted(manifest.layers[0].media_type) == media.OCI_LAYER_GZIP


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("duplicate_key", b'{"schemaVersion":2,"schemaVersion":2,"config":{},"layers":[]}'),
        ("nan", b'{"schemaVersion":NaN}'),
        ("not_object", b"[1,2]"),
        ("not_utf8", b'{"a":"\xff"}'),
        ("missing_config", enc({"schemaVersion": 2, "layers": []})),
        (
            "bad_digest_uppercase",
            enc(manifest_obj(config={"mediaType": media.OCI_CONFIG, "digest": D1.upper()})),
        ),
        (
            "short_digest",
            enc(manifest_obj(config={"mediaType": media.OCI_CONFIG, "digest": D1[:-1], "size": 1})),
        ),
        (
            "negative_size",
            enc(manifest_obj(config={"mediaType": media.OCI_CONFIG, "digest": D1, "size": -1})),
        ),
        ("bool_size", enc(manifest_obj(config={"mediaType": media.OCI_CONFIG, "digest": D1, "size": True}))),
        (
            "unknown_layer_type",
            enc(manifest_obj(layers=[{"mediaType": "text/plain", "digest": D2, "size": 1}])),
        ),
        ("unknown_config_type", enc(manifest_obj(config={"mediaType": "x/y", "digest": D1, "size": 1}))),
        ("contradicting_media_type", enc(manifest_obj(mediaType=media.OCI_INDEX))),
        ("oversized_annotation", enc(manifest_obj(annotations={"k": "v" * (MAX_ANNOTATION_VALUE + 1)}))),
        ("non_string_annotation", enc(manifest_obj(annotations={"k": 1}))),
        ("oversized_manifest", b" " * (MAX_MANIFEST_BYTES + 1)),
        (
            "encrypted_layer_in_docker_manifest",
            enc(
                manifest_obj(
                    mediaType=media.DOCKER_MANIFEST,
                    config={"mediaType": media.DOCKER_CONFIG, "digest": D1, "size": 1},
                    layers=[{"mediaType": media.OCI_LAYER_GZIP_ENC, "digest": D2, "size": 1}],
                )
            ),
        ),
    ],
)
def test_rejects_malformed_manifest(name: str, data: bytes) -> None:
    with pytest.raises(FormatError):
        Manifest.parse(data)


def test_rejects_schema_version_1() -> None:
    with pytest.raises(UnsupportedError):
        Manifest.parse(enc(manifest_obj(schemaVersion=1)))


def test_rejects_other_digest_algorithm_as_unsupported() -> None:
    with pytest.raises(UnsupportedError):
        check_digest("sha512:" + "a" * 128)


def test_index_with_platforms() -> None:
    data = enc(
        {
            "schemaVersion": 2,
            "mediaType": media.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": media.OCI_MANIFEST,
                    "digest": D1,
                    "size": 5,
                    "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
                },
                {
                    "mediaType": media.OCI_MANIFEST,
                    "digest": D2,
                    "size": 6,
                    "platform": {"architecture": "amd64", "os": "linux"},
                },
            ],
        }
    )
    index = Index.parse(data)
    platforms = [m.platform for m in index.manifests]
    assert platforms[0] is not None
    assert platforms[0].matches("linux", "arm64", "v8")
    assert platforms[1] is not None
    assert platforms[1].matches("linux", "amd64")
    assert Index.parse(index.to_bytes()) == index
    assert isinstance(parse_manifest_or_index(data), Index)
    assert isinstance(parse_manifest_or_index(enc(manifest_obj())), Manifest)


def test_config_fields() -> None:
    data = enc(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"l": "v"}},
            "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
        }
    )
    config = ImageConfig.parse(data)
    assert config.diff_ids == (D1, D2)
    assert config.cmd == ("/bin/sh",)
    assert config.labels == {"l": "v"}
    assert config.digest == sha256_digest(data)


@pytest.mark.parametrize(
    "rootfs",
    [
        None,
        {"type": "other", "diff_ids": []},
        {"type": "layers"},
        {"type": "layers", "diff_ids": ["sha256:zz"]},
    ],
)
def test_rejects_config_with_bad_rootfs(rootfs: object) -> None:
    with pytest.raises(FormatError):
        ImageConfig.parse(enc({"architecture": "amd64", "os": "linux", "rootfs": rootfs}))


def test_descriptor_constructor_validates() -> None:
    with pytest.raises(FormatError):
        Descriptor(media_type=media.OCI_LAYER_TAR, digest="sha256:xyz", size=1)
    with pytest.raises(FormatError):
        Descriptor(media_type=media.OCI_LAYER_TAR, digest=D1, size=-5)


def test_media_type_helpers() -> None:
    assert media.encrypted(media.OCI_LAYER_TAR) == media.OCI_LAYER_TAR_ENC
    assert media.compression(media.DOCKER_LAYER_GZIP) == "gzip"
    assert media.compression(media.OCI_LAYER_ZSTD) == "zstd"
    assert media.compression(media.OCI_LAYER_ND_TAR) == "none"
    with pytest.raises(UnsupportedError):
        media.encrypted(media.DOCKER_LAYER_GZIP)
    with pytest.raises(FormatError):
        media.decrypted(media.OCI_LAYER_TAR)
    with pytest.raises(FormatError):
        media.check_allowed("application/x-unknown", "layer")
    assert media.check_allowed(media.OCI_LAYER_ZSTD_ENC, "layer") == media.OCI_LAYER_ZSTD_ENC


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=600)
    | st.builds(
        enc,
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
            ),
            max_leaves=20,
        ),
    )
)
def test_random_documents_only_raise_format_errors(data: bytes) -> None:
    for parse in (Manifest.parse, Index.parse, ImageConfig.parse, parse_manifest_or_index):
        with contextlib.suppress(CofferError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=255))
def test_mutated_manifest_only_raises_coffer_errors(position: int, value: int) -> None:
    data = bytearray(enc(manifest_obj(annotations={"a": "b"})))
    data[position % len(data)] = value
    with contextlib.suppress(CofferError):
        Manifest.parse(bytes(data))
