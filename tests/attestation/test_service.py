"""The attestation service end to end (in process): Trustee evidence shapes in, EAR token out.

Recorded hardware evidence whose runtime-data pre-image is unknown is checked at the verifier level
(:meth:`AttestationService.verify_evidence` with the report data it carries) and refused through
:meth:`attest` with any runtime data, which cannot hash to it."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from coffer.attestation.binding import InitData, initdata_digest, pcr8_for_initdata, report_data_for
from coffer.attestation.policy import DEFAULT_CPU_POLICY
from coffer.attestation.service import AttestationService, evidence_bytes
from coffer.attestation.token import tee_pubkey_from_claims
from coffer.errors import FormatError, ProtocolError, VerificationError
from coffer.evidence.dcap import OfflineIntelCollateral, StaticIntelCollateral, parse_quote
from coffer.evidence.sample import make_sample_evidence
from coffer.evidence.tpm import structures as st
from coffer.kbs.store import MemoryStore
from tests.attestation.helpers import (
    DIGEST,
    INITDATA,
    NONCE,
    PCRS,
    RUNTIME,
    TEE_PUBKEY,
    Clock,
    cpu0,
    service,
    spki_hex,
    tpm_evidence,
    trustee_sample,
)
from tests.conftest import vector_bytes, vector_path
from tests.evidence.dcap import synth
from tests.evidence.tpm import builders

TD = "trustee/deps/verifier/test_data/"
INIT = InitData(format="toml", body=INITDATA)
INIT_DIGEST = initdata_digest(INITDATA.encode())[1]


def _signed_sample(*, digest: bytes = DIGEST, init: bytes = b"", measurement: bytes = b"\1" * 48) -> Any:
    return json.loads(make_sample_evidence(report_data=report_data_for("sample", digest), init_data=init,
                                           measurement=measurement))


# --- sample: the token's shape ----------------------------------------------------------------

def test_trustee_sample_evidence_yields_a_trustee_shaped_token() -> None:
    clock = Clock()
    svc = service(clock=clock)
    result = svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME)
    claims = result.claims
    iat = int(clock.at.timestamp())
    assert claims["eat_profile"] == "tag:github.com,2024:confidential-containers/Trustee"
    assert (claims["iat"], claims["exp"]) == (iat, iat + 300)
    assert claims["iss"] == "coffer-attestation-service"
    assert set(claims["ear.verifier-id"]) == {"developer", "build"}
    sub = cpu0(claims)
    assert sub["ear.appraisal-policy-id"] == "default"
    assert sub["ear.status"] == "contraindicated"
    assert sub["ear.trustworthiness-vector"]["hardware"] == 97
    annotated = sub["ear.veraison.annotated-evidence"]
    assert annotated["report_data"] == DIGEST.hex()
    assert annotated["runtime_data_claims"] == {"nonce": RUNTIME["nonce"], "tee-pubkey": TEE_PUBKEY,
                                                "additional-evidence": ""}
    assert annotated["init_data_claims"] is None
    assert annotated["sample"]["svn"] == "1"
    assert annotated["sample"]["insecure"] is True
    verified = svc.token_verifier().verify(result.token, now=clock.at)
    assert verified == claims
    assert tee_pubkey_from_claims(verified) == TEE_PUBKEY


def test_sample_is_never_affirming_even_with_reference_values() -> None:
    svc = service()
    svc.reference_values.add("measurement", ["01" * 48])
    svc.reference_values.add("launch_digest", ["01" * 48])
    result = svc.attest(tee="sample", primary_evidence=_signed_sample(), runtime_data=RUNTIME)
    assert cpu0(result.claims)["ear.status"] == "contraindicated"


def test_rejects_sample_evidence_bound_to_another_nonce() -> None:
    other = {"nonce": "AAAA" + NONCE[4:], "tee-pubkey": TEE_PUBKEY}
    for evidence in (trustee_sample(), _signed_sample()):
        with pytest.raises(VerificationError):
            service().attest(tee="sample", primary_evidence=evidence, runtime_data=other)


def test_rejects_unverified_additional_evidence() -> None:
    # Device evidence is not verified yet: refused outright, never copied into the token.
    with pytest.raises(ProtocolError, match="additional device evidence is not supported yet") as info:
        service().attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME,
                         additional_evidence='{"nvidia":{}}')
    assert info.value.kind == "AttestationError"


def test_rejects_runtime_data_naming_other_additional_evidence() -> None:
    with pytest.raises(ProtocolError):
        service().attest(tee="sample", primary_evidence=trustee_sample(),
                         runtime_data={**RUNTIME, "additional-evidence": "x"})


def test_primary_evidence_may_be_json_text() -> None:
    service().attest(tee="sample", primary_evidence=json.dumps(trustee_sample()), runtime_data=RUNTIME)


@pytest.mark.parametrize(("tee", "evidence"), [
    ("cca", {}), ("sample", []), ("sample", "not json"), ("snp", {"report": 1}),
    ("tdx", {"quote": "!!!"}), ("tdx", {"quote": "AAAA", "extra": 1}), ("sgx", {"quote": 7}),
    ("sample", {"svn": "1", "report_data": "***"}),
])
def test_malformed_requests_are_attestation_errors(tee: str, evidence: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        service().attest(tee=tee, primary_evidence=evidence, runtime_data=RUNTIME)
    assert info.value.kind == "AttestationError"


def test_malformed_tpm_evidence_is_rejected_at_the_parse_step() -> None:
    with pytest.raises(VerificationError) as info:
        service().attest(tee="tpm", primary_evidence={"ak_public": 1}, runtime_data=RUNTIME)
    assert info.value.step == 1


# --- init-data ------------------------------------------------------------------------------------

def test_init_data_bound_in_sample_evidence() -> None:
    result = service().attest(tee="sample", primary_evidence=_signed_sample(init=INIT_DIGEST),
                              runtime_data=RUNTIME, init_data=INIT)
    annotated = cpu0(result.claims)["ear.veraison.annotated-evidence"]
    assert annotated["init_data"] == INIT_DIGEST.ljust(64, b"\0").hex()
    assert annotated["init_data_claims"] == {
        "aa.toml": {"token_configs": {"kbs": {"url": "http://127.0.0.1:8080"}}},
        "agent_policy_claims": {"containers": ["nginx"]},
    }


def test_rejects_init_data_that_the_evidence_does_not_carry() -> None:
    with pytest.raises(VerificationError) as info:
        service().attest(tee="sample", primary_evidence=_signed_sample(init=b"\7" * 48),
                         runtime_data=RUNTIME, init_data=INIT)
    assert info.value.step_name == "check init-data"
    assert info.value.step == 5


def test_rejects_init_data_for_trustee_sample_evidence() -> None:
    with pytest.raises(VerificationError):
        service().attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME,
                         init_data=INIT)


@pytest.mark.parametrize("init", [InitData(format="json", body="{}"),
                                  InitData(format="toml", body='algorithm = "md5"'),
                                  InitData(format="toml", body="= broken")])
def test_bad_init_data_is_an_attestation_error(init: InitData) -> None:
    with pytest.raises(ProtocolError):
        service().attest(tee="sample", primary_evidence=_signed_sample(init=INIT_DIGEST),
                         runtime_data=RUNTIME, init_data=init)


def _attest_with_init_data(body: str) -> Any:
    digest = hashlib.sha384(body.encode()).digest()  # not initdata_digest: it parses the body
    return service().attest(tee="sample", primary_evidence=_signed_sample(init=digest),
                            runtime_data=RUNTIME, init_data=InitData(format="toml", body=body))


_HEAD = 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n'
_ML = "'''"  # TOML multi-line literal string delimiter


@pytest.mark.parametrize("body", [
    "a = " + "[" * 5000 + "]" * 5000 + "\n",  # beyond tomllib's recursion limit
    _HEAD + "deep = " + "[" * 40 + "]" * 40 + "\n",  # parses, but over the depth cap
    _HEAD + f'"policy.rego" = {_ML}\npolicy_data := ' + "[" * 100000 + f"\n{_ML}\n",  # json recursion
    _HEAD + f'"policy.rego" = {_ML}\npolicy_data := ' + "[" * 40 + "]" * 40 + f"\n{_ML}\n",
    _HEAD + f'"aa.toml" = {_ML}\nx = ' + "[" * 5000 + "]" * 5000 + f"\n{_ML}\n",
    _HEAD + f'"cdh.toml" = {_ML}\nx = ' + "[" * 40 + "]" * 40 + f"\n{_ML}\n",
])
def test_rejects_deeply_nested_init_data_as_attestation_error(body: str) -> None:
    # Was an unauthenticated 500 (RecursionError): now the ordinary bad-request path.
    with pytest.raises(ProtocolError) as info:
        _attest_with_init_data(body)
    assert info.value.kind == "AttestationError"
    assert "init-data" in info.value.detail


@pytest.mark.parametrize("body", [_HEAD + "x = inf\n", _HEAD + "x = nan\n",
                                  _HEAD + '"policy.rego" = "policy_data := [Infinity]"\n',
                                  _HEAD + '"aa.toml" = "x = -inf"\n'])
def test_rejects_init_data_with_non_finite_numbers(body: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _attest_with_init_data(body)
    assert info.value.kind == "AttestationError"


def test_init_data_toml_dates_and_times_become_iso_strings() -> None:
    body = (_HEAD + "day = 1979-05-27\nclock = 07:32:00\nlocal = 1979-05-27T07:32:00\n"
            'zoned = 1979-05-27T07:32:00Z\n"aa.toml" = "d = 1979-05-27"\n')
    result = _attest_with_init_data(body)
    claims = cpu0(result.claims)["ear.veraison.annotated-evidence"]["init_data_claims"]
    assert claims == {"day": "1979-05-27", "clock": "07:32:00", "local": "1979-05-27T07:32:00",
                      "zoned": "1979-05-27T07:32:00Z", "aa.toml": {"d": "1979-05-27"}}
    json.dumps(result.claims, allow_nan=False)  # the token payload is plain JSON


def test_policy_extension_cannot_overwrite_ear_status() -> None:
    svc = service()
    svc.set_policy("default", 'package policy\nimport rego.v1\ntrust_claims := {"hardware": 97}\n'
                              'extensions := [{"name": "ear.status", "key": "x", "value": "affirming"}]\n')
    with pytest.raises(ProtocolError, match="reserved") as info:
        svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME)
    assert info.value.kind == "AttestationError"


def test_policy_extensions_never_win_over_the_services_claims() -> None:
    svc = service()
    svc.set_policy("default", 'package policy\nimport rego.v1\ntrust_claims := {"hardware": 97}\n'
                              'extensions := [{"name": "ear.trustee.identifiers", "key": -18, '
                              '"value": {"validated": ["x"]}}]\n')
    sub = cpu0(svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME).claims)
    assert sub["ear.status"] == "contraindicated"
    assert sub["ear.trustee.identifiers"] == {"validated": ["x"]}


class _FakeSnpClaims:
    """What the evidence library returns for an SNP report (only what the service reads)."""

    def __init__(self, vmpl: int | None) -> None:
        self.report_data = report_data_for("snp", DIGEST)
        self.vmpl = vmpl

    def to_dict(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"tee": "snp", "insecure": False, "host_data": "00" * 32,
                                  "measurement": "11" * 48, "steps": ["1 a", "2 b"]}
        if self.vmpl is not None:
            claims["vmpl"] = self.vmpl
        return claims


@pytest.mark.parametrize("vmpl", [1, 2, 3, None])
def test_rejects_snp_evidence_from_nonzero_vmpl(monkeypatch: pytest.MonkeyPatch, vmpl: int | None) -> None:
    # The evidence library verifies reports from any VMPL; the service accepts only VMPL 0.
    monkeypatch.setattr("coffer.attestation.service.verify_evidence_bytes",
                        lambda *args, **kwargs: _FakeSnpClaims(vmpl))
    with pytest.raises(VerificationError) as info:
        service().attest(tee="snp", primary_evidence={"attestation_report": {}}, runtime_data=RUNTIME)
    assert (info.value.tee, info.value.step, info.value.step_name) == ("snp", 3, "check VMPL")
    monkeypatch.setattr("coffer.attestation.service.verify_evidence_bytes",
                        lambda *args, **kwargs: _FakeSnpClaims(0))
    service().attest(tee="snp", primary_evidence={"attestation_report": {}}, runtime_data=RUNTIME)


# --- TPM (synthetic quotes) --------------------------------------------------------------------

@pytest.fixture
def ak() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_tpm_with_trusted_ak_and_registered_pcrs_is_affirming(ak: ec.EllipticCurvePrivateKey) -> None:
    svc = service()
    svc.reference_values.add("trusted_ak", [spki_hex(ak)])
    svc.reference_values.add("pcr11", [PCRS[11].hex()])
    result = svc.attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST[:32], key=ak), runtime_data=RUNTIME)
    sub = cpu0(result.claims)
    assert sub["ear.status"] == "affirming"
    assert sub["ear.veraison.annotated-evidence"]["tpm"]["ak_trusted"] is True
    assert sub["ear.veraison.annotated-evidence"]["report_data"] == DIGEST[:32].hex()


def test_tpm_with_unregistered_pcr_is_not_affirming(ak: ec.EllipticCurvePrivateKey) -> None:
    svc = service()
    svc.reference_values.add("trusted_ak", [spki_hex(ak)])
    svc.reference_values.add("pcr11", ["ee" * 32])
    result = svc.attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST[:32], key=ak), runtime_data=RUNTIME)
    assert cpu0(result.claims)["ear.status"] == "warning"


def test_tpm_with_untrusted_ak_is_contraindicated(ak: ec.EllipticCurvePrivateKey) -> None:
    svc = service()
    svc.reference_values.add("pcr11", [PCRS[11].hex()])
    result = svc.attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST[:32], key=ak), runtime_data=RUNTIME)
    assert cpu0(result.claims)["ear.status"] == "contraindicated"


def test_rejects_tpm_quote_with_the_full_digest_as_nonce(ak: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(VerificationError) as info:
        service().attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST, key=ak), runtime_data=RUNTIME)
    assert info.value.step_name == "check nonce" or "nonce" in str(info.value)


def test_tpm_init_data_in_pcr8(ak: ec.EllipticCurvePrivateKey) -> None:
    pcrs = list(PCRS)
    pcrs[8] = pcr8_for_initdata(INIT_DIGEST)
    result = service().attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST[:32], key=ak, pcrs=pcrs),
                              runtime_data=RUNTIME, init_data=INIT)
    assert cpu0(result.claims)["ear.veraison.annotated-evidence"]["init_data"] == pcrs[8].hex()
    with pytest.raises(VerificationError) as info:
        service().attest(tee="tpm", primary_evidence=tpm_evidence(DIGEST[:32], key=ak), runtime_data=RUNTIME,
                         init_data=INIT)
    assert info.value.step_name == "check init-data"


# --- TDX (synthetic platform with a test root) -----------------------------------------------------

MR_CONFIG_ID_AT, RTMR0_AT = 184, 328
CCEL_EVENTS = [(1, 0x80000001, b"firmware"), (2, 0x6, b"kernel"), (3, 0xD, b"cmdline"),
               (2, 0x3, b"no-action")]


@pytest.fixture
def tdx_platform(monkeypatch: pytest.MonkeyPatch) -> Callable[..., synth.Platform]:
    """Builds a synthetic TDX platform (test root CA pinned in place of Intel's for the test)."""
    original = synth.td_body

    def build(*, report_data: bytes, mr_config_id: bytes = bytes(48), rtmrs: bytes | None = None,
              **kw: Any) -> synth.Platform:
        def body(**args: Any) -> bytes:
            out = original(**args)
            out = out[:MR_CONFIG_ID_AT] + mr_config_id + out[MR_CONFIG_ID_AT + 48:]
            if rtmrs is not None:
                out = out[:RTMR0_AT] + rtmrs + out[RTMR0_AT + 192:]
            return out

        monkeypatch.setattr(synth, "td_body", body)
        platform = synth.build(report_data=report_data, **kw)
        root_der = platform.root.public_bytes(Encoding.DER)
        monkeypatch.setattr("coffer.evidence.dcap.verifier.intel_sgx_root_ca_der", lambda: root_der)
        return platform

    return build


def _tdx_service(platform: synth.Platform) -> AttestationService:
    return service(collateral=StaticIntelCollateral(platform.collateral), clock=Clock(synth.NOW))


def _tdx_evidence(platform: synth.Platform, log: bytes | None = None) -> dict[str, Any]:
    return {"quote": base64.b64encode(platform.quote).decode(),
            "cc_eventlog": base64.b64encode(log).decode() if log is not None else None}


def test_tdx_quote_bound_to_runtime_data_with_init_data_and_mr_td(
        tdx_platform: Callable[..., synth.Platform]) -> None:
    platform = tdx_platform(report_data=report_data_for("tdx", DIGEST), mr_config_id=INIT_DIGEST)
    svc = _tdx_service(platform)
    svc.reference_values.add("mr_td", ["01" * 48])
    result = svc.attest(tee="tdx", primary_evidence=_tdx_evidence(platform), runtime_data=RUNTIME,
                        init_data=INIT)
    sub = cpu0(result.claims)
    assert sub["ear.status"] == "affirming"
    annotated = sub["ear.veraison.annotated-evidence"]
    assert annotated["init_data"] == INIT_DIGEST.hex()
    assert annotated["tdx"]["mr_td"] == "01" * 48
    assert annotated["tdx"]["tcb_status"] == "UpToDate"


def test_tdx_unregistered_mr_td_is_not_affirming(tdx_platform: Callable[..., synth.Platform]) -> None:
    platform = tdx_platform(report_data=report_data_for("tdx", DIGEST))
    svc = _tdx_service(platform)
    svc.reference_values.add("mr_td", ["09" * 48])
    result = svc.attest(tee="tdx", primary_evidence=_tdx_evidence(platform), runtime_data=RUNTIME)
    assert cpu0(result.claims)["ear.status"] == "warning"


def test_rejects_tdx_quote_bound_to_other_runtime_data(tdx_platform: Callable[..., synth.Platform]) -> None:
    platform = tdx_platform(report_data=report_data_for("tdx", hashlib.sha384(b"other").digest()))
    with pytest.raises(VerificationError) as info:
        _tdx_service(platform).attest(tee="tdx", primary_evidence=_tdx_evidence(platform),
                                      runtime_data=RUNTIME)
    assert info.value.step == 12


def test_rejects_tdx_init_data_not_in_mr_config_id(tdx_platform: Callable[..., synth.Platform]) -> None:
    platform = tdx_platform(report_data=report_data_for("tdx", DIGEST))
    with pytest.raises(VerificationError) as info:
        _tdx_service(platform).attest(tee="tdx", primary_evidence=_tdx_evidence(platform),
                                      runtime_data=RUNTIME, init_data=INIT)
    assert (info.value.step, info.value.step_name) == (13, "check init-data")


def test_tdx_cc_eventlog_is_replayed_against_the_rtmrs(tdx_platform: Callable[..., synth.Platform]) -> None:
    log = builders.event_log(CCEL_EVENTS, algs=(st.ALG_SHA384,))
    replayed = builders.replay_expected(CCEL_EVENTS, "sha384")
    rtmrs = b"".join(replayed.get(i, bytes(48)) for i in (1, 2, 3, 4))
    platform = tdx_platform(report_data=report_data_for("tdx", DIGEST), rtmrs=rtmrs)
    result = _tdx_service(platform).attest(tee="tdx", primary_evidence=_tdx_evidence(platform, log),
                                           runtime_data=RUNTIME)
    summary = cpu0(result.claims)["ear.veraison.annotated-evidence"]["tdx"]["cc_eventlog"]
    assert summary["rtmrs"][1] == replayed[2].hex()


def test_rejects_cc_eventlog_that_does_not_replay_to_the_rtmrs(
        tdx_platform: Callable[..., synth.Platform]) -> None:
    log = builders.event_log(CCEL_EVENTS, algs=(st.ALG_SHA384,))
    platform = tdx_platform(report_data=report_data_for("tdx", DIGEST))
    with pytest.raises(VerificationError) as info:
        _tdx_service(platform).attest(tee="tdx", primary_evidence=_tdx_evidence(platform, log),
                                      runtime_data=RUNTIME)
    assert info.value.step_name == "replay CC event log"


# --- recorded hardware evidence ---------------------------------------------------------------

@pytest.mark.vectors
def test_snp_e2e_evidence_verifies_with_the_report_data_it_carries() -> None:
    doc = json.loads(vector_bytes("trustee/attestation-service/tests/e2e/evidence.json"))
    report_data = bytes(doc["attestation_report"]["report_data"])
    svc = service(clock=Clock(datetime(2026, 1, 1, tzinfo=UTC)))
    verified = svc.verify_evidence("snp", doc, expected_report_data=report_data)
    assert verified.claims["product"] == "Genoa"
    assert verified.report_data == report_data
    assert verified.init_field == bytes(doc["attestation_report"]["host_data"])
    measurement = verified.claims["measurement"]
    policy_input = {"snp": verified.claims}
    assert svc.appraise(policy_input).status != "affirming"
    svc.reference_values.add("measurement", [measurement])
    assert svc.appraise(policy_input).trust_vector["executables"] == 2


@pytest.mark.vectors
def test_snp_e2e_evidence_is_refused_for_other_runtime_data() -> None:
    doc = json.loads(vector_bytes("trustee/attestation-service/tests/e2e/evidence.json"))
    with pytest.raises(VerificationError) as info:
        service(clock=Clock(datetime(2026, 1, 1, tzinfo=UTC))).attest(
            tee="snp", primary_evidence=doc, runtime_data=RUNTIME)
    assert (info.value.tee, info.value.step) == ("snp", 8)


V2_REPORT_DATA = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef")


@pytest.mark.vectors
def test_az_snp_vtpm_v2_accepted_iff_report_data_matches() -> None:
    doc = json.loads(vector_bytes(TD + "az-snp-vtpm/evidence-v2.json"))
    svc = service(clock=Clock(datetime(2026, 1, 1, tzinfo=UTC)))
    expected = report_data_for("az-snp-vtpm", V2_REPORT_DATA)
    verified = svc.verify_evidence("az-snp-vtpm", doc, expected_report_data=expected)
    assert verified.report_data == V2_REPORT_DATA
    assert verified.init_field is not None
    assert len(verified.init_field) == 32  # PCR 8
    svc.reference_values.add("measurement", [verified.claims["snp"]["measurement"]])
    # The paravisor measurement alone is not enough: a registered PCR must match too.
    assert svc.appraise({"az-snp-vtpm": verified.claims}).trust_vector["executables"] == 33
    svc.reference_values.add("pcr0", [verified.claims["tpm"]["pcrs"]["sha256"]["0"]])
    assert svc.appraise({"az-snp-vtpm": verified.claims}).trust_vector["executables"] == 2
    with pytest.raises(VerificationError):
        svc.attest(tee="az-snp-vtpm", primary_evidence=doc, runtime_data=RUNTIME)
    with pytest.raises(VerificationError):
        svc.verify_evidence("az-snp-vtpm", doc, expected_report_data=bytes(48))


SGX_COLLATERAL = "dcap-qvl/sample/sgx_quote_collateral.json"


@pytest.mark.vectors
def test_sgx_quote_in_trustee_form_accepted_iff_report_data_matches() -> None:
    quote = vector_bytes("dcap-qvl/sample/sgx_quote")
    evidence = {"quote": base64.b64encode(quote).decode()}
    report_data = parse_quote(quote).enclave_report.report_data
    svc = service(collateral=OfflineIntelCollateral(vector_path(SGX_COLLATERAL)),
                  clock=Clock(datetime(2025, 7, 1, tzinfo=UTC)))
    verified = svc.verify_evidence("sgx", evidence, expected_report_data=report_data)
    assert verified.claims["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(VerificationError) as info:
        svc.attest(tee="sgx", primary_evidence=evidence, runtime_data=RUNTIME)
    assert info.value.step == 12


@pytest.mark.vectors
def test_recorded_tdx_quote_reaches_the_verifier() -> None:
    gtg = "go-tdx-guest/testing/"
    quote = vector_bytes(gtg + "testdata/tdx_prod_quote_SPR_E4.dat")
    evidence = {"quote": base64.b64encode(quote).decode(), "cc_eventlog": None}
    assert evidence_bytes("tdx", evidence) == (quote, None)
    with pytest.raises(VerificationError) as info:
        service(clock=Clock(datetime(2023, 7, 1, 1, tzinfo=UTC))).attest(
            tee="tdx", primary_evidence=evidence, runtime_data=RUNTIME)
    assert info.value.tee == "tdx"  # no offline collateral: refused, never accepted


# --- policies -------------------------------------------------------------------------------------

ALWAYS = 'package policy\nimport rego.v1\ntrust_claims := {"hardware": 2, "executables": 2}\n'


def test_set_get_and_delete_the_default_policy() -> None:
    svc = service()
    assert svc.get_policy("default") == DEFAULT_CPU_POLICY
    assert svc.get_policy("default_cpu") == DEFAULT_CPU_POLICY
    svc.set_policy("default_cpu", ALWAYS)
    assert svc.get_policy("default") == ALWAYS
    result = svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME)
    assert cpu0(result.claims)["ear.status"] == "affirming"
    assert svc.list_policies() == {"default": "stored"}
    assert svc.delete_policy("default") is True
    assert svc.get_policy("default") == DEFAULT_CPU_POLICY
    assert svc.get_policy("other") is None


def test_named_policy() -> None:
    svc = service()
    svc.set_policy("lenient", ALWAYS)
    result = svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME,
                        policy_id="lenient")
    assert cpu0(result.claims)["ear.appraisal-policy-id"] == "lenient"
    with pytest.raises(ProtocolError):
        svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME, policy_id="nope")


@pytest.mark.parametrize(("policy_id", "text"), [("default", "package policy\nnot rego"),
                                                 ("bad id!", ALWAYS), ("x" * 65, ALWAYS)])
def test_set_policy_validates(policy_id: str, text: str) -> None:
    svc = service()
    with pytest.raises(FormatError):
        svc.set_policy(policy_id, text)
    assert svc.get_policy("default") == DEFAULT_CPU_POLICY


def test_replicas_share_policies_and_reference_values() -> None:
    store = MemoryStore()
    a, b = service(store=store), service(store=store)
    a.set_policy("default", ALWAYS)
    a.reference_values.add("mr_td", ["01" * 48])
    assert b.get_policy("default") == ALWAYS
    assert b.reference_values.snapshot() == {"mr_td": ["01" * 48]}
    assert a.jwks() == b.jwks()
    token = b.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME).token
    a.token_verifier().verify(token, now=Clock().at)
