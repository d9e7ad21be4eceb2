"""Build small OCI image layouts for the image tests (single images and multi-platform indexes)."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.models import Descriptor, Index, Manifest, Platform
from tests.image.tarbuild import build_tar, d, f


def layer_tar(seed: str, *, size: int = 2048, gz: bool = False) -> bytes:
    """A layer with a directory and a file whose bytes depend on ``seed``."""
    body = hashlib.sha256(seed.encode()).digest() * (size // 32 + 1)
    entries = [d(seed), f(f"{seed}/data.bin", body[:size]), f(f"{seed}/hello.txt", seed.encode())]
    return build_tar(entries, gz=gz)


def config_json(layers: Sequence[bytes], *, arch: str = "amd64", gz: bool = False) -> bytes:
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(layer) if gz else layer).hexdigest() for layer in layers
    ]
    obj: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(obj, separators=(",", ":")).encode()


def add_image(layout: OciLayout, layers: Sequence[bytes], *, arch: str = "amd64", gz: bool = False,
              docker: bool = False) -> Descriptor:
    """Write config, layers and manifest into ``layout``; return the manifest descriptor (not indexed)."""
    config_type = media.DOCKER_CONFIG if docker else media.OCI_CONFIG
    config = layout.write_bytes(config_json(layers, arch=arch, gz=gz), config_type)
    layer_type = media.DOCKER_LAYER_GZIP if docker else media.OCI_LAYER_GZIP if gz else media.OCI_LAYER_TAR
    layer_descs = tuple(layout.write_bytes(layer, layer_type) for layer in layers)
    manifest = Manifest(media_type=media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST, config=config,
                        layers=layer_descs)
    return layout.write_manifest(manifest)


def make_image(root: Path, *, n_layers: int = 3, tag: str = "latest", gz: bool = False,
               docker: bool = False, seed: str = "img") -> OciLayout:
    """A layout holding one single-platform image tagged ``tag``."""
    layout = OciLayout.create(root)
    layers = [layer_tar(f"{seed}{i}", gz=gz or docker) for i in range(n_layers)]
    descriptor = add_image(layout, layers, gz=gz or docker, docker=docker)
    layout.set_ref(descriptor, tag)
    return layout


def make_multiarch(root: Path, *, arches: Sequence[str] = ("amd64", "arm64"),
                   tag: str = "latest") -> OciLayout:
    """A layout holding an index with one two-layer manifest per architecture."""
    layout = OciLayout.create(root)
    entries = []
    for arch in arches:
        layers = [layer_tar(f"{arch}-{i}") for i in range(2)]
        desc = add_image(layout, layers, arch=arch)
        entries.append(Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                                  platform=Platform(architecture=arch, os="linux")))
    index = Index(media_type=media.OCI_INDEX, manifests=tuple(entries))
    index_desc = layout.write_bytes(index.to_bytes(), media.OCI_INDEX)
    layout.set_ref(index_desc, tag)
    return layout


def layer_blobs(root: Path, tag: str = "latest") -> list[bytes]:
    """The layer blobs of the image ``tag`` in the layout at ``root``, in manifest order."""
    layout = OciLayout.open(root)
    manifest = layout.read_manifest(layout.resolve(tag))
    return [b"".join(layout.iter_blob(layer)) for layer in manifest.layers]
