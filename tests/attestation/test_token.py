"""EAR tokens: ES256 signing with a persisted key, verification, and the TEE key path."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from coffer.attestation.token import (
    TokenSigner,
    TokenVerifier,
    b64url,
    public_jwk,
    tee_pubkey_from_claims,
    unverified_claims,
)
from coffer.errors import ProtocolError
from coffer.kbs.store import NS_KEYS, MemoryStore
from tests.attestation.helpers import TEE_PUBKEY, Clock

NOW = datetime(2026, 3, 1, tzinfo=UTC)
T = int(NOW.timestamp())
CLAIMS = {"iss": "test", "iat": T, "exp": T + 300,
          "submods": {"cpu0": {"ear.veraison.annotated-evidence": {
              "runtime_data_claims": {"nonce": "n", "tee-pubkey": TEE_PUBKEY}}}}}


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(MemoryStore(), clock=Clock(NOW))


def _rejected(verifier: TokenVerifier, token: str, at: datetime = NOW) -> str:
    with pytest.raises(ProtocolError) as info:
        verifier.verify(token, now=at)
    assert info.value.kind == "TokenVerifierError"
    return info.value.detail


def _part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return out


def _resign(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode()))
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def test_round_trip(signer: TokenSigner) -> None:
    token = signer.issue(CLAIMS)
    assert TokenVerifier(signer.jwks()).verify(token, now=NOW) == CLAIMS
    header = _part(token, 0)
    assert header["alg"] == "ES256"
    assert header["typ"] == "JWT"
    assert header["kid"] == signer.public_jwk()["kid"]
    assert header["jwk"]["crv"] == "P-256"


def test_jwks_shape(signer: TokenSigner) -> None:
    (jwk,) = signer.jwks()["keys"]
    assert set(jwk) == {"kty", "crv", "alg", "use", "kid", "x", "y"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")


def test_key_is_persisted_and_shared_by_replicas() -> None:
    store = MemoryStore()
    a = TokenSigner(store, clock=Clock(NOW))
    b = TokenSigner(store, clock=Clock(NOW))
    assert a.jwks() == b.jwks()
    assert store.get(NS_KEYS, "ear-signing-key", now=NOW) is not None
    TokenVerifier(a.jwks()).verify(b.issue(CLAIMS), now=NOW)


def test_verifier_accepts_a_list_or_a_single_jwk(signer: TokenSigner) -> None:
    token = signer.issue(CLAIMS)
    TokenVerifier([signer.public_jwk()]).verify(token, now=NOW)
    TokenVerifier(signer.public_jwk()).verify(token, now=NOW)


def test_rejects_expired_token(signer: TokenSigner) -> None:
    verifier = TokenVerifier(signer.jwks())
    token = signer.issue(CLAIMS)
    assert _rejected(verifier, token, NOW + timedelta(seconds=300)) == "token expired"
    TokenVerifier(signer.jwks(), leeway_seconds=60).verify(token, now=NOW + timedelta(seconds=330))


def test_rejects_token_issued_in_the_future(signer: TokenSigner) -> None:
    token = signer.issue({**CLAIMS, "iat": T + 100, "exp": T + 400})
    assert "future" in _rejected(TokenVerifier(signer.jwks()), token)


def test_rejects_token_before_nbf(signer: TokenSigner) -> None:
    token = signer.issue({**CLAIMS, "nbf": T + 100})
    assert "not valid yet" in _rejected(TokenVerifier(signer.jwks()), token)


def test_rejects_token_without_exp(signer: TokenSigner) -> None:
    token = signer.issue({"iss": "x"})
    assert "exp" in _rejected(TokenVerifier(signer.jwks()), token)


def test_rejects_flipped_signature_byte(signer: TokenSigner) -> None:
    token = signer.issue(CLAIMS)
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 1
    assert "does not verify" in _rejected(TokenVerifier(signer.jwks()), f"{head}.{body}.{b64url(bytes(raw))}")


_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _flip_unused_bit(segment: str) -> str:
    # 64 signature bytes fill 85 characters and 2 bits of the 86th: its lowest bit is unused.
    return segment[:-1] + _B64URL_ALPHABET[_B64URL_ALPHABET.index(segment[-1]) ^ 1]


@pytest.mark.parametrize("respell", [
    pytest.param(_flip_unused_bit, id="unused-trailing-bit"),
    pytest.param(lambda sig: sig[:10] + "!" + sig[10:], id="character-outside-alphabet"),
    pytest.param(lambda sig: sig[:10] + "\t" + sig[10:], id="tab-inside"),
])
def test_rejects_non_canonical_signature_encoding(signer: TokenSigner, respell: Any) -> None:
    """Regression (found by tests/e2e): the decoder skipped characters outside the base64url
    alphabet and ignored the unused bits of the last character, so one signed token was accepted
    under many spellings."""
    token = signer.issue(CLAIMS)
    header, payload, signature = token.split(".")
    respelled = f"{header}.{payload}.{respell(signature)}"
    assert respelled != token
    assert "base64url" in _rejected(TokenVerifier(signer.jwks()), respelled)
    assert TokenVerifier(signer.jwks()).verify(token, now=NOW) == CLAIMS


def test_rejects_altered_payload(signer: TokenSigner) -> None:
    token = signer.issue(CLAIMS)
    head, _, sig = token.split(".")
    body = b64url(json.dumps({**CLAIMS, "exp": T + 10**6}).encode())
    assert "does not verify" in _rejected(TokenVerifier(signer.jwks()), f"{head}.{body}.{sig}")


def test_rejects_token_of_another_service(signer: TokenSigner) -> None:
    other = TokenSigner(MemoryStore(), clock=Clock(NOW))
    assert "not trusted" in _rejected(TokenVerifier(signer.jwks()), other.issue(CLAIMS))


def test_header_jwk_alone_is_not_trusted(signer: TokenSigner) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(attacker.public_key())
    forged = _resign(attacker, {"alg": "ES256", "typ": "JWT", "jwk": jwk}, CLAIMS)
    assert "not trusted" in _rejected(TokenVerifier(signer.jwks()), forged)
    # Without kid or jwk the verifier tries its own keys only.
    bare = _resign(attacker, {"alg": "ES256"}, CLAIMS)
    assert "does not verify" in _rejected(TokenVerifier(signer.jwks()), bare)


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS256", "EdDSA"])
def test_rejects_other_algorithms(signer: TokenSigner, alg: str) -> None:
    token = signer.issue(CLAIMS)
    _, body, sig = token.split(".")
    head = b64url(json.dumps({"alg": alg, "kid": signer.public_jwk()["kid"]}).encode())
    assert "algorithm" in _rejected(TokenVerifier(signer.jwks()), f"{head}.{body}.{sig}")


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "!!!.e30.AA", "e30.e30.AA", "W10.e30." + "A" * 86])
def test_rejects_malformed_tokens(signer: TokenSigner, token: str) -> None:
    _rejected(TokenVerifier(signer.jwks()), token)


def test_rejects_crit_header(signer: TokenSigner) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = _resign(key, {"alg": "ES256", "crit": ["x"], "x": 1}, CLAIMS)
    assert "critical" in _rejected(TokenVerifier(public_jwk(key.public_key())), token)


def test_empty_jwks_trusts_nothing(signer: TokenSigner) -> None:
    verifier = TokenVerifier({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]})
    assert verifier.key_count == 0
    assert "no trusted" in _rejected(verifier, signer.issue(CLAIMS))


def test_tee_pubkey_paths() -> None:
    assert tee_pubkey_from_claims(CLAIMS) == TEE_PUBKEY
    assert tee_pubkey_from_claims({"tee-pubkey": {"kty": "RSA"}}) == {"kty": "RSA"}
    legacy = {"customized_claims": {"runtime_data": {"tee-pubkey": {"a": 1}}}}
    assert tee_pubkey_from_claims(legacy) == {"a": 1}
    with pytest.raises(ProtocolError) as info:
        tee_pubkey_from_claims({"submods": {"cpu0": {}}})
    assert info.value.kind == "TokenVerifierError"


def test_unverified_claims(signer: TokenSigner) -> None:
    assert unverified_claims(signer.issue(CLAIMS)) == CLAIMS


def test_interop_with_jwcrypto(signer: TokenSigner) -> None:
    jwk_module = pytest.importorskip("jwcrypto.jwk")
    jwt_module = pytest.importorskip("jwcrypto.jwt")
    key = jwk_module.JWK(**signer.public_jwk())
    token = signer.issue(CLAIMS)
    parsed = jwt_module.JWT(jwt=token, key=key, algs=["ES256"], check_claims=False)
    assert json.loads(parsed.claims) == CLAIMS
    # And the other way round: a jwcrypto-signed ES256 token verifies here.
    private = jwk_module.JWK.generate(kty="EC", crv="P-256")
    theirs = jwt_module.JWT(header={"alg": "ES256"}, claims=CLAIMS)
    theirs.make_signed_token(private)
    public = json.loads(private.export_public())
    assert TokenVerifier(public).verify(theirs.serialize(), now=NOW) == CLAIMS
