"""containers-policy.json parsing, scope selection and verify_image's numbered steps."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, PolicyDeniedError, UnsupportedError, VerificationError
from coffer.image.locations import open_source
from coffer.image.reference import DockerArchiveRef, OciLayoutRef, RegistryRef, parse_registry_name
from coffer.image.signing import SigningKey, build_payload
from coffer.image.transport import OciLayoutSource, TransportOptions
from coffer.image.trust_policy import (
    Policy,
    SignedIdentity,
    identity_matches,
    load_policy,
    parse_policy,
    select_requirements,
    verify_image,
)
from tests.image.test_signing import (
    IDENTITY,
    KeyPair,
    attach_raw,
    make_layout,
    sign_b64,
    sign_layout,
)
from tests.support.registry import RegistryServer, registry  # noqa: F401


def _policy(tmp_path: Path, obj: dict[str, Any], public_pem: bytes | None = None) -> Policy:
    if public_pem is not None:
        (tmp_path / "key.pub").write_bytes(public_pem)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(obj))
    return load_policy(path)


def _signed(identity: dict[str, Any] | None = None, key: str = "key.pub") -> dict[str, Any]:
    requirement: dict[str, Any] = {"type": "sigstoreSigned", "keyPath": key}
    if identity is not None:
        requirement["signedIdentity"] = identity
    return requirement


REJECT = [{"type": "reject"}]
ACCEPT = [{"type": "insecureAcceptAnything"}]


def _oci_policy(tmp_path: Path, keys: KeyPair, identity: dict[str, Any] | None = None) -> Policy:
    exact = identity or {"type": "exactReference", "dockerReference": IDENTITY}
    obj = {"default": REJECT, "transports": {"oci": {"": [_signed(exact)]}}}
    return _policy(tmp_path, obj, keys.public_pem)


# -- parsing ---------------------------------------------------------------------------------------


def test_full_policy_parses(tmp_path: Path, keys: KeyPair) -> None:
    key_data = base64.b64encode(keys.public_pem).decode()
    policy = _policy(tmp_path, {
        "default": REJECT,
        "transports": {
            "docker": {
                "registry.example/a": [_signed()],
                "registry.example/b": [{"type": "sigstoreSigned", "keyData": key_data,
                                        "signedIdentity": {"type": "matchRepository"}}],
                "registry.example/c": [{"type": "sigstoreSigned", "keyPaths": ["key.pub", "key.pub"]}],
                "registry.example/d": [{"type": "sigstoreSigned", "keyDatas": [key_data],
                                        "signedIdentity": {"type": "remapIdentity",
                                                           "prefix": "registry.example",
                                                           "signedPrefix": "mirror.example/x"}}],
                "*.example.com": ACCEPT,
                "": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/etc/pki/gpg"}],
            },
            "oci": {"/srv/images": [_signed({"type": "exactRepository", "dockerRepository": "r.example/x"})]},
            "containers-storage": {"": ACCEPT},
        },
    }, keys.public_pem)
    assert len(policy.transports["docker"]) == 6
    assert "containers-storage" not in policy.transports


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"transports": {}}, "default"),
        ({"default": []}, "default"),
        ({"default": REJECT, "extra": 1}, "extra"),
        ({"default": [{"type": "acceptIfNice"}]}, "default[0].type"),
        ({"default": [{"type": "reject", "why": "x"}]}, "default[0].why"),
        ({"default": REJECT, "transports": {"dokcer": {}}}, "transports.dokcer"),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [{"type": "sigstoreSigned"}]}}},
         'transports.docker["reg.example/x"][0]'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            {"type": "sigstoreSigned", "keyPath": "missing.pub"}]}}},
         'transports.docker["reg.example/x"][0].keyPath'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            {"type": "sigstoreSigned", "keyPath": "key.pub", "keyData": "AAAA"}]}}},
         'transports.docker["reg.example/x"][0]'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            {"type": "sigstoreSigned", "keyData": "%%%"}]}}},
         'transports.docker["reg.example/x"][0].keyData'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            _signed({"type": "matchSomething"})]}}},
         'transports.docker["reg.example/x"][0].signedIdentity.type'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            _signed({"type": "exactReference", "dockerReference": "reg.example/x"})]}}},
         "signedIdentity.dockerReference"),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            _signed({"type": "exactRepository", "dockerRepository": "reg.example/x:1"})]}}},
         "signedIdentity.dockerRepository"),
        ({"default": REJECT, "transports": {"docker": {"UPPER/x": REJECT}}}, 'transports.docker["UPPER/x"]'),
        ({"default": REJECT, "transports": {"docker": {"*": REJECT}}}, 'transports.docker["*"]'),
        ({"default": REJECT, "transports": {"oci": {"relative/path": REJECT}}},
         'transports.oci["relative/path"]'),
        ({"default": REJECT, "transports": {"docker": {"reg.example/x": [
            {"type": "signedBy", "keyType": "X509", "keyPath": "/k"}]}}}, "keyType"),
        ({"default": REJECT, "transports": {"docker": []}}, "transports.docker"),
        ({"default": {"type": "reject"}}, "default"),
    ],
)
def test_malformed_policy_names_the_field(
    tmp_path: Path, keys: KeyPair, obj: dict[str, Any], path: str
) -> None:
    with pytest.raises(FormatError) as info:
        _policy(tmp_path, obj, keys.public_pem)
    assert path in str(info.value)


def test_keyless_sigstore_is_refused_not_ignored(tmp_path: Path, keys: KeyPair) -> None:
    obj = {"default": [{"type": "sigstoreSigned", "keyPath": "key.pub", "rekorPublicKeyPath": "r.pub"}]}
    with pytest.raises(UnsupportedError, match=r"default\[0\]\.rekorPublicKeyPath"):
        _policy(tmp_path, obj, keys.public_pem)


def test_duplicate_keys_and_oversize_are_refused() -> None:
    with pytest.raises(FormatError, match="duplicate"):
        parse_policy(b'{"default":[{"type":"reject"}],"default":[]}')
    with pytest.raises(FormatError, match="limit"):
        parse_policy(b'{"default":[{"type":"reject"}]}' + b" " * (1024 * 1024))


def test_relative_key_path_is_relative_to_the_policy_file(tmp_path: Path, keys: KeyPair,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "k.pub").write_bytes(keys.public_pem)
    (tmp_path / "conf" / "policy.json").write_text(json.dumps({"default": [_signed(key="k.pub")]}))
    monkeypatch.chdir(tmp_path)
    assert load_policy(Path("conf/policy.json")).default


policy_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(
        ["reject", "insecureAcceptAnything", "sigstoreSigned", "signedBy", "matchExact", "key.pub", "", "*"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["default", "transports", "docker", "oci", "type", "keyPath", "keyData",
                         "signedIdentity", "reg.example/x", "", "keyType", "prefix"]), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(policy_json.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_policy_parser_raises_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(CofferError):
        parse_policy(data, base_dir=Path("/nonexistent"))


# -- scopes ----------------------------------------------------------------------------------------


@pytest.fixture
def scoped(tmp_path: Path, keys: KeyPair) -> Policy:
    names = ["reg.example.com:5000/ns/app:1.0", "reg.example.com:5000/ns/app", "reg.example.com:5000/ns",
             "reg.example.com:5000", "*.example.com", "*.com", "other.example.com/ns/app@sha256:" + "1" * 64,
             "localhost/x", ""]
    docker = {name: [{"type": "sigstoreSigned", "keyPath": "key.pub",
                      "signedIdentity": {"type": "exactRepository",
                                         "dockerRepository": f"scope.example/s{n}"}}]
              for n, name in enumerate(names)}
    oci = {str(tmp_path / "layouts" / "app") + ":v1": REJECT, str(tmp_path / "layouts"): ACCEPT}
    return _policy(tmp_path, {"default": REJECT, "transports": {"docker": docker, "oci": oci,
                                                               "docker-archive": {"/srv/a.tar": ACCEPT}}},
                   keys.public_pem)


@pytest.mark.parametrize(
    ("image", "scope"),
    [
        ("reg.example.com:5000/ns/app:1.0", 'transports.docker["reg.example.com:5000/ns/app:1.0"]'),
        ("reg.example.com:5000/ns/app:2.0", 'transports.docker["reg.example.com:5000/ns/app"]'),
        ("reg.example.com:5000/ns/app@sha256:" + "2" * 64,
         'transports.docker["reg.example.com:5000/ns/app"]'),
        ("reg.example.com:5000/ns/other:1", 'transports.docker["reg.example.com:5000/ns"]'),
        ("reg.example.com:5000/top:1", 'transports.docker["reg.example.com:5000"]'),
        ("reg.example.com/ns/app:1.0", 'transports.docker["*.example.com"]'),
        ("a.b.example.com/x:1", 'transports.docker["*.example.com"]'),
        ("example.com/x:1", 'transports.docker["*.com"]'),
        ("other.example.com/ns/app@sha256:" + "1" * 64, 'transports.docker["other.example.com/ns/app@sha256:'
         + "1" * 64 + '"]'),
        ("localhost/x:7", 'transports.docker["localhost/x"]'),
        ("quay.io/x:1", 'transports.docker[""]'),
    ],
)
def test_docker_scope_precedence(scoped: Policy, image: str, scope: str) -> None:
    assert select_requirements(scoped, parse_registry_name(image))[0] == scope


def test_path_scopes(scoped: Policy, tmp_path: Path) -> None:
    app = tmp_path / "layouts" / "app"
    assert select_requirements(scoped, OciLayoutRef(path=app, tag="v1"))[0].endswith(':v1"]')
    assert select_requirements(scoped, OciLayoutRef(path=app, tag="v2"))[0] == (
        f'transports.oci["{tmp_path / "layouts"}"]')
    assert select_requirements(scoped, OciLayoutRef(path=tmp_path / "elsewhere"))[0] == "default"
    assert select_requirements(scoped, DockerArchiveRef(path=Path("/srv/a.tar")))[0] == (
        'transports.docker-archive["/srv/a.tar"]')
    assert select_requirements(scoped, DockerArchiveRef(path=Path("/srv/b.tar")))[0] == "default"


# -- identities ------------------------------------------------------------------------------------

R = parse_registry_name


@pytest.mark.parametrize(
    ("rule", "image", "signed", "ok"),
    [
        (SignedIdentity(), "r.example/a:1", "r.example/a:1", True),
        (SignedIdentity(), "r.example/a:1", "r.example/a:2", False),
        (SignedIdentity(), "r.example/a:1", "r.example/a", False),
        (SignedIdentity(), "r.example/a@sha256:" + "3" * 64, "r.example/a:9", True),
        (SignedIdentity(), "r.example/a@sha256:" + "3" * 64, "r.example/b:9", False),
        (SignedIdentity(type="matchExact"), "r.example/a:1", "r.example/a:1", True),
        (SignedIdentity(type="matchExact"), "r.example/a@sha256:" + "3" * 64, "r.example/a:1", False),
        (SignedIdentity(type="matchRepository"), "r.example/a:1", "r.example/a:2", True),
        (SignedIdentity(type="matchRepository"), "r.example/a:1", "r.example/b:1", False),
        (SignedIdentity(type="exactReference", docker_reference=R("s.example/z:3")), "r.example/a:1",
         "s.example/z:3", True),
        (SignedIdentity(type="exactReference", docker_reference=R("s.example/z:3")), "r.example/a:1",
         "s.example/z:4", False),
        (SignedIdentity(type="exactRepository", docker_repository=R("s.example/z", default_tag=False)),
         "r.example/a:1", "s.example/z:4", True),
        (SignedIdentity(type="exactRepository", docker_repository=R("s.example/z", default_tag=False)),
         "r.example/a:1", "s.example/y:4", False),
        (SignedIdentity(type="remapIdentity", prefix="mirror.example/m", signed_prefix="r.example"),
         "mirror.example/m/a:1", "r.example/a:1", True),
        (SignedIdentity(type="remapIdentity", prefix="mirror.example/m", signed_prefix="r.example"),
         "mirror.example/m/a:1", "mirror.example/m/a:1", False),
        (SignedIdentity(type="remapIdentity", prefix="mirror.example/m", signed_prefix="r.example"),
         "mirror.example/mm/a:1", "mirror.example/mm/a:1", True),
    ],
)
def test_identity_rules(rule: SignedIdentity, image: str, signed: str, ok: bool) -> None:
    assert identity_matches(rule, R(image), R(signed, default_tag=False))[0] is ok


def test_image_relative_rules_need_an_identity_for_layouts() -> None:
    ok, why = identity_matches(SignedIdentity(type="matchRepository"), None, R("r.example/a:1"))
    assert not ok
    assert "identity" in why


# -- verify_image in an OCI layout -----------------------------------------------------------------


def _verify(policy: Policy, ref: OciLayoutRef, identity: str | None = None) -> str:
    return verify_image(policy, ref, OciLayoutSource(ref), identity=identity).manifest_digest


def test_signed_layout_verifies(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = sign_layout(ref, keys.key)
    policy = _oci_policy(tmp_path, keys)
    result = verify_image(policy, ref, OciLayoutSource(ref))
    assert result.manifest_digest == digest
    assert result.signed
    assert result.signatures[0].docker_reference == IDENTITY
    assert result.scope == 'transports.oci[""]'


def test_layout_with_identity_uses_default_rule(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, keys.key)
    policy = _policy(tmp_path, {"default": [_signed()]}, keys.public_pem)
    assert _verify(policy, ref, identity=IDENTITY)
    with pytest.raises(VerificationError) as info:
        _verify(policy, ref, identity="registry.example/team/app:2.0")
    assert info.value.step == 6
    with pytest.raises(VerificationError) as info:
        _verify(policy, ref)  # no docker identity for a layout
    assert info.value.step == 6


def test_unsigned_image_is_denied_at_step_3(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert (info.value.step, info.value.step_name) == (3, "fetch the signatures")
    assert 'transports.oci[""]' in str(info.value)


def test_signature_by_another_key_is_denied_at_step_4(tmp_path: Path, keys: KeyPair,
                                                      other_key: SigningKey) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, other_key)
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert info.value.step == 4


def test_payload_for_another_digest_is_denied_at_step_5(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = OciLayoutSource(ref).root().digest
    payload = build_payload(IDENTITY, "sha256:" + "9" * 64)
    attach_raw(ref.path, digest, payload, sign_b64(keys.key, payload))
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert info.value.step == 5


def test_tampered_payload_with_fixed_descriptor_is_denied_at_step_4(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = OciLayoutSource(ref).root().digest
    payload = build_payload(IDENTITY, digest)
    signature = sign_b64(keys.key, payload)
    tampered = payload.replace(b"team/app", b"evil/app")
    attach_raw(ref.path, digest, tampered, signature)
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert info.value.step == 4


def test_tampered_payload_blob_is_denied_at_step_3(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = sign_layout(ref, keys.key)
    source = OciLayoutSource(ref)
    from coffer.image.signing import read_signatures

    [signature] = read_signatures(source, digest)
    blob = ref.path / "blobs" / "sha256" / signature.layer.hex
    blob.write_bytes(blob.read_bytes().replace(b"team/app", b"evil/app"))
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert info.value.step == 3


def test_flipped_signature_byte_is_denied_at_step_4(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    digest = OciLayoutSource(ref).root().digest
    payload = build_payload(IDENTITY, digest)
    raw = bytearray(keys.key.sign(payload))
    raw[-3] ^= 1
    attach_raw(ref.path, digest, payload, base64.b64encode(bytes(raw)).decode())
    with pytest.raises(VerificationError) as info:
        _verify(_oci_policy(tmp_path, keys), ref)
    assert info.value.step == 4


@pytest.mark.parametrize(
    ("identity", "ok"),
    [
        ({"type": "exactReference", "dockerReference": IDENTITY}, True),
        ({"type": "exactReference", "dockerReference": "registry.example/team/app:2.0"}, False),
        ({"type": "exactRepository", "dockerRepository": "registry.example/team/app"}, True),
        ({"type": "exactRepository", "dockerRepository": "registry.example/team/other"}, False),
        ({"type": "matchRepository"}, False),  # a layout has no docker identity of its own
        ({"type": "matchExact"}, False),
        ({"type": "remapIdentity", "prefix": "mirror.example", "signedPrefix": "registry.example"}, False),
    ],
)
def test_identity_rules_end_to_end(tmp_path: Path, keys: KeyPair, identity: dict[str, Any], ok: bool) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, keys.key)
    policy = _oci_policy(tmp_path, keys, identity)
    if ok:
        assert _verify(policy, ref)
    else:
        with pytest.raises(VerificationError) as info:
            _verify(policy, ref)
        assert info.value.step == 6


def test_remap_identity_end_to_end(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, keys.key)
    policy = _oci_policy(tmp_path, keys, {"type": "remapIdentity", "prefix": "mirror.example/m",
                                          "signedPrefix": "registry.example/team"})
    assert _verify(policy, ref, identity="mirror.example/m/app:1.0")
    with pytest.raises(VerificationError):
        _verify(policy, ref, identity="mirror.example/m/app:1.1")


def test_reject_is_a_policy_denial(tmp_path: Path, keys: KeyPair) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, keys.key)
    policy = _policy(tmp_path, {"default": REJECT})
    with pytest.raises(PolicyDeniedError, match="reject") as info:
        _verify(policy, ref)
    assert info.value.step == 7
    assert "default" in str(info.value)


def test_signed_by_fails_closed(tmp_path: Path) -> None:
    ref = make_layout(tmp_path / "img")
    policy = _policy(tmp_path, {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}]})
    with pytest.raises(PolicyDeniedError, match=r"signedBy \(GPG\) is not supported; use sigstoreSigned"):
        _verify(policy, ref)


def test_insecure_accept_anything_accepts_unsigned(tmp_path: Path) -> None:
    ref = make_layout(tmp_path / "img")
    result = verify_image(_policy(tmp_path, {"default": ACCEPT}), ref, OciLayoutSource(ref))
    assert not result.signed
    assert result.manifest_digest == OciLayoutSource(ref).root().digest


def test_all_requirements_must_hold(tmp_path: Path, keys: KeyPair, other_key: SigningKey) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, keys.key)
    (tmp_path / "other.pub").write_bytes(other_key.public_key.to_pem())
    exact = {"type": "exactRepository", "dockerRepository": "registry.example/team/app"}
    policy = _policy(tmp_path, {"default": [_signed(exact), _signed(exact, "other.pub")]}, keys.public_pem)
    with pytest.raises(VerificationError) as info:
        _verify(policy, ref)
    assert info.value.step == 4
    assert "requirement [1]" in str(info.value)
    sign_layout(ref, other_key)
    assert _verify(policy, ref)
    with_reject = _policy(tmp_path, {"default": [_signed(exact), {"type": "reject"}]}, keys.public_pem)
    with pytest.raises(PolicyDeniedError):
        _verify(with_reject, ref)


def test_any_of_key_paths_is_enough(tmp_path: Path, keys: KeyPair, other_key: SigningKey) -> None:
    ref = make_layout(tmp_path / "img")
    sign_layout(ref, other_key)
    (tmp_path / "other.pub").write_bytes(other_key.public_key.to_pem())
    identity = {"type": "exactRepository", "dockerRepository": "registry.example/team/app"}
    requirement = {"type": "sigstoreSigned", "keyPaths": ["key.pub", "other.pub"], "signedIdentity": identity}
    policy = _policy(tmp_path, {"default": [requirement]}, keys.public_pem)
    assert _verify(policy, ref)


# -- verify_image against the registry -------------------------------------------------------------


def test_registry_image_signed_and_verified(tmp_path: Path, pushed: RegistryRef, keys: KeyPair,
                                            other_key: SigningKey) -> None:
    from coffer.image.locations import open_destination
    from coffer.image.signing import sign_image

    options = TransportOptions(insecure=True)
    policy = _policy(tmp_path, {"default": REJECT, "transports": {"docker": {pushed.host: [_signed()]}}},
                     keys.public_pem)
    with open_source(pushed, options) as source, pytest.raises(VerificationError) as info:
        verify_image(policy, pushed, source)
    assert info.value.step == 3
    with open_source(pushed, options) as source, open_destination(pushed, options) as destination:
        sign_image(source, destination, keys.key, docker_reference=pushed.familiar)
        destination.commit()
    with open_source(pushed, options) as source:
        result = verify_image(policy, pushed, source)
    assert result.scope == f'transports.docker["{pushed.host}"]'
    pinned = pushed.with_digest(result.manifest_digest)
    with open_source(pinned, options) as source:
        assert verify_image(policy, pinned, source).manifest_digest == result.manifest_digest
    other_tag = RegistryRef(host=pushed.host, repository=pushed.repository, tag="2.0")
    with open_source(pinned, options) as source, pytest.raises(VerificationError) as info:
        verify_image(policy, other_tag, source)  # signed for :1.0, asked as :2.0
    assert info.value.step == 6
