"""The guest-side KBS client against an in-process fake KBS (httpx.MockTransport) that speaks the
protocol with the same models and checks the runtime-data binding like a real KBS would."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from coffer.attestation.binding import InitData, runtime_data_digest
from coffer.errors import ProtocolError, TransportError
from coffer.kbs import jwe, protocol
from coffer.kbs.client import KbsClient, token_claims
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.protocol import ErrorInformation

BASE = "http://kbs.test:8080"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeAttester:
    """Trustee's sample attester shape: the runtime digest, base64, as ``report_data``."""

    tee = "sample"

    def __init__(self) -> None:
        self.digests: list[bytes] = []

    def evidence(self, runtime_digest: bytes) -> Any:
        self.digests.append(runtime_digest)
        return {"svn": "1", "report_data": base64.b64encode(runtime_digest).decode()}


def _b64url_json(obj: Any) -> str:
    return jwe.b64url(json.dumps(obj).encode())


@dataclass
class FakeKbs:
    """Just enough KBS: sessions with cookies, nonce check, report-data binding check, tokens that
    carry the TEE key, JWE-wrapped resources, Trustee error bodies."""

    clock: Callable[[], datetime] = lambda: NOW
    resources: dict[str, bytes] = field(default_factory=lambda: {"default/key/1": b"s3cret"})
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    forced: list[tuple[int, str]] = field(default_factory=list)  # (status, kind) for the next resource GETs
    log: list[httpx.Request] = field(default_factory=list)
    auth_calls: int = 0
    token_ttl: int = 300

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @staticmethod
    def error(kind: str, detail: str) -> httpx.Response:
        info = ErrorInformation(kind=kind, detail=detail)
        return httpx.Response(info.status, json=info.to_json())

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        try:
            path = request.url.path
            if request.method == "POST" and path == "/kbs/v0/auth":
                return self.auth(request)
            if request.method == "POST" and path == "/kbs/v0/attest":
                return self.attest(request)
            if request.method == "GET" and path.startswith("/kbs/v0/resource/"):
                return self.resource(request, path.removeprefix("/kbs/v0/resource/"))
            return self.error("PluginNotFound", "Plugin not found")
        except ProtocolError as exc:
            return self.error(exc.kind, exc.detail)

    def auth(self, request: httpx.Request) -> httpx.Response:
        self.auth_calls += 1
        parsed = protocol.parse_request(request.content)
        session_id = uuid.uuid4().hex
        challenge = protocol.Challenge(nonce=protocol.make_nonce(), extra_params="")
        self.sessions[session_id] = {"request": parsed, "nonce": challenge.nonce, "token": None}
        return httpx.Response(200, json=challenge.to_json(),
                              headers={"Set-Cookie": f"kbs-session-id={session_id}; Expires=Thu, 01 Jan 2099 "
                                                     "00:00:00 GMT"})

    def session(self, request: httpx.Request) -> tuple[str, dict[str, Any]] | None:
        cookie = request.headers.get("cookie", "")
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "kbs-session-id" and value in self.sessions:
                return value, self.sessions[value]
        return None

    def attest(self, request: httpx.Request) -> httpx.Response:
        found = self.session(request)
        if found is None:
            raise protocol.attest_failed("cookie not found")
        session_id, session = found
        attestation = protocol.parse_attestation(request.content)
        if attestation.runtime_data.nonce != session["nonce"]:
            raise protocol.attest_failed("nonce mismatch")
        digest = runtime_data_digest(attestation.primary_runtime_data())
        evidence = attestation.tee_evidence.primary_evidence
        if base64.b64decode(evidence["report_data"]) != digest:
            raise protocol.attest_failed("verify TEE evidence failed")
        claims = {"exp": int(self.clock().timestamp()) + self.token_ttl,
                  "tee-pubkey": attestation.runtime_data.tee_pubkey,
                  "init_data": None if attestation.init_data is None else attestation.init_data.body}
        token = f"{_b64url_json({'alg': 'none'})}.{_b64url_json(claims)}.sig{len(self.tokens)}"
        self.tokens[token] = claims
        session["token"] = token
        return httpx.Response(200, json={"token": token},
                              headers={"Set-Cookie": f"kbs-session-id={session_id}"})

    def resource(self, request: httpx.Request, path: str) -> httpx.Response:
        if self.forced:
            status, kind = self.forced.pop(0)
            return httpx.Response(status, json=ErrorInformation(kind=kind, detail="forced").to_json())
        protocol.parse_resource_path(path)
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            token: str | None = auth.removeprefix("Bearer ")
        else:
            found = self.session(request)
            token = found[1]["token"] if found else None
        if token is None:
            return self.error("TokenNotFound", "Attestation Token not found")
        claims = self.tokens.get(token)
        if claims is None or claims["exp"] <= self.clock().timestamp():
            return self.error("TokenVerifierError", "token expired or unknown")
        if path not in self.resources:
            return self.error("PluginInternalError", "Plugin internal error: resource not found")
        return httpx.Response(200, json=jwe.encrypt(self.resources[path], claims["tee-pubkey"]))


@pytest.fixture
def kbs() -> FakeKbs:
    return FakeKbs()


def make_client(kbs: FakeKbs, **kwargs: Any) -> KbsClient:
    return KbsClient(BASE, FakeAttester(), transport=kbs.transport(), clock=kwargs.pop("clock", kbs.clock),
                     **kwargs)


# -- handshake --------------------------------------------------------------------------------------


def test_attest_runs_auth_then_attest_and_keeps_the_token(kbs: FakeKbs) -> None:
    attester = FakeAttester()
    with KbsClient(BASE, attester, transport=kbs.transport(), clock=kbs.clock) as client:
        token = client.attest()
        assert client.token == token
        assert token in kbs.tokens
        assert client.tee == "sample"
        # the digest bound into the evidence is SHA-384 of the canonical runtime data
        assert [len(d) for d in attester.digests] == [48]
        assert client.report_data == attester.digests[0]
    auth, attest = kbs.log
    assert auth.url.path == "/kbs/v0/auth"
    assert json.loads(auth.content) == {"version": "0.4.0", "tee": "sample", "extra-params": {
        "supported-hash-algorithms": ["sha256", "sha384", "sha512"]}}
    assert "cookie" not in auth.headers
    assert attest.headers["cookie"].startswith("kbs-session-id=")
    assert attest.headers["content-type"] == "application/json"
    body = json.loads(attest.content)
    assert list(body) == ["init-data", "runtime-data", "tee-evidence"]
    assert body["tee-evidence"]["additional_evidence"] == ""


def test_base_url_with_kbs_prefix_is_accepted(kbs: FakeKbs) -> None:
    with KbsClient(BASE + "/kbs/v0/", FakeAttester(), transport=kbs.transport(), clock=kbs.clock) as client:
        client.attest()
    assert kbs.log[0].url.path == "/kbs/v0/auth"


def test_init_data_is_sent_with_the_attestation(kbs: FakeKbs) -> None:
    toml = 'version = "0.1.0"\nalgorithm = "sha384"\n'
    with make_client(kbs, init_data=InitData(format="toml", body=toml)) as client:
        token = client.attest()
    assert kbs.tokens[token]["init_data"] == toml
    assert json.loads(kbs.log[-1].content)["init-data"] == {"format": "toml", "body": toml}


def test_auth_refusal_is_a_protocol_error_with_trustee_kind(kbs: FakeKbs,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coffer.kbs.client.PROTOCOL_VERSION", "0.1.1")
    with make_client(kbs) as client, pytest.raises(ProtocolError) as info:
        client.attest()
    assert info.value.kind == "AttestationError"
    assert "Version Mismatch" in info.value.detail
    assert client.token is None


def test_evidence_not_bound_to_runtime_data_is_refused(kbs: FakeKbs) -> None:
    class LyingAttester(FakeAttester):
        def evidence(self, runtime_digest: bytes) -> Any:
            return super().evidence(bytes(48))

    with KbsClient(BASE, LyingAttester(), transport=kbs.transport()) as client, \
            pytest.raises(ProtocolError, match="AttestationError"):
        client.attest()


def test_auth_without_cookie_is_a_transport_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"nonce": "abc", "extra-params": ""})

    with KbsClient(BASE, FakeAttester(), transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(TransportError, match="cookie"):
        client.attest()


@pytest.mark.parametrize(("status", "content", "error"), [
    (500, b"internal", TransportError),
    (502, b'{"type":"https://github.com/confidential-containers/kbs/errors/X","detail":"d"}', TransportError),
    (401, b"not json", TransportError),
    (200, b"not json", ProtocolError),
    (200, b'{"nonce": 1}', ProtocolError),
])
def test_unexpected_answers(status: int, content: bytes, error: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"Set-Cookie": "kbs-session-id=abc"})

    with KbsClient(BASE, FakeAttester(), transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(error):
        client.attest()


def test_network_failure_is_a_transport_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with KbsClient(BASE, FakeAttester(), transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(TransportError, match="ConnectError"):
        client.attest()


# -- resources --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p521", "rsa-oaep-256"])
def test_get_resource_attests_then_decrypts(kbs: FakeKbs, kind: str) -> None:
    with make_client(kbs, key=TeeKeyPair.generate(kind)) as client:  # type: ignore[arg-type]
        assert client.get_resource("default/key/1") == b"s3cret"
        assert client.get_resource("kbs:///default/key/1") == b"s3cret"
    assert kbs.auth_calls == 1
    gets = [r for r in kbs.log if r.method == "GET"]
    assert [r.url.path for r in gets] == ["/kbs/v0/resource/default/key/1"] * 2
    assert all(r.headers["cookie"].startswith("kbs-session-id=") for r in gets)
    assert all("authorization" not in r.headers for r in gets)


def test_bearer_mode_presents_the_token(kbs: FakeKbs) -> None:
    with make_client(kbs) as client:
        assert client.get_resource("default/key/1", bearer=True) == b"s3cret"
        token = client.token
    get = kbs.log[-1]
    assert get.headers["authorization"] == f"Bearer {token}"
    assert "cookie" not in get.headers


def test_401_triggers_a_new_handshake_and_a_retry(kbs: FakeKbs) -> None:
    with make_client(kbs) as client:
        client.attest()
        first = client.token
        kbs.forced.append((401, "TokenVerifierError"))
        assert client.get_resource("default/key/1") == b"s3cret"
        assert client.token != first
    assert kbs.auth_calls == 2


def test_gives_up_after_three_attempts(kbs: FakeKbs) -> None:
    kbs.forced.extend([(401, "PolicyDeny")] * 5)
    with make_client(kbs) as client, pytest.raises(ProtocolError) as info:
        client.get_resource("default/key/1")
    assert info.value.kind == "PolicyDeny"
    assert len([r for r in kbs.log if r.method == "GET"]) == 3
    assert kbs.auth_calls == 3


def test_404_is_not_retried(kbs: FakeKbs) -> None:
    kbs.forced.append((404, "InvalidRequestPath"))
    with make_client(kbs) as client, pytest.raises(ProtocolError) as info:
        client.get_resource("default/key/1")
    assert info.value.kind == "InvalidRequestPath"
    assert kbs.auth_calls == 1
    assert len([r for r in kbs.log if r.method == "GET"]) == 1


def test_missing_resource_is_a_401_plugin_error_after_retries(kbs: FakeKbs) -> None:
    with make_client(kbs) as client, pytest.raises(ProtocolError) as info:
        client.get_resource("default/key/missing")
    assert info.value.kind == "PluginInternalError"


def test_expired_token_is_renewed_before_the_request(kbs: FakeKbs) -> None:
    now = [NOW]
    kbs.clock = lambda: now[0]
    with make_client(kbs, clock=lambda: now[0]) as client:
        client.get_resource("default/key/1")
        now[0] = NOW + timedelta(seconds=kbs.token_ttl + 1)
        assert client.get_resource("default/key/1") == b"s3cret"
    assert kbs.auth_calls == 2
    # the renewal happened before the GET, so no request was refused
    assert [r.url.path.rsplit("/", 1)[-1] for r in kbs.log] == ["auth", "attest", "1", "auth", "attest", "1"]


def test_malformed_resource_path_is_refused_before_any_request(kbs: FakeKbs) -> None:
    with make_client(kbs) as client, pytest.raises(ProtocolError, match="PluginInternalError"):
        client.get_resource("default/../key")
    assert kbs.log == []


def test_tampered_resource_is_a_jwe_error(kbs: FakeKbs) -> None:
    def tamper(request: httpx.Request) -> httpx.Response:
        response = kbs.handle(request)
        if request.method == "GET" and response.status_code == 200:
            body = json.loads(response.content)
            body["ciphertext"] = jwe.b64url(b"\0" + base64.urlsafe_b64decode(body["ciphertext"] + "==")[1:])
            return httpx.Response(200, json=body)
        return response

    with KbsClient(BASE, FakeAttester(), transport=httpx.MockTransport(tamper), clock=kbs.clock) as client, \
            pytest.raises(ProtocolError, match="JweError"):
        client.get_resource("default/key/1")


def test_token_claims_decodes_without_verifying() -> None:
    token = f"{_b64url_json({'alg': 'ES256'})}.{_b64url_json({'exp': 5, 'iss': 'x'})}.c2ln"
    assert token_claims(token) == {"exp": 5, "iss": "x"}
    with pytest.raises(Exception, match="compact JWS"):
        token_claims("abc")


# -- coffer attest (CLI) ----------------------------------------------------------------------------


def run_cli(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, str, str]:
    """Run ``coffer attest`` against the fake KBS with the real sample attester."""
    import argparse
    import io

    from coffer.cli import _attest
    from coffer.cli._output import Output

    def client_factory(base_url: str, attester: Any, **kwargs: Any) -> KbsClient:
        kwargs["transport"] = kbs.transport()
        return KbsClient(base_url, attester, clock=kbs.clock, **kwargs)

    monkeypatch.setattr(_attest, "KbsClient", client_factory)
    parser = argparse.ArgumentParser()
    _attest.register(parser.add_subparsers())
    args = parser.parse_args(["attest", "--kbs", BASE, "--tee", "sample", *argv])
    stdout, stderr = io.StringIO(), io.StringIO()
    code = args.handler(args, Output(json_mode=args.json, stdout=stdout, stderr=stderr))
    return code, stdout.getvalue(), stderr.getvalue()


def test_cli_attests_and_writes_the_resource_privately(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Any) -> None:
    target = tmp_path / "key.bin"
    token_file = tmp_path / "token.jwt"
    code, out, _ = run_cli(kbs, monkeypatch, ["--resource", "kbs:///default/key/1", "--out", str(target),
                                              "--token-out", str(token_file), "--json"])
    assert code == 0
    assert target.read_bytes() == b"s3cret"
    assert target.stat().st_mode & 0o777 == 0o600
    summary = json.loads(out)
    assert summary["resources"] == [{"path": "default/key/1", "bytes": 6, "written_to": str(target)}]
    assert summary["token_claims"]["tee-pubkey"]["kty"] == "EC"
    assert len(bytes.fromhex(summary["report_data"])) == 48
    assert token_file.read_text().strip() in kbs.tokens
    assert "s3cret" not in out


def test_cli_never_prints_the_secret_without_out(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(kbs, monkeypatch, ["--resource", "default/key/1"])
    assert code == 0
    assert "s3cret" not in out + err
    assert "bytes: 6" in out


def test_cli_out_dash_writes_only_the_secret_to_stdout(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch,
                                                       capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, _ = run_cli(kbs, monkeypatch, ["--resource", "default/key/1", "--out", "-"])
    assert code == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"s3cret"
    assert out == ""  # the summary went to stderr
    assert b"attested" in captured.err


def test_cli_writes_several_resources_under_a_directory(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Any) -> None:
    kbs.resources["other/cert/pem"] = b"cert"
    code, _, _ = run_cli(kbs, monkeypatch, ["--resource", "default/key/1", "--resource", "other/cert/pem",
                                            "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "default" / "key" / "1").read_bytes() == b"s3cret"
    assert (tmp_path / "other" / "cert" / "pem").read_bytes() == b"cert"


def test_cli_sends_initdata(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    initdata = tmp_path / "initdata.toml"
    initdata.write_text('version = "0.1.0"\nalgorithm = "sha256"\n[data]\n')
    code, _, _ = run_cli(kbs, monkeypatch, ["--initdata", str(initdata)])
    assert code == 0
    assert next(iter(kbs.tokens.values()))["init_data"] == initdata.read_text()


def test_cli_signed_sample_evidence_carries_the_initdata_digest(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Any) -> None:
    import hashlib

    initdata = tmp_path / "initdata.toml"
    initdata.write_bytes(b'version = "0.1.0"\nalgorithm = "sha384"\n')
    seen: list[Any] = []
    original = FakeKbs.attest

    def capture(self: FakeKbs, request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["tee-evidence"]["primary_evidence"])
        raise ProtocolError("AttestationError", "stop here")

    monkeypatch.setattr(FakeKbs, "attest", capture)
    code, _, _ = run_cli(kbs, monkeypatch, ["--initdata", str(initdata), "--attester-option", "form=signed"])
    monkeypatch.setattr(FakeKbs, "attest", original)
    assert code == 1
    expected = hashlib.sha384(initdata.read_bytes()).digest()
    assert seen[0]["init_data"] == expected.hex()


def test_cli_rejects_initdata_that_is_not_toml(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Any) -> None:
    from coffer.errors import UsageError

    initdata = tmp_path / "initdata.toml"
    initdata.write_text("not = [toml")
    with pytest.raises(UsageError, match="initdata"):
        run_cli(kbs, monkeypatch, ["--initdata", str(initdata)])
    assert kbs.log == []


def test_cli_refusal_exits_1_with_the_kind(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch) -> None:
    kbs.forced.extend([(401, "PolicyDeny")] * 3)
    code, out, err = run_cli(kbs, monkeypatch, ["--resource", "default/key/1", "--json"])
    assert code == 1
    assert json.loads(out)["error"] == "PolicyDeny"
    assert "PolicyDeny" in err


@pytest.mark.parametrize("argv", [
    ["--resource", "a/b", "--out", "x"],
    ["--resource", "a/b/c", "--resource", "d/e/f", "--out", "-"],
    ["--out", "x"],
    ["--attester-option", "nonsense"],
    ["--attester-option", "no_such_option=1"],
    ["--attester-option", "form=bogus"],
    ["--timeout", "0"],
])
def test_cli_usage_errors(kbs: FakeKbs, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    from coffer.errors import UsageError

    with pytest.raises(UsageError):
        run_cli(kbs, monkeypatch, argv)
    assert kbs.log == []
