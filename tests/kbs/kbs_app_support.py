"""Shared pieces of the tests/kbs/test_app_*.py modules: a KBS app over a memory store with the real
attestation service, a controllable clock, and Trustee-form sample evidence."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from starlette.applications import Starlette

from coffer.attestation.binding import report_data_for, runtime_data_digest, runtime_data_preimage
from coffer.attestation.service import AttestationService
from coffer.evidence.collateral import NoCollateral
from coffer.kbs.app import build_app
from coffer.kbs.config import KbsConfig
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY, ResourcePolicy
from coffer.kbs.resources import MasterKey, ResourceStore
from coffer.kbs.store import MemoryStore

BASE_URL = "http://testserver"
ERROR_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
SECRET = b"the-resource-secret-\x00\x01\x02-bytes"
RESOURCE = "default/key/one"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@dataclass
class Kbs:
    app: Starlette
    store: MemoryStore
    clock: Clock
    attestation: AttestationService
    resources: ResourceStore
    policy: ResourcePolicy
    master_key: MasterKey

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL)


def make_kbs(*, allow_all: bool = False, config: KbsConfig | None = None) -> Kbs:
    store = MemoryStore()
    clock = Clock()
    attestation = AttestationService(store, collateral=NoCollateral(), clock=clock)
    master = MasterKey.generate()
    resources = ResourceStore(store, master)
    resources.put(RESOURCE, SECRET)
    policy = ResourcePolicy(store, clock=clock)
    if allow_all:
        policy.set(ALLOW_ALL_RESOURCE_POLICY)
    app = build_app(config or KbsConfig(), store=store, attestation=attestation, clock=clock,
                    resources=resources, resource_policy=policy)
    return Kbs(app=app, store=store, clock=clock, attestation=attestation, resources=resources,
               policy=policy, master_key=master)


def auth_body(tee: str = "sample", version: str = "0.4.0") -> dict[str, Any]:
    return {"version": version, "tee": tee,
            "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]}}


def sample_attestation(nonce: str, key: TeeKeyPair, *, bound_nonce: str | None = None,
                       additional_evidence: str = "") -> dict[str, Any]:
    """An /attest body with Trustee-form sample evidence binding ``bound_nonce`` (default: ``nonce``)."""
    pubkey = key.public_jwk()
    runtime = runtime_data_preimage(bound_nonce or nonce, pubkey, additional_evidence)
    report_data = report_data_for("sample", runtime_data_digest(runtime))
    return {
        "init-data": None,
        "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
        "tee-evidence": {"primary_evidence": {"svn": "1",
                                              "report_data": base64.b64encode(report_data).decode()},
                         "additional_evidence": additional_evidence},
    }


async def handshake(client: httpx.AsyncClient, key: TeeKeyPair) -> str:
    """auth + attest; returns the token."""
    challenge = await client.post("/kbs/v0/auth", json=auth_body())
    assert challenge.status_code == 200, challenge.text
    answer = await client.post("/kbs/v0/attest", json=sample_attestation(challenge.json()["nonce"], key))
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["token"]
    return token


def assert_error(response: httpx.Response, status: int, kind: str) -> Mapping[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "detail"}, body
    assert body["type"] == ERROR_PREFIX + kind, body
    assert isinstance(body["detail"], str)
    return body
