"""TPM structure parsers: real quotes from the vectors, synthetic structures, limits and fuzzing."""

from __future__ import annotations

import base64
import contextlib
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as strat

from coffer.errors import FormatError
from coffer.evidence.tpm import structures as st
from tests.conftest import vector_bytes
from tests.evidence.tpm import builders as b

TPM_EVIDENCE = "trustee/deps/verifier/test_data/tpm_evidence.json"
AZ_QUOTE_JSON = "trustee/deps/verifier/test_data/az-snp-vtpm/tpm-quote-v1.json"


def _trustee_tpm() -> dict[str, object]:
    doc = json.loads(vector_bytes(TPM_EVIDENCE))
    assert isinstance(doc, dict)
    return doc


def test_parses_trustee_tpm_quote_message() -> None:
    quote = _trustee_tpm()["tpm_quote"]
    assert isinstance(quote, dict)
    attest = st.parse_attest(base64.b64decode(quote["message"]))
    assert attest.is_quote
    assert attest.extra_data.hex().startswith("a04182b5")
    assert len(attest.extra_data) == 64
    assert attest.extra_data[48:] == bytes(16)  # a 48-byte digest, zero-padded to 64
    assert attest.quote is not None
    assert attest.quote.pcr_select[0].bank == "sha256"
    assert attest.quote.pcr_select[0].pcrs == tuple(range(24))
    assert attest.clock_info.safe
    assert attest.to_dict()["quote"]["pcr_select"] == [{"bank": "sha256", "pcrs": list(range(24))}]


def test_parses_trustee_tpmt_signature() -> None:
    quote = _trustee_tpm()["tpm_quote"]
    assert isinstance(quote, dict)
    sig = st.parse_signature(base64.b64decode(quote["signature"]))
    assert sig.sig_alg == st.ALG_RSASSA
    assert sig.hash_alg == st.ALG_SHA256
    assert len(sig.rsa_signature) == 256
    assert sig.to_dict()["scheme"] == "rsassa"


def test_parses_azure_quote_message_with_challenge_nonce() -> None:
    doc = json.loads(vector_bytes(AZ_QUOTE_JSON))
    attest = st.parse_attest(bytes.fromhex(doc["message"]))
    assert attest.extra_data == b"challenge"
    assert attest.quote is not None
    assert len(attest.quote.pcr_digest) == 32


def test_legacy_tpm_quote_msg_parses() -> None:
    attest = st.parse_attest(vector_bytes("trustee/deps/verifier/test_data/az-snp-vtpm/tpm-quote.msg"))
    assert attest.is_quote
    assert attest.extra_data == b"challenge"


def test_rejects_trailing_bytes_after_attest() -> None:
    with pytest.raises(FormatError, match="trailing"):
        st.parse_attest(b.attest() + b"\0")


def test_rejects_oversized_extra_data() -> None:
    with pytest.raises(FormatError, match="extraData"):
        st.parse_attest(b.attest(extra=b"x" * 65))


def test_rejects_too_many_pcr_banks() -> None:
    data = b.attest(selections=[b.pcr_select(st.ALG_SHA256, [0])] * 17)
    with pytest.raises(FormatError, match="banks"):
        st.parse_attest(data)


def test_rejects_oversized_pcr_bitmap() -> None:
    data = b.attest(selections=[b.pcr_select(st.ALG_SHA256, [0], size=33)])
    with pytest.raises(FormatError, match="sizeofSelect"):
        st.parse_attest(data)


def test_rejects_bad_clock_safe_flag() -> None:
    data = bytearray(b.attest())
    # magic 4 + type 2 + signer (2 + 34) + extra (2 + 5) + clock 8 + reset 4 + restart 4 -> safe
    data[4 + 2 + 36 + 7 + 16] = 2
    with pytest.raises(FormatError, match="safe"):
        st.parse_attest(bytes(data))


def test_non_quote_attestation_keeps_body_unparsed() -> None:
    data = b.attest(attest_type=0x8017)
    attest = st.parse_attest(data)
    assert attest.quote is None
    assert not attest.is_quote
    assert attest.attested


def test_selection_bitmap_order() -> None:
    data = b.attest(selections=[b.pcr_select(st.ALG_SHA1, [7, 0, 16]), b.pcr_select(st.ALG_SHA256, [1])])
    attest = st.parse_attest(data)
    assert attest.quote is not None
    assert [(s.bank, s.pcrs) for s in attest.quote.pcr_select] == [("sha1", (0, 7, 16)), ("sha256", (1,))]


def test_ecdsa_signature_parses() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sig = st.parse_signature(b.sign_ecdsa(key, b"msg"))
    assert sig.sig_alg == st.ALG_ECDSA
    assert len(sig.ecc_r) == 32
    assert len(sig.ecc_s) == 32


def test_rejects_unsupported_signature_scheme() -> None:
    with pytest.raises(FormatError, match="unsupported signature algorithm"):
        st.parse_signature(struct.pack(">HH", st.ALG_SM2, st.ALG_SHA256) + b.tpm2b(b"r") + b.tpm2b(b"s"))


def test_rejects_truncated_signature() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(FormatError, match="truncated"):
        st.parse_signature(b.sign_rsassa(key, b"msg")[:-1])


def test_rsa_public_area_roundtrip() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    area = b.rsa_public_area(key)
    public = st.parse_public(area)
    assert public.public_key().public_numbers() == key.public_numbers()
    assert public.rsa_exponent == 65537
    assert st.parse_public_sized(b.tpm2b(area)) == public
    assert public.name()[:2] == b"\x00\x0b"
    assert len(public.name()) == 34


def test_ecc_public_area_roundtrip() -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    public = st.parse_public(b.ecc_public_area(key))
    assert public.curve == st.ECC_NIST_P384
    assert public.public_key().public_numbers() == key.public_numbers()


def test_rejects_rsa_modulus_size_mismatch() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    area = bytearray(b.rsa_public_area(key))
    area[16:18] = struct.pack(">H", 1024)  # keyBits
    with pytest.raises(FormatError, match="keyBits"):
        st.parse_public(bytes(area))


def test_rejects_unknown_curve() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    area = bytearray(b.ecc_public_area(key))
    area[16:18] = struct.pack(">H", 0x0020)
    with pytest.raises(FormatError, match="curve"):
        st.parse_public(bytes(area))


def test_ecc_point_not_on_curve_is_format_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    area = bytearray(b.ecc_public_area(key))
    area[-1] ^= 1
    with pytest.raises(FormatError):
        st.parse_public(bytes(area)).public_key()


# ---------------------------------------------------------------------------------------------
# Property tests: random and mutated inputs only ever raise FormatError


def _seed_attest() -> bytes:
    return b.attest(selections=[b.pcr_select(st.ALG_SHA1, [0, 1]), b.pcr_select(st.ALG_SHA256, range(24))])


def _mutate(seed: bytes, data: strat.DataObject) -> bytes:
    out = bytearray(seed)
    for _ in range(data.draw(strat.integers(1, 4))):
        pos = data.draw(strat.integers(0, len(out) - 1))
        out[pos] = data.draw(strat.integers(0, 255))
    cut = data.draw(strat.integers(0, len(out)))
    return bytes(out[:cut]) if data.draw(strat.booleans()) else bytes(out)


@settings(max_examples=150, deadline=None)
@given(strat.binary(max_size=300))
def test_fuzz_attest_random(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        st.parse_attest(data)


@settings(max_examples=150, deadline=None)
@given(strat.data())
def test_fuzz_attest_mutated(data: strat.DataObject) -> None:
    with contextlib.suppress(FormatError):
        st.parse_attest(_mutate(_seed_attest(), data))


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=150, deadline=None)
@given(strat.data())
def test_fuzz_signature(data: strat.DataObject) -> None:
    seed = data.draw(strat.sampled_from([b.sign_rsassa(_RSA, b"m"), b.sign_ecdsa(_EC, b"m")]))
    candidate = data.draw(strat.one_of(strat.binary(max_size=80), strat.just(_mutate(seed, data))))
    with contextlib.suppress(FormatError):
        st.parse_signature(candidate)


@settings(max_examples=150, deadline=None)
@given(strat.data())
def test_fuzz_public(data: strat.DataObject) -> None:
    seed = data.draw(strat.sampled_from([b.rsa_public_area(_RSA.public_key()),
                                         b.ecc_public_area(_EC.public_key())]))
    candidate = data.draw(strat.one_of(strat.binary(max_size=80), strat.just(_mutate(seed, data))))
    try:
        public = st.parse_public(candidate)
        public.public_key()
    except FormatError:
        pass
    with contextlib.suppress(FormatError):
        st.parse_public_sized(candidate)
