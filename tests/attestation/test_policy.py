"""Appraisal policies: the default CPU policy enforces reference values and fails closed; custom
Rego policies; AR4SI tiers and the EAR status."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest

from coffer.attestation.policy import (
    DEFAULT_CPU_POLICY,
    CompiledPolicy,
    compiled,
    default_policy,
    status_from_vector,
    tier,
    validate_policy,
)
from coffer.errors import FormatError, ProtocolError

M = "aa" * 48
TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
SNP = {"tee": "snp", "insecure": False, "measurement": M, "reported_tcb": TCB,
       "policy": {"debug": False}, "host_data": "00" * 32, "guest_svn": 1, "id_key_digest": "00" * 48,
       "vmpl": 0}
TDX = {"tee": "tdx", "insecure": False, "mr_td": "01" * 48, "rtmr0": "02" * 48, "rtmr1": "02" * 48,
       "rtmr2": "02" * 48, "rtmr3": "02" * 48, "mr_seam": "03" * 48, "tcb_status": "UpToDate",
       "debug": False, "xfam": "e742060000000000", "mr_config_id": "00" * 48, "mr_owner": "00" * 48,
       "mr_owner_config": "00" * 48}
SGX = {"tee": "sgx", "insecure": False, "mr_enclave": "0e" * 32, "mr_signer": "05" * 32, "isv_prod_id": 0,
       "tcb_status": "UpToDate", "debug": False, "config_id": "00" * 64}
PCRS = {"sha256": {str(i): f"{i:02x}" * 32 for i in range(24)}}
TPM = {"tee": "tpm", "insecure": False, "ak_trusted": True, "pcrs": PCRS}
AZ_SNP = {"tee": "az-snp-vtpm", "insecure": False, "snp": SNP, "tpm": {"pcrs": PCRS}}
AZ_TDX = {"tee": "az-tdx-vtpm", "insecure": False, "tdx": TDX, "tpm": {"pcrs": PCRS}}


def appraise(tee: str, claims: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    result = default_policy().appraise("default", {tee: claims, "report_data": "", "init_data": ""},
                                       reference)
    return {"status": result.status, **result.trust_vector}


def changed(claims: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(claims)
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


# --- fail closed ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("tee", "claims"), [("snp", SNP), ("tdx", TDX), ("sgx", SGX), ("tpm", TPM),
                                             ("az-snp-vtpm", AZ_SNP), ("az-tdx-vtpm", AZ_TDX)])
def test_nothing_is_affirming_without_reference_values(tee: str, claims: dict[str, Any]) -> None:
    out = appraise(tee, claims, {})
    assert out["status"] != "affirming"
    assert out["executables"] == 33


def test_snp_affirming_only_with_registered_measurement() -> None:
    assert appraise("snp", SNP, {"measurement": [M]})["status"] == "affirming"
    assert appraise("snp", SNP, {"snp_launch_measurement": [M]})["status"] == "affirming"
    out = appraise("snp", SNP, {"measurement": ["bb" * 48]})
    assert out["status"] == "warning"
    assert out["executables"] == 33


def test_unrelated_reference_values_do_not_help() -> None:
    assert appraise("snp", SNP, {"mr_td": [M], "launch_digest": [M]})["status"] != "affirming"


@pytest.mark.parametrize("reference", [{}, {"measurement": [M], "launch_digest": [M], "svn": [1]},
                                       {"measurement": [M], "mr_td": [M]}])
def test_sample_is_never_affirming(reference: dict[str, Any]) -> None:
    sample = {"tee": "sample", "insecure": True, "measurement": M, "launch_digest": M, "svn": 1}
    out = appraise("sample", sample, reference)
    assert out["status"] == "contraindicated"
    assert out["hardware"] == 97


def test_unknown_tee_key_is_contraindicated() -> None:
    assert appraise("cca", {"measurement": M}, {"measurement": [M]})["status"] == "contraindicated"


def test_snp_tcb_minimum() -> None:
    ref = {"measurement": [M], "snp_tcb_min": [{"bootloader": 3, "snp": 8, "microcode": 115}]}
    assert appraise("snp", SNP, ref)["status"] == "affirming"
    low = {"measurement": [M], "snp_tcb_min": [{"microcode": 200}]}
    out = appraise("snp", SNP, low)
    assert (out["status"], out["hardware"]) == ("warning", 32)


def test_snp_host_data_and_debug() -> None:
    assert appraise("snp", SNP, {"measurement": [M], "host_data": ["11" * 32]})["configuration"] == 36
    assert appraise("snp", SNP, {"measurement": [M], "host_data": ["00" * 32]})["configuration"] == 2
    debug = appraise("snp", changed(SNP, "policy.debug", True), {"measurement": [M]})
    assert (debug["status"], debug["configuration"]) == ("contraindicated", 96)


def test_insecure_snp_claims_are_contraindicated() -> None:
    out = appraise("snp", changed(SNP, "insecure", True), {"measurement": [M]})
    assert out["hardware"] == 97


def test_tdx_needs_mr_td_and_matching_rtmrs() -> None:
    assert appraise("tdx", TDX, {"mr_td": ["01" * 48]})["status"] == "affirming"
    assert appraise("tdx", TDX, {"mr_td": ["01" * 48], "rtmr2": ["02" * 48]})["status"] == "affirming"
    assert appraise("tdx", TDX, {"mr_td": ["01" * 48], "rtmr2": ["09" * 48]})["executables"] == 33
    assert appraise("tdx", TDX, {"rtmr0": ["02" * 48]})["executables"] == 33


def test_tdx_tcb_status_and_debug() -> None:
    ref: dict[str, Any] = {"mr_td": ["01" * 48]}
    out_of_date = changed(TDX, "tcb_status", "OutOfDate")
    assert appraise("tdx", out_of_date, ref)["hardware"] == 32
    assert appraise("tdx", out_of_date, {**ref, "tdx_tcb_status": ["OutOfDate"]})["hardware"] == 2
    assert appraise("tdx", changed(TDX, "debug", True), ref)["configuration"] == 96


def test_sgx_mr_enclave() -> None:
    assert appraise("sgx", SGX, {"mr_enclave": ["0e" * 32]})["status"] == "affirming"
    assert appraise("sgx", SGX, {"mr_enclave": ["0e" * 32], "mr_signer": ["06" * 32]})["executables"] == 33
    assert appraise("sgx", SGX, {"mr_signer": ["05" * 32]})["executables"] == 33


def test_tpm_needs_trusted_ak_and_registered_pcrs() -> None:
    ref = {"pcr11": ["0b" * 32], "pcr4": ["04" * 32]}
    assert appraise("tpm", TPM, ref)["status"] == "affirming"
    assert appraise("tpm", TPM, {"pcr11": ["ff" * 32]})["executables"] == 33
    untrusted = appraise("tpm", changed(TPM, "ak_trusted", False), ref)
    assert (untrusted["status"], untrusted["hardware"]) == ("contraindicated", 97)


def test_azure_needs_measurement_and_registered_pcrs() -> None:
    good, bad = {"measurement": [M], "pcr11": ["0b" * 32]}, {"measurement": [M], "pcr11": ["ff" * 32]}
    assert appraise("az-snp-vtpm", AZ_SNP, good)["status"] == "affirming"
    assert appraise("az-snp-vtpm", AZ_SNP, bad)["executables"] == 33
    assert appraise("az-snp-vtpm", AZ_SNP, {"pcr11": ["0b" * 32]})["executables"] == 33
    tdx_ref = {"mr_td": ["01" * 48], "pcr4": ["04" * 32]}
    assert appraise("az-tdx-vtpm", AZ_TDX, tdx_ref)["status"] == "affirming"
    insecure = changed(AZ_TDX, "insecure", True)
    assert appraise("az-tdx-vtpm", insecure, {"mr_td": ["01" * 48]})["hardware"] == 97


@pytest.mark.parametrize(("tee", "claims", "launch"), [("az-snp-vtpm", AZ_SNP, {"measurement": [M]}),
                                                       ("az-tdx-vtpm", AZ_TDX, {"mr_td": ["01" * 48]})])
def test_azure_vtpm_not_affirmed_on_paravisor_measurement_alone(
        tee: str, claims: dict[str, Any], launch: dict[str, Any]) -> None:
    # The paravisor's launch measurement does not cover the guest's boot chain: without a registered
    # PCR nothing vouches for what the vTPM measured.
    alone = appraise(tee, claims, launch)
    assert (alone["status"], alone["executables"]) == ("warning", 33)
    assert appraise(tee, claims, {**launch, "pcr11": ["0b" * 32]})["status"] == "affirming"
    # Every registered PCR must match, not just one of them.
    mixed = {**launch, "pcr11": ["0b" * 32], "pcr4": ["ff" * 32]}
    assert appraise(tee, claims, mixed)["executables"] == 33


@pytest.mark.parametrize("vmpl", [1, 2, 3])
def test_snp_report_from_nonzero_vmpl_is_not_affirming(vmpl: int) -> None:
    ref = {"measurement": [M]}
    assert appraise("snp", SNP, ref)["status"] == "affirming"
    out = appraise("snp", changed(SNP, "vmpl", vmpl), ref)
    assert out["status"] == "contraindicated"
    assert out["hardware"] == 32
    assert out["configuration"] == 96
    az = appraise("az-snp-vtpm", changed(AZ_SNP, "snp.vmpl", vmpl), {**ref, "pcr11": ["0b" * 32]})
    assert az["status"] == "contraindicated"


def test_snp_report_without_vmpl_is_not_affirming() -> None:
    claims = {k: v for k, v in SNP.items() if k != "vmpl"}
    out = appraise("snp", claims, {"measurement": [M]})
    assert out["status"] != "affirming"
    assert (out["hardware"], out["configuration"]) == (32, 36)


# --- tiers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "name"), [(0, "none"), (1, "none"), (-1, "none"), (2, "affirming"),
                                             (31, "affirming"), (32, "warning"), (95, "warning"),
                                             (96, "contraindicated"), (127, "contraindicated"),
                                             (-2, "contraindicated"), (-128, "contraindicated")])
def test_ar4si_tiers(value: int, name: str) -> None:
    assert tier(value) == name


def test_status_is_the_worst_tier() -> None:
    assert status_from_vector({"a": 0, "b": 0}) == "none"
    assert status_from_vector({"a": 2, "b": 0}) == "affirming"
    assert status_from_vector({"a": 2, "b": 33}) == "warning"
    assert status_from_vector({"a": 97, "b": 33, "c": 2}) == "contraindicated"


# --- custom policies -------------------------------------------------------------------------------

CUSTOM = """package policy
import rego.v1
default hardware := 97
hardware := 2 if input.snp.measurement in query_reference_value("golden")
trust_claims := {"hardware": hardware, "executables": 3}
extensions := [{"name": "ear.trustee.identifiers", "key": -18, "value": {"validated": ["x"]}}]
"""


def test_custom_policy_with_query_reference_value_and_extensions() -> None:
    policy = CompiledPolicy(CUSTOM)
    result = policy.appraise("custom", {"snp": SNP}, {"golden": [M]})
    assert result.trust_vector["hardware"] == 2
    assert result.trust_vector["executables"] == 3
    assert result.status == "affirming"
    assert result.extensions == {"ear.trustee.identifiers": {"validated": ["x"]}}
    assert policy.appraise("custom", {"snp": SNP}, {}).trust_vector["hardware"] == 97


@pytest.mark.parametrize("text", ["package other\ntrust_claims := {}\n", "package policy\nthis is not rego",
                                  "package policy\nx := 1\n",
                                  "", "x" * (300 * 1024)])
def test_invalid_policies_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        validate_policy(text)


@pytest.mark.parametrize("name", ["ear.status", "ear.trustworthiness-vector", "ear.appraisal-policy-id",
                                  "ear.veraison.annotated-evidence", "ear.anything"])
def test_policy_extension_cannot_overwrite_ear_status(name: str) -> None:
    policy = CompiledPolicy('package policy\nimport rego.v1\ntrust_claims := {"hardware": 97}\n'
                            f'extensions := [{{"name": "{name}", "key": "x", "value": "affirming"}}]\n')
    with pytest.raises(ProtocolError, match="reserved") as info:
        policy.appraise("p", {"snp": SNP}, {})
    assert info.value.kind == "AttestationError"


@pytest.mark.parametrize(("body", "fragment"), [
    ('trust_claims := {"hardware": 500}', "int8"),
    ('trust_claims := {"bogus": 2}', "unknown trust claim"),
    ('trust_claims := {"hardware": "2"}', "int8"),
    ("trust_claims := [1]", "no trust_claims"),
    ('trust_claims := {"hardware": 2} if input.never', "no trust_claims"),
])
def test_bad_policy_output_is_an_attestation_error(body: str, fragment: str) -> None:
    policy = CompiledPolicy(f"package policy\nimport rego.v1\n{body}\n")
    with pytest.raises(ProtocolError) as info:
        policy.appraise("p", {"snp": SNP}, {})
    assert info.value.kind == "AttestationError"
    assert fragment in info.value.detail


def test_runtime_errors_in_rego_are_attestation_errors() -> None:
    policy = CompiledPolicy('package policy\nimport rego.v1\ntrust_claims := {"hardware": 1 / 0}\n')
    with pytest.raises(ProtocolError):
        policy.appraise("p", {"snp": SNP}, {})


def test_compiled_policies_are_reused() -> None:
    assert compiled(DEFAULT_CPU_POLICY) is default_policy()
    assert compiled(CUSTOM) is compiled(CUSTOM)


def test_a_compiled_policy_works_from_other_threads() -> None:
    # regorus engines panic when used from another thread than their creator's.
    policy = compiled(DEFAULT_CPU_POLICY)
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(policy.appraise("default", {"snp": SNP}, {"measurement": [M]}).status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == ["affirming"] * 12
