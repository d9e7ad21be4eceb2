# Coffer default appraisal policy for CPU evidence ("default", also reachable as "default_cpu").
#
# Input: {"<tee>": verified claims, "report_data", "init_data", "runtime_data_claims",
#         "init_data_claims"}; exactly one TEE key is present.
# Data:  data.reference.<name> = list of accepted reference values (live ones only).
# Output: trust_claims, an object of AR4SI trustworthiness claims.
#
# Fails closed: each claim starts at a value outside the "affirming" tier and is lowered only when
# the evidence matches registered reference values. With no reference values nothing is affirming,
# an unregistered measurement leaves "executables" at 33 (warning) and the sample TEE (no hardware
# root of trust) keeps "hardware" at 97 (contraindicated) whatever is registered. SNP evidence is
# affirming only from VMPL 0; vTPM platforms (tpm, az-*) need at least one registered PCR.
package policy

import rego.v1

default executables := 33

default hardware := 97

default configuration := 36

trust_claims := {
	"executables": executables,
	"hardware": hardware,
	"configuration": configuration,
}

# ---------------------------------------------------------------------------------------------
# Reference-value helpers

rv(name) := data.reference[name] if {
	is_array(data.reference[name])
} else := []

has_rv(name) if count(rv(name)) > 0

# The value is registered (the name must have values).
registered(value, name) if value in rv(name)

# Either nothing is registered under the name, or the value is.
allowed(value, name) if not has_rv(name)

allowed(value, name) if registered(value, name)

tcb_at_least(tcb, minimum) if {
	every component, level in minimum {
		object.get(tcb, component, -1) >= level
	}
}

snp_tcb_ok(tcb) if not has_rv("snp_tcb_min")

snp_tcb_ok(tcb) if {
	some minimum in rv("snp_tcb_min")
	tcb_at_least(tcb, minimum)
}

intel_tcb_ok(status, name) if {
	not has_rv(name)
	status == "UpToDate"
}

intel_tcb_ok(status, name) if registered(status, name)

registered_pcrs := {i |
	some i in numbers.range(0, 23)
	has_rv(sprintf("pcr%d", [i]))
}

pcr_registered(pcrs, i) if {
	some bank in object.keys(pcrs)
	registered(pcrs[bank][sprintf("%d", [i])], sprintf("pcr%d", [i]))
}

# Every registered PCR matches (vacuously true when none is registered).
pcrs_allowed(pcrs) if {
	every i in registered_pcrs {
		pcr_registered(pcrs, i)
	}
}

# At least one PCR is registered and every registered PCR matches (vTPM platforms: the paravisor's
# launch measurement alone does not cover the guest's boot chain).
pcrs_enforced(pcrs) if {
	count(registered_pcrs) > 0
	pcrs_allowed(pcrs)
}

# ---------------------------------------------------------------------------------------------
# AMD SEV-SNP (bare metal, and under the Azure paravisor)

snp_measurement_ok(c) if registered(c.measurement, "measurement")

snp_measurement_ok(c) if registered(c.measurement, "snp_launch_measurement")

snp_executables(c) := 2 if {
	snp_measurement_ok(c)
} else := 33

# Only a report requested from VMPL 0 (the most privileged guest context) describes the guest the
# measurement covers; a report from any other VMPL (or one without a VMPL) is never affirming.
snp_vmpl0(c) if c.vmpl == 0

snp_hardware(c) := 97 if {
	c.insecure
} else := 2 if {
	snp_vmpl0(c)
	snp_tcb_ok(c.reported_tcb)
} else := 32

snp_configuration(c) := 96 if {
	c.policy.debug
} else := 96 if {
	is_number(c.vmpl)
	c.vmpl != 0
} else := 2 if {
	snp_vmpl0(c)
	allowed(c.host_data, "host_data")
	allowed(c.guest_svn, "guest_svn")
	allowed(c.id_key_digest, "id_key_digest")
} else := 36

executables := snp_executables(input.snp) if input.snp

hardware := snp_hardware(input.snp) if input.snp

configuration := snp_configuration(input.snp) if input.snp

az_snp := input["az-snp-vtpm"]

executables := 2 if {
	az_snp
	snp_executables(az_snp.snp) == 2
	pcrs_enforced(az_snp.tpm.pcrs)
} else := 33 if az_snp

hardware := 97 if {
	az_snp.insecure
} else := snp_hardware(az_snp.snp) if az_snp

configuration := snp_configuration(az_snp.snp) if az_snp

# ---------------------------------------------------------------------------------------------
# Intel TDX (bare metal, and under the Azure paravisor)

tdx_executables(c) := 2 if {
	registered(c.mr_td, "mr_td")
	allowed(c.rtmr0, "rtmr0")
	allowed(c.rtmr1, "rtmr1")
	allowed(c.rtmr2, "rtmr2")
	allowed(c.rtmr3, "rtmr3")
	allowed(c.mr_seam, "mr_seam")
} else := 33

tdx_hardware(c) := 2 if {
	intel_tcb_ok(c.tcb_status, "tdx_tcb_status")
} else := 32

tdx_configuration(c) := 96 if {
	c.debug
} else := 2 if {
	allowed(c.xfam, "xfam")
	allowed(c.mr_config_id, "mr_config_id")
	allowed(c.mr_owner, "mr_owner")
	allowed(c.mr_owner_config, "mr_owner_config")
} else := 36

executables := tdx_executables(input.tdx) if input.tdx

hardware := tdx_hardware(input.tdx) if input.tdx

configuration := tdx_configuration(input.tdx) if input.tdx

az_tdx := input["az-tdx-vtpm"]

executables := 2 if {
	az_tdx
	tdx_executables(az_tdx.tdx) == 2
	pcrs_enforced(az_tdx.tpm.pcrs)
} else := 33 if az_tdx

hardware := 97 if {
	az_tdx.insecure
} else := tdx_hardware(az_tdx.tdx) if az_tdx

configuration := tdx_configuration(az_tdx.tdx) if az_tdx

# ---------------------------------------------------------------------------------------------
# Intel SGX

executables := 2 if {
	input.sgx
	registered(input.sgx.mr_enclave, "mr_enclave")
	allowed(input.sgx.mr_signer, "mr_signer")
	allowed(input.sgx.isv_prod_id, "isv_prod_id")
} else := 33 if input.sgx

hardware := 2 if {
	input.sgx
	intel_tcb_ok(input.sgx.tcb_status, "sgx_tcb_status")
} else := 32 if input.sgx

configuration := 96 if {
	input.sgx.debug
} else := 2 if {
	allowed(input.sgx.config_id, "config_id")
} else := 36 if input.sgx

# ---------------------------------------------------------------------------------------------
# TPM 2.0: the attestation key must be trusted (registered as trusted_ak, checked by the verifier),
# and at least one PCR must be registered, every registered one matching.

executables := 2 if {
	input.tpm
	pcrs_enforced(input.tpm.pcrs)
} else := 33 if input.tpm

hardware := 2 if {
	input.tpm
	input.tpm.ak_trusted == true
	not input.tpm.insecure
} else := 97 if input.tpm

configuration := 0 if input.tpm

# ---------------------------------------------------------------------------------------------
# sample: no rule lowers any claim, so sample evidence is never affirming.
