"""Runtime-data and init-data binding: RFC 8785 canonical JSON, per-TEE report-data placement and
the init-data registers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.attestation.binding import (
    MAX_INITDATA_DEPTH,
    canonical_json,
    check_nesting,
    initdata_digest,
    initdata_expected,
    parse_initdata,
    pcr8_for_initdata,
    report_data_for,
    runtime_data_digest,
    runtime_data_preimage,
)
from coffer.errors import FormatError
from tests.attestation.helpers import INITDATA, NONCE, TEE_PUBKEY


def test_worked_example_of_the_protocol_reference() -> None:
    # SHA-384 of the JCS pre-image {"additional-evidence": "", "nonce", "tee-pubkey"}.
    assert runtime_data_digest(runtime_data_preimage(
        "8nSJRHF5mH7+g2Q0dkdp5w7Fz3KZ0v2U0Yb4q9o0a1E=", TEE_PUBKEY)).hex() == (
        "75bdd768faa3c7e9f67cc53fec2bdf95c2dd0b0054c1e8d9727b4e70e47a6b62"
        "7d5ad8dca8317d3febcba97212ef57bd")


def test_trustee_canonicalizer_unit_vector() -> None:
    digest = hashlib.sha384(canonical_json({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest()
    assert digest.startswith("e71ce8e7")
    assert digest.endswith("8870c3")


def test_preimage_is_compact_and_sorted() -> None:
    assert canonical_json(runtime_data_preimage(NONCE, {"y": "2", "x": "1"})) == (
        b'{"additional-evidence":"","nonce":"' + NONCE.encode() + b'","tee-pubkey":{"x":"1","y":"2"}}')


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1"), (0.5, "0.5"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"),
    (1e-6, "0.000001"), (-2.5, "-2.5"), (5e-324, "5e-324"), (1e16, "10000000000000000"),
    (123.456, "123.456"), (0.0, "0"), (-0.0, "0"), (4.5e-7, "4.5e-7"), (1.5e300, "1.5e+300"),
])
def test_numbers_follow_ecmascript(value: float, text: str) -> None:
    assert canonical_json(value) == text.encode()


def test_keys_sort_by_utf16_code_units() -> None:
    # U+1F600 (surrogates D83D..) sorts before U+FB01 in UTF-16, after it in code points.
    assert canonical_json({"\ufb01": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb01":1}'.encode()


def test_string_escaping_is_minimal() -> None:
    assert canonical_json("a\"\\\n\x01é€") == '"a\\"\\\\\\n\\u0001é€"'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, {"a": object()}, 2**60, "\ud800"])
def test_rejects_values_without_a_canonical_form(bad: Any) -> None:
    with pytest.raises(FormatError):
        canonical_json(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    # An integral double between 2^53 and 1e21 prints without exponent and would read back as an
    # integer outside the exact range, which canonical_json refuses on purpose.
    | st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not (f.is_integer() and 2**53 < abs(f) < 1e21))
    | st.text(max_size=8),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_canonical_json_round_trips(value: Any) -> None:
    text = canonical_json(value)
    assert json.loads(text) == value
    assert canonical_json(json.loads(text)) == text


@pytest.mark.parametrize(("tee", "size", "exact"), [
    ("snp", 64, False), ("tdx", 64, False), ("sgx", 64, False),
    ("az-snp-vtpm", 48, True), ("az-tdx-vtpm", 48, True), ("sample", 48, True), ("tpm", 32, True),
])
def test_report_data_placement(tee: str, size: int, exact: bool) -> None:
    digest = bytes(range(1, 49))
    out = report_data_for(tee, digest)
    assert len(out) == size
    if size == 64:
        assert out == digest + bytes(16)
    else:
        assert out == digest[:size]
    del exact


def test_report_data_for_unknown_tee_is_refused() -> None:
    with pytest.raises(FormatError):
        report_data_for("cca", bytes(48))


def test_initdata_digest_uses_the_declared_algorithm() -> None:
    algorithm, digest = initdata_digest(INITDATA.encode())
    assert algorithm == "sha384"
    assert digest == hashlib.sha384(INITDATA.encode()).digest()
    body = INITDATA.replace("sha384", "sha256").encode()
    assert initdata_digest(body) == ("sha256", hashlib.sha256(body).digest())


@pytest.mark.parametrize("body", [b'algorithm = "md5"\n', b"version = \"0.1.0\"\n", b"not toml = = x",
                                  b"\xff\xfe", b'algorithm = "sha256"\nversion = 1\n'])
def test_initdata_rejects_bad_documents(body: bytes) -> None:
    with pytest.raises(FormatError):
        initdata_digest(body)


@pytest.mark.parametrize("body", [
    b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",  # tomllib hits the recursion limit
    b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000 + b"\n",
    b"a = " + b"[" * (MAX_INITDATA_DEPTH + 1) + b"]" * (MAX_INITDATA_DEPTH + 1) + b"\n",
])
def test_initdata_rejects_deep_nesting_without_recursion_error(body: bytes) -> None:
    with pytest.raises(FormatError, match="initdata"):
        parse_initdata(body)
    with pytest.raises(FormatError):
        initdata_digest(b'algorithm = "sha256"\n' + body)


def test_initdata_accepts_nesting_up_to_the_cap() -> None:
    depth = MAX_INITDATA_DEPTH - 1  # the document table itself is one level
    parse_initdata(b"a = " + b"[" * depth + b"]" * depth + b"\n")


@pytest.mark.parametrize("body", [b"x = inf\n", b"x = -inf\n", b"x = nan\n", b"[t]\ny = [1.0, inf]\n"])
def test_initdata_rejects_non_finite_numbers(body: bytes) -> None:
    with pytest.raises(FormatError, match="non-finite"):
        parse_initdata(body)


def test_check_nesting_is_iterative() -> None:
    deep: list[Any] = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    with pytest.raises(FormatError, match="deeper than 32"):
        check_nesting(deep, "x")
    check_nesting({"a": [{"b": 1.5}]}, "x")


def test_initdata_registers() -> None:
    d384 = bytes(range(48))
    assert initdata_expected("snp", d384) == ("host_data", d384[:32])
    assert initdata_expected("tdx", d384) == ("mr_config_id", d384)
    assert initdata_expected("sgx", d384) == ("config_id", d384 + bytes(16))
    d512 = bytes(range(64))
    assert initdata_expected("tdx", d512) == ("mr_config_id", d512[:48])
    d256 = bytes(range(32))
    assert initdata_expected("tdx", d256) == ("mr_config_id", d256 + bytes(16))
    for tee in ("tpm", "az-snp-vtpm", "az-tdx-vtpm"):
        assert initdata_expected(tee, d384) == ("pcr8", hashlib.sha256(bytes(32) + d384).digest())
    assert pcr8_for_initdata(d256) == hashlib.sha256(bytes(32) + d256).digest()
