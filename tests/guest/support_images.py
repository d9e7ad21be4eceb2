"""Tiny runnable images for the guest runtime tests: /bin/busybox (busybox-static) and its applets.

:func:`busybox_layout` writes an OCI layout holding one image of two layers (busybox, then a small
``/app`` layer), named both by a tag and by the full reference the policy pins.
:func:`encrypt_layout` and :func:`sign_layout` protect such a layout the way ``coffer image`` does.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from coffer.image import media, ocicrypt
from coffer.image.layout import OciLayout
from coffer.image.models import Descriptor, Manifest
from coffer.image.pipeline import EncryptLayers, copy_image
from coffer.image.reference import OciLayoutRef
from coffer.image.signing import SigningKey, sign_image
from coffer.image.transport import OciLayoutDestination, OciLayoutSource

BUSYBOX: Final = Path("/bin/busybox")
IMAGE_NAME: Final = "registry.example/coffer/busybox"
TAG: Final = "1.0"
APPLETS: Final = ("sh", "echo", "cat", "sleep", "id", "ls", "stat", "env", "printf", "true", "httpd", "nc")


def busybox_available() -> bool:
    return BUSYBOX.is_file()


def _add(archive: tarfile.TarFile, name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
         mode: int = 0o644, target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_600_000_000
    info.linkname = target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@functools.lru_cache(maxsize=1)
def busybox_layer() -> bytes:
    """An uncompressed layer: /bin/busybox, applet links, /etc, /tmp, /run."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("run", 0o755)):
            _add(archive, directory, kind=tarfile.DIRTYPE, mode=mode)
        _add(archive, "bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        for applet in APPLETS:
            _add(archive, f"bin/{applet}", kind=tarfile.SYMTYPE, target="busybox", mode=0o777)
        _add(archive, "etc/passwd", data=b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
        _add(archive, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
    return buffer.getvalue()


def app_layer(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, "app", kind=tarfile.DIRTYPE, mode=0o755)
        for name, data in sorted(files.items()):
            _add(archive, f"app/{name}", data=data)
    return buffer.getvalue()


@dataclass(frozen=True)
class BuiltImage:
    layout: Path
    digest: str

    @property
    def reference(self) -> str:
        """What a policy pins: ``NAME:TAG@sha256:...``."""
        return f"{IMAGE_NAME}:{TAG}@{self.digest}"

    @property
    def untagged(self) -> str:
        return f"{IMAGE_NAME}@{self.digest}"


def busybox_layout(root: Path, *, app_files: Mapping[str, bytes] | None = None) -> BuiltImage:
    """A layout at ``root`` with the busybox image (tagged ``TAG`` and by its full name)."""
    layers = [busybox_layer(), app_layer(app_files or {"hello.txt": b"hello from the image\n"})]
    layout = OciLayout.create(root)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]},
    }
    config_desc = layout.write_bytes(json.dumps(config).encode(), media.OCI_CONFIG)
    layer_descs = tuple(layout.write_bytes(layer, media.OCI_LAYER_TAR) for layer in layers)
    manifest = layout.write_manifest(Manifest(media_type=media.OCI_MANIFEST, config=config_desc,
                                              layers=layer_descs))
    layout.set_ref(manifest, TAG)
    return BuiltImage(layout=root, digest=manifest.digest)


def encrypt_layout(image: BuiltImage, destination: Path, recipient: ocicrypt.PublicKey) -> BuiltImage:
    """Copy ``image`` to ``destination`` with every layer encrypted for a JWE recipient."""
    with OciLayoutSource(OciLayoutRef(path=image.layout, tag=TAG)) as source, \
            OciLayoutDestination(OciLayoutRef(path=destination, tag=TAG)) as target:
        result = copy_image(source, target, transform=EncryptLayers(jwe=[ocicrypt.JweRecipient(recipient)]))
        target.commit()
    return BuiltImage(layout=destination, digest=result.root.digest)


def sign_layout(image: BuiltImage, key: SigningKey, identity: str = f"{IMAGE_NAME}:{TAG}") -> None:
    """Store a cosign signature of ``image`` (for ``identity``) in its layout."""
    with OciLayoutSource(OciLayoutRef(path=image.layout, tag=TAG)) as source, \
            OciLayoutDestination(OciLayoutRef(path=image.layout)) as target:
        sign_image(source, target, key, docker_reference=identity)
        target.commit()


def copy_layout(image: BuiltImage, destination: Path) -> BuiltImage:
    shutil.copytree(image.layout, destination)
    return BuiltImage(layout=destination, digest=image.digest)


def tamper_last_layer(image: BuiltImage) -> None:
    """Flip one byte of the image's top layer blob (the manifest still names the old digest)."""
    layout = OciLayout.open(image.layout)
    manifest_desc = layout.resolve(TAG)
    manifest = Manifest.parse(layout.read_blob(manifest_desc, 1 << 20), media_type=manifest_desc.media_type)
    top: Descriptor = manifest.layers[-1]
    path = layout.blob_path(top.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
