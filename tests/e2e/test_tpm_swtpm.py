"""The ``tpm`` TEE end to end: a real software TPM, its AK enrolled by credential activation against
the EK certificate, the AK and the PCRs registered as reference values through the admin API, the
default resource policy (affirming only) releasing a resource to ``coffer attest --tee tpm``, and a
PCR extended afterwards making the same request refused."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer.guest.attesters.tpm import TpmAttester, enroll_by_activation
from coffer.sandbox import swtpm
from tests.e2e.support import AdminKey, KbsProcess, admin_get, audit_events, child_env, run_coffer, run_json

SECRET = b"disk-encryption-key-for-the-tpm-guest"
RESOURCE = "default/key/tpm-guest"
REGISTERED_PCRS = range(17)  # firmware, boot and the debug PCR 16 (extended below)

pytestmark = pytest.mark.skipif(
    not (swtpm.available() and all(shutil.which(t) for t in ("tpm2_createak", "tpm2_quote",
                                                            "tpm2_activatecredential", "tpm2_pcrextend"))),
    reason="swtpm / tpm2-tools not installed (apt-get install swtpm swtpm-tools tpm2-tools "
           "libtss2-tcti-swtpm0)")


@pytest.fixture
def software_tpm(tmp_path: Path) -> Iterator[swtpm.Swtpm]:
    tpm = swtpm.Swtpm(tmp_path / "tpm", ca_dir=tmp_path / "tpm-ca")
    with tpm:
        yield tpm
    assert not tpm.running


def test_tpm_release_follows_ak_and_pcr_reference_values(tmp_path: Path, admin_key: AdminKey,
                                                         sqlite_kbs: KbsProcess,
                                                         software_tpm: swtpm.Swtpm) -> None:
    kbs = sqlite_kbs
    remote = ["--kbs", kbs.url, "--token", admin_key.token()]
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    run_coffer("kbs", "admin", "resource", "put", RESOURCE, str(secret_file), *remote)

    # The verifier side trusts the AK once the TPM proved, by activating a credential made for its
    # certified EK, that it holds both keys.
    attester = TpmAttester(software_tpm.tcti)
    ak_spki = enroll_by_activation(attester, ca_certs=software_tpm.local_ca.certificates())
    assert ak_spki == attester.ak_public()
    run_coffer("kbs", "admin", "reference-value", "add", "trusted_ak", ak_spki.hex(),
               "--provenance", "credential activation against the swtpm EK certificate", *remote)
    pcrs = dict(zip(attester.pcrs, attester.read_pcrs(), strict=True))
    rvps = {"version": "0.1.0", "type": "sample", "payload": base64.b64encode(json.dumps(
        {f"pcr{i}": [pcrs[i].hex()] for i in REGISTERED_PCRS}).encode()).decode()}
    rvps_file = tmp_path / "pcrs.rvps.json"
    rvps_file.write_text(json.dumps(rvps))
    run_coffer("kbs", "admin", "reference-value", "add", "--rvps", str(rvps_file), *remote)
    listed = json.dumps(admin_get(kbs.url, admin_key, "/kbs/v0/reference-value"))
    assert ak_spki.hex() in listed
    assert pcrs[16].hex() in listed
    assert "credential activation" in listed  # provenance kept

    guest = ["attest", "--kbs", kbs.url, "--tee", "tpm", "--attester-option", f"tcti={software_tpm.tcti}",
             "--resource", f"kbs:///{RESOURCE}", "--json"]
    out_file = tmp_path / "released"
    released = run_json(*guest, "--out", str(out_file), env=child_env())
    assert out_file.read_bytes() == SECRET
    cpu0 = released["token_claims"]["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming"
    tpm_claims = cpu0["ear.veraison.annotated-evidence"]["tpm"]
    assert tpm_claims["ak_trusted"] is True
    assert released["report_data"] == cpu0["ear.veraison.annotated-evidence"]["report_data"]

    # Something measured into PCR 16 after registration: the quote no longer matches the reference
    # values, the token is not affirming, and the default policy refuses the resource.
    attester.tools.run("tpm2_pcrextend", f"16:sha256={hashlib.sha256(b'unexpected code').hexdigest()}")
    refused_out = tmp_path / "refused"
    refused = run_coffer(*guest, "--out", str(refused_out), check=False, env=child_env())
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert json.loads(refused.stdout)["error"] == "PolicyDeny"
    assert not refused_out.exists()

    decisions = [e for e in audit_events(kbs.url, admin_key, resource=RESOURCE)
                 if e["action"] in ("release", "deny")]
    assert decisions[0]["action"] == "release"
    assert decisions[0]["claims"]["ear.status"] == "affirming"
    assert {e["action"] for e in decisions[1:]} == {"deny"}
    assert {e["claims"]["ear.status"] for e in decisions[1:]} == {"warning"}
    assert all(e["claims"]["tee"] == "tpm" for e in decisions)
    assert decisions[0]["claims"]["claims"]["ak_public_sha256"] == hashlib.sha256(ak_spki).hexdigest()
