"""The ``tpm`` verifier: Trustee vectors, the azure-cvm-tooling quote, synthetic keys and mutations."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coffer.errors import FormatError, VerificationError
from coffer.evidence import parse, verify
from coffer.evidence.base import VerifyOptions
from coffer.evidence.tpm import HANDLER, load_ak, parse_bincode_quote, verify_tpm_quote
from coffer.evidence.tpm import structures as st
from tests.conftest import vector_bytes
from tests.evidence.tpm import builders as b

TPM_EVIDENCE = "trustee/deps/verifier/test_data/tpm_evidence.json"
SNP_QUOTE_JSON = "trustee/deps/verifier/test_data/az-snp-vtpm/tpm-quote-v1.json"
SNP_HCL = "trustee/deps/verifier/test_data/az-snp-vtpm/hcl-report.bin"
CVM_QUOTE = "azure-cvm-tooling/az-cvm-vtpm/test/quote.bin"
CVM_AKPUB = "azure-cvm-tooling/az-cvm-vtpm/test/akpub.pem"


def _doc() -> dict[str, Any]:
    doc = json.loads(vector_bytes(TPM_EVIDENCE))
    assert isinstance(doc, dict)
    return doc


def _rejected_at(step: int, data: bytes, options: VerifyOptions | None = None) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify("tpm", data, options=options)
    assert info.value.step == step, str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------
# Trustee tpm_evidence.json


def test_trustee_tpm_evidence_verifies() -> None:
    claims = verify("tpm", vector_bytes(TPM_EVIDENCE))
    out = claims.to_dict()
    assert out["tee"] == "tpm"
    assert out["insecure"] is True  # the AK is not rooted yet
    assert out["signature_scheme"] == "rsassa-sha256"
    assert out["report_data"].startswith("a04182b5")
    assert out["pcrs"]["sha256"]["17"] == "ff" * 32
    assert len(out["pcrs"]["sha256"]) == 24
    assert out["steps"][-1] == "6 check PCR digest"


def test_trustee_tpm_evidence_parses_for_display() -> None:
    shown = parse("tpm", vector_bytes(TPM_EVIDENCE)).to_dict()
    assert shown["signature"]["scheme"] == "rsassa"
    assert shown["attest"]["extra_data"].startswith("a04182b5")


def test_trusted_ak_makes_claims_secure() -> None:
    ak = base64.b64decode(_doc()["ak_public"])
    claims = verify("tpm", vector_bytes(TPM_EVIDENCE), options=VerifyOptions(trusted_keys=(ak,)))
    assert claims.insecure is False
    assert claims.to_dict()["ak_trusted"] is True


def test_nonce_is_compared_exactly() -> None:
    doc = _doc()
    extra = st.parse_attest(base64.b64decode(doc["tpm_quote"]["message"])).extra_data
    verify("tpm", vector_bytes(TPM_EVIDENCE), options=VerifyOptions(expected_report_data=extra))
    # The 32-byte prefix is not enough: no implicit padding for TPM nonces.
    err = _rejected_at(5, vector_bytes(TPM_EVIDENCE), VerifyOptions(expected_report_data=extra[:32]))
    assert err.step_name == "check nonce"


def test_handler_shape() -> None:
    assert HANDLER.name == "tpm"
    assert HANDLER.input_kind == "json"


def _mutated(path: tuple[str, ...], fn: Any) -> bytes:
    doc = _doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = fn(target[path[-1]])
    return json.dumps(doc).encode()


def _flip_b64(text: str, index: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_rejects_flipped_signature_byte() -> None:
    data = _mutated(("tpm_quote", "signature"), lambda s: _flip_b64(s, 20))
    assert _rejected_at(3, data).step_name == "verify quote signature"


def test_rejects_flipped_signed_message_byte() -> None:
    data = _mutated(("tpm_quote", "message"), lambda s: _flip_b64(s, 60))
    _rejected_at(3, data)


def test_rejects_flipped_pcr_value() -> None:
    data = _mutated(("tpm_quote", "pcrs"), lambda p: ["01" + p[0][2:], *p[1:]])
    assert _rejected_at(6, data).step_name == "check PCR digest"


def test_rejects_missing_pcr_value() -> None:
    data = _mutated(("tpm_quote", "pcrs"), lambda p: p[:23])
    _rejected_at(6, data)


def test_rejects_other_key() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    data = _mutated(("ak_public",), lambda _: base64.b64encode(der).decode())
    _rejected_at(3, data)


def test_rejects_garbage_ak() -> None:
    data = _mutated(("ak_public",), lambda _: base64.b64encode(b"\x30\x03abc").decode())
    assert _rejected_at(2, data).step_name == "load attestation key"


@pytest.mark.parametrize("doc", [b"[]", b"{}", b'{"ak_public": "AA==", "tpm_quote": 3}', b"not json",
                                 b'{"ak_public":"AA==","tpm_quote":{"message":"zz","signature":"","pcrs":[]}}'])
def test_rejects_malformed_document_at_parse(doc: bytes) -> None:
    _rejected_at(1, doc)


# ---------------------------------------------------------------------------------------------
# Azure vTPM quotes (raw RSASSA signature, hex JSON and bincode)


def _snp_ak() -> bytes:
    from coffer.evidence.azure import ak_from_var_data, parse_hcl_report

    return ak_from_var_data(parse_hcl_report(vector_bytes(SNP_HCL)).var_data).spki_der


def test_trustee_tpm_quote_v1_verifies_with_hcl_ak() -> None:
    q = json.loads(vector_bytes(SNP_QUOTE_JSON))
    pcrs = [bytes.fromhex(p) for p in q["pcrs"]]
    claims = verify_tpm_quote(bytes.fromhex(q["message"]), bytes.fromhex(q["signature"]), pcrs, _snp_ak(),
                              options=VerifyOptions(expected_report_data=b"challenge"))
    assert claims.report_data == b"challenge"
    assert claims.signature_scheme == "rsassa-sha256"


def _quote_v1_rejected_at(step: int, *, sig_flip: bool = False, pcr_flip: bool = False,
                          nonce: bytes = b"challenge") -> None:
    q = json.loads(vector_bytes(SNP_QUOTE_JSON))
    sig = bytearray(bytes.fromhex(q["signature"]))
    pcrs = [bytearray(bytes.fromhex(p)) for p in q["pcrs"]]
    if sig_flip:
        sig[0] ^= 0xFF
    if pcr_flip:
        pcrs[0][0] ^= 0xFF
    with pytest.raises(VerificationError) as info:
        verify_tpm_quote(bytes.fromhex(q["message"]), bytes(sig), [bytes(p) for p in pcrs], _snp_ak(),
                         options=VerifyOptions(expected_report_data=nonce))
    assert info.value.step == step, str(info.value)


def test_tpm_quote_v1_rejects_flipped_signature_byte() -> None:
    _quote_v1_rejected_at(3, sig_flip=True)


def test_tpm_quote_v1_rejects_flipped_pcr0() -> None:
    _quote_v1_rejected_at(6, pcr_flip=True)


def test_tpm_quote_v1_rejects_wrong_nonce() -> None:
    _quote_v1_rejected_at(5, nonce=b"challenge"[::-1])


def test_tdx_tpm_quote_v1_verifies_with_its_hcl_ak() -> None:
    from coffer.evidence.azure import ak_from_var_data, parse_hcl_report

    hcl = parse_hcl_report(vector_bytes("trustee/deps/verifier/test_data/az-tdx-vtpm/hcl-report.bin"))
    q = json.loads(vector_bytes("trustee/deps/verifier/test_data/az-tdx-vtpm/tpm-quote-v1.json"))
    claims = verify_tpm_quote(bytes.fromhex(q["message"]), bytes.fromhex(q["signature"]),
                              [bytes.fromhex(p) for p in q["pcrs"]], ak_from_var_data(hcl.var_data),
                              options=VerifyOptions(expected_report_data=b"challenge"))
    assert claims.report_data == b"challenge"


@pytest.mark.parametrize("path", [CVM_QUOTE, "trustee/deps/verifier/test_data/az-snp-vtpm/quote.bin"])
def test_bincode_quote_parses(path: str) -> None:
    parts = parse_bincode_quote(vector_bytes(path))
    assert len(parts.signature) == 256
    assert len(parts.pcrs) == 24
    assert st.parse_attest(parts.message).extra_data == b"challenge"


def test_c3_cvm_quote_verifies_with_akpub_pem() -> None:
    parts = parse_bincode_quote(vector_bytes(CVM_QUOTE))
    claims = verify_tpm_quote(parts.message, parts.signature, parts.pcrs, vector_bytes(CVM_AKPUB),
                              options=VerifyOptions(expected_report_data=b"challenge"))
    assert claims.report_data == b"challenge"
    assert claims.steps[-1] == "6 check PCR digest"


def test_c3_cvm_quote_rejects_wrong_nonce_at_nonce_step() -> None:
    parts = parse_bincode_quote(vector_bytes(CVM_QUOTE))
    with pytest.raises(VerificationError) as info:
        verify_tpm_quote(parts.message, parts.signature, parts.pcrs, vector_bytes(CVM_AKPUB),
                         options=VerifyOptions(expected_report_data=b"egnellahc"))
    assert (info.value.step, info.value.step_name) == (5, "check nonce")


def test_c3_cvm_quote_rejects_flipped_pcr_byte() -> None:
    raw = bytearray(vector_bytes(CVM_QUOTE))
    raw[8 + 256 + 8 + 122 + 8] ^= 0x01  # first byte of PCR0
    parts = parse_bincode_quote(bytes(raw))
    with pytest.raises(VerificationError) as info:
        verify_tpm_quote(parts.message, parts.signature, parts.pcrs, vector_bytes(CVM_AKPUB))
    assert info.value.step == 6


def test_c3_cvm_quote_rejects_flipped_signature_byte() -> None:
    raw = bytearray(vector_bytes(CVM_QUOTE))
    raw[0x30] ^= 0x01  # inside the signature (the upstream negative)
    parts = parse_bincode_quote(bytes(raw))
    with pytest.raises(VerificationError) as info:
        verify_tpm_quote(parts.message, parts.signature, parts.pcrs, vector_bytes(CVM_AKPUB))
    assert info.value.step == 3


def test_bincode_rejects_lying_length() -> None:
    raw = bytearray(vector_bytes(CVM_QUOTE))
    raw[0:8] = struct.pack("<Q", 1 << 40)
    with pytest.raises(FormatError):
        parse_bincode_quote(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Synthetic keys and schemes

PCRS = [bytes([i]) * 32 for i in range(24)]


def _evidence(ak_public: bytes, message: bytes, signature: bytes, pcrs: list[bytes] = PCRS,
              log: bytes | None = None) -> bytes:
    doc: dict[str, Any] = {
        "ak_public": base64.b64encode(ak_public).decode(),
        "tpm_quote": {"message": message.hex(), "signature": base64.b64encode(signature).decode(),
                      "pcrs": [p.hex() for p in pcrs]},
    }
    if log is not None:
        doc["event_log"] = base64.b64encode(log).decode()
    return json.dumps(doc).encode()


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_ecdsa_quote_verifies(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    message = b.quote_for(PCRS)
    alg = st.ALG_SHA256 if curve.key_size == 256 else st.ALG_SHA384
    if alg == st.ALG_SHA384:
        message = b.quote_for(PCRS, hash_name="sha384")
    claims = verify("tpm", _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message, alg)),
                    options=VerifyOptions(expected_report_data=b"nonce"))
    assert claims.to_dict()["signature_scheme"] == f"ecdsa-{st.hash_name(alg)}"


def test_rsapss_quote_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = b.quote_for(PCRS)
    claims = verify("tpm", _evidence(_spki(key.public_key()), message, b.sign_rsapss(key, message)))
    assert claims.to_dict()["signature_scheme"] == "rsapss-sha256"


def test_ecdsa_rejects_flipped_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.quote_for(PCRS)
    sig = bytearray(b.sign_ecdsa(key, message))
    sig[10] ^= 1
    _rejected_at(3, _evidence(_spki(key.public_key()), message, bytes(sig)))


def test_rsa_signature_with_ec_key_is_rejected() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = b.quote_for(PCRS)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    _rejected_at(3, _evidence(_spki(other), message, b.sign_rsassa(key, message)))


def test_tpm2b_public_ak_is_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.quote_for(PCRS)
    area = b.tpm2b(b.ecc_public_area(key.public_key()))
    claims = verify("tpm", _evidence(area, message, b.sign_ecdsa(key, message)))
    assert load_ak(area).spki_der == _spki(key.public_key())
    assert claims.to_dict()["ak_public_sha256"] == load_ak(area).sha256.hex()


def test_unrestricted_tpm_key_is_rejected_as_ak() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = b.quote_for(PCRS)
    area = b.rsa_public_area(key.public_key(), attributes=1 << 18)  # sign, not restricted
    err = _rejected_at(2, _evidence(area, message, b.sign_rsassa(key, message)))
    assert "restricted" in err.reason


def test_wrong_magic_is_rejected_at_structure_step() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.attest(magic=0xFF544348)
    _rejected_at(4, _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message)))


def test_non_quote_type_is_rejected_at_structure_step() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.attest(attest_type=0x8014)
    err = _rejected_at(4, _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message)))
    assert "TPM_ST_ATTEST_QUOTE" in err.reason


def test_quote_of_other_bank_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.attest(selections=[b.pcr_select(st.ALG_SHA1, [0])])
    err = _rejected_at(6, _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message)))
    assert "bank" in err.reason


def test_only_quoted_pcrs_are_claimed() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    import hashlib

    digest = hashlib.sha256(PCRS[0] + PCRS[7]).digest()
    message = b.attest(selections=[b.pcr_select(st.ALG_SHA256, [0, 7])], pcr_digest=digest)
    claims = verify("tpm", _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message)))
    assert set(claims.to_dict()["pcrs"]["sha256"]) == {"0", "7"}


# ---------------------------------------------------------------------------------------------
# Event log replay against the quote

LOG_EVENTS = [(0, 0x80000008, b"firmware"), (7, 0x800000E0, b"db cert"), (0, 4, b"\0" * 4),
              (4, 0x80000003, b"bootloader"), (4, 4, b"\0" * 4), (9, 0xD, b"kernel cmdline")]


def _logged_pcrs() -> list[bytes]:
    replayed = b.replay_expected(LOG_EVENTS)
    return [replayed.get(i, bytes(32)) for i in range(24)]


def test_event_log_replays_to_quoted_pcrs() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pcrs = _logged_pcrs()
    message = b.quote_for(pcrs)
    log = b.event_log(LOG_EVENTS, padding_byte=b"\xff")
    claims = verify("tpm", _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message), pcrs,
                                     log))
    out = claims.to_dict()
    assert out["event_log"] == {"events": 6, "bank": "sha256", "replayed_pcrs": [0, 4, 7, 9]}
    assert out["steps"][-1] == "7 replay event log"


def test_event_log_with_flipped_digest_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pcrs = _logged_pcrs()
    message = b.quote_for(pcrs)
    log = bytearray(b.event_log(LOG_EVENTS))
    header_len = len(b.spec_id_header([st.ALG_SHA256]))
    log[header_len + 12 + 2] ^= 1  # first digest byte of the first event
    err = _rejected_at(7, _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message), pcrs,
                                    bytes(log)))
    assert "PCR 0" in err.reason


def test_event_log_not_covering_quoted_pcrs_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b.quote_for(PCRS)
    log = b.event_log([(30, 0xD, b"x")])
    _rejected_at(7, _evidence(_spki(key.public_key()), message, b.sign_ecdsa(key, message), PCRS, log))
