"""KBS protocol 0.4.0 wire models: strict parsing, Trustee error kinds, resource paths."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.attestation.binding import InitData, runtime_data_digest
from coffer.errors import ProtocolError
from coffer.kbs import protocol
from coffer.kbs.protocol import (
    ERROR_STATUS,
    PROTOCOL_VERSION,
    Attestation,
    Challenge,
    ErrorInformation,
    Request,
    RuntimeData,
    TeeEvidence,
)

EC_KEY = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
          "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
          "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}
NONCE = "8nSJRHF5mH7+g2Q0dkdp5w7Fz3KZ0v2U0Yb4q9o0a1E="


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def attestation_body(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "init-data": None,
        "runtime-data": {"nonce": NONCE, "tee-pubkey": dict(EC_KEY)},
        "tee-evidence": {"primary_evidence": {"svn": "1", "report_data": "AAAA"}, "additional_evidence": ""},
    }
    doc.update(overrides)
    return doc


def expect_kind(kind: str) -> Any:
    return pytest.raises(ProtocolError, match=f"^{kind}: ")


# -- /auth -------------------------------------------------------------------------------------------


def test_request_round_trips_through_its_json() -> None:
    request = Request(version=PROTOCOL_VERSION, tee="snp",
                      extra_params={"supported-hash-algorithms": ["sha384"]})
    wire = request.to_json()
    assert wire == {"version": "0.4.0", "tee": "snp",
                    "extra-params": {"supported-hash-algorithms": ["sha384"]}}
    assert protocol.parse_request(body(wire)) == request
    assert request.supported_hash_algorithms() == ("sha384",)


def test_old_guest_extra_params_empty_string_is_accepted() -> None:
    request = protocol.parse_request(body({"version": "0.4.0", "tee": "tdx", "extra-params": ""}))
    assert request.extra_params == ""
    assert request.supported_hash_algorithms() == ()


def test_rejects_protocol_version_mismatch_with_trustee_message() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(body({"version": "0.1.1", "tee": "snp", "extra-params": ""}))
    assert info.value.kind == "AttestationError"
    assert info.value.detail == ("Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version "
                                 "Mismatch: expect =0.4.0 while the request is 0.1.1")
    assert protocol.status_for(info.value.kind) == 401


@pytest.mark.parametrize("version", ["0.4.0-rc1", "0.4.1", "1.4.0", "0.3.0"])
def test_rejects_other_semver_versions(version: str) -> None:
    with expect_kind("AttestationError"):
        protocol.parse_request(body({"version": version, "tee": "snp", "extra-params": ""}))


def test_build_metadata_is_ignored_like_semver_requirements() -> None:
    assert protocol.parse_request(body({"version": "0.4.0+abc", "tee": "snp", "extra-params": ""}))


@pytest.mark.parametrize("version", ["0.4", "v0.4.0", "00.4.0", " 0.4.0", "0.4.0\n", ""])
def test_rejects_unparseable_version(version: str) -> None:
    with pytest.raises(ProtocolError, match="failed to parse KBS version"):
        protocol.parse_request(body({"version": version, "tee": "snp", "extra-params": ""}))


@pytest.mark.parametrize("doc", [
    {"version": "0.4.0", "tee": "sev", "extra-params": ""},
    {"version": "0.4.0", "tee": "SNP", "extra-params": ""},
    {"version": "0.4.0", "tee": 3, "extra-params": ""},
    {"version": "0.4.0", "extra-params": ""},
    {"version": "0.4.0", "tee": "snp"},
    {"tee": "snp", "extra-params": ""},
    {"version": 4, "tee": "snp", "extra-params": ""},
    ["0.4.0", "snp"],
])
def test_rejects_malformed_request(doc: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(body(doc))
    assert info.value.kind == "AttestationError"
    assert info.value.detail.startswith(protocol.AUTH_FAILED)


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"version":"0.4.0","version":"0.4.0","tee":"snp","extra-params":""}', b"\xff\xfe",
    b'{"version": NaN}'])
def test_rejects_request_that_is_not_strict_json(raw: bytes) -> None:
    with expect_kind("AttestationError"):
        protocol.parse_request(raw)


def test_rejects_oversized_request() -> None:
    raw = body({"version": "0.4.0", "tee": "snp", "extra-params": "x" * protocol.MAX_BODY_BYTES})
    with pytest.raises(ProtocolError, match="limit"):
        protocol.parse_request(raw)


@pytest.mark.parametrize("extra", ["A" * (2 * 1024 * 1024 - 100), "A" * protocol.MAX_EXTRA_PARAMS_BYTES,
                                   {"k": ["v" * 100] * 50}, [{"x": "y" * 5000}]])
def test_rejects_oversized_extra_params(extra: Any) -> None:
    # Stored verbatim in the session (2 MiB per /auth) before the cap.
    with pytest.raises(ProtocolError, match="extra-params") as info:
        protocol.parse_request(body({"version": "0.4.0", "tee": "snp", "extra-params": extra}))
    assert info.value.kind == "AttestationError"


def test_extra_params_up_to_the_cap_are_accepted() -> None:
    offered = {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]}
    assert protocol.parse_request(body({"version": "0.4.0", "tee": "snp", "extra-params": offered})
                                  ).extra_params == offered
    at_cap = "A" * (protocol.MAX_EXTRA_PARAMS_BYTES - 2)  # two bytes of JSON quotes
    assert protocol.parse_request(body({"version": "0.4.0", "tee": "snp", "extra-params": at_cap})
                                  ).extra_params == at_cap


def test_every_trustee_tee_name_is_accepted() -> None:
    for tee in sorted(protocol.TEE_NAMES):
        assert protocol.parse_request(body({"version": "0.4.0", "tee": tee, "extra-params": ""})).tee == tee


# -- challenge and nonce -----------------------------------------------------------------------------


def test_nonce_is_standard_base64_of_32_random_bytes() -> None:
    nonces = {protocol.make_nonce() for _ in range(32)}
    assert len(nonces) == 32
    for nonce in nonces:
        assert len(nonce) == 44
        assert nonce.endswith("=")
        assert len(base64.b64decode(nonce, validate=True)) == 32


def test_challenge_round_trip_and_default_hash() -> None:
    challenge = Challenge(nonce=NONCE, extra_params="")
    assert challenge.to_json() == {"nonce": NONCE, "extra-params": ""}
    assert protocol.parse_challenge(body(challenge.to_json())) == challenge
    assert challenge.hash_algorithm() == "sha384"
    selected = Challenge(nonce=NONCE, extra_params={"selected-hash-algorithm": "sha512"})
    assert selected.hash_algorithm() == "sha512"
    unknown = Challenge(nonce=NONCE, extra_params={"selected-hash-algorithm": "md5"})
    assert unknown.hash_algorithm() == "sha384"


@pytest.mark.parametrize("doc", [{"nonce": ""}, {"nonce": "", "extra-params": ""},
                                 {"nonce": 5, "extra-params": ""}, {"extra-params": ""}])
def test_client_rejects_malformed_challenge(doc: Any) -> None:
    with expect_kind("SerdeError"):
        protocol.parse_challenge(body(doc))


# -- /attest -----------------------------------------------------------------------------------------


def test_attestation_round_trips_through_its_json() -> None:
    attestation = protocol.parse_attestation(body(attestation_body()))
    assert attestation.init_data is None
    assert attestation.runtime_data == RuntimeData(nonce=NONCE, tee_pubkey=EC_KEY)
    assert attestation.tee_evidence.additional_evidence == ""
    assert protocol.parse_attestation(body(attestation.to_json())) == attestation
    assert attestation.to_json()["init-data"] is None


def test_missing_init_data_is_the_same_as_null() -> None:
    doc = attestation_body()
    del doc["init-data"]
    assert protocol.parse_attestation(body(doc)).init_data is None


def test_init_data_is_carried_as_plaintext_toml() -> None:
    toml = 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n'
    attestation = protocol.parse_attestation(body(attestation_body(**{"init-data": {"format": "toml",
                                                                                    "body": toml}})))
    assert attestation.init_data == InitData(format="toml", body=toml)
    assert attestation.to_json()["init-data"] == {"format": "toml", "body": toml}


def test_primary_runtime_data_matches_the_worked_example_digest() -> None:
    attestation = protocol.parse_attestation(body(attestation_body()))
    runtime = attestation.primary_runtime_data()
    assert runtime == {"additional-evidence": "", "nonce": NONCE, "tee-pubkey": EC_KEY}
    assert runtime_data_digest(runtime).hex() == (
        "75bdd768faa3c7e9f67cc53fec2bdf95c2dd0b0054c1e8d9727b4e70e47a6b62"
        "7d5ad8dca8317d3febcba97212ef57bd")


def test_tee_pubkey_members_outside_the_typed_key_are_dropped() -> None:
    doc = attestation_body()
    doc["runtime-data"]["tee-pubkey"] = {**EC_KEY, "kid": "extra", "use": "enc"}
    attestation = protocol.parse_attestation(body(doc))
    assert attestation.runtime_data.tee_pubkey == EC_KEY


def test_rsa_tee_pubkey_is_accepted() -> None:
    key = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": "AQAB", "e": "AQAB"}
    doc = attestation_body()
    doc["runtime-data"]["tee-pubkey"] = key
    assert protocol.parse_attestation(body(doc)).runtime_data.tee_pubkey == key


def test_unknown_members_are_ignored_like_serde() -> None:
    doc = attestation_body(future={"x": 1})
    assert protocol.parse_attestation(body(doc)).runtime_data.nonce == NONCE


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    doc = attestation_body()
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return doc


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = attestation_body()
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("doc", [
    _without(("runtime-data",)),
    _without(("runtime-data", "nonce")),
    _without(("runtime-data", "tee-pubkey")),
    _without(("tee-evidence",)),
    _without(("tee-evidence", "primary_evidence")),
    _without(("tee-evidence", "additional_evidence")),
    _with(("runtime-data",), "x"),
    _with(("runtime-data", "nonce"), 1),
    _with(("runtime-data", "tee-pubkey"), "key"),
    _with(("runtime-data", "tee-pubkey", "kty"), "OKP"),
    _with(("runtime-data", "tee-pubkey", "y"), None),
    _with(("tee-evidence", "additional_evidence"), {"nvidia": {}}),
    _with(("init-data",), "toml"),
    _with(("init-data",), {"format": "toml"}),
    _with(("init-data",), {"format": "toml", "body": 1}),
], ids=lambda d: json.dumps(d)[:60])
def test_rejects_malformed_attestation(doc: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_attestation(body(doc))
    assert info.value.kind == "AttestationError"
    assert info.value.detail.startswith(protocol.ATTEST_FAILED)


def test_legacy_0_2_body_with_top_level_pubkey_is_refused() -> None:
    legacy = {"tee-pubkey": EC_KEY, "tee-evidence": "{}"}
    with expect_kind("AttestationError"):
        protocol.parse_attestation(body(legacy))


def test_attestation_models_build_the_wire_body() -> None:
    attestation = Attestation(init_data=None, runtime_data=RuntimeData(nonce=NONCE, tee_pubkey=EC_KEY),
                              tee_evidence=TeeEvidence(primary_evidence={"a": 1}))
    assert attestation.to_json() == {
        "init-data": None,
        "runtime-data": {"nonce": NONCE, "tee-pubkey": EC_KEY},
        "tee-evidence": {"primary_evidence": {"a": 1}, "additional_evidence": ""},
    }


# -- errors ------------------------------------------------------------------------------------------


def test_error_information_uses_trustee_type_url() -> None:
    info = ErrorInformation(kind="PolicyDeny", detail="Access denied by policy")
    assert info.to_json() == {"type": "https://github.com/confidential-containers/kbs/errors/PolicyDeny",
                              "detail": "Access denied by policy"}
    assert info.status == 401
    assert protocol.parse_error_information(body(info.to_json())) == info
    error = info.to_error()
    assert (error.kind, error.detail) == ("PolicyDeny", "Access denied by policy")
    assert ErrorInformation.from_error(error) == info


def test_only_bad_path_and_unknown_plugin_are_404() -> None:
    assert {k for k, v in ERROR_STATUS.items() if v == 404} == {"InvalidRequestPath", "PluginNotFound"}
    assert set(ERROR_STATUS.values()) == {401, 404}
    for kind in ("AttestationError", "TokenNotFound", "TokenVerifierError", "PolicyDeny",
                 "PluginInternalError", "JweError", "AdminAuthAccess", "SerdeError"):
        assert ERROR_STATUS[kind] == 401
    assert protocol.status_for("SomethingNew") == 401


def test_foreign_error_type_is_kept_whole() -> None:
    info = protocol.parse_error_information(body({"type": "about:blank", "detail": "x"}))
    assert info.kind == "about:blank"


@pytest.mark.parametrize("doc", [{"type": "x"}, {"detail": "x"}, {"type": 1, "detail": "x"},
                                 {"type": protocol.ERROR_TYPE_PREFIX, "detail": "x"}])
def test_client_rejects_malformed_error_information(doc: Any) -> None:
    with expect_kind("SerdeError"):
        protocol.parse_error_information(body(doc))


def test_token_response() -> None:
    assert protocol.parse_token_response(b'{"token":"a.b.c"}') == "a.b.c"
    with expect_kind("SerdeError"):
        protocol.parse_token_response(b'{"token":"abc"}')


# -- resource paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "parts"), [
    ("default/key/1", ("default", "key", "1")),
    ("my-repo/cosign.pub/v1.2_rc", ("my-repo", "cosign.pub", "v1.2_rc")),
    ("_/-/0", ("_", "-", "0")),
    ("a.../b/c", ("a...", "b", "c")),
])
def test_parses_valid_resource_paths(path: str, parts: tuple[str, str, str]) -> None:
    assert protocol.parse_resource_path(path) == parts


@pytest.mark.parametrize("path", [
    "", "a/b", "a/b/c/d", "/a/b/c", "a/b/c/", ".a/b/c", "a/../c", "a/b/..", "a//c", "a/b/c\n",
    "a/b/c d", "a/b/ü", "a\\b\\c", "a/b/c?x=1", "a/" + "b" * 2000 + "/c",
])
def test_rejects_malformed_resource_path_as_plugin_error(path: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_resource_path(path)
    assert info.value.kind == "PluginInternalError"
    assert protocol.status_for(info.value.kind) == 401


@pytest.mark.parametrize(("uri", "path"), [
    ("kbs:///default/key/1", "default/key/1"),
    ("kbs://example.org:8080/default/key/1", "default/key/1"),
    ("default/key/1", "default/key/1"),
    ("/default/key/1", "default/key/1"),
])
def test_resource_uri(uri: str, path: str) -> None:
    assert protocol.parse_resource_uri(uri) == path


@pytest.mark.parametrize("uri", ["kbs://", "kbs:///a/b", "kbs://host", "http://x/a/b/c"])
def test_rejects_malformed_resource_uri(uri: str) -> None:
    with expect_kind("PluginInternalError"):
        protocol.parse_resource_uri(uri)


# -- fuzz --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_protocol_error(raw: bytes) -> None:
    for parse in (protocol.parse_request, protocol.parse_attestation, protocol.parse_challenge,
                  protocol.parse_error_information, protocol.parse_token_response):
        with contextlib.suppress(ProtocolError):
            parse(raw)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["init-data", "runtime-data", "tee-evidence", "nonce", "tee-pubkey",
                                        "version", "tee", "extra-params", "x"]), _json_values, max_size=5))
def test_random_json_objects_only_raise_protocol_error(doc: dict[str, Any]) -> None:
    raw = body(doc)
    for parse in (protocol.parse_request, protocol.parse_attestation):
        with contextlib.suppress(ProtocolError):
            parse(raw)
