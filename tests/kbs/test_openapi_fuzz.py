"""Schemathesis over the KBS's own OpenAPI document (``/openapi.json``), in process over ASGI.

Every operation of the document gets a bounded number of generated requests (valid and invalid
bodies, parameters and headers). Each answer must not be a 5xx, must carry a status the document
lists for the operation, a documented content type, and a body matching the documented schema.
Admin operations are called both without credentials (401) and with a valid admin token, so the
fuzzer reaches the handlers behind the authentication; RCAR operations run without a session
(the protocol tests cover the happy path).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from coffer.kbs.admin import mint_admin_token
from coffer.kbs.app import OPENAPI_PATH
from coffer.kbs.config import AdminAcl, AdminConfig, AdminKey, KbsConfig
from tests.kbs.kbs_app_support import make_kbs

# Examples per operation (positive and negative generation); raise it for a longer local run.
MAX_EXAMPLES = int(os.environ.get("COFFER_FUZZ_EXAMPLES", "12"))
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance)

_ADMIN_KEY = Ed25519PrivateKey.generate()
_CONFIG = KbsConfig(admin=AdminConfig(
    keys=(AdminKey(id="fuzz", public_key_pem=_ADMIN_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),),
    acls=(AdminAcl(role="admin", allowed_endpoints="^/kbs/v0/.*$"),)))
_KBS = make_kbs(config=_CONFIG)
ADMIN_TOKEN = mint_admin_token(_ADMIN_KEY, role="admin", now=_KBS.clock())

schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, _KBS.app)


def _is_admin(case: Any) -> bool:
    security = case.operation.definition.raw.get("security") or []
    return any("adminBearer" in requirement for requirement in security)


def _call_and_check(case: Any, headers: dict[str, str] | None) -> None:
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
def test_no_server_errors_and_documented_answers(case: Any) -> None:
    _call_and_check(case, None)
    if _is_admin(case):
        _call_and_check(case, {"Authorization": f"Bearer {ADMIN_TOKEN}"})


def test_every_route_is_documented() -> None:
    """The document covers every operation the fuzzer is meant to reach."""
    raw = schema.raw_schema
    paths = raw["paths"]
    for path in ("/kbs/v0/auth", "/kbs/v0/attest", "/kbs/v0/resource/{repository}/{type}/{tag}",
                 "/kbs/v0/resources", "/kbs/v0/resource-policy", "/kbs/v0/attestation-policy",
                 "/kbs/v0/reference-value", "/kbs/v0/audit", "/healthz", "/readyz", OPENAPI_PATH,
                 "/.well-known/jwks.json"):
        assert path in paths, path
