"""Two ``coffer kbs serve`` processes sharing one PostgreSQL database: a handshake whose steps land on
alternate replicas, the guest client against each, and admin changes on one seen by the other."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from coffer.guest.attesters import attester_for
from coffer.kbs.client import KbsClient
from coffer.kbs.jwe import TeeKeyPair
from tests.e2e.conftest import KbsFactory
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    admin_get,
    assert_error,
    auth_body,
    cookie_header,
    put_resource,
    sample_attestation,
    session_cookie,
    set_resource_policy,
    state_snapshot,
    write_config,
)

SECRET = b"shared between replicas"
RESOURCE = "default/key/replicated"


def test_handshake_across_two_replicas(tmp_path: Path, postgres_url: str, admin_key: AdminKey,
                                       master_key_file: Path, start_kbs: KbsFactory) -> None:
    config = write_config(tmp_path / "kbs.toml", db=postgres_url, master_key=master_key_file, admin=admin_key)
    a = start_kbs(config)
    b = start_kbs(config)

    # Admin changes made on A are what B serves.
    put_resource(a.url, admin_key, RESOURCE, SECRET)
    set_resource_policy(a.url, admin_key, SAMPLE_RESOURCE_POLICY)
    added = httpx.post(f"{a.url}/kbs/v0/reference-value", headers=admin_key.headers(), timeout=10,
                       json={"name": "svn", "values": [7], "provenance": "e2e replica test"})
    assert added.status_code == 200, added.text
    assert admin_get(b.url, admin_key, f"/kbs/v0/resources/{RESOURCE}") == SECRET
    assert state_snapshot(a.url, admin_key) == state_snapshot(b.url, admin_key)
    svn = admin_get(b.url, admin_key, "/kbs/v0/reference-value/svn")
    assert svn["name"] == "svn"
    assert "e2e replica test" in json.dumps(svn), svn
    # ... and the token signing key is one: both publish the same JWKS.
    jwks_a, jwks_b = (httpx.get(f"{r.url}/.well-known/jwks.json").json() for r in (a, b))
    assert jwks_a == jwks_b

    # /auth on A, /attest on B, the resource from A with the session cookie.
    key = TeeKeyPair.generate()
    auth = httpx.post(f"{a.url}/kbs/v0/auth", json=auth_body(), timeout=10)
    assert auth.status_code == 200, auth.text
    session = session_cookie(auth)
    body = sample_attestation(auth.json()["nonce"], key)
    attested = httpx.post(f"{b.url}/kbs/v0/attest", json=body, headers=cookie_header(session), timeout=10)
    assert attested.status_code == 200, attested.text
    assert session_cookie(attested) == session
    fetched = httpx.get(f"{a.url}/kbs/v0/resource/{RESOURCE}", headers=cookie_header(session), timeout=10)
    assert fetched.status_code == 200, fetched.text
    assert key.decrypt(fetched.json()) == SECRET
    # The challenge was consumed on B: replaying the attestation on A is refused.
    replay = httpx.post(f"{a.url}/kbs/v0/attest", json=body, headers=cookie_header(session), timeout=10)
    assert "single use" in assert_error(replay, 401, "AttestationError")
    # The token B issued is a bearer credential on A as well.
    token = attested.json()["token"]
    bearer = httpx.get(f"{a.url}/kbs/v0/resource/{RESOURCE}", headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    assert bearer.status_code == 200
    assert key.decrypt(bearer.json()) == SECRET

    # The guest client's full flow against each replica.
    for replica in (a, b):
        with KbsClient(replica.url, attester_for("sample")) as client:
            assert client.get_resource(RESOURCE) == SECRET

    # Changes on B (delete) are seen on A at once.
    deleted = httpx.delete(f"{b.url}/kbs/v0/resource/{RESOURCE}", headers=admin_key.headers(), timeout=10)
    assert deleted.status_code == 200, deleted.text
    with KbsClient(a.url, attester_for("sample")) as client:
        client.attest()
        gone = httpx.get(f"{a.url}/kbs/v0/resource/{RESOURCE}",
                         headers={"Authorization": f"Bearer {client.token}"}, timeout=10)
    assert_error(gone, 401, "PluginInternalError")

    # Every release is in the one audit log, whichever replica made it.
    releases = admin_get(b.url, admin_key, "/kbs/v0/audit?action=release")["events"]
    assert len(releases) == 4
