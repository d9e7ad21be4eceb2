"""Regressions for defects found in the security review of the image modules: hostile nested indexes,
an aborted write deleting an existing layout's own blobs, a negative tar member size, and ``protect``
signing whatever the destination tag names after the copy instead of what it wrote."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from coffer.cli import _image as cli_image
from coffer.cli import main
from coffer.errors import FormatError
from coffer.image import media
from coffer.image.docker_archive import DockerArchiveSource
from coffer.image.layout import REF_NAME, OciLayout
from coffer.image.models import Descriptor, Index, Platform
from coffer.image.pipeline import CopyResult, copy_image, parse_platform
from coffer.image.reference import DockerArchiveRef, OciLayoutRef
from coffer.image.signing import signature_tag
from coffer.image.transport import OciLayoutDestination, OciLayoutSource
from tests.image.imagebuild import add_image, layer_tar, make_image

AMD64 = parse_platform("linux/amd64")


def _index_with(layout: OciLayout, entries: Iterable[Descriptor]) -> Descriptor:
    return layout.write_bytes(Index(media_type=media.OCI_INDEX, manifests=tuple(entries)).to_bytes(),
                              media.OCI_INDEX)


def _root_with_extra(root: Path, extra: Descriptor, layout: OciLayout) -> None:
    """Tag ``latest`` an index of one amd64 image plus ``extra`` (not a chosen platform)."""
    amd64 = add_image(layout, [layer_tar("a0"), layer_tar("a1")])
    chosen = Descriptor(media_type=amd64.media_type, digest=amd64.digest, size=amd64.size,
                        platform=Platform(architecture="amd64", os="linux"))
    layout.set_ref(_index_with(layout, [chosen, extra]), "latest")


class _CountingSource(OciLayoutSource):
    def __init__(self, ref: OciLayoutRef) -> None:
        super().__init__(ref)
        self.index_reads = 0

    def read_index(self, descriptor: Descriptor) -> Index:
        self.index_reads += 1
        return super().read_index(descriptor)


def test_endlessly_nested_index_is_refused_with_a_typed_error(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "src")
    inner = add_image(layout, [layer_tar("arm")], arch="arm64")
    entry = Descriptor(media_type=inner.media_type, digest=inner.digest, size=inner.size,
                       platform=Platform(architecture="arm64", os="linux"))
    for _ in range(1200):  # deeper than Python's recursion limit
        entry = _index_with(layout, [entry])
    _root_with_extra(tmp_path / "src", entry, layout)
    with (
        OciLayoutSource(OciLayoutRef(path=tmp_path / "src", tag="latest")) as source,
        OciLayoutDestination(OciLayoutRef(path=tmp_path / "dst", tag="latest")) as destination,
        pytest.raises(FormatError, match="nested"),
    ):
        copy_image(source, destination, platform=AMD64)
    assert not (tmp_path / "dst").exists()


def test_index_naming_one_nested_index_many_times_is_walked_once(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "src")
    leaf = add_image(layout, [layer_tar("arm")], arch="arm64")
    entry = Descriptor(media_type=leaf.media_type, digest=leaf.digest, size=leaf.size,
                       platform=Platform(architecture="arm64", os="linux"))
    for _ in range(4):  # each level lists the level below 8 times: 8**4 paths, 5 documents
        entry = _index_with(layout, [entry] * 8)
    _root_with_extra(tmp_path / "src", entry, layout)
    with (
        _CountingSource(OciLayoutRef(path=tmp_path / "src", tag="latest")) as source,
        OciLayoutDestination(OciLayoutRef(path=tmp_path / "dst", tag="latest")) as destination,
    ):
        copy_image(source, destination, platform=AMD64)
        destination.commit()
    assert source.index_reads == 1 + 4  # the root, then each nested index once
    out = OciLayout.open(tmp_path / "dst")
    out.verify_blob(leaf)


def test_aborted_copy_into_an_existing_layout_keeps_the_blobs_it_already_had(tmp_path: Path) -> None:
    existing = make_image(tmp_path / "lay")
    before = sorted(p.name for p in existing.blob_dir.iterdir())
    with (
        OciLayoutSource(OciLayoutRef(path=tmp_path / "lay", tag="latest")) as source,
        OciLayoutDestination(OciLayoutRef(path=tmp_path / "lay", tag="copy")) as destination,
    ):
        copy_image(source, destination, platform=AMD64)  # re-puts the existing manifest blob
        destination.abort()
    assert sorted(p.name for p in existing.blob_dir.iterdir()) == before
    layout = OciLayout.open(tmp_path / "lay")
    manifest = layout.read_manifest(layout.resolve("latest"))
    for blob in (manifest.config, *manifest.layers):
        layout.verify_blob(blob)


def test_aborted_sink_rewriting_an_existing_blob_does_not_delete_it(tmp_path: Path) -> None:
    existing = make_image(tmp_path / "lay")
    manifest = existing.read_manifest(existing.resolve("latest"))
    layer = manifest.layers[0]
    data = b"".join(existing.iter_blob(layer))
    with OciLayoutDestination(OciLayoutRef(path=tmp_path / "lay", tag="other")) as destination:
        with destination.blob_sink() as sink:  # as a decryption whose plaintext is already there
            sink.write(data)
            assert sink.commit(layer.media_type).digest == layer.digest
        destination.abort()
    existing.verify_blob(layer)


def test_tar_member_with_a_negative_size_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"[]"))
    raw = bytearray(buffer.getvalue())
    raw[124:136] = b"\xff" * 12  # base-256 size field: -1
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    (tmp_path / "neg.tar").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="negative size"):
        DockerArchiveSource(DockerArchiveRef(path=tmp_path / "neg.tar"))


def test_protect_signs_the_digest_it_wrote_not_what_the_tag_names_afterwards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COFFER_SIGNING_PASSWORD", "review-password")
    make_image(tmp_path / "src")
    assert main(["image", "keygen", "--output-key-prefix", str(tmp_path / "k")]) == 0
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "pub.pem").write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    swapped: list[str] = []
    real_run = cli_image._run

    def run_then_move_the_tag(*args: object, **kwargs: object) -> CopyResult:
        result = real_run(*args, **kwargs)  # type: ignore[arg-type]
        layout = OciLayout.open(tmp_path / "dst")  # someone else moves the tag meanwhile
        other = add_image(layout, [layer_tar("intruder")])
        layout.set_ref(other, "v1")
        swapped.append(other.digest)
        return result

    monkeypatch.setattr(cli_image, "_run", run_then_move_the_tag)
    capsys.readouterr()
    code = main([
        "image", "protect", f"oci:{tmp_path / 'src'}:latest", f"oci:{tmp_path / 'dst'}:v1",
        "--recipient", f"jwe:{tmp_path / 'pub.pem'}", "--sign-key", str(tmp_path / "k.key"),
        "--identity", "example.com/app:v1", "--json",
    ])  # fmt: skip
    capsys.readouterr()
    assert code == 2
    names = {e.annotations.get(REF_NAME) for e in OciLayout.open(tmp_path / "dst").read_index().manifests}
    assert signature_tag(swapped[0]) not in names  # the intruder's image was not signed
    assert not any(name and name.endswith(".sig") for name in names)
    assert json.loads((tmp_path / "dst" / "index.json").read_bytes())["manifests"]


# --------------------------------------------------------------------------------------------------
# Follow-ups by the lead


def test_untagged_multiarch_copy_leaves_one_image_in_the_layout(tmp_path: Path) -> None:
    """The per-platform manifests of a copied index are blobs, not index.json entries of their own."""
    from coffer.image.locations import open_destination as open_dst
    from coffer.image.locations import open_source as open_src
    from coffer.image.pipeline import copy_image as copy
    from coffer.image.pipeline import parse_platform
    from tests.image.imagebuild import make_multiarch

    make_multiarch(tmp_path / "src")
    with open_src(f"oci:{tmp_path / 'src'}:latest") as source, open_dst(f"oci:{tmp_path / 'dst'}") as dst:
        copy(source, dst, platform=parse_platform("all"))
        dst.commit()
    index = OciLayout.open(tmp_path / "dst").read_index()
    assert len(index.manifests) == 1
    assert index.manifests[0].media_type == media.OCI_INDEX
    with open_src(f"oci:{tmp_path / 'dst'}") as again:  # not ambiguous
        assert again.root().digest == index.manifests[0].digest


def test_an_https_registry_cannot_send_the_client_to_plain_http() -> None:
    import httpx

    from coffer.errors import ProtocolError
    from coffer.image.registry import RegistryClient
    from coffer.image.transport import TransportOptions

    client = RegistryClient("registry.example", "team/app", TransportOptions())
    try:
        with pytest.raises(ProtocolError, match="plain http"):
            client._refuse_downgrade(httpx.Request("GET", "http://registry.example/v2/x/blobs/y"))
        client._refuse_downgrade(httpx.Request("GET", "https://cdn.example/blob"))  # https elsewhere is fine
    finally:
        client.close()


def test_kbs_refusal_is_reported_as_a_refused_key_not_a_registry_error() -> None:
    from coffer.errors import ProtocolError
    from coffer.image.keys import AttestedKekLookup, KeyReleaseRefusedError

    class RefusingClient:
        token = None

        def attest(self) -> str:
            raise ProtocolError("PolicyDeny", "denied by policy")

    lookup = AttestedKekLookup(RefusingClient())  # type: ignore[arg-type]
    with pytest.raises(KeyReleaseRefusedError) as info:
        lookup("kbs:///default/key/k")
    assert info.value.kind == "PolicyDeny"
    assert lookup("not-a-kbs-kid") is None
