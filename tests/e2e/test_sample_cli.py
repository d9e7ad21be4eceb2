"""The sample TEE end to end with the command line only: a real ``coffer kbs serve`` process, the
operator's ``coffer kbs admin`` commands, the guest's ``coffer attest`` and ``coffer kbs audit``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx

from coffer.kbs.jwe import TeeKeyPair
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    KbsProcess,
    assert_error,
    auth_body,
    cookie_header,
    run_coffer,
    run_json,
    sample_attestation,
    session_cookie,
)

SECRET = b"e2e sample secret \x00\xff\x10 bytes"
RESOURCE = "default/key/e2e"


def test_sample_release_with_the_cli(tmp_path: Path, admin_key: AdminKey, sqlite_kbs: KbsProcess) -> None:
    kbs = sqlite_kbs
    token_file = tmp_path / "admin.jwt"
    run_coffer("kbs", "admin", "token", "--key", str(admin_key.private), "--role", "admin",
               "--subject", "e2e-operator", "--out", str(token_file))
    remote = ["--kbs", kbs.url, "--token-file", str(token_file)]

    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(SECRET)
    stored = run_json("kbs", "admin", "resource", "put", RESOURCE, str(secret_file), *remote, "--json")
    assert stored == {"ok": True, "resource": RESOURCE, "size": len(SECRET)}

    # The default resource policy refuses sample evidence: 401 PolicyDeny on the wire...
    with httpx.Client(base_url=kbs.url, timeout=10) as http:
        key = TeeKeyPair.generate()
        auth = http.post("/kbs/v0/auth", json=auth_body())
        session = session_cookie(auth)
        http.cookies.clear()
        attested = http.post("/kbs/v0/attest", json=sample_attestation(auth.json()["nonce"], key),
                             headers=cookie_header(session))
        assert attested.status_code == 200, attested.text
        http.cookies.clear()
        refused = http.get(f"/kbs/v0/resource/{RESOURCE}", headers=cookie_header(session))
    assert "denied by policy" in assert_error(refused, 401, "PolicyDeny")

    # ... and for the guest CLI: exit 1, the kind reported, nothing written.
    out_file = tmp_path / "out" / "secret"
    denied = run_coffer("attest", "--kbs", kbs.url, "--tee", "sample", "--resource", f"kbs:///{RESOURCE}",
                        "--out", str(out_file), "--json", check=False)
    assert denied.returncode == 1, denied.stderr
    assert json.loads(denied.stdout)["error"] == "PolicyDeny"
    assert not out_file.exists()

    # The operator opens the policy to sample evidence; the CLI release then succeeds.
    policy_file = tmp_path / "open.rego"
    policy_file.write_text(SAMPLE_RESOURCE_POLICY)
    run_coffer("kbs", "admin", "policy", "set", "resource", str(policy_file), *remote)
    assert run_coffer("kbs", "admin", "policy", "get", "resource", *remote).stdout == SAMPLE_RESOURCE_POLICY

    token_out = tmp_path / "guest.jwt"
    released = run_coffer("attest", "--kbs", kbs.url, "--tee", "sample", "--resource", f"kbs:///{RESOURCE}",
                          "--out", str(out_file), "--token-out", str(token_out), "--json")
    summary = json.loads(released.stdout)
    assert summary["resources"] == [{"path": RESOURCE, "bytes": len(SECRET), "written_to": str(out_file)}]
    assert out_file.read_bytes() == SECRET
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert SECRET.decode("latin-1") not in released.stdout + released.stderr
    cpu0 = summary["token_claims"]["submods"]["cpu0"]
    assert "sample" in cpu0["ear.veraison.annotated-evidence"]

    # The token the guest got verifies against the server's published JWKS.
    verified = run_json("token", "verify", str(token_out), "--jwks", f"{kbs.url}/.well-known/jwks.json",
                        "--json")
    assert verified["ok"] is True

    # The audit log has the denials and the release, each with identifying claims.
    events = run_json("kbs", "audit", *remote, "--resource", RESOURCE, "--json")["events"]
    decisions = [e for e in events if e["action"] in ("deny", "release")]
    # one denial by hand, three from the CLI (the guest re-attests on a 401, three requests in all)
    assert [e["action"] for e in decisions] == ["deny"] * 4 + ["release"], decisions
    for event in decisions:
        assert event["subject"] == RESOURCE
        assert event["claims"]["tee"] == "sample"
        assert event["claims"]["ear.status"]
        assert len(event["claims"]["tee_pubkey_thumbprint"]) == 64
        assert "iat" in event["claims"]
        assert "exp" in event["claims"]
    assert decisions[0]["outcome"] == "denied"
    assert decisions[0]["detail"] == "resource policy"
    assert decisions[-1]["outcome"] == "allowed"
    releases = run_json("kbs", "audit", *remote, "--action", "release", "--json")["events"]
    assert len(releases) == 1
    admin_changes = [e for e in events if e["action"] == "admin"]
    assert admin_changes
    assert admin_changes[0]["claims"].get("sub") == "e2e-operator", admin_changes
    assert SECRET.decode("latin-1") not in kbs.log_text()
