"""The registry transport against Debian's docker-registry (plain, TLS, htpasswd, token auth), skopeo,
and a scripted registry that lies."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer._internal.net import free_port
from coffer.errors import CofferError, ConfigError, FormatError, ProtocolError, TransportError, UsageError
from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.locations import open_destination, open_source
from coffer.image.models import Descriptor, sha256_digest
from coffer.image.reference import RegistryRef, parse_reference
from coffer.image.registry import (
    Challenge,
    RegistryClient,
    RegistryDestination,
    RegistrySource,
    credentials_from_auth_files,
    is_loopback,
    parse_auth_file,
    parse_challenge,
    parse_error_body,
    registry_base_url,
)
from coffer.image.transport import ImageDestination, ImageSource, TransportOptions
from tests.image.imagebuild import make_image, make_multiarch
from tests.support.registry import (
    TOKEN_SERVICE,
    RegistryServer,
    Reply,
    ScriptedRegistry,
    htpasswd_auth,
    make_tls,
    registry,  # noqa: F401 - fixture
    running_registry,
    running_token_server,
    scripted_registry,
)

INSECURE = TransportOptions(insecure=True, timeout=10.0)
SKOPEO = shutil.which("skopeo")


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's real auth files out of the tests."""
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


# --------------------------------------------------------------------------------------------------
# helpers


def copy_image(source: ImageSource, destination: ImageDestination) -> Descriptor:
    """Copy the source's root image (manifest or index) into the destination and commit."""

    def copy(descriptor: Descriptor, tag: str | None) -> Descriptor:
        if descriptor.media_type in media.INDEX_TYPES:
            index = source.read_index(descriptor)
            for child in index.manifests:
                copy(child, None)
            data = index.raw
        else:
            manifest = source.read_manifest(descriptor)
            for blob in (manifest.config, *manifest.layers):
                if not destination.has_blob(blob):
                    destination.put_blob(source.iter_blob(blob), blob.media_type, expected=blob)
            data = manifest.raw
        return destination.put_manifest(data, descriptor.media_type, tag=tag)

    with destination:
        root = copy(source.root(), destination.tag)
        destination.commit()
    return root


def transfer(src: str, dst: str, options: TransportOptions = INSECURE) -> Descriptor:
    with open_source(parse_reference(src), options) as source:
        return copy_image(source, open_destination(parse_reference(dst), options))


def blob_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "blobs" / "sha256").iterdir()}


def ref(server: RegistryServer | ScriptedRegistry, name: str = "coffer/app:v1") -> RegistryRef:
    parsed = parse_reference(f"docker://{server.host}/{name}")
    assert isinstance(parsed, RegistryRef)
    return parsed


def tag_exists(server: RegistryServer, name: str, options: TransportOptions = INSECURE) -> bool:
    tag = name.rsplit(":", 1)[1]
    with RegistrySource(ref(server, name), options) as source:
        return source.resolve_tag(tag) is not None


# --------------------------------------------------------------------------------------------------
# round trips against docker-registry


def test_round_trip_single_image(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    make_image(tmp_path / "src", n_layers=3, gz=True, tag="v1")
    pushed = transfer(f"oci:{tmp_path}/src:v1", f"docker://{registry.host}/coffer/app:v1")
    pulled = transfer(f"docker://{registry.host}/coffer/app:v1", f"oci:{tmp_path}/out:v1")
    assert pulled.digest == pushed.digest == OciLayout.open(tmp_path / "src").resolve("v1").digest
    assert blob_files(tmp_path / "out") == blob_files(tmp_path / "src")
    with RegistrySource(ref(registry), INSECURE) as source:
        assert source.root() == pushed
        assert source.resolve_tag("v1") == pushed
        assert source.resolve_tag("missing") is None
    with RegistrySource(ref(registry, "coffer/other:v1"), INSECURE) as source:
        assert source.resolve_tag("v1") is None  # unknown repository is a missing tag too


def test_round_trip_by_digest_and_docker_media_types(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    make_image(tmp_path / "src", n_layers=2, docker=True)
    pushed = transfer(f"oci:{tmp_path}/src:latest", f"docker://{registry.host}/coffer/dock:1")
    assert pushed.media_type == media.DOCKER_MANIFEST
    pulled = transfer(f"docker://{registry.host}/coffer/dock@{pushed.digest}", f"oci:{tmp_path}/out:x")
    assert pulled == pushed
    assert blob_files(tmp_path / "out") == blob_files(tmp_path / "src")


def test_multiarch_index_round_trip(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    make_multiarch(tmp_path / "src", tag="multi")
    pushed = transfer(f"oci:{tmp_path}/src:multi", f"docker://{registry.host}/coffer/multi:m")
    assert pushed.media_type == media.OCI_INDEX
    pulled = transfer(f"docker://{registry.host}/coffer/multi:m", f"oci:{tmp_path}/out:m")
    assert pulled.digest == pushed.digest
    assert blob_files(tmp_path / "out") == blob_files(tmp_path / "src")
    with RegistrySource(ref(registry, "coffer/multi:m"), INSECURE) as source:
        index = source.read_index(source.root())
        assert {m.platform.architecture for m in index.manifests if m.platform} == {"amd64", "arm64"}
        for entry in index.manifests:
            assert source.read_manifest(entry).digest == entry.digest


def test_progress_is_reported_and_existing_blobs_are_not_uploaded(
    registry: RegistryServer, tmp_path: Path  # noqa: F811
) -> None:
    layout = make_image(tmp_path / "src", n_layers=1)
    manifest = layout.read_manifest(layout.resolve("latest"))
    layer = manifest.layers[0]
    calls: list[tuple[str, int, int | None]] = []
    with RegistryDestination(ref(registry), INSECURE, progress=lambda *a: calls.append(a)) as dest:
        assert not dest.has_blob(layer)
        assert dest.put_blob(layout.iter_blob(layer), layer.media_type, expected=layer) == layer
        assert calls[-1] == (layer.digest, layer.size, layer.size)
        assert dest.has_blob(layer)
        calls.clear()
        assert dest.put_blob(layout.iter_blob(layer), layer.media_type, expected=layer) == layer
        assert calls == []  # HEAD said it exists: nothing uploaded
        # Without ``expected`` the digest is learnt on the way.
        assert dest.put_blob(iter([b"ab", b"", b"c"]), media.OCI_LAYER_TAR) == Descriptor(
            media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"abc"), size=3
        )
        assert dest.put_blob(iter([]), media.OCI_EMPTY).digest == sha256_digest(b"")
    pulled: list[tuple[str, int, int | None]] = []
    with RegistrySource(ref(registry), INSECURE, progress=lambda *a: pulled.append(a)) as source:
        assert b"".join(source.iter_blob(layer)) == b"".join(layout.iter_blob(layer))
        assert pulled[0] == (layer.digest, 0, layer.size)
        assert pulled[-1] == (layer.digest, layer.size, layer.size)
        assert source.read_document(
            Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"abc"), size=3), 10
        ) == b"abc"


def test_nothing_is_tagged_before_commit_and_abort_forgets(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    layout = make_image(tmp_path / "src", n_layers=1)
    root = layout.resolve("latest")
    manifest = layout.read_manifest(root)
    dest = RegistryDestination(ref(registry, "coffer/app:late"), INSECURE)
    for blob in (manifest.config, *manifest.layers):
        dest.put_blob(layout.iter_blob(blob), blob.media_type, expected=blob)
    dest.put_manifest(manifest.raw, root.media_type, tag="late")
    dest.put_manifest(manifest.raw, root.media_type, tag="sha256-" + "a" * 64 + ".sig")
    assert not tag_exists(registry, "coffer/app:late")
    dest.commit()
    dest.abort()  # after commit: a no-op
    assert tag_exists(registry, "coffer/app:late")
    assert tag_exists(registry, "coffer/app:sha256-" + "a" * 64 + ".sig")

    with RegistryDestination(ref(registry, "coffer/app:never"), INSECURE) as dest:
        dest.put_manifest(manifest.raw, root.media_type, tag="never")
        dest.abort()
        dest.abort()
        with pytest.raises(UsageError):
            dest.put_manifest(manifest.raw, root.media_type, tag="never")
    assert not tag_exists(registry, "coffer/app:never")


def test_untagged_manifest_is_pushed_by_digest(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    layout = make_image(tmp_path / "src", n_layers=1)
    root = layout.resolve("latest")
    manifest = layout.read_manifest(root)
    with RegistryDestination(ref(registry, f"coffer/app@{root.digest}"), INSECURE) as dest:
        assert dest.tag is None
        for blob in (manifest.config, *manifest.layers):
            dest.put_blob(layout.iter_blob(blob), blob.media_type, expected=blob)
        dest.put_manifest(manifest.raw, root.media_type, tag=None)
        dest.commit()
    with RegistrySource(ref(registry, f"coffer/app@{root.digest}"), INSECURE) as source:
        assert source.root().digest == root.digest
        assert source.resolve_tag("latest") is None


def test_corrupt_source_blob_leaves_no_tag(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    layout = make_image(tmp_path / "src", n_layers=3)
    manifest = layout.read_manifest(layout.resolve("latest"))
    path = layout.blob_path(manifest.layers[1].digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="digest"):
        transfer(f"oci:{tmp_path}/src:latest", f"docker://{registry.host}/coffer/app:broken")
    assert not tag_exists(registry, "coffer/app:broken")
    # The half-sent blob was not completed under either digest.
    with RegistryDestination(ref(registry), INSECURE) as dest:
        assert not dest.has_blob(manifest.layers[1])
        assert not dest.has_blob(Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(bytes(data)),
                                            size=len(data)))


def test_blob_not_matching_expected_is_not_completed(registry: RegistryServer) -> None:  # noqa: F811
    expected = Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"right"), size=5)
    with RegistryDestination(ref(registry), INSECURE) as dest:
        with pytest.raises(FormatError, match="digest"):
            dest.put_blob([b"wrong"], media.OCI_LAYER_TAR, expected=expected)
        with pytest.raises(FormatError, match="longer"):
            dest.put_blob([b"right", b"!"], media.OCI_LAYER_TAR, expected=expected)
        with pytest.raises(FormatError, match="bytes"):
            dest.put_blob([b"rig"], media.OCI_LAYER_TAR, expected=expected)
        assert not dest.has_blob(expected)
        assert not dest.has_blob(Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"wrong"),
                                            size=5))


def test_manifest_refusals_in_destination(registry: RegistryServer) -> None:  # noqa: F811
    with RegistryDestination(ref(registry), INSECURE) as dest:
        with pytest.raises(FormatError, match="media type"):
            dest.put_manifest(b"{}", media.OCI_CONFIG, tag="x")
        with pytest.raises(FormatError, match="limit"):
            dest.put_manifest(b" " * (4 * 1024 * 1024 + 1), media.OCI_MANIFEST, tag="x")
        with pytest.raises(UsageError, match="tag"):
            dest.put_manifest(b"{}", media.OCI_MANIFEST, tag="bad tag")


def test_registry_rejecting_a_manifest_is_a_protocol_error(registry: RegistryServer) -> None:  # noqa: F811
    # The registry refuses a manifest whose blobs it does not have; that surfaces at commit.
    missing = Descriptor(media_type=media.OCI_CONFIG, digest=sha256_digest(b"nope"), size=4)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "config": missing.to_obj(),
                           "layers": []}).encode()
    dest = RegistryDestination(ref(registry, "coffer/app:orphan"), INSECURE)
    dest.put_manifest(manifest, media.OCI_MANIFEST, tag="orphan")
    with pytest.raises(ProtocolError) as info:
        dest.commit()
    assert info.value.kind == "MANIFEST_BLOB_UNKNOWN"
    assert "HTTP 400" in info.value.detail
    dest.abort()


# --------------------------------------------------------------------------------------------------
# skopeo interop

needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


def _skopeo(*args: str) -> None:
    assert SKOPEO is not None
    result = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


@needs_skopeo
def test_skopeo_pushes_coffer_pulls(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    make_image(tmp_path / "src", n_layers=2, gz=True, tag="v1")
    _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path}/src:v1", f"docker://{registry.host}/sk/app:v1")
    pulled = transfer(f"docker://{registry.host}/sk/app:v1", f"oci:{tmp_path}/out:v1")
    src_layout = OciLayout.open(tmp_path / "src")
    src_manifest = src_layout.read_manifest(src_layout.resolve("v1"))
    out_manifest = OciLayout.open(tmp_path / "out").read_manifest(pulled)
    assert [layer.digest for layer in out_manifest.layers] == [layer.digest for layer in src_manifest.layers]
    out_blobs, src_blobs = blob_files(tmp_path / "out"), blob_files(tmp_path / "src")
    for layer in src_manifest.layers:
        assert out_blobs[layer.hex] == src_blobs[layer.hex]


@needs_skopeo
def test_coffer_pushes_skopeo_pulls(registry: RegistryServer, tmp_path: Path) -> None:  # noqa: F811
    make_image(tmp_path / "src", n_layers=2, gz=True, tag="v1")
    pushed = transfer(f"oci:{tmp_path}/src:v1", f"docker://{registry.host}/co/app:v1")
    _skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/co/app:v1", f"oci:{tmp_path}/out:v1")
    out = OciLayout.open(tmp_path / "out")
    assert out.resolve("v1").digest == pushed.digest  # skopeo kept the manifest byte for byte
    src_blobs, out_blobs = blob_files(tmp_path / "src"), blob_files(tmp_path / "out")
    for layer in out.read_manifest(out.resolve("v1")).layers:
        assert out_blobs[layer.hex] == src_blobs[layer.hex]


# --------------------------------------------------------------------------------------------------
# authentication


def _pushable(tmp_path: Path) -> str:
    make_image(tmp_path / "src", n_layers=1, tag="v1")
    return f"oci:{tmp_path}/src:v1"


def test_basic_auth_right_wrong_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = htpasswd_auth(tmp_path / "auth", {"alice": "s3cret-pw"})
    src = _pushable(tmp_path)
    with running_registry(tmp_path / "reg", auth=auth) as server:
        dst = f"docker://{server.host}/coffer/app:v1"
        right = TransportOptions(insecure=True, username="alice", password="s3cret-pw", timeout=10)
        transfer(src, dst, right)
        assert tag_exists(server, "coffer/app:v1", right)

        wrong = TransportOptions(insecure=True, username="alice", password="not-it-pw", timeout=10)
        with pytest.raises(ProtocolError, match=f"registry {server.host} refused the credentials") as info:
            transfer(src, dst, wrong)
        assert "not-it-pw" not in str(info.value)
        assert "alice" in str(info.value)

        with pytest.raises(ProtocolError, match="requires a user name and password"):
            tag_exists(server, "coffer/app:v1")

        # From the containers auth file when no options are given.
        auth_file = tmp_path / "auth.json"
        token = base64.b64encode(b"alice:s3cret-pw").decode()
        auth_file.write_text(json.dumps({"auths": {server.host: {"auth": token}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
        assert tag_exists(server, "coffer/app:v1")


def test_token_auth_right_wrong_anonymous(tmp_path: Path) -> None:
    src = _pushable(tmp_path)
    with running_token_server(tmp_path / "tok", {"bob": "t0ken-pw"}) as tokens, \
            running_registry(tmp_path / "reg", auth=tokens.auth) as server:
        dst = f"docker://{server.host}/coffer/app:v1"
        right = TransportOptions(insecure=True, username="bob", password="t0ken-pw", timeout=10)
        transfer(src, dst, right)
        # One token per client and scope, reused for every request of the copy.
        assert tokens.requests == [("bob", ["repository:coffer/app:pull,push"])]
        assert tag_exists(server, "coffer/app:v1", right)
        assert tokens.requests[-1] == ("bob", ["repository:coffer/app:pull"])

        wrong = TransportOptions(insecure=True, username="bob", password="wrong-pw", timeout=10)
        with pytest.raises(ProtocolError, match=f"refused the credentials of user 'bob' for registry "
                           f"{server.host}") as info:
            transfer(src, dst, wrong)
        assert "wrong-pw" not in str(info.value)

        with pytest.raises(ProtocolError, match="refused anonymous access") as anon:
            tag_exists(server, "coffer/app:v1")
        assert anon.value.kind == "UNAUTHORIZED"


def test_401_refreshes_the_token_once_then_fails(tmp_path: Path) -> None:
    with running_token_server(tmp_path / "tok", {"bob": "t0ken-pw"}) as tokens, scripted_registry() as liar:
        challenge = f'Bearer realm="{tokens.realm}",service="{TOKEN_SERVICE}"'
        liar.routes[("GET", "/v2/")] = Reply(401, {"WWW-Authenticate": challenge})
        liar.routes[("GET", "/v2/x/y/manifests/t")] = Reply(
            401, {"WWW-Authenticate": challenge + ',scope="repository:x/y:pull",error="insufficient_scope"'})
        options = TransportOptions(insecure=True, username="bob", password="t0ken-pw", timeout=10)
        with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), options) as source, \
                pytest.raises(ProtocolError, match="refused the credentials of user 'bob'"):
            source.root()
        assert tokens.requests == [("bob", ["repository:x/y:pull"])] * 2
        assert liar.seen.count(("GET", "/v2/x/y/manifests/t")) == 2


def test_tls_with_custom_ca(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    src = _pushable(tmp_path)
    with running_registry(tmp_path / "reg", http_extra=tls.http_extra, ca_file=tls.ca_file) as server:
        options = TransportOptions(ca_file=tls.ca_file, timeout=10)
        pushed = transfer(src, f"docker://{server.host}/coffer/app:v1", options)
        pulled = transfer(f"docker://{server.host}/coffer/app:v1", f"oci:{tmp_path}/out:v1", options)
        assert pulled.digest == pushed.digest

        with pytest.raises(TransportError, match="certificate verification") as info:
            tag_exists(server, "coffer/app:v1", TransportOptions(timeout=10))
        assert server.host in str(info.value)
        # insecure means plain http, which a TLS-only registry refuses (Go answers HTTP 400).
        with pytest.raises(ProtocolError, match=server.host):
            tag_exists(server, "coffer/app:v1", INSECURE)


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA"):
        RegistryClient("127.0.0.1:1", "x", TransportOptions(ca_file=tmp_path / "nope.pem"))


@pytest.mark.parametrize("host", ["registry.example.com", "10.0.0.1:5000", "example.com:443",
                                  "[2001:db8::1]:5000", "localhost.example.com", "docker.io"])
def test_insecure_for_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(UsageError, match="loopback"):
        open_destination(parse_reference(f"docker://{host}/x/y:z"), INSECURE)
    with pytest.raises(UsageError, match="loopback"):
        open_source(parse_reference(f"docker://{host}/x/y:z"), INSECURE)


def test_connection_choice() -> None:
    assert registry_base_url("127.0.0.1:5000", insecure=True) == "http://127.0.0.1:5000"
    assert registry_base_url("127.0.0.1:5000", insecure=False) == "https://127.0.0.1:5000"
    assert registry_base_url("docker.io", insecure=False) == "https://registry-1.docker.io"
    assert registry_base_url("quay.io", insecure=False) == "https://quay.io"
    for host in ("localhost", "localhost:5000", "127.0.0.1", "127.1.2.3:80", "[::1]:5000", "[::1]"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "example.com", "[2001:db8::1]:1", "localhost.evil.com", "128.0.0.1:5000"):
        assert not is_loopback(host), host


def test_unreachable_registry_is_a_transport_error() -> None:
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransportError, match=host) as info, \
            RegistrySource(ref_of(f"docker://{host}/x/y:z"), INSECURE) as source:
        source.root()
    assert "GET /v2/" in str(info.value)


def ref_of(text: str) -> RegistryRef:
    parsed = parse_reference(text)
    assert isinstance(parsed, RegistryRef)
    return parsed


# --------------------------------------------------------------------------------------------------
# a lying registry

MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
    "config": {"mediaType": media.OCI_CONFIG, "digest": sha256_digest(b"{}"), "size": 2}, "layers": [],
}).encode()
MANIFEST_DIGEST = sha256_digest(MANIFEST)


@pytest.fixture
def liar() -> Iterator[ScriptedRegistry]:
    with scripted_registry() as server:
        yield server


def _manifest_reply(body: bytes = MANIFEST, headers: dict[str, str] | None = None) -> Reply:
    return Reply(200, {"Content-Type": media.OCI_MANIFEST, **(headers or {})}, body)


def test_liar_manifest_digest_differs_from_the_one_asked(liar: ScriptedRegistry) -> None:
    other = MANIFEST + b" "
    liar.routes[("GET", f"/v2/x/y/manifests/{MANIFEST_DIGEST}")] = _manifest_reply(other)
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y@{MANIFEST_DIGEST}"), INSECURE) as source, \
            pytest.raises(FormatError, match=f"content has digest {sha256_digest(other)}"):
        source.root()


def test_liar_docker_content_digest_mismatch(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/x/y/manifests/t")] = _manifest_reply(
        headers={"Docker-Content-Digest": sha256_digest(b"other")})
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(FormatError, match="Docker-Content-Digest"):
        source.root()


def test_liar_manifest_answer_matching_is_accepted(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/x/y/manifests/t")] = _manifest_reply(
        headers={"Docker-Content-Digest": MANIFEST_DIGEST,
                 "Content-Type": media.OCI_MANIFEST + "; charset=utf-8"})
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source:
        root = source.root()
        assert root == Descriptor(media_type=media.OCI_MANIFEST, digest=MANIFEST_DIGEST, size=len(MANIFEST))
        assert source.read_manifest(root).config.size == 2
    assert liar.seen.count(("GET", "/v2/x/y/manifests/t")) == 1  # read_manifest used the fetched bytes


@pytest.mark.parametrize("chunked", [False, True])
def test_liar_oversized_manifest_is_refused(liar: ScriptedRegistry, chunked: bool) -> None:
    liar.routes[("GET", "/v2/x/y/manifests/t")] = Reply(200, {"Content-Type": media.OCI_MANIFEST},
                                                        b" " * (5 * 1024 * 1024), chunked=chunked)
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(FormatError, match="limit"):
        source.root()


def test_liar_unknown_manifest_content_type(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/x/y/manifests/t")] = Reply(200, {"Content-Type": "text/html"}, MANIFEST)
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(FormatError, match="text/html"):
        source.root()


@pytest.mark.parametrize(
    ("body", "match"),
    [(b"{}X", "digest"), (b"{", "truncated"), (b"{}" + b"x" * 3_000_000, "longer")],
    ids=["wrong-content", "truncated", "too-long"],
)
def test_liar_blob_content_is_refused(liar: ScriptedRegistry, body: bytes, match: str) -> None:
    descriptor = Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"{}X"[:2] + b"Y"), size=3)
    if match != "digest":
        descriptor = Descriptor(media_type=media.OCI_LAYER_TAR, digest=sha256_digest(b"{}"), size=2)
    liar.routes[("GET", f"/v2/x/y/blobs/{descriptor.digest}")] = Reply(
        200, {"Content-Type": "application/octet-stream"}, body, chunked=True)
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(FormatError, match=match):
        b"".join(source.iter_blob(descriptor))


def test_liar_blob_redirect_is_followed_and_checked(liar: ScriptedRegistry) -> None:
    descriptor = Descriptor(media_type=media.OCI_CONFIG, digest=sha256_digest(b"{}"), size=2)
    liar.routes[("GET", f"/v2/x/y/blobs/{descriptor.digest}")] = Reply(
        307, {"Location": f"http://{liar.host}/storage/blob"}, b"")
    liar.routes[("GET", "/storage/blob")] = Reply(200, {}, b"{}")
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source:
        assert source.read_document(descriptor, 100) == b"{}"
        with pytest.raises(FormatError, match="limit"):
            source.read_document(descriptor, 1)


def test_liar_error_document_is_a_protocol_error(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/x/y/manifests/t")] = Reply(
        403, {"Content-Type": "application/json"},
        b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}')
    liar.routes[("GET", "/v2/x/y/manifests/u")] = Reply(500, {}, b"<html>oops</html>")
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source:
        with pytest.raises(ProtocolError) as info:
            source.root()
        assert info.value.kind == "DENIED"
        assert "HTTP 403" in info.value.detail
        assert "denied" in info.value.detail
        with pytest.raises(ProtocolError) as info:
            source.resolve_tag("u")
        assert info.value.kind == "HTTP_500"
        assert source.resolve_tag("nothing") is None  # 404: a missing tag


def test_liar_not_a_registry(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/")] = Reply(404, {}, b"not here")
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(ProtocolError, match="HTTP 404"):
        source.root()


def test_liar_token_realm_over_plain_http_elsewhere_is_refused(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/")] = Reply(
        401, {"WWW-Authenticate": 'Bearer realm="http://auth.example.com/token",service="x"'}, b"")
    options = TransportOptions(insecure=True, username="u", password="p", timeout=5)
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), options) as source, \
            pytest.raises(ProtocolError, match=r"auth\.example\.com"):
        source.root()


def test_liar_unsupported_auth_scheme(liar: ScriptedRegistry) -> None:
    liar.routes[("GET", "/v2/")] = Reply(401, {"WWW-Authenticate": 'Negotiate'}, b"")
    with RegistrySource(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as source, \
            pytest.raises(ProtocolError, match="unsupported authentication"):
        source.root()


def test_liar_upload_without_location(liar: ScriptedRegistry) -> None:
    liar.routes[("POST", "/v2/x/y/blobs/uploads/")] = Reply(202, {}, b"")
    with RegistryDestination(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as dest, \
            pytest.raises(ProtocolError, match="Location"):
        dest.put_blob([b"abc"], media.OCI_LAYER_TAR)


def test_liar_manifest_stored_under_another_digest(liar: ScriptedRegistry) -> None:
    liar.routes[("PUT", "/v2/x/y/manifests/t")] = Reply(201, {"Docker-Content-Digest": sha256_digest(b"x")})
    with RegistryDestination(ref_of(f"docker://{liar.host}/x/y:t"), INSECURE) as dest:
        dest.put_manifest(MANIFEST, media.OCI_MANIFEST, tag="t")
        with pytest.raises(ProtocolError, match="stored manifest"):
            dest.commit()


# --------------------------------------------------------------------------------------------------
# parsers


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/alpine:pull"',
         Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                              "scope": "repository:library/alpine:pull"})),
        ('bearer Realm=https://a/t, service = "s\\"q"', Challenge("bearer", {"realm": "https://a/t",
                                                                             "service": 's"q'})),
        ("Basic", Challenge("basic", {})),
        ('Basic realm="a", Bearer realm="b"', Challenge("basic", {"realm": "a"})),
    ],
)
def test_parse_challenge(header: str, expected: Challenge) -> None:
    assert parse_challenge(header) == expected


@pytest.mark.parametrize("header", ["", "  ", '="x"', 'Bearer realm="unterminated', "x" * 9000])
def test_malformed_challenge_is_refused(header: str) -> None:
    with pytest.raises(ProtocolError):
        parse_challenge(header)


def test_parse_error_body() -> None:
    assert parse_error_body(b'{"errors":[{"code":"X","message":"m\\n"}]}') == ("X", "m?")
    assert parse_error_body(b'{"errors":[{"code":"X"}]}') == ("X", "")
    for bad in (b"", b"[]", b'{"errors":[]}', b'{"errors":[{"code":1}]}', b"\xff", b'{"errors":{}}'):
        assert parse_error_body(bad) is None


def test_auth_file_lookup(tmp_path: Path) -> None:
    def entry(user: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:pw:with:colons".encode()).decode()}

    data = json.dumps({"auths": {
        "https://index.docker.io/v1/": entry("hub"),
        "reg.example.com": entry("host"),
        "reg.example.com/team": entry("team"),
        "http://other.example.com:5000": entry("other"),
    }}).encode()
    path = tmp_path / "auth.json"
    found = parse_auth_file(data, path, "docker.io", "library/alpine")
    assert found is not None
    assert (found.username, found.password) == ("hub", "pw:with:colons")
    assert "pw:with" not in repr(found)
    assert parse_auth_file(data, path, "reg.example.com", "team/app").username == "team"  # type: ignore[union-attr]
    assert parse_auth_file(data, path, "reg.example.com", "teamx/app").username == "host"  # type: ignore[union-attr]
    assert parse_auth_file(data, path, "other.example.com:5000", "a").username == "other"  # type: ignore[union-attr]
    assert parse_auth_file(data, path, "nobody.example.com", "a") is None

    # Order: $REGISTRY_AUTH_FILE, then $XDG_RUNTIME_DIR/containers/auth.json, then ~/.docker/config.json.
    (tmp_path / "run" / "containers").mkdir(parents=True)
    (tmp_path / "run" / "containers" / "auth.json").write_text(json.dumps({"auths": {"h": entry("xdg")}}))
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    (tmp_path / "home" / ".docker" / "config.json").write_text(json.dumps({"auths": {"h": entry("docker")}}))
    env = {"REGISTRY_AUTH_FILE": str(path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    path.write_bytes(data)

    def user(**kw: str) -> str | None:
        found = credentials_from_auth_files("h", "r", environ=kw, home=tmp_path / "home")
        return found.username if found else None

    assert user(**env) == "xdg"  # the first file has no entry for h
    assert user() == "docker"
    assert credentials_from_auth_files("reg.example.com", "x", environ=env, home=tmp_path) is not None


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"auths": []}', b'{"auths": {"h": {}}}', b'{"auths": {"h": {"auth": "!!"}}}',
     b'{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}', b"x" * (1024 * 1024 + 1)],
    ids=["json", "list", "auths-list", "no-auth", "not-base64", "no-colon", "huge"],
)
def test_malformed_auth_file_is_a_config_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ConfigError, match="auth file") as info:
        parse_auth_file(data, tmp_path / "a.json", "h", "r")
    assert "bm9jb2xvbg" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_challenge_only_raises_typed_errors(header: str) -> None:
    try:
        challenge = parse_challenge(header)
    except CofferError:
        return
    assert challenge.scheme


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                              lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.sampled_from(["errors", "code", "message", "x"]), inner,
                                                max_size=3),
                              max_leaves=10).map(lambda obj: json.dumps(obj).encode())))
def test_parse_error_body_never_raises(data: bytes) -> None:
    result = parse_error_body(data)
    assert result is None or all(isinstance(part, str) for part in result)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                              lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.sampled_from(["auths", "h", "auth", "https://h/v1/"]),
                                                inner, max_size=3),
                              max_leaves=10).map(lambda obj: json.dumps(obj).encode())))
def test_parse_auth_file_only_raises_typed_errors(data: bytes) -> None:
    with contextlib.suppress(CofferError):
        parse_auth_file(data, Path("/x/auth.json"), "h", "r")


def test_reprs_hide_secrets() -> None:
    options = TransportOptions(username="u", password="hunter2-secret", insecure=True)
    client = RegistryClient("127.0.0.1:1", "x/y", options)
    try:
        assert "hunter2" not in repr(client)
    finally:
        client.close()
