"""``coffer token verify`` (registered on a local parser; the lead wires it into ``coffer``)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from coffer.attestation.service import AttestationService
from coffer.cli import _token
from coffer.cli._output import Output
from coffer.errors import UsageError
from tests.attestation.helpers import RUNTIME, Clock, service, trustee_sample

AT = "2026-03-01T00:01:00Z"


def run(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="coffer")
    groups = parser.add_subparsers(dest="group")
    _token.register(groups)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.handler(args, Output(json_mode=args.json, stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def issued(tmp_path: Path) -> tuple[AttestationService, str, Path]:
    svc = service(clock=Clock())
    token = svc.attest(tee="sample", primary_evidence=trustee_sample(), runtime_data=RUNTIME).token
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(svc.jwks()))
    return svc, token, jwks


def test_verifies_a_token_given_inline(issued: tuple[AttestationService, str, Path]) -> None:
    _, token, jwks = issued
    code, out, _ = run(["token", "verify", token, "--jwks", str(jwks), "--at", AT, "--json"])
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["summary"]["cpu0"]["status"] == "contraindicated"
    assert doc["summary"]["cpu0"]["tee"] == "sample"
    assert doc["claims"]["iss"] == "coffer-attestation-service"


def test_verifies_a_token_file_and_an_attest_response(issued: tuple[AttestationService, str, Path],
                                                       tmp_path: Path) -> None:
    _, token, jwks = issued
    plain = tmp_path / "token.jwt"
    plain.write_text(token + "\n")
    response = tmp_path / "attest.json"
    response.write_text(json.dumps({"token": token}))
    for path in (plain, response):
        code, out, _ = run(["token", "verify", str(path), "--jwks", str(jwks), "--at", AT])
        assert code == 0
        assert out.startswith("OK: token signature and validity verified")


def test_expired_token_is_rejected(issued: tuple[AttestationService, str, Path]) -> None:
    _, token, jwks = issued
    code, out, err = run(["token", "verify", token, "--jwks", str(jwks), "--at", "2026-03-01T01:00:00Z",
                          "--json"])
    assert code == 1
    assert json.loads(out)["error"] == "token_rejected"
    assert "expired" in err


def test_token_of_another_service_is_rejected(issued: tuple[AttestationService, str, Path],
                                              tmp_path: Path) -> None:
    _, token, _ = issued
    other = tmp_path / "other.json"
    other.write_text(json.dumps(service().jwks()))
    code, _, err = run(["token", "verify", token, "--jwks", str(other), "--at", AT])
    assert code == 1
    assert "not trusted" in err


def test_jwks_from_a_url(issued: tuple[AttestationService, str, Path],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    svc, token, _ = issued
    seen: list[str] = []

    def fake_get(url: str, **kw: Any) -> httpx.Response:
        seen.append(url)
        return httpx.Response(200, json=svc.jwks())

    monkeypatch.setattr(httpx, "get", fake_get)
    url = "http://127.0.0.1:8080/.well-known/jwks.json"
    code, _, _ = run(["token", "verify", token, "--jwks", url, "--at", AT])
    assert code == 0
    assert seen == [url]


@pytest.mark.parametrize("argv", [["token", "verify", "a.b.c"],
                                  ["token", "verify", "a.b.c", "--jwks", "/nonexistent/jwks.json"],
                                  ["token", "verify", "/nonexistent/token", "--jwks", "/dev/null"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        run(argv)


def test_jwks_without_usable_keys_is_a_usage_error(issued: tuple[AttestationService, str, Path],
                                                   tmp_path: Path) -> None:
    _, token, _ = issued
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(UsageError):
        run(["token", "verify", token, "--jwks", str(empty)])
