"""The guest side of the KBS protocol: run the RCAR handshake with an attester and fetch resources.

It behaves like Trustee's guest (``kbs_protocol``): ``/auth`` then ``/attest`` with the runtime data
bound into the evidence, the session cookie for resource requests, and on a 401 from a resource
request (token expired, session lost on another replica...) the handshake again, up to three
attempts in all. A 404 means the resource path or plugin does not exist and is not retried.

Server-reported failures raise :class:`coffer.errors.ProtocolError` with the kind the KBS reported;
network failures and answers that are not the protocol's raise :class:`coffer.errors.TransportError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import httpx

from coffer._internal.clock import utc_now
from coffer._internal.encoding import load_json_object
from coffer.attestation.binding import InitData, report_data_for, runtime_data_digest, runtime_data_preimage
from coffer.errors import FormatError, ProtocolError, TransportError
from coffer.kbs import protocol
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.protocol import (
    HASH_ALGORITHMS,
    KBS_PREFIX,
    PROTOCOL_VERSION,
    SESSION_COOKIE,
    Attestation,
    Request,
    RuntimeData,
    TeeEvidence,
)

if TYPE_CHECKING:
    from coffer.guest.attesters.base import Attester

MAX_RESOURCE_ATTEMPTS: Final = 3
_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
# Re-attest a little before the token's expiry rather than racing it.
_EXPIRY_MARGIN_SECONDS: Final = 5


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, decoded WITHOUT checking its signature (for display and for
    reading ``exp``; relying parties verify tokens with ``coffer.attestation.token``)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise FormatError("attestation token", "not a compact JWS (three dot-separated parts)")
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError) as exc:
        raise FormatError("attestation token", "payload is not base64url") from exc
    return load_json_object(raw, "attestation token payload")


class KbsClient:
    """One guest's conversation with a KBS.

    ``base_url`` is the KBS origin (``http://127.0.0.1:8080``; a trailing ``/kbs/v0`` is accepted).
    ``key`` is the ephemeral TEE key the resources are wrapped to (a fresh P-256 key by default).
    ``transport`` lets tests plug in ``httpx.MockTransport`` or an ASGI app.
    """

    def __init__(self, base_url: str, attester: Attester, *, key: TeeKeyPair | None = None,
                 init_data: InitData | None = None, transport: httpx.BaseTransport | None = None,
                 timeout: float = 10, clock: Callable[[], datetime] = utc_now) -> None:
        base = base_url.rstrip("/")
        base = base.removesuffix(KBS_PREFIX)
        self._attester = attester
        self._key = key if key is not None else TeeKeyPair.generate()
        self._init_data = init_data
        self._clock = clock
        self._http = httpx.Client(base_url=base, transport=transport, timeout=timeout,
                                  follow_redirects=False)
        self._session_id: str | None = None
        self._token: str | None = None
        self._token_exp: float | None = None
        self._report_data: bytes | None = None

    # -- public ------------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The attestation token of the last successful handshake."""
        return self._token

    @property
    def key(self) -> TeeKeyPair:
        return self._key

    @property
    def report_data(self) -> bytes | None:
        """The report data the last handshake bound into the evidence (for diagnostics)."""
        return self._report_data

    @property
    def tee(self) -> str:
        tee: str = self._attester.tee
        return tee

    def attest(self) -> str:
        """Run ``/auth`` and ``/attest``; returns (and keeps) the attestation token."""
        self._session_id = None
        self._token = None
        self._token_exp = None
        request = Request(version=PROTOCOL_VERSION, tee=self._attester.tee,
                          extra_params={"supported-hash-algorithms": list(HASH_ALGORITHMS)})
        auth = self._post("/auth", request.to_json(), cookie=None)
        self._expect_ok(auth)
        session_id = self._session_cookie(auth)
        if session_id is None:
            raise TransportError("the KBS answered /auth without a kbs-session-id cookie")
        challenge = protocol.parse_challenge(auth.content)

        tee_pubkey = self._key.public_jwk()
        additional_evidence = ""
        runtime = runtime_data_preimage(challenge.nonce, tee_pubkey, additional_evidence)
        digest = runtime_data_digest(runtime, challenge.hash_algorithm())
        try:
            self._report_data = report_data_for(self._attester.tee, digest)
        except FormatError:
            self._report_data = None  # a TEE binding we only pass through
        evidence = self._attester.evidence(digest)
        body = Attestation(
            init_data=self._init_data,
            runtime_data=RuntimeData(nonce=challenge.nonce, tee_pubkey=tee_pubkey),
            tee_evidence=TeeEvidence(primary_evidence=evidence, additional_evidence=additional_evidence),
        )
        answer = self._post("/attest", body.to_json(), cookie=session_id)
        self._expect_ok(answer)
        token = protocol.parse_token_response(answer.content)
        self._session_id = self._session_cookie(answer) or session_id
        self._token = token
        self._token_exp = self._read_exp(token)
        return token

    def get_resource(self, path: str, *, bearer: bool = False) -> bytes:
        """Fetch and decrypt ``repo/type/tag`` (``kbs:///repo/type/tag`` accepted).

        Attests first when there is no valid token; on 401 attests again and retries, at most
        three requests in all. ``bearer=True`` presents the token in ``Authorization`` instead of the
        session cookie (the passport model).
        """
        resource = protocol.parse_resource_uri(path)
        last: ProtocolError | TransportError | None = None
        for _ in range(MAX_RESOURCE_ATTEMPTS):
            if self._token is None or self._expired():
                self.attest()
            response = self._get(f"/resource/{resource}", bearer=bearer)
            if response.status_code == 200:
                return self._key.decrypt(self._json(response, "resource response"))
            error = self._error(response)
            if response.status_code != 401:
                raise error
            last = error
            self._token = None  # 401: the KBS wants a fresh handshake
        assert last is not None
        raise last

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KbsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- HTTP --------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, body: Any = None, headers: dict[str, str]) -> httpx.Response:
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers = {**headers, "Content-Type": "application/json"}
        try:
            response = self._http.request(method, KBS_PREFIX + path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {KBS_PREFIX}{path}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            # Cookies are handled explicitly (one session per handshake), never by the jar.
            self._http.cookies.clear()
        if len(response.content) > _MAX_RESPONSE_BYTES:
            raise TransportError(f"{method} {KBS_PREFIX}{path}: answer larger than "
                                 f"{_MAX_RESPONSE_BYTES} bytes")
        return response

    def _post(self, path: str, body: Any, *, cookie: str | None) -> httpx.Response:
        headers = {} if cookie is None else {"Cookie": f"{SESSION_COOKIE}={cookie}"}
        return self._send("POST", path, body=body, headers=headers)

    def _get(self, path: str, *, bearer: bool) -> httpx.Response:
        headers: dict[str, str] = {}
        if bearer:
            assert self._token is not None
            headers["Authorization"] = f"Bearer {self._token}"
        elif self._session_id is not None:
            headers["Cookie"] = f"{SESSION_COOKIE}={self._session_id}"
        return self._send("GET", path, headers=headers)

    @staticmethod
    def _session_cookie(response: httpx.Response) -> str | None:
        for header in response.headers.get_list("set-cookie"):
            name, sep, rest = header.partition("=")
            if sep and name.strip() == SESSION_COOKIE:
                value = rest.split(";", 1)[0].strip()
                if value:
                    return value
        return None

    @staticmethod
    def _json(response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            return load_json_object(response.content, what, max_bytes=_MAX_RESPONSE_BYTES)
        except FormatError as exc:
            raise ProtocolError("SerdeError", f"malformed KBS {what}: {exc.reason}") from exc

    def _error(self, response: httpx.Response) -> ProtocolError | TransportError:
        """The error a non-200 answer stands for."""
        where = f"{response.request.method} {response.request.url.path}"
        if response.status_code in (401, 404):
            try:
                return protocol.parse_error_information(response.content).to_error()
            except ProtocolError:
                return TransportError(f"{where}: HTTP {response.status_code} without an error body")
        try:
            info = protocol.parse_error_information(response.content)
        except ProtocolError:
            return TransportError(f"{where}: unexpected HTTP {response.status_code}")
        return TransportError(f"{where}: unexpected HTTP {response.status_code}: {info.kind}: {info.detail}")

    def _expect_ok(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise self._error(response)

    # -- token expiry ------------------------------------------------------------------------------

    @staticmethod
    def _read_exp(token: str) -> float | None:
        try:
            exp = token_claims(token).get("exp")
        except FormatError:
            return None
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    def _expired(self) -> bool:
        if self._token_exp is None:
            return False
        return self._clock().timestamp() >= self._token_exp - _EXPIRY_MARGIN_SECONDS
