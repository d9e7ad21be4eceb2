from __future__ import annotations

import contextlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer import evidence
from coffer.errors import FormatError, VerificationError
from coffer.evidence.base import VerifyOptions
from coffer.evidence.sample import make_sample_evidence, parse_sample_evidence


def test_verifies_and_is_always_insecure() -> None:
    data = make_sample_evidence(report_data=b"nonce", init_data=b"\x11" * 32)
    claims = evidence.verify("sample", data, options=VerifyOptions(expected_report_data=b"nonce"))
    assert claims.insecure is True
    body = claims.to_dict()
    assert body["tee"] == "sample"
    assert body["report_data"] == (b"nonce".ljust(64, b"\0")).hex()
    assert body["init_data"] == "11" * 32
    assert body["steps"] == [
        "1 parse evidence", "2 load signing key", "3 evidence signature", "4 report data"]


def test_rejects_wrong_report_data_at_step_4() -> None:
    data = make_sample_evidence(report_data=b"nonce")
    with pytest.raises(VerificationError) as info:
        evidence.verify("sample", data, options=VerifyOptions(expected_report_data=b"other"))
    assert info.value.step == 4


def test_rejects_tampered_field_at_signature_step() -> None:
    doc = json.loads(make_sample_evidence(report_data=b"nonce"))
    doc["svn"] = 2
    with pytest.raises(VerificationError) as info:
        evidence.verify("sample", json.dumps(doc).encode())
    assert (info.value.step, info.value.step_name) == (3, "evidence signature")


def test_rejects_signature_by_other_key() -> None:
    doc = json.loads(make_sample_evidence())
    other = json.loads(make_sample_evidence(key=ec.generate_private_key(ec.SECP256R1())))
    doc["signature"] = other["signature"]
    with pytest.raises(VerificationError, match="step 3"):
        evidence.verify("sample", json.dumps(doc).encode())


def test_rejects_non_p256_key_at_step_2() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    doc = json.loads(make_sample_evidence())
    from cryptography.hazmat.primitives import serialization

    doc["public_key"] = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()
    with pytest.raises(VerificationError) as info:
        evidence.verify("sample", json.dumps(doc).encode())
    assert info.value.step == 2


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d.pop("svn"), "missing"),
        (lambda d: d.update(extra=1), "unknown"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(svn=-1), "svn"),
        (lambda d: d.update(report_data="00" * 65), "at most 64"),
        (lambda d: d.update(measurement="xyz"), "hex"),
        (lambda d: d.update(signature=5), "base64"),
    ],
)
def test_rejects_malformed_fields(mutation: object, message: str) -> None:
    doc = json.loads(make_sample_evidence())
    mutation(doc)  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        parse_sample_evidence(json.dumps(doc).encode())


def test_rejects_oversized_evidence() -> None:
    with pytest.raises(FormatError, match="limit"):
        parse_sample_evidence(b"{" + b" " * 20000 + b"}")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=599), st.integers(0, 255))
def test_fuzz_parser_only_raises_format_error(noise: bytes, index: int, value: int) -> None:
    good = bytearray(make_sample_evidence())
    good[index % len(good)] = value
    for candidate in (noise, bytes(good)):
        with contextlib.suppress(FormatError):
            parse_sample_evidence(candidate)
