"""initdata: the TOML document, its digest for each algorithm and TEE placement (checked against
openssl, an independent implementation), the pod annotation, and hostile annotations."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import subprocess
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UsageError
from coffer.policy import initdata

POLICY = "package agent_policy\n\ndefault X := false\n# a comment with 'quotes' and \"double quotes\"\n"


def _openssl_digest(path: Path, algorithm: str) -> bytes:
    done = subprocess.run(
        ["openssl", "dgst", f"-{algorithm}", "-binary", str(path)], capture_output=True, check=True
    )
    return done.stdout


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_digests_match_openssl_for_every_algorithm_and_placement(tmp_path: Path, algorithm: str) -> None:
    doc = initdata.build_initdata(POLICY, algorithm=algorithm, aa_toml="[token_configs]\n")
    path = tmp_path / "initdata.toml"
    path.write_bytes(doc)
    expected = _openssl_digest(path, algorithm)
    result = initdata.digests(doc)
    assert result.algorithm == algorithm
    assert result.digest == expected
    assert result.snp_hostdata == expected[:32].ljust(32, b"\0")
    assert result.tdx_mrconfigid == expected[:48].ljust(48, b"\0")
    assert len(result.snp_hostdata) == 32
    assert len(result.tdx_mrconfigid) == 48
    # PCR 8 extended once from zero with the digest, SHA-256 bank (what the TPM attester does).
    assert result.tpm_pcr8 == hashlib.sha256(b"\0" * 32 + expected).digest()
    assert result.to_json()["digest"] == expected.hex()


def test_document_shape_is_coco_initdata() -> None:
    doc = tomllib.loads(initdata.build_initdata(POLICY, cdh_toml='socket = "x"\n').decode())
    assert doc["version"] == "0.1.0"
    assert doc["algorithm"] == "sha256"
    assert doc["data"] == {"cdh.toml": 'socket = "x"\n', "policy.rego": POLICY}


def test_a_changed_policy_changes_the_digest() -> None:
    first = initdata.digests(initdata.build_initdata(POLICY)).digest
    second = initdata.digests(initdata.build_initdata(POLICY.replace("false", "true"))).digest
    assert first != second


def test_build_is_deterministic_and_the_annotation_round_trips() -> None:
    doc = initdata.build_initdata(POLICY)
    assert doc == initdata.build_initdata(POLICY)
    value = initdata.initdata_annotation(doc)
    assert value == initdata.initdata_annotation(doc)
    assert initdata.decode_annotation(value) == doc
    assert gzip.decompress(base64.b64decode(value)) == doc


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_policy_text_round_trips_through_the_toml(text: str) -> None:
    try:
        doc = initdata.build_initdata(text)
    except UsageError:
        return  # over the size limit
    assert initdata.parse_initdata_document(doc).policy == text


def test_unknown_algorithm_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="sha256"):
        initdata.build_initdata(POLICY, algorithm="md5")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'version = "0.2.0"\nalgorithm = "sha256"\n', "version"),
        (b'version = "0.1.0"\nalgorithm = "sha1"\n', "algorithm"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"policy.rego" = 3\n', "strings"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\nextra = 1\n', "unknown"),
        (b"not toml at all = = =", "TOML"),
    ],
)
def test_malformed_documents_are_format_errors(body: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        initdata.parse_initdata_document(body)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!!not base64", "base64"),
        (base64.b64encode(b"plain, not gzip").decode(), "gzip"),
        (base64.b64encode(gzip.compress(b"\0" * (2 * 1024 * 1024))).decode(), "expands"),
        ("A" * (300 * 1024), "over"),
    ],
)
def test_hostile_annotations_are_refused(value: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        initdata.decode_annotation(value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_annotation_decoder_only_raises_typed_errors(data: bytes) -> None:
    with contextlib.suppress(CofferError):
        initdata.decode_annotation(base64.b64encode(data).decode())
