"""The KBS HTTP application (Starlette): the Trustee protocol 0.4.0 endpoints, health, OpenAPI, JWKS,
and the admin API from :mod:`coffer.kbs.admin`.

=======  ==================================  ===================================================
POST     /kbs/v0/auth                        ``Request`` → ``Challenge`` + ``kbs-session-id`` cookie
POST     /kbs/v0/attest                      ``Attestation`` (cookie) → ``{"token": <EAR JWT>}``
GET      /kbs/v0/resource/<repo>/<type>/<tag>  cookie or ``Authorization: Bearer`` → JWE
GET      /healthz, /readyz                   liveness; readiness (store reachable, master key right)
GET      /openapi.json                       the OpenAPI 3.1 description of every route
GET      /.well-known/jwks.json              the attestation token signing keys
=======  ==================================  ===================================================

Every error answer carries an ``ErrorInformation`` JSON body; the status is Trustee's (401 for almost
everything, so that a guest re-attests; 404 for a bad path or an unknown plugin). Resource contents and
key material never reach a log line, an error detail or the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from email.utils import format_datetime
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coffer import __version__
from coffer._internal.clock import as_utc, utc_now
from coffer.attestation.service import AttestationService
from coffer.attestation.token import TokenVerifier, tee_pubkey_from_claims
from coffer.errors import CofferError, ProtocolError, StorageError, VerificationError
from coffer.kbs import jwe
from coffer.kbs.admin import AdminAuth, admin_routes
from coffer.kbs.config import KbsConfig
from coffer.kbs.protocol import (
    ERROR_TYPE_PREFIX,
    SESSION_COOKIE,
    Attestation,
    ErrorInformation,
    attest_failed,
    parse_attestation,
    parse_request,
    parse_resource_path,
    status_for,
)
from coffer.kbs.resource_policy import ResourcePolicy
from coffer.kbs.resources import MasterKey, ResourceStore
from coffer.kbs.sessions import Session, SessionManager, valid_session_id
from coffer.kbs.store import NS_SESSIONS, AuditEvent, Store

log = logging.getLogger("coffer.kbs")

OPENAPI_PATH = "/openapi.json"
JWKS_PATH = "/.well-known/jwks.json"
SWEEP_INTERVAL_SECONDS = 60.0
CHECKPOINT_INTERVAL_SECONDS = 1.0

# Names under /kbs/v0/ that are endpoints of this server (a wrong method on them is a bad path, not an
# unknown plugin).
_KNOWN_ENDPOINTS = frozenset({"auth", "attest", "resource", "resources", "resource-policy",
                              "attestation-policy", "reference-value", "audit"})
# Claims copied into audit events: identifiers of the workload, never secrets.
_IDENTIFYING = ("measurement", "mr_td", "mr_config_id", "mr_seam", "rtmr_0", "rtmr_1", "rtmr_2", "rtmr_3",
                "mr_enclave", "mr_signer", "host_data", "chip_id", "launch_digest", "init_data",
                "report_data", "svn", "tcb_status", "ak_public_sha256", "pcr11")
_EVIDENCE_META = frozenset({"report_data", "init_data", "runtime_data_claims", "init_data_claims"})


# --------------------------------------------------------------------------------------------------
# Helpers


def error_response(kind: str, detail: str, *, status: int | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorInformation(kind=kind, detail=detail).to_json()
    return JSONResponse(body, status_code=status or status_for(kind), headers=dict(headers or {}))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str | None:
    """RFC 7638 SHA-256 thumbprint (hex) of an EC or RSA public JWK; None for anything else."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}.get(str(jwk.get("kty")))
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        return None
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def identifying_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """Who fetched: TEE, status, policy, token times, TEE-key thumbprint and measurement-like claims."""
    out: dict[str, Any] = {}
    for name in ("iss", "iat", "exp"):
        if isinstance(claims.get(name), str | int):
            out[name] = claims[name]
    submods = claims.get("submods")
    cpu0 = submods.get("cpu0") if isinstance(submods, Mapping) else None
    if not isinstance(cpu0, Mapping):
        return out
    for name in ("ear.status", "ear.appraisal-policy-id"):
        if isinstance(cpu0.get(name), str):
            out[name] = cpu0[name]
    evidence = cpu0.get("ear.veraison.annotated-evidence")
    if not isinstance(evidence, Mapping):
        return out
    runtime = evidence.get("runtime_data_claims")
    if isinstance(runtime, Mapping) and isinstance(runtime.get("tee-pubkey"), Mapping):
        thumbprint = jwk_thumbprint(runtime["tee-pubkey"])
        if thumbprint:
            out["tee_pubkey_thumbprint"] = thumbprint
    for tee, tee_claims in evidence.items():
        if tee in _EVIDENCE_META or not isinstance(tee_claims, Mapping):
            continue
        out["tee"] = tee
        found = _find_identifying(tee_claims)
        if found:
            out["claims"] = found
        break
    return out


def _find_identifying(claims: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in claims.items():
        if key in _IDENTIFYING and isinstance(value, str | int | bool) and len(str(value)) <= 256:
            found[key] = value
        elif isinstance(value, Mapping) and depth < 2:
            for inner_key, inner in _find_identifying(value, depth + 1).items():
                found.setdefault(inner_key, inner)
    return found


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes, whether or not a length was announced."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ProtocolError("SerdeError", f"request body exceeds {limit} bytes")
        except ValueError:
            raise ProtocolError("SerdeError", "bad Content-Length") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError("SerdeError", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _session_cookie(session_id: str, expires_at: datetime) -> str:
    return (f"{SESSION_COOKIE}={session_id}; Expires={format_datetime(as_utc(expires_at), usegmt=True)}; "
            "Path=/kbs; HttpOnly")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ProtocolError("TokenNotFound",
                            "Attestation Token not found: Authorization is not a bearer token")
    return value.strip()


# --------------------------------------------------------------------------------------------------
# Audit events: group commit


class AuditWriter:
    """Writes audit events durably with group commit, off the event loop.

    A request awaits :meth:`write`, which queues its event and returns once the event is committed.
    One flush task per event loop takes every queued event, writes them in one transaction in a worker
    thread (one fsync for the batch with :class:`~coffer.kbs.store_sqlite.SqliteStore`; stores without
    ``append_audit_batch`` get one ``append_audit`` per event in that thread) and wakes the waiters;
    events queued meanwhile form the next batch. So the fsync cost is shared by concurrent requests,
    and no response is sent before its audit event is committed. The task ends when the queue is
    empty; :meth:`drain` waits for it (shutdown)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[AuditEvent, asyncio.Future[AuditEvent]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # number of commits so far (tests, diagnostics)

    async def write(self, event: AuditEvent) -> AuditEvent:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEvent] = loop.create_future()
        self._pending.append((event, future))
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._flush())
        return await asyncio.shield(future)

    def _append(self, events: list[AuditEvent]) -> list[AuditEvent]:
        batch = getattr(self._store, "append_audit_batch", None)
        if batch is not None:
            stored: list[AuditEvent] = batch(events)
            return stored
        return [self._store.append_audit(event) for event in events]

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                stored = await anyio.to_thread.run_sync(self._append, [event for event, _ in batch])
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else StorageError("audit write interrupted")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batches += 1
            for (_, future), event in zip(batch, stored, strict=True):
                if not future.done():
                    future.set_result(event)

    async def drain(self) -> None:
        """Wait until every queued event is committed (or failed)."""
        while self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)


# --------------------------------------------------------------------------------------------------
# The application


class KbsApp:
    """Holds the services; its bound methods are the route endpoints."""

    def __init__(self, config: KbsConfig, *, store: Store, attestation: AttestationService,
                 clock: Callable[[], datetime], resources: ResourceStore,
                 resource_policy: ResourcePolicy, sessions: SessionManager) -> None:
        self.config = config
        self.store = store
        self.attestation = attestation
        self.clock = clock
        self.resources = resources
        self.resource_policy = resource_policy
        self.sessions = sessions
        self._verifier: tuple[bytes, TokenVerifier] | None = None
        self.audit_writer = AuditWriter(store)

    def now(self) -> datetime:
        return as_utc(self.clock())

    def audit_event(self, action: str, subject: str, outcome: str, *, detail: str = "",
                    claims: Mapping[str, Any] | None = None) -> AuditEvent:
        return AuditEvent(at=self.now(), action=action, subject=subject, outcome=outcome,
                          detail=detail[:500], claims=dict(claims or {}))

    async def audit(self, action: str, subject: str, outcome: str, *, detail: str = "",
                    claims: Mapping[str, Any] | None = None, required: bool = False) -> None:
        """Record an event durably before answering. ``required``: a failed write fails the request
        (a resource is never released without its audit record); otherwise it is logged."""
        await self.record([self.audit_event(action, subject, outcome, detail=detail, claims=claims)],
                          required=required)

    async def record(self, events: list[AuditEvent], *, required: bool = False) -> None:
        for event in events:
            try:
                await self.audit_writer.write(event)
            except StorageError:
                if required:
                    raise
                log.exception("audit write failed for %s %s", event.action, event.subject)

    def token_verifier(self) -> TokenVerifier:
        jwks = self.attestation.jwks()
        digest = hashlib.sha256(json.dumps(jwks, sort_keys=True).encode()).digest()
        cached = self._verifier
        if cached is None or cached[0] != digest:
            cached = (digest, TokenVerifier(jwks))
            self._verifier = cached
        return cached[1]

    # -- RCAR ----------------------------------------------------------------------------------------

    async def auth(self, request: Request) -> Response:
        body = await read_body(request, self.config.max_body_bytes)
        kbs_request = parse_request(body)
        session, challenge = self.sessions.begin_session(kbs_request)
        log.info("auth: new session for tee %s", kbs_request.tee)
        return JSONResponse(challenge.to_json(),
                            headers={"set-cookie": _session_cookie(session.id, session.expires_at)})

    async def attest(self, request: Request) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            raise attest_failed("cookie not found")
        if not valid_session_id(session_id):
            raise attest_failed("session not found or expired")
        body = await read_body(request, self.config.max_body_bytes)
        attestation = parse_attestation(body)
        events: list[AuditEvent] = []

        def verify(session: Session, attestation: Attestation) -> str:
            return self._verify(session, attestation, events)

        try:
            session = self.sessions.attest_session(session_id, attestation, verify)
        finally:
            # Refusals are recorded whatever happens next; a success only once the session took the
            # token (a concurrent /attest on the same session may have verified as well and lost).
            await self.record([e for e in events if e.action != "attest"])
        await self.record([e for e in events if e.action == "attest"])
        return JSONResponse({"token": session.token},
                            headers={"set-cookie": _session_cookie(session_id, session.expires_at)})

    def _verify(self, session: Session, attestation: Attestation, events: list[AuditEvent]) -> str:
        runtime_data = attestation.primary_runtime_data()
        try:
            result = self.attestation.attest(
                tee=session.tee,
                primary_evidence=attestation.tee_evidence.primary_evidence,
                runtime_data=runtime_data,
                additional_evidence=attestation.tee_evidence.additional_evidence,
                init_data=attestation.init_data,
            )
        except StorageError:
            raise
        except ProtocolError as exc:
            events.append(self.audit_event("attest_failed", session.tee, "error", detail=exc.detail))
            log.info("attest refused for tee %s: %s", session.tee, exc.detail)
            raise
        except VerificationError as exc:
            events.append(self.audit_event("attest_failed", session.tee, "error", detail=str(exc)))
            log.info("attest refused for tee %s: %s", session.tee, exc)
            raise attest_failed(str(exc)) from exc
        except CofferError as exc:
            events.append(self.audit_event("attest_failed", session.tee, "error", detail=str(exc)))
            log.info("attest failed for tee %s: %s", session.tee, exc)
            raise attest_failed(str(exc)) from exc
        events.append(self.audit_event("attest", session.tee, "ok", claims=identifying_claims(result.claims)))
        token: str = result.token
        return token

    # -- resources -----------------------------------------------------------------------------------

    async def get_resource(self, request: Request) -> Response:
        path = request.path_params["path"]
        repo, kind, tag = parse_resource_path(path)
        path = f"{repo}/{kind}/{tag}"
        token = _bearer(request)
        session_id = request.cookies.get(SESSION_COOKIE)
        if token is None and not session_id:
            raise ProtocolError("TokenNotFound", "Attestation Token not found")
        query = dict(request.query_params.items())
        events: list[AuditEvent] = []
        try:
            wrapped = self._release((repo, kind, tag), token, session_id, query, events)
        except BaseException:
            await self.record(events)
            raise
        await self.record(events, required=True)
        log.info("resource %s released", path)
        return JSONResponse(wrapped)

    def _release(self, resource_path: tuple[str, str, str], token: str | None, session_id: str | None,
                 query: dict[str, str], events: list[AuditEvent]) -> dict[str, Any]:
        repo, kind, tag = resource_path
        path = f"{repo}/{kind}/{tag}"
        if token is None:
            assert session_id is not None
            token = self.sessions.token_for(session_id)
        claims = self.token_verifier().verify(token, now=self.now())
        who = identifying_claims(claims)
        if not self.resource_policy.allows(claims, resource_path=(repo, kind, tag), query=query):
            events.append(self.audit_event("deny", path, "denied", detail="resource policy", claims=who))
            log.info("resource %s denied by policy", path)
            raise ProtocolError("PolicyDeny", "Access denied by policy")
        data = self.resources.get(path)
        if data is None:
            events.append(self.audit_event("deny", path, "denied", detail="no such resource", claims=who))
            raise ProtocolError("PluginInternalError", "Plugin internal error: resource not found")
        try:
            wrapped = jwe.encrypt(data, tee_pubkey_from_claims(claims))
        except ProtocolError as exc:
            events.append(self.audit_event("deny", path, "denied", detail=exc.detail, claims=who))
            raise
        events.append(self.audit_event("release", path, "allowed", claims=who))
        return wrapped

    async def other_plugin(self, request: Request) -> Response:
        name = request.path_params["rest"].split("/", 1)[0]
        if name in _KNOWN_ENDPOINTS:
            raise ProtocolError("InvalidRequestPath",
                                f"Invalid request path: {request.method} is not supported here")
        raise ProtocolError("PluginNotFound", "Plugin not found")

    # -- service endpoints ---------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            self.store.count(NS_SESSIONS, now=self.now())
            checks["store"] = "ok"
        except StorageError as exc:
            log.warning("readiness: store unavailable: %s", exc)
            checks["store"] = "store unavailable"
        try:
            checks["master_key"] = "ok" if self.resources.check_master_key() else "wrong master key"
        except StorageError:
            checks["master_key"] = "unknown (store unavailable)"
        try:
            self.attestation.jwks()
            checks["token_signer"] = "ok"  # noqa: S105  (a status, not a secret)
        except CofferError as exc:
            log.warning("readiness: token signer unavailable: %s", exc)
            checks["token_signer"] = "unavailable"  # noqa: S105  (a status, not a secret)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                            status_code=200 if ready else 503)

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.attestation.jwks())

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


# --------------------------------------------------------------------------------------------------
# Error handling


async def _protocol_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProtocolError)
    status = getattr(exc, "status", None)
    headers = {}
    if isinstance(status, int) and status == 401 and exc.kind == "AdminAuthAccess":
        headers["www-authenticate"] = "Bearer"
    if exc.kind == "SerdeError" and "exceeds" in exc.detail:
        status = 413
    return error_response(exc.kind, exc.detail, status=status if isinstance(status, int) else None,
                          headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response("InvalidRequestPath", "Invalid request path")
    if exc.status_code == 405:
        return error_response("InvalidRequestPath", f"Invalid request path: {request.method} not allowed",
                              status=405, headers=exc.headers)
    return error_response("HTTPFailed", str(exc.detail), status=exc.status_code, headers=exc.headers)


async def _storage_error(request: Request, exc: Exception) -> Response:
    log.error("storage failure on %s %s: %s", request.method, request.url.path, exc)
    return error_response("StorageBackendInitialization", "storage backend unavailable", status=503)


async def _coffer_error(request: Request, exc: Exception) -> Response:
    # A library error that no handler translated: report its class, never its (possibly detailed) text.
    log.error("unhandled %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return error_response("PluginInternalError", f"internal error ({type(exc).__name__})", status=500)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return error_response("PluginInternalError", "internal error", status=500)


# --------------------------------------------------------------------------------------------------
# Assembly


def resource_store_from_config(config: KbsConfig, store: Store) -> ResourceStore:
    """The sealed resource store with the configured master key. While a key rotation is under way
    (``<key file>.new`` exists), values already re-sealed under the new key stay readable."""
    key_file = config.master_key_path()
    if key_file is not None and config.master_key_file is None and not key_file.exists():
        # Embedded default: a key of our own in the (owner-only) state directory.
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        MasterKey.generate().write(key_file)
        log.warning("generated a new KBS master key in %s (configure [master_key] for production)",
                    key_file)
    master = MasterKey.load(key_file, config.master_key_env)
    fallback: list[MasterKey] = []
    if key_file is not None:
        pending = key_file.with_name(key_file.name + ".new")
        if pending.exists():
            fallback.append(MasterKey.load(pending))
    return ResourceStore(store, master, fallback_keys=fallback)


def build_app(config: KbsConfig, *, store: Store, attestation: AttestationService,
              clock: Callable[[], datetime] = utc_now, resources: ResourceStore | None = None,
              resource_policy: ResourcePolicy | None = None, admin_auth: AdminAuth | None = None,
              sweep_interval: float = SWEEP_INTERVAL_SECONDS) -> Starlette:
    """The ASGI app. ``resources`` defaults to a store sealed with the configured master key,
    ``admin_auth`` to :class:`AdminAuth` over ``config.admin`` (absent: no admin access)."""
    resources = resources if resources is not None else resource_store_from_config(config, store)
    sessions = SessionManager(store, clock, timeout=config.session_timeout, max_sessions=config.max_sessions)
    policy = resource_policy if resource_policy is not None else ResourcePolicy(store, clock=clock)
    kbs = KbsApp(config, store=store, attestation=attestation, clock=clock, resources=resources,
                 resource_policy=policy, sessions=sessions)
    auth = admin_auth if admin_auth is not None else AdminAuth(config.admin)

    routes: list[BaseRoute] = [
        Route("/kbs/v0/auth", kbs.auth, methods=["POST"]),
        Route("/kbs/v0/attest", kbs.attest, methods=["POST"]),
        Route("/kbs/v0/resource/{path:path}", kbs.get_resource, methods=["GET"]),
        *admin_routes(store=store, attestation=attestation, resources=resources, auth=auth, clock=clock,
                      resource_policy=policy, max_body_bytes=config.max_body_bytes),
        Route("/kbs/v0/{rest:path}", kbs.other_plugin,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        Route("/healthz", kbs.healthz, methods=["GET"]),
        Route("/readyz", kbs.readyz, methods=["GET"]),
        Route(OPENAPI_PATH, kbs.openapi, methods=["GET"]),
        Route(JWKS_PATH, kbs.jwks, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            group.start_soon(_sweeper, sessions, sweep_interval)
            checkpoint = getattr(store, "checkpoint", None)
            if callable(checkpoint):
                group.start_soon(_checkpointer, checkpoint, CHECKPOINT_INTERVAL_SECONDS)
            try:
                yield
            finally:
                await kbs.audit_writer.drain()
                group.cancel_scope.cancel()

    app = Starlette(
        routes=routes,
        exception_handlers={
            ProtocolError: _protocol_error,
            HTTPException: _http_error,
            StorageError: _storage_error,
            CofferError: _coffer_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.kbs = kbs
    return app


async def _checkpointer(checkpoint: Callable[[], object], interval: float) -> None:
    """Run the store's write-ahead-log checkpoint in a worker thread (see SqliteStore.checkpoint)."""
    while True:
        await anyio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(checkpoint)
        except StorageError as exc:
            log.warning("store checkpoint failed: %s", exc)


async def _sweeper(sessions: SessionManager, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        try:
            purged = sessions.sweep()
            if purged:
                log.debug("purged %d expired sessions", purged)
        except StorageError as exc:
            log.warning("session sweep failed: %s", exc)


# --------------------------------------------------------------------------------------------------
# OpenAPI


def _error_responses(*statuses: int) -> dict[str, Any]:
    texts = {400: "Malformed request: ErrorInformation",
             401: "Refused (re-attest, policy denial, bad input...): ErrorInformation",
             403: "Authenticated but not allowed: ErrorInformation",
             404: "Bad request path or unknown plugin: ErrorInformation",
             405: "Method not allowed: ErrorInformation",
             413: "Request body too large: ErrorInformation",
             500: "Internal error: ErrorInformation",
             503: "Storage unavailable: ErrorInformation"}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorInformation"}}}
    return {str(s): {"description": texts[s], "content": ref} for s in statuses}


_RESOURCE_PARAMS = [
    {"name": name, "in": "path", "required": True,
     "schema": {"type": "string", "pattern": r"^[a-zA-Z0-9_\-]+[a-zA-Z0-9_\-.]*$"}}
    for name in ("repository", "type", "tag")
]
_RESOURCE = "/kbs/v0/resource/{repository}/{type}/{tag}"
_ADMIN: list[dict[str, list[str]]] = [{"adminBearer": []}]
_RAW = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_JWE_MEMBERS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _admin_op(summary: str, *, body: dict[str, Any] | None = None, out: dict[str, Any] | None = None,
              params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary, "tags": ["admin"], "security": _ADMIN,
        "responses": {"200": {"description": "Done", **({"content": out} if out else {})},
                      **_error_responses(400, 401, 403, 404, 413)},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    return op


def openapi_document() -> dict[str, Any]:
    """The hand-written OpenAPI 3.1 description served at :data:`OPENAPI_PATH`."""
    any_object = {"type": "object", "additionalProperties": True}
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    policy_id_param = [{"name": "policy_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    audit_params = [
        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
        {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
        {"name": "resource", "in": "query", "schema": {"type": "string"}},
        {"name": "action", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Coffer KBS",
            "version": __version__,
            "description": "Key broker and attestation service speaking the Trustee KBS protocol 0.4.0. "
                           "Errors carry an ErrorInformation body; 401 asks a guest to attest again.",
        },
        "paths": {
            "/kbs/v0/auth": {"post": {
                "summary": "Start an RCAR handshake", "tags": ["rcar"],
                "requestBody": {"required": True, "content": _json("Request")},
                "responses": {"200": {
                    "description": "Challenge; sets the kbs-session-id cookie",
                    "headers": {"Set-Cookie": {"schema": {"type": "string"}}},
                    "content": _json("Challenge")}, **_error_responses(401, 413)},
            }},
            "/kbs/v0/attest": {"post": {
                "summary": "Send evidence bound to the challenge; get an attestation token",
                "tags": ["rcar"], "security": [{"sessionCookie": []}],
                "requestBody": {"required": True, "content": _json("Attestation")},
                "responses": {"200": {"description": "EAR attestation token",
                                      "content": _json("TokenResponse")},
                              **_error_responses(401, 413)},
            }},
            _RESOURCE: {
                "parameters": _RESOURCE_PARAMS,
                "get": {
                    "summary": "Fetch a resource, encrypted to the TEE key of the attestation token",
                    "tags": ["resource"], "security": [{"sessionCookie": []}, {"attestationToken": []}],
                    "responses": {"200": {"description": "JWE (flattened JSON)", "content": _json("Jwe")},
                                  **_error_responses(401, 404)},
                },
                "post": _admin_op("Store a resource", body=_RAW),
                "put": _admin_op("Store a resource", body=_RAW),
                "delete": _admin_op("Delete a resource"),
            },
            "/kbs/v0/resources": {"get": _admin_op("List resource paths", out={
                "application/json": {"schema": any_object}})},
            "/kbs/v0/resources/{repository}/{type}/{tag}": {
                "parameters": _RESOURCE_PARAMS,
                "get": _admin_op("Read a resource in plaintext (admin role)", out={
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}),
            },
            "/kbs/v0/resource-policy": {
                "get": _admin_op("The resource policy", out=_json("Policy")),
                "post": _admin_op("Set the resource policy (Rego, base64url)", body=_json("Policy")),
            },
            "/kbs/v0/attestation-policy": {
                "get": _admin_op("Attestation policies", out={"application/json": {"schema": any_object}}),
                "post": _admin_op("Set an attestation policy (Rego, base64url)", body=_json("Policy")),
            },
            "/kbs/v0/attestation-policy/{policy_id}": {
                "get": _admin_op("One attestation policy", out=_json("Policy"), params=policy_id_param),
            },
            "/kbs/v0/reference-value": {
                "get": _admin_op("List reference values", out={"application/json": {"schema": any_object}}),
                "post": _admin_op("Add reference values (RVPS message)", body=_json("RvpsMessage")),
            },
            "/kbs/v0/reference-value/{name}": {
                "get": _admin_op("One reference value", out={"application/json": {"schema": any_object}},
                                 params=name_param),
                "delete": _admin_op("Delete a reference value", params=name_param),
            },
            "/kbs/v0/audit": {"get": _admin_op(
                "Audit events (releases, denials, attestations, admin changes)",
                out={"application/json": {"schema": any_object}}, params=audit_params)},
            "/healthz": {"get": {"summary": "Liveness", "tags": ["service"],
                                 "responses": {"200": {"description": "Alive", "content": _json("Status")}}}},
            "/readyz": {"get": {"summary": "Readiness (store and master key)", "tags": ["service"],
                                "responses": {"200": {"description": "Ready", "content": _json("Status")},
                                              "503": {"description": "Not ready",
                                                      "content": _json("Status")}}}},
            OPENAPI_PATH: {"get": {"summary": "This document", "tags": ["service"],
                                   "responses": {"200": {"description": "OpenAPI 3.1 document",
                                                         "content": {"application/json": {
                                                             "schema": any_object}}}}}},
            JWKS_PATH: {"get": {"summary": "Attestation token signing keys", "tags": ["service"],
                                "responses": {"200": {"description": "JWK set", "content": _json("Jwks")}}}},
        },
        "components": {
            "securitySchemes": {
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
                "attestationToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EAR, ES256)"},
                "adminBearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EdDSA or ES256)"},
            },
            "schemas": {
                "ErrorInformation": {
                    "type": "object", "required": ["type", "detail"],
                    "properties": {"type": {"type": "string",
                                            "pattern": "^" + ERROR_TYPE_PREFIX.replace(".", r"\.")},
                                   "detail": {"type": "string"}},
                },
                "Request": {
                    "type": "object", "required": ["version", "tee", "extra-params"],
                    "properties": {"version": {"type": "string", "const": "0.4.0"},
                                   "tee": {"type": "string"},
                                   "extra-params": {}},
                },
                "Challenge": {
                    "type": "object", "required": ["nonce", "extra-params"],
                    "properties": {"nonce": {"type": "string"}, "extra-params": {}},
                },
                "Attestation": {
                    "type": "object", "required": ["runtime-data", "tee-evidence"],
                    "properties": {
                        "init-data": {"oneOf": [{"type": "null"}, {
                            "type": "object", "required": ["format", "body"],
                            "properties": {"format": {"type": "string"}, "body": {"type": "string"}}}]},
                        "runtime-data": {"type": "object", "required": ["nonce", "tee-pubkey"],
                                         "properties": {"nonce": {"type": "string"},
                                                        "tee-pubkey": {"$ref": "#/components/schemas/Jwk"}}},
                        "tee-evidence": {"type": "object",
                                         "required": ["primary_evidence", "additional_evidence"],
                                         "properties": {"primary_evidence": {},
                                                        "additional_evidence": {"type": "string"}}},
                    },
                },
                "Jwk": {"type": "object", "required": ["kty"],
                        "properties": {"kty": {"type": "string"}}, "additionalProperties": True},
                "TokenResponse": {"type": "object", "required": ["token"],
                                  "properties": {"token": {"type": "string"}}},
                "Jwe": {"type": "object", "required": list(_JWE_MEMBERS),
                        "properties": {k: {"type": "string"} for k in _JWE_MEMBERS}},
                "Jwks": {"type": "object", "required": ["keys"],
                         "properties": {"keys": {"type": "array",
                                                 "items": {"$ref": "#/components/schemas/Jwk"}}}},
                "Policy": {"type": "object", "required": ["policy"],
                           "properties": {"policy": {"type": "string",
                                                     "description": "base64url (no padding)"},
                                          "policy_id": {"type": "string"}, "type": {"type": "string"}}},
                "RvpsMessage": {"type": "object", "required": ["version", "type", "payload"],
                                "properties": {"version": {"type": "string"}, "type": {"type": "string"},
                                               "payload": {"type": "string"}}},
                "Status": {"type": "object", "required": ["status"],
                           "properties": {"status": {"type": "string"}}, "additionalProperties": True},
            },
        },
    }
