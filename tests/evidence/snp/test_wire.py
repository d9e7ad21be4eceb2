"""The CoCo ``snp`` attester JSON form: rebuilt reports are byte-identical to binary ones."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence.snp import SnpReport, parse_report
from coffer.evidence.snp.wire import parse_json_evidence, rebuild_report
from tests.conftest import vector_bytes
from tests.evidence.snp.synth import ReportSpec, Tcb, build_report, sign_report

E2E = "trustee/attestation-service/tests/e2e/evidence.json"


def to_serde(report: SnpReport) -> dict[str, Any]:
    """The serde shape the attester produces, written from a parsed report."""

    def tcb(name: str) -> dict[str, Any]:
        value = getattr(report, name)
        return {"fmc": value.fmc, "bootloader": value.bootloader, "tee": value.tee, "snp": value.snp,
                "microcode": value.microcode}

    def ver(name: str) -> dict[str, int]:
        value = getattr(report, name)
        return {"major": value.major, "minor": value.minor, "build": value.build}

    out: dict[str, Any] = {
        "version": report.version, "guest_svn": report.guest_svn, "policy": report.policy.raw,
        "family_id": list(report.family_id), "image_id": list(report.image_id), "vmpl": report.vmpl,
        "sig_algo": report.signature_algo, "current_tcb": tcb("current_tcb"),
        "plat_info": report.platform_info.raw, "key_info": report.signer_info.raw,
        "report_data": list(report.report_data), "measurement": list(report.measurement),
        "host_data": list(report.host_data), "id_key_digest": list(report.id_key_digest),
        "author_key_digest": list(report.author_key_digest), "report_id": list(report.report_id),
        "report_id_ma": list(report.report_id_ma), "reported_tcb": tcb("reported_tcb"),
        "cpuid_fam_id": report.cpuid_family, "cpuid_mod_id": report.cpuid_model,
        "cpuid_step": report.cpuid_stepping, "chip_id": list(report.chip_id),
        "committed_tcb": tcb("committed_tcb"), "current": ver("current_version"),
        "committed": ver("committed_version"), "launch_tcb": tcb("launch_tcb"),
        "signature": {"r": list(report.signature_r.to_bytes(72, "little")),
                      "s": list(report.signature_s.to_bytes(72, "little"))},
    }
    if report.version >= 5:
        out["launch_mit_vector"] = report.launch_mit_vector
        out["current_mit_vector"] = report.current_mit_vector
    return out


REAL_REPORTS = [
    ("virtee-sev/tests/certs_data/report_milan.hex", "hex"),
    ("go-sev-guest/verify/testdata/attestation.bin", "raw"),
    ("constellation/internal/attestation/aws/snp/testdata/report.txt", "b64"),
    ("trustee/deps/verifier/test_data/snp/test-vlek-report.bin", "raw"),
]


def load(relative: str, form: str) -> bytes:
    data = vector_bytes(relative)
    if form == "hex":
        return bytes.fromhex(data.decode().strip())
    if form == "b64":
        return base64.b64decode(data)
    return data[:0x4A0]


@pytest.mark.parametrize(("relative", "form"), REAL_REPORTS)
def test_rebuild_is_byte_identical_for_real_reports(relative: str, form: str) -> None:
    raw = load(relative, form)
    assert rebuild_report(to_serde(parse_report(raw))) == raw


@pytest.mark.parametrize(("product", "tcb"), [("Genoa", Tcb()), ("Turin", Tcb(fmc=2))])
def test_rebuild_is_byte_identical_for_v5_reports(product: str, tcb: Tcb) -> None:
    raw = sign_report(build_report(ReportSpec(product=product, reported_tcb=tcb)))
    assert rebuild_report(to_serde(parse_report(raw))) == raw


def test_e2e_evidence_round_trips() -> None:
    raw, endorsements = parse_json_evidence(vector_bytes(E2E))
    report = parse_report(raw)
    assert report.product == "Genoa"
    assert endorsements is not None
    assert endorsements.chain == ()
    doc = json.loads(vector_bytes(E2E))
    assert to_serde(report) == doc["attestation_report"]


@pytest.mark.parametrize(
    ("path", "value"),
    [(("version",), "3"), (("vmpl",), -1), (("policy",), 1 << 64), (("chip_id",), [0] * 63),
     (("report_data",), [256] + [0] * 63), (("current_tcb",), None), (("signature",), {"r": []}),
     (("cpuid_fam_id",), None), (("reported_tcb", "bootloader"), True)],
)
def test_rejects_malformed_fields(path: tuple[str, ...], value: object) -> None:
    doc = json.loads(vector_bytes(E2E))
    target = doc["attestation_report"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(FormatError):
        parse_json_evidence(json.dumps(doc).encode())


def test_rejects_fmc_on_a_non_turin_report() -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["attestation_report"]["reported_tcb"]["fmc"] = 1
    with pytest.raises(FormatError, match="FMC"):
        parse_json_evidence(json.dumps(doc).encode())


def test_rejects_two_signing_certificates() -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["cert_chain"].append(doc["cert_chain"][0])
    with pytest.raises(FormatError, match="more than one"):
        parse_json_evidence(json.dumps(doc).encode())


def test_chain_entries_are_kept_in_ask_then_ark_order() -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["cert_chain"] = [{"cert_type": "ARK", "data": [1]}, {"cert_type": "VCEK", "data": [2]},
                         {"cert_type": "ASK", "data": [3]}, {"cert_type": "CRL", "data": [4]}]
    _, endorsements = parse_json_evidence(json.dumps(doc).encode())
    assert endorsements is not None
    assert endorsements.leaf == b"\x02"
    assert endorsements.chain == (b"\x03", b"\x01")


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-300, 1 << 70) | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=20))
def test_random_json_only_raises_format_error(value: object) -> None:
    doc = json.loads(vector_bytes(E2E))
    doc["attestation_report"]["measurement"] = value
    with contextlib.suppress(FormatError):
        parse_json_evidence(json.dumps({"attestation_report": value}).encode())
    with contextlib.suppress(FormatError):
        parse_json_evidence(json.dumps(doc).encode())
