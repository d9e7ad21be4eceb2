"""The policy reaches the attestation claims: a guest attesting with the initdata that carries its
compiled policy gets a token whose init-data claims hold the policy data (its debug switch
included), bound to the digest its evidence carries."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.support import AdminKey, KbsProcess, run_coffer

POLICY = """\
version: 1
name: web
debug: {debug}
containers:
  - name: app
    image: docker.io/library/app@sha256:{digest}
    args: [/app]
"""


def _initdata(tmp_path: Path, name: str, *, debug: bool) -> Path:
    policy = tmp_path / f"{name}.yaml"
    policy.write_text(POLICY.format(debug="true" if debug else "false", digest="2" * 64))
    out = tmp_path / f"{name}.toml"
    run_coffer("policy", "initdata", str(policy), "-o", str(out))
    return out


def test_policy_debug_switch_is_visible_in_the_token(
    tmp_path: Path, admin_key: AdminKey, sqlite_kbs: KbsProcess
) -> None:
    kbs = sqlite_kbs
    for debug in (False, True):
        initdata = _initdata(tmp_path, f"policy-{debug}", debug=debug)
        done = run_coffer(
            "attest", "--kbs", kbs.url, "--tee", "sample", "--attester-option", "form=signed",
            "--initdata", str(initdata), "--json",
        )  # fmt: skip
        claims = json.loads(done.stdout)["token_claims"]
        submod = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
        policy_claims = submod["init_data_claims"]["agent_policy_claims"]
        assert policy_claims["debug"] is debug
        assert policy_claims["name"] == "web"
