"""The ``sample`` attester (Trustee form and Coffer's signed form) and the attester registry."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from coffer.errors import UnsupportedError, VerificationError
from coffer.evidence import verify
from coffer.evidence.base import VerifyOptions
from coffer.guest import TEES, Attester, attester_for
from coffer.guest.attesters.sample import SampleAttester

DIGEST = hashlib.sha384(b"runtime data").digest()


def test_trustee_form_carries_the_digest_in_std_base64() -> None:
    evidence = SampleAttester().evidence(DIGEST)
    assert evidence == {"svn": "1", "report_data": base64.b64encode(DIGEST).decode()}


def test_signed_form_verifies_with_the_evidence_library() -> None:
    attester = SampleAttester(form="signed", init_data=b"\x01" * 32, measurement=b"\x02" * 48)
    evidence = attester.evidence(DIGEST)
    claims = verify("sample", json.dumps(evidence).encode(),
                    options=VerifyOptions(expected_report_data=DIGEST))
    assert claims.insecure is True
    assert claims.report_data == DIGEST + bytes(16)
    assert claims.to_dict()["init_data"] == "01" * 32


def test_signed_form_keeps_its_key_across_requests() -> None:
    attester = SampleAttester(form="signed")
    assert attester.evidence(DIGEST)["public_key"] == attester.evidence(DIGEST)["public_key"]


def test_signed_form_refused_for_other_runtime_data() -> None:
    evidence = SampleAttester(form="signed").evidence(DIGEST)
    with pytest.raises(VerificationError) as err:
        verify("sample", json.dumps(evidence).encode(),
               options=VerifyOptions(expected_report_data=hashlib.sha384(b"x").digest()))
    assert err.value.step == 4


def test_rejects_unknown_form_and_bad_digest() -> None:
    with pytest.raises(ValueError, match="form"):
        SampleAttester(form="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="digest"):
        SampleAttester().evidence(b"")


def test_registry_knows_every_tee_and_refuses_others() -> None:
    assert set(TEES) == {"sample", "tpm", "snp", "tdx", "az-snp-vtpm", "az-tdx-vtpm"}
    attester = attester_for("sample", form="signed")
    assert isinstance(attester, Attester)
    assert attester.tee == "sample"
    with pytest.raises(UnsupportedError, match="sgx"):
        attester_for("sgx")
