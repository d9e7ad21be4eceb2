"""JWE wrapping of resources: Trustee's exact header form, RFC 7518 KDF vector, interop with jwcrypto
both ways (jwcrypto is a test-only dependency), and tampering/unsupported-key refusals."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import ProtocolError
from coffer.kbs import jwe
from coffer.kbs.jwe import TeeKeyPair

_NO_JWCRYPTO = "jwcrypto (test-only interop check) is not installed"
jwcrypto_jwe = pytest.importorskip("jwcrypto.jwe", reason=_NO_JWCRYPTO)
jwcrypto_jwk = pytest.importorskip("jwcrypto.jwk", reason=_NO_JWCRYPTO)

KINDS = ("ec-p256", "ec-p521", "rsa-oaep-256")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def flip(text: str, index: int = 0) -> str:
    raw = bytearray(unb64(text))
    raw[index] ^= 0x01
    return jwe.b64url(bytes(raw))


@pytest.fixture(scope="module")
def keys() -> dict[str, TeeKeyPair]:
    return {kind: TeeKeyPair.generate(kind) for kind in KINDS}  # type: ignore[arg-type]


def jwcrypto_private(key: TeeKeyPair) -> Any:
    pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    return jwcrypto_jwk.JWK.from_pem(pem)


def expect_jwe_error(match: str = "") -> Any:
    return pytest.raises(ProtocolError, match=f"^JweError: .*{match}")


# -- primitives --------------------------------------------------------------------------------------


def test_concat_kdf_matches_rfc7518_appendix_c() -> None:
    alice = ec.derive_private_key(int.from_bytes(unb64("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo"), "big"),
                                  ec.SECP256R1())
    bob = ec.derive_private_key(int.from_bytes(unb64("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw"), "big"),
                                ec.SECP256R1())
    z = alice.exchange(ec.ECDH(), bob.public_key())
    assert list(z) == [158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
                       110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196]
    derived = jwe.concat_kdf(z, algorithm="A128GCM", key_bits=128, apu=b"Alice", apv=b"Bob")
    assert jwe.b64url(derived) == "VqqN6vgjbSBcIijNcacQGg"


def test_protected_header_is_trustee_canonical_form() -> None:
    extras = {"epk": {"y": "Y", "x": "X", "kty": "EC", "crv": "P-256"}, "apu": "A"}
    encoded = jwe.protected_header("ECDH-ES+A256KW", "A256GCM", extras)
    assert unb64(encoded) == (b'{"alg":"ECDH-ES+A256KW","enc":"A256GCM","apu":"A",'
                              b'"epk":{"crv":"P-256","kty":"EC","x":"X","y":"Y"}}')
    assert unb64(jwe.protected_header("fakealg", "fakeenc")) == b'{"alg":"fakealg","enc":"fakeenc"}'
    # kbs-types' own unit-test value for the same header
    assert jwe.protected_header("fakealg", "fakeenc") == "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9"


# -- our encrypt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(keys: dict[str, TeeKeyPair], kind: str) -> None:
    key = keys[kind]
    for plaintext in (b"", b"s", b"x" * 100_000):
        assert key.decrypt(jwe.encrypt(plaintext, key.public_jwk())) == plaintext


@pytest.mark.parametrize(("kind", "size"), [("ec-p256", 32), ("ec-p521", 66)])
def test_ec_output_is_flattened_json_as_trustee_sends_it(keys: dict[str, TeeKeyPair], kind: str,
                                                         size: int) -> None:
    out = jwe.encrypt(b"secret", keys[kind].public_jwk())
    assert list(out) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    header_text = unb64(out["protected"]).decode("ascii")
    header = json.loads(header_text)
    assert list(header) == ["alg", "enc", "epk"]
    assert (header["alg"], header["enc"]) == ("ECDH-ES+A256KW", "A256GCM")
    assert list(header["epk"]) == ["crv", "kty", "x", "y"]
    assert len(unb64(header["epk"]["x"])) == size
    assert len(unb64(header["epk"]["y"])) == size
    assert " " not in header_text
    assert len(unb64(out["encrypted_key"])) == 40
    assert len(unb64(out["iv"])) == 12
    assert len(unb64(out["tag"])) == 16
    assert all("=" not in value for value in out.values())


def test_guest_recomputed_aad_equals_received_header(keys: dict[str, TeeKeyPair]) -> None:
    """The Trustee guest re-serializes the parsed header for the AAD; that must give our bytes."""
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    header = json.loads(unb64(out["protected"]))
    extras = {k: v for k, v in header.items() if k not in ("alg", "enc")}
    assert jwe.protected_header(header["alg"], header["enc"], extras) == out["protected"]


def test_rsa_header_has_only_alg_and_enc(keys: dict[str, TeeKeyPair]) -> None:
    out = jwe.encrypt(b"secret", keys["rsa-oaep-256"].public_jwk())
    assert unb64(out["protected"]) == b'{"alg":"RSA-OAEP-256","enc":"A256GCM"}'
    assert len(unb64(out["encrypted_key"])) == 384


def test_public_jwk_is_the_guest_form(keys: dict[str, TeeKeyPair]) -> None:
    assert list(keys["ec-p256"].public_jwk()) == ["kty", "crv", "alg", "x", "y"]
    assert keys["ec-p256"].public_jwk()["crv"] == "P-256"
    assert keys["ec-p521"].public_jwk()["crv"] == "P-521"
    rsa_jwk = keys["rsa-oaep-256"].public_jwk()
    assert rsa_jwk["kty"] == "RSA"
    assert rsa_jwk["alg"] == "RSA-OAEP-256"
    assert rsa_jwk["e"] == "AQAB"
    assert keys["rsa-oaep-256"].kind == "rsa-oaep-256"


# -- interop with jwcrypto --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jwcrypto_decrypts_what_we_encrypt(keys: dict[str, TeeKeyPair], kind: str) -> None:
    out = jwe.encrypt(b"resource bytes", keys[kind].public_jwk())
    token = jwcrypto_jwe.JWE()
    token.deserialize(json.dumps(out), key=jwcrypto_private(keys[kind]))
    assert token.payload == b"resource bytes"


@pytest.mark.parametrize("kind", KINDS)
def test_we_decrypt_what_jwcrypto_encrypts(keys: dict[str, TeeKeyPair], kind: str) -> None:
    key = keys[kind]
    public = jwcrypto_jwk.JWK(**key.public_jwk())
    header = json.dumps({"alg": key.public_jwk()["alg"], "enc": "A256GCM"})
    # general JSON with a per-recipient unprotected header (where jwcrypto puts epk)
    token = jwcrypto_jwe.JWE(b"from jwcrypto", header)
    token.add_recipient(public)
    assert key.decrypt(json.loads(token.serialize(compact=False))) == b"from jwcrypto"
    # compact: everything in the protected header
    compact = jwcrypto_jwe.JWE(b"compact", header, recipient=public).serialize(compact=True)
    protected, encrypted_key, iv, ciphertext, tag = compact.split(".")
    assert key.decrypt({"protected": protected, "encrypted_key": encrypted_key, "iv": iv,
                        "ciphertext": ciphertext, "tag": tag}) == b"compact"


def test_we_decrypt_jwcrypto_output_with_aad_and_party_info(keys: dict[str, TeeKeyPair]) -> None:
    key = keys["ec-p256"]
    header = json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "apu": jwe.b64url(b"Alice"),
                         "apv": jwe.b64url(b"Bob")})
    token = jwcrypto_jwe.JWE(b"with aad", header, aad=b"extra")
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    assert key.decrypt(json.loads(token.serialize(compact=False))) == b"with aad"


# -- tampering --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("member", ["ciphertext", "tag", "iv", "encrypted_key"])
def test_rejects_flipped_byte(keys: dict[str, TeeKeyPair], kind: str, member: str) -> None:
    out = jwe.encrypt(b"secret payload", keys[kind].public_jwk())
    out[member] = flip(out[member])
    with expect_jwe_error():
        keys[kind].decrypt(out)


def test_rejects_reencoded_protected_header(keys: dict[str, TeeKeyPair]) -> None:
    """Same header, different bytes (spaces): the AAD changes, so the tag must not verify."""
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    header = json.loads(unb64(out["protected"]))
    out["protected"] = jwe.b64url(json.dumps(header).encode())
    with expect_jwe_error("authentication tag"):
        keys["ec-p256"].decrypt(out)


def test_rejects_swapped_epk(keys: dict[str, TeeKeyPair]) -> None:
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    other = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    out["protected"] = other["protected"]
    with expect_jwe_error():
        keys["ec-p256"].decrypt(out)


@pytest.mark.parametrize("kind", KINDS)
def test_rejects_jwe_for_another_key(keys: dict[str, TeeKeyPair], kind: str) -> None:
    other = TeeKeyPair.generate("ec-p256" if kind != "ec-p256" else "ec-p521")
    out = jwe.encrypt(b"secret", other.public_jwk())
    with expect_jwe_error():
        keys[kind].decrypt(out)
    same_family = TeeKeyPair.generate("ec-p521" if kind == "ec-p521" else "ec-p256")
    with expect_jwe_error():
        keys[kind].decrypt(jwe.encrypt(b"secret", same_family.public_jwk()))


@pytest.mark.parametrize(("change", "match"), [
    ({"enc": "A128GCM"}, "A256GCM"),
    ({"zip": "DEF"}, "zip"),
    ({"crit": ["exp"]}, "crit"),
    ({"alg": "RSA-OAEP-256"}, "alg"),
    ({"epk": {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}}, "curve"),
    ({"epk": {"kty": "OKP", "crv": "X25519", "x": "AA"}}, "epk"),
])
def test_rejects_bad_header(keys: dict[str, TeeKeyPair], change: dict[str, Any], match: str) -> None:
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    header = {**json.loads(unb64(out["protected"])), **change}
    out["protected"] = jwe.b64url(json.dumps(header).encode())
    with expect_jwe_error(match):
        keys["ec-p256"].decrypt(out)


def test_rejects_epk_not_on_curve(keys: dict[str, TeeKeyPair]) -> None:
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    header = json.loads(unb64(out["protected"]))
    header["epk"]["y"] = flip(header["epk"]["y"], 31)
    out["protected"] = jwe.b64url(json.dumps(header).encode())
    with expect_jwe_error("not on P-256"):
        keys["ec-p256"].decrypt(out)


@pytest.mark.parametrize("mutation", [
    {"iv": jwe.b64url(b"\0" * 16)}, {"tag": jwe.b64url(b"\0" * 8)}, {"iv": "a+b/"}, {"ciphertext": "AA=="},
    {"protected": "bm90IGpzb24"}, {"protected": jwe.b64url(b"[1]")}, {"header": "x"},
    {"recipients": []}, {"aad": "not b64!"},
])
def test_rejects_malformed_members(keys: dict[str, TeeKeyPair], mutation: dict[str, Any]) -> None:
    out: dict[str, Any] = dict(jwe.encrypt(b"secret", keys["ec-p256"].public_jwk()))
    out.update(mutation)
    with expect_jwe_error():
        keys["ec-p256"].decrypt(out)


def test_rejects_missing_member(keys: dict[str, TeeKeyPair]) -> None:
    out = jwe.encrypt(b"secret", keys["ec-p256"].public_jwk())
    for member in out:
        partial = {k: v for k, v in out.items() if k != member}
        with expect_jwe_error(member):
            keys["ec-p256"].decrypt(partial)


def test_rejects_header_member_repeated_unprotected(keys: dict[str, TeeKeyPair]) -> None:
    out: dict[str, Any] = dict(jwe.encrypt(b"secret", keys["ec-p256"].public_jwk()))
    out["unprotected"] = {"enc": "A256GCM"}
    with expect_jwe_error("repeated"):
        keys["ec-p256"].decrypt(out)


# -- unsupported keys on the KBS side ---------------------------------------------------------------


def _rsa_jwk(bits: int, alg: str = "RSA-OAEP-256") -> dict[str, str]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers()
    return {"kty": "RSA", "alg": alg, "n": jwe.b64url(numbers.n.to_bytes((bits + 7) // 8, "big")),
            "e": jwe.b64url(numbers.e.to_bytes(3, "big"))}


def _p384_jwk() -> dict[str, str]:
    numbers = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    return {"kty": "EC", "crv": "P-384", "alg": "ECDH-ES+A256KW",
            "x": jwe.b64url(numbers.x.to_bytes(48, "big")), "y": jwe.b64url(numbers.y.to_bytes(48, "big"))}


def test_rejects_unsupported_tee_keys(keys: dict[str, TeeKeyPair]) -> None:
    ec_key = keys["ec-p256"].public_jwk()
    cases: list[Any] = [
        _p384_jwk(),
        {**ec_key, "alg": "ECDH-ES"},
        {**ec_key, "alg": "ECDH-ES+A128KW"},
        {**keys["rsa-oaep-256"].public_jwk(), "alg": "RSA1_5"},
        {**keys["rsa-oaep-256"].public_jwk(), "alg": "RSA-OAEP"},
        {"kty": "OKP", "crv": "X25519", "alg": "ECDH-ES+A256KW", "x": "AA"},
        {"kty": "AKP", "alg": "ML-KEM-768+A192KW", "pub": "AA"},
        {**ec_key, "x": ec_key["x"][:-2]},
        {**ec_key, "y": flip(ec_key["y"], 31)},
        {**ec_key, "x": 5},
        _rsa_jwk(1024),
        {**keys["rsa-oaep-256"].public_jwk(), "e": jwe.b64url(b"\x01")},
        "not a key",
    ]
    for case in cases:
        with expect_jwe_error():
            jwe.encrypt(b"secret", case)


def test_rejects_unsupported_private_keys() -> None:
    with expect_jwe_error("curve"):
        TeeKeyPair(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match="unknown TEE key kind"):
        TeeKeyPair.generate("ec-p384")  # type: ignore[arg-type]


def test_errors_carry_no_secret_material(keys: dict[str, TeeKeyPair]) -> None:
    out = jwe.encrypt(b"TOP-SECRET-VALUE", keys["ec-p256"].public_jwk())
    out["tag"] = flip(out["tag"])
    with pytest.raises(ProtocolError) as info:
        keys["ec-p256"].decrypt(out)
    assert "TOP-SECRET" not in str(info.value)
    assert out["ciphertext"] not in str(info.value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag", "aad",
                                        "header"]),
                       st.text(alphabet="ABCDEFabcdef0123456789-_=+/", max_size=60), max_size=7))
def test_random_jwe_objects_only_raise_jwe_error(doc: dict[str, Any]) -> None:
    key = TeeKeyPair(ec.derive_private_key(7, ec.SECP256R1()))
    with pytest.raises(ProtocolError):
        key.decrypt(doc)
