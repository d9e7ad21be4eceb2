"""OCI distribution registries (``docker://HOST/REPO:TAG``) as an image source and destination.

:class:`RegistrySource` and :class:`RegistryDestination` implement the transport interface of
:mod:`coffer.image.transport` on top of :class:`RegistryClient`, a small synchronous client for the
distribution API (``/v2/``) built on httpx.

What the client checks:

* manifests are read under a size ceiling (the ``Content-Length`` is checked before the body is read,
  the body is read at most one byte past the ceiling), their sha256 must equal the digest asked for
  (when pulling by digest) and the registry's ``Docker-Content-Digest`` (when it sends one); the
  media type is the response's ``Content-Type`` and must be a known manifest or index type;
* blobs are streamed and checked against their descriptor's size as they arrive and against its
  digest after the last chunk, like :meth:`coffer.image.layout.OciLayout.iter_blob`;
* uploads stream the blob in one chunked ``PATCH`` (never whole in memory), hashing on the way, and
  are finished with ``PUT ?digest=`` only when the content matched what the caller expected.

Connection policy: ``https`` always, verified against ``TransportOptions.ca_file`` or the system CAs.
``TransportOptions.insecure`` means plain ``http`` and is accepted only for loopback hosts
(``localhost``, ``127.0.0.0/8``, ``[::1]``): a test or development registry on the same machine, where
nobody can sit on the wire. With ``insecure`` the client speaks plain ``http`` straight away rather
than trying ``https`` first: the answer is then deterministic, and a TLS registry on loopback is
reached by leaving ``insecure`` off and passing its CA.

Authentication follows the registry's ``WWW-Authenticate`` challenge (from ``GET /v2/`` or any 401):
``Basic`` sends the credentials, ``Bearer`` fetches a token from the realm for the repository scope
(``pull`` for a source, ``pull,push`` for a destination), cached per scope and refreshed once on a 401.
Credentials come from :class:`~coffer.image.transport.TransportOptions` or else from the containers
auth file (see :func:`credentials_from_auth_files`). Credentials and tokens never appear in errors or
reprs; Authorization is sent only to the registry's own origin and to the token realm.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn, Self

import httpx

from coffer.errors import ConfigError, FormatError, ProtocolError, TransportError, UsageError
from coffer.image import media
from coffer.image.layout import CHUNK
from coffer.image.models import MAX_MANIFEST_BYTES, Descriptor, check_digest, sha256_digest
from coffer.image.reference import DOCKER_HUB, RegistryRef
from coffer.image.transport import (
    ImageDestination,
    ImageSource,
    Progress,
    TransportOptions,
    no_progress,
)

#: Accepted in answers to manifest requests, sent as ``Accept``.
MANIFEST_ACCEPT: Final = media.MANIFEST_TYPES | media.INDEX_TYPES
#: Docker Hub's API endpoint (``docker.io`` is only its name).
DOCKER_HUB_API: Final = "registry-1.docker.io"
MAX_ERROR_BODY: Final = 64 * 1024
MAX_TOKEN_RESPONSE: Final = 64 * 1024
MAX_CHALLENGE: Final = 8 * 1024
MAX_AUTH_FILE: Final = 1024 * 1024

_TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


# --------------------------------------------------------------------------------------------------
# Pure helpers (parsers are property-tested: only CofferError subclasses escape)


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``scheme`` lower-cased, parameter names lower-cased."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge:
    """Parse ``Scheme k=v, k="quoted"`` (RFC 7235); only the first challenge of a list is returned."""
    if len(header) > MAX_CHALLENGE:
        raise ProtocolError("MalformedChallenge", f"WWW-Authenticate header of {len(header)} characters")
    pos, end = 0, len(header)

    def token() -> str:
        nonlocal pos
        start = pos
        while pos < end and header[pos] in _TOKEN_CHARS:
            pos += 1
        return header[start:pos]

    def spaces() -> None:
        nonlocal pos
        while pos < end and header[pos] in " \t":
            pos += 1

    spaces()
    scheme = token()
    if not scheme:
        raise ProtocolError("MalformedChallenge", "WWW-Authenticate has no scheme")
    params: dict[str, str] = {}
    spaces()
    while pos < end:
        name = token()
        spaces()
        if not name or pos >= end or header[pos] != "=":
            # A token68 or the start of a second challenge: the first challenge ends here.
            break
        pos += 1
        spaces()
        if pos < end and header[pos] == '"':
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= end:
                    raise ProtocolError("MalformedChallenge", "unterminated quoted string in a challenge")
                char = header[pos]
                if char == "\\" and pos + 1 < end:
                    chars.append(header[pos + 1])
                    pos += 2
                    continue
                pos += 1
                if char == '"':
                    break
                chars.append(char)
            value = "".join(chars)
        else:
            # Lenient: some registries leave URLs unquoted, which is not a token in RFC 7235 terms.
            start = pos
            while pos < end and header[pos] not in ", \t":
                pos += 1
            value = header[start:pos]
        params[name.lower()] = value
        spaces()
        if pos < end and header[pos] == ",":
            pos += 1
            spaces()
        elif pos < end:
            break
    return Challenge(scheme=scheme.lower(), params=params)


def parse_error_body(data: bytes) -> tuple[str, str] | None:
    """The first ``(code, message)`` of a registry error document, or None if ``data`` is not one."""
    if len(data) > MAX_ERROR_BODY:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    errors = obj.get("errors")
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    code, message = errors[0].get("code"), errors[0].get("message", "")
    if not isinstance(code, str) or not code:
        return None
    if not isinstance(message, str):
        message = ""
    return _printable(code, 64), _printable(message, 300)


def _printable(text: str, limit: int) -> str:
    """A registry-supplied string made safe to put in a message (one line, bounded)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def is_loopback(host: str) -> bool:
    """Whether a ``host[:port]`` names this machine (``localhost``, ``127.0.0.0/8``, ``[::1]``)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def registry_base_url(host: str, *, insecure: bool) -> str:
    """The API base URL of ``host``; plain http only for ``insecure`` on loopback (see the module doc)."""
    if insecure:
        if not is_loopback(host):
            raise UsageError(
                f"refusing plain http to registry {host}: --insecure is only allowed for loopback hosts "
                "(localhost, 127.0.0.0/8, [::1]), where nobody can read or alter the traffic; for "
                "other registries use https and pass the registry's CA certificate"
            )
        return f"http://{host}"
    return f"https://{DOCKER_HUB_API if host == DOCKER_HUB else host}"


@dataclass(frozen=True)
class Credentials:
    """A user name and password; the password never appears in the repr."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _auth_key(key: str) -> str:
    """Normalise an ``auths`` key to ``host[/path]`` (Docker writes ``https://index.docker.io/v1/``)."""
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :].split("/", 1)[0]
    key = key.rstrip("/")
    host, sep, rest = key.partition("/")
    if host in ("index.docker.io", DOCKER_HUB_API):
        host = DOCKER_HUB
    return host + sep + rest


def parse_auth_file(data: bytes, path: Path, host: str, repository: str) -> Credentials | None:
    """The credentials an auth file holds for ``host/repository`` (the most specific key wins)."""
    what = f"auth file {path}"
    if len(data) > MAX_AUTH_FILE:
        raise ConfigError(f"{what} is larger than {MAX_AUTH_FILE} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{what} is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}: top level is not an object")
    auths = obj.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"{what}: 'auths' is not an object")
    entries = {_auth_key(key): value for key, value in auths.items() if isinstance(key, str)}
    parts = f"{host}/{repository}".split("/")
    for n in range(len(parts), 0, -1):
        entry = entries.get("/".join(parts[:n]))
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
            raise ConfigError(f"{what}: the entry for {'/'.join(parts[:n])} has no 'auth' string")
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{what}: the 'auth' of {'/'.join(parts[:n])} is not base64 of user:password") \
                from exc
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise ConfigError(f"{what}: the 'auth' of {'/'.join(parts[:n])} is not base64 of user:password")
        return Credentials(username, password)
    return None


def auth_file_paths(environ: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """Where credentials are looked for, in order: ``$REGISTRY_AUTH_FILE``,
    ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``."""
    env = os.environ if environ is None else environ
    paths: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        paths.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    paths.append((home if home is not None else Path.home()) / ".docker" / "config.json")
    return paths


def credentials_from_auth_files(
    host: str, repository: str, *, environ: Mapping[str, str] | None = None, home: Path | None = None
) -> Credentials | None:
    """The credentials of the first auth file (see :func:`auth_file_paths`) with an entry for the host."""
    for path in auth_file_paths(environ, home):
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_AUTH_FILE + 1)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read auth file {path}: {exc.strerror}") from exc
        found = parse_auth_file(data, path, host, repository)
        if found is not None:
            return found
    return None


def _content_type(response: httpx.Response) -> str:
    value: str = response.headers.get("Content-Type", "")
    return value.split(";", 1)[0].strip()


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------------------------------
# The client


class RegistryClient:
    """The distribution API for one repository of one registry.

    ``actions`` is what the client will do (``("pull",)`` or ``("pull", "push")``); it sets the token
    scope. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        repository: str,
        options: TransportOptions,
        *,
        actions: tuple[str, ...] = ("pull",),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.repository = repository
        self._base = httpx.URL(registry_base_url(host, insecure=options.insecure))
        self._insecure = options.insecure
        self._scope = f"repository:{repository}:{','.join(actions)}"
        if options.username is not None:
            self._credentials: Credentials | None = Credentials(options.username, options.password or "")
        else:
            self._credentials = credentials_from_auth_files(host, repository, environ=environ)
        verify: ssl.SSLContext | bool = True
        if options.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(options.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA certificates from {options.ca_file}: {exc}") from exc
        self._http = httpx.Client(verify=verify, timeout=httpx.Timeout(options.timeout),
                                  event_hooks={"request": [self._refuse_downgrade]})
        self._challenge: Challenge | None = None
        self._pinged = False
        self._tokens: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RegistryClient(host={self.host!r}, repository={self.repository!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _refuse_downgrade(self, request: httpx.Request) -> None:
        """Every request, redirects and upload locations included: an https registry may not send
        us to plain http (layers, possibly decrypted ones on upload, would travel in clear)."""
        if self._base.scheme == "https" and request.url.scheme != "https":
            raise ProtocolError("INSECURE_REDIRECT", f"registry {self.host} sent the client to plain "
                                f"{request.url.scheme}://{request.url.host} (refused)")

    def _url(self, path_or_url: str) -> httpx.URL:
        return self._base.join(path_or_url)

    def _same_origin(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (self._base.scheme, self._base.host, self._base.port)

    def _network_error(self, exc: httpx.HTTPError, what: str, where: str | None = None) -> TransportError:
        place = where or self.host
        if _tls_failure(exc):
            return TransportError(
                f"{place}: TLS certificate verification failed while {what} (pass the registry's CA "
                "certificate with --ca-cert, or fix the certificate)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return TransportError(f"{place}: timed out while {what}")
        return TransportError(f"{place}: network error while {what}: {exc}")

    def _send(
        self,
        method: str,
        url: httpx.URL,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterator[bytes] | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
        authorization: str | None = None,
    ) -> httpx.Response:
        request_headers = dict(headers or {})
        if authorization is not None and self._same_origin(url):
            request_headers["Authorization"] = authorization
        try:
            request = self._http.build_request(method, url, headers=request_headers, content=content)
            return self._http.send(request, stream=stream, follow_redirects=follow_redirects)
        except httpx.HTTPError as exc:
            raise self._network_error(exc, what) from exc

    def _ping(self) -> None:
        if self._pinged:
            return
        what = "checking the registry API (GET /v2/)"
        response = self._send("GET", self._url("/v2/"), what=what)
        if response.status_code == 401:
            self._challenge = self._challenge_of(response)
        elif response.status_code != 200:
            self._raise_for(response, what)
        self._pinged = True

    def _challenge_of(self, response: httpx.Response) -> Challenge:
        header = response.headers.get("WWW-Authenticate")
        if not header:
            raise ProtocolError("UNAUTHORIZED", f"registry {self.host} answered 401 without a challenge")
        challenge = parse_challenge(header)
        if challenge.scheme not in ("basic", "bearer"):
            raise ProtocolError(
                "UNAUTHORIZED",
                f"registry {self.host} wants unsupported authentication {challenge.scheme[:40]!r}",
            )
        return challenge

    def _authorization(self, *, refresh: bool = False) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise ProtocolError(
                    "UNAUTHORIZED",
                    f"registry {self.host} requires a user name and password (none given, none in the auth "
                    "file)",
                )
            return self._credentials.basic()
        # Always ask for the client's own scope (so one token serves the whole pull or push), plus
        # whatever a 401 challenge named if that differs.
        scopes = tuple(dict.fromkeys(s for s in (self._scope, challenge.params.get("scope")) if s))
        key = " ".join(scopes)
        if refresh:
            self._tokens.pop(key, None)
        token = self._tokens.get(key)
        if token is None:
            token = self._fetch_token(challenge, scopes)
            self._tokens[key] = token
        return f"Bearer {token}"

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise ProtocolError("UNAUTHORIZED", f"registry {self.host} sent a Bearer challenge with no realm")
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ProtocolError("UNAUTHORIZED", f"registry {self.host} sent an invalid token realm") from exc
        realm_host = url.netloc.decode("ascii", "replace")
        plain_ok = url.scheme == "http" and self._insecure and is_loopback(realm_host)
        if url.scheme != "https" and not plain_ok:
            raise ProtocolError(
                "UNAUTHORIZED",
                f"registry {self.host} sends credentials to token realm {realm_host} over {url.scheme!r}; "
                "only https (or http on loopback with --insecure) is allowed",
            )
        params: dict[str, str | list[str]] = {"scope": list(scopes)}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers: dict[str, str] = {}
        if self._credentials is not None:
            params["account"] = self._credentials.username
            headers["Authorization"] = self._credentials.basic()
        what = f"getting a token for {' '.join(scopes)} from {realm_host}"
        try:
            with self._http.stream("GET", url.copy_merge_params(params), headers=headers) as response:
                status = response.status_code
                body = _read_bounded(response, MAX_TOKEN_RESPONSE)
        except httpx.HTTPError as exc:
            raise self._network_error(exc, what, realm_host) from exc
        if status in (401, 403):
            who = f"the credentials of user {self._credentials.username!r}" if self._credentials else \
                "anonymous access"
            raise ProtocolError("UNAUTHORIZED", f"token server {realm_host} refused {who} for registry "
                                f"{self.host} (HTTP {status})")
        if status != 200 or body is None:
            raise ProtocolError(
                "UNAUTHORIZED", f"token server {realm_host} answered HTTP {status} for registry {self.host}"
            )
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError("UNAUTHORIZED", f"token server {realm_host} sent invalid JSON") from exc
        token: object = (obj.get("token") or obj.get("access_token")) if isinstance(obj, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable() or len(token) > 16384:
            raise ProtocolError("UNAUTHORIZED", f"token server {realm_host} sent no usable token")
        return token

    def _unauthorized(self, response: httpx.Response) -> ProtocolError:
        if self._credentials is None:
            return ProtocolError(
                "UNAUTHORIZED",
                f"registry {self.host} refused anonymous access to {self.repository} (HTTP "
                f"{response.status_code}); give a user name and password or log in (auth file)",
            )
        return ProtocolError(
            "UNAUTHORIZED",
            f"registry {self.host} refused the credentials of user {self._credentials.username!r} for "
            f"{self.repository} (HTTP {response.status_code})",
        )

    def request(
        self,
        method: str,
        path_or_url: str | httpx.URL,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterator[bytes] | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send an authenticated request; a 401 refreshes the authorization and retries once (only for
        replayable bodies: a streamed upload body cannot be sent twice, so its 401 is final)."""
        self._ping()
        url = path_or_url if isinstance(path_or_url, httpx.URL) else self._url(path_or_url)
        response = self._send(method, url, what=what, headers=headers, content=content, stream=stream,
                              follow_redirects=follow_redirects, authorization=self._authorization())
        if response.status_code != 401:
            return response
        response.close()
        if not isinstance(content, bytes | None):
            raise self._unauthorized(response)
        self._challenge = self._challenge_of(response)
        response = self._send(method, url, what=what, headers=headers, content=content, stream=stream,
                              follow_redirects=follow_redirects,
                              authorization=self._authorization(refresh=True))
        if response.status_code == 401:
            response.close()
            raise self._unauthorized(response)
        return response

    @contextlib.contextmanager
    def _stream(self, method: str, path_or_url: str | httpx.URL, *, what: str,
                headers: Mapping[str, str] | None = None, follow_redirects: bool = False,
                ) -> Iterator[httpx.Response]:
        response = self.request(method, path_or_url, what=what, headers=headers, stream=True,
                                follow_redirects=follow_redirects)
        try:
            yield response
        finally:
            response.close()

    def _raise_for(self, response: httpx.Response, what: str) -> NoReturn:
        """Raise the :class:`ProtocolError` a failed response stands for."""
        status = response.status_code
        body: bytes | None = b""
        if response.request.method != "HEAD":
            try:
                body = _read_bounded(response, MAX_ERROR_BODY)
            except httpx.HTTPError:
                body = None
        parsed = parse_error_body(body) if body else None
        if parsed is None:
            raise ProtocolError(f"HTTP_{status}", f"registry {self.host} answered HTTP {status} while {what}")
        code, message = parsed
        raise ProtocolError(code, f"{message} (HTTP {status} from registry {self.host} while {what})")

    # -- the API ----------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the registry speaks the distribution API (and learn how it authenticates)."""
        self._ping()

    def get_manifest(
        self, reference: str, *, limit: int = MAX_MANIFEST_BYTES, missing_ok: bool = False
    ) -> tuple[bytes, Descriptor] | None:
        """Fetch a manifest or index by tag or digest; its bytes and descriptor (media type from the
        ``Content-Type``). With ``missing_ok``, None when the registry does not know it (404)."""
        by_digest = reference.startswith("sha256:")
        if by_digest:
            check_digest(reference, "manifest reference")
        what = f"fetching manifest {self.repository}:{reference}" if not by_digest else \
            f"fetching manifest {self.repository}@{reference}"
        item = f"manifest {self.repository}{'@' if by_digest else ':'}{reference} from {self.host}"
        headers = {"Accept": ", ".join(sorted(MANIFEST_ACCEPT))}
        with self._stream("GET", f"/v2/{self.repository}/manifests/{reference}", what=what,
                          headers=headers) as response:
            if response.status_code == 404 and missing_ok:
                return None
            if response.status_code != 200:
                self._raise_for(response, what)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdecimal() and int(declared) > limit:
                raise FormatError(item, f"{int(declared)} bytes exceeds the limit of {limit}")
            try:
                data = _read_bounded(response, limit)
            except httpx.HTTPError as exc:
                raise self._network_error(exc, what) from exc
            if data is None:
                raise FormatError(item, f"more than the limit of {limit} bytes")
            media_type = _content_type(response)
            header_digest = response.headers.get("Docker-Content-Digest")
        if media_type not in MANIFEST_ACCEPT:
            raise FormatError(item, f"Content-Type {media_type[:100]!r} is not a manifest or index type")
        digest = sha256_digest(data)
        if by_digest and digest != reference:
            raise FormatError(item, f"content has digest {digest}")
        if header_digest is not None and header_digest.strip() != digest:
            raise FormatError(item, f"content has digest {digest}, Docker-Content-Digest says "
                              f"{header_digest.strip()[:80]!r}")
        return data, Descriptor(media_type=media_type, digest=digest, size=len(data))

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        """Store a manifest under a tag or its digest."""
        what = f"pushing manifest {self.repository}:{reference}"
        digest = sha256_digest(data)
        response = self.request("PUT", f"/v2/{self.repository}/manifests/{reference}", what=what,
                                headers={"Content-Type": media_type}, content=data)
        try:
            if response.status_code not in (200, 201):
                self._raise_for(response, what)
            answered = response.headers.get("Docker-Content-Digest")
            if answered is not None and answered.strip() != digest:
                raise ProtocolError(
                    "DIGEST_INVALID",
                    f"registry {self.host} stored manifest {digest} as {answered.strip()[:80]!r} while "
                    f"{what}",
                )
        finally:
            response.close()

    def has_blob(self, descriptor: Descriptor) -> bool:
        """Whether the repository holds a blob of this digest (and size, when the registry says it)."""
        what = f"checking for blob {descriptor.digest}"
        response = self.request("HEAD", f"/v2/{self.repository}/blobs/{descriptor.digest}", what=what,
                                follow_redirects=True)
        try:
            if response.status_code == 404:
                return False
            if response.status_code != 200:
                self._raise_for(response, what)
            length = response.headers.get("Content-Length")
            return length is None or not length.isdecimal() or int(length) == descriptor.size
        finally:
            response.close()

    def iter_blob(self, descriptor: Descriptor, progress: Progress = no_progress) -> Iterator[bytes]:
        """Stream a blob (redirects followed); size checked on the way, digest after the last chunk."""
        what = f"fetching blob {descriptor.digest}"
        item = f"blob {descriptor.digest} from {self.host}/{self.repository}"
        hasher = hashlib.sha256()
        seen = 0
        with self._stream("GET", f"/v2/{self.repository}/blobs/{descriptor.digest}", what=what,
                          follow_redirects=True) as response:
            if response.status_code != 200:
                self._raise_for(response, what)
            chunks = response.iter_bytes(CHUNK)
            progress(descriptor.digest, 0, descriptor.size)
            while True:
                try:
                    chunk = next(chunks, None)
                except httpx.HTTPError as exc:
                    raise self._network_error(exc, what) from exc
                if chunk is None:
                    break
                seen += len(chunk)
                if seen > descriptor.size:
                    raise FormatError(item, f"longer than the {descriptor.size} bytes its descriptor says")
                hasher.update(chunk)
                progress(descriptor.digest, seen, descriptor.size)
                yield chunk
        if seen != descriptor.size:
            raise FormatError(item, f"truncated: {seen} of {descriptor.size} bytes")
        actual = "sha256:" + hasher.hexdigest()
        if actual != descriptor.digest:
            raise FormatError(item, f"content has digest {actual}")

    def upload_blob(
        self,
        chunks: Iterable[bytes],
        media_type: str,
        *,
        expected: Descriptor | None = None,
        progress: Progress = no_progress,
    ) -> Descriptor:
        """Upload a blob: ``POST`` a session, one streamed ``PATCH``, then ``PUT ?digest=``.

        With ``expected`` the upload is refused (and the session cancelled) unless digest and size
        match; the registry never completes a blob that differs from what the caller asked for.
        """
        label = expected.digest if expected is not None else f"{media_type} blob"
        what = f"uploading {label}"
        location = self._upload_step("POST", f"/v2/{self.repository}/blobs/uploads/", what, content=b"")
        hasher = hashlib.sha256()
        size = 0
        total = expected.size if expected is not None else None

        def body() -> Iterator[bytes]:
            nonlocal size
            progress(label, 0, total)
            for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if expected is not None and size > expected.size:
                    raise FormatError(f"blob {expected.digest}", f"longer than {expected.size} bytes")
                hasher.update(chunk)
                progress(label, size, total)
                yield chunk

        finished = False
        try:
            location = self._upload_step("PATCH", location, what, content=body(),
                                         headers={"Content-Type": "application/octet-stream"})
            digest = "sha256:" + hasher.hexdigest()
            if expected is not None:
                if size != expected.size:
                    raise FormatError(f"blob {expected.digest}", f"got {size} bytes, descriptor says "
                                      f"{expected.size}")
                if digest != expected.digest:
                    raise FormatError(f"blob {expected.digest}", f"content has digest {digest}")
            response = self.request("PUT", location.copy_merge_params({"digest": digest}), what=what,
                                    content=b"", headers={"Content-Type": "application/octet-stream"})
            try:
                if response.status_code not in (201, 204):
                    self._raise_for(response, what)
            finally:
                response.close()
            finished = True
        finally:
            if not finished:
                self._cancel_upload(location)
        if expected is not None:
            return expected
        return Descriptor(media_type=media_type, digest=digest, size=size)

    def _upload_step(self, method: str, url: str | httpx.URL, what: str, *, content: bytes | Iterator[bytes],
                     headers: Mapping[str, str] | None = None) -> httpx.URL:
        """One request of a blob upload that must answer 202 Accepted: the upload's next Location."""
        response = self.request(method, url, what=what, content=content, headers=headers)
        try:
            if response.status_code != 202:
                self._raise_for(response, what)
            return self._location(response, what)
        finally:
            response.close()

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise ProtocolError(
                "BLOB_UPLOAD_INVALID", f"registry {self.host} sent no upload Location while {what}"
            )
        try:
            return self._url(location)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ProtocolError("BLOB_UPLOAD_INVALID",
                                f"registry {self.host} sent an invalid upload Location while {what}") from exc

    def _cancel_upload(self, location: httpx.URL) -> None:
        """Best effort: tell the registry to drop a half-done upload session."""
        with contextlib.suppress(TransportError, ProtocolError):
            self.request("DELETE", location, what="cancelling an upload").close()


def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """Read a streamed response body; None if it is longer than ``limit`` (reading stops there)."""
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------
# Transport implementations


class RegistrySource(ImageSource):
    """``docker://HOST/REPO[:TAG][@DIGEST]`` as a source."""

    def __init__(self, ref: RegistryRef, options: TransportOptions, *, progress: Progress = no_progress,
                 environ: Mapping[str, str] | None = None) -> None:
        self.name = str(ref)
        self._ref = ref
        self._progress = progress
        self.client = RegistryClient(ref.host, ref.repository, options, actions=("pull",), environ=environ)
        # Manifests already fetched and checked, by digest: root() and resolve_tag() fetch whole
        # documents, so read_document need not fetch them again.
        self._documents: dict[str, bytes] = {}
        self._root: Descriptor | None = None

    def _fetch(self, reference: str, *, missing_ok: bool) -> Descriptor | None:
        found = self.client.get_manifest(reference, missing_ok=missing_ok)
        if found is None:
            return None
        data, descriptor = found
        self._documents[descriptor.digest] = data
        return descriptor

    def root(self) -> Descriptor:
        if self._root is None:
            descriptor = self._fetch(self._ref.reference, missing_ok=False)
            assert descriptor is not None
            self._root = descriptor
        return self._root

    def resolve_tag(self, tag: str) -> Descriptor | None:
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag {tag[:80]!r}")
        return self._fetch(tag, missing_ok=True)

    def read_document(self, descriptor: Descriptor, limit: int) -> bytes:
        item = f"blob {descriptor.digest}"
        if descriptor.size > limit:
            raise FormatError(item, f"{descriptor.size} bytes exceeds the limit of {limit}")
        if descriptor.media_type in MANIFEST_ACCEPT:
            data = self._documents.get(descriptor.digest)
            if data is None:
                found = self.client.get_manifest(descriptor.digest, limit=limit)
                assert found is not None
                data = found[0]
                self._documents[descriptor.digest] = data
            if len(data) != descriptor.size:
                raise FormatError(item, f"{len(data)} bytes, descriptor says {descriptor.size}")
            return data
        return b"".join(self.client.iter_blob(descriptor))

    def iter_blob(self, descriptor: Descriptor) -> Iterator[bytes]:
        return self.client.iter_blob(descriptor, self._progress)

    def close(self) -> None:
        self.client.close()


class RegistryDestination(ImageDestination):
    """``docker://HOST/REPO[:TAG]`` as a destination.

    Blobs are uploaded as they come (a registry cannot take them back, but unreferenced blobs are
    unreachable and garbage-collected). Manifests are only recorded by :meth:`put_manifest` and pushed
    by :meth:`commit`, in the order they were put (callers put children before the index that lists
    them), by tag when one is given and by digest otherwise. If ``commit`` fails half-way, the
    manifests already pushed stay; the tagged one is normally last, so no tag then points anywhere new.
    """

    supports_encryption = True
    supports_extra_tags = True

    def __init__(self, ref: RegistryRef, options: TransportOptions, *, progress: Progress = no_progress,
                 environ: Mapping[str, str] | None = None) -> None:
        self.name = str(ref)
        self.tag = ref.tag
        self._ref = ref
        self._progress = progress
        self.client = RegistryClient(ref.host, ref.repository, options, actions=("pull", "push"),
                                     environ=environ)
        self._pending: list[tuple[bytes, Descriptor, str | None]] = []
        self._done = False

    def _check_open(self) -> None:
        if self._done:
            raise UsageError(f"{self.name}: destination already committed or aborted")

    def has_blob(self, descriptor: Descriptor) -> bool:
        self._check_open()
        return self.client.has_blob(descriptor)

    def put_blob(
        self, chunks: Iterable[bytes], media_type: str, *, expected: Descriptor | None = None
    ) -> Descriptor:
        self._check_open()
        if expected is not None and self.client.has_blob(expected):
            for _ in chunks:  # drain the source so its digest check still runs
                pass
            return expected
        return self.client.upload_blob(chunks, media_type, expected=expected, progress=self._progress)

    def put_manifest(self, data: bytes, media_type: str, *, tag: str | None) -> Descriptor:
        self._check_open()
        if media_type not in MANIFEST_ACCEPT:
            raise FormatError("manifest", f"media type {media_type!r} is not a manifest or index type")
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError("manifest", f"{len(data)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        if tag is not None and not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag {tag[:80]!r}")
        descriptor = Descriptor(media_type=media_type, digest=sha256_digest(data), size=len(data))
        self._pending.append((bytes(data), descriptor, tag))
        return descriptor

    def commit(self) -> None:
        if self._done:
            return
        for data, descriptor, tag in self._pending:
            reference = tag if tag is not None else descriptor.digest
            self.client.put_manifest(reference, data, descriptor.media_type)
        self._pending.clear()
        self._done = True
        self.client.close()

    def abort(self) -> None:
        if self._done:
            return
        self._pending.clear()
        self._done = True
        self.client.close()


__all__ = [
    "DOCKER_HUB_API",
    "MANIFEST_ACCEPT",
    "Challenge",
    "Credentials",
    "RegistryClient",
    "RegistryDestination",
    "RegistrySource",
    "auth_file_paths",
    "credentials_from_auth_files",
    "is_loopback",
    "parse_auth_file",
    "parse_challenge",
    "parse_error_body",
    "registry_base_url",
]

