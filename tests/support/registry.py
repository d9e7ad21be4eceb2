"""A real, throw-away OCI distribution registry (Debian's ``docker-registry``) for tests.

:func:`running_registry` writes a configuration into a fresh directory, starts
``/usr/bin/docker-registry serve`` on 127.0.0.1 with a free port, waits until ``/v2/`` answers and
stops it afterwards. Storage is the directory itself, so every registry starts empty.

The fixture ``registry`` gives a plain-HTTP registry without authentication for one test; tests that
need TLS or authentication call :func:`running_registry` with the options they need.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hmac
import http.server
import ipaddress
import json
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coffer._internal.net import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class RegistryServer:
    """A running registry: ``host`` is ``127.0.0.1:PORT`` (what goes after ``docker://``)."""

    host: str
    url: str
    root: Path
    ca_file: Path | None = None


def registry_available() -> str | None:
    """None when a registry can be started here, else the reason why not."""
    if shutil.which(REGISTRY_BIN) is None and not Path(REGISTRY_BIN).exists():
        return "Debian's docker-registry is not installed (apt-get install docker-registry)"
    return None


def _yaml(obj: Any, indent: int = 0) -> str:
    """Just enough YAML for a registry configuration (nested string/int/bool maps and lists)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in obj.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(value, indent + 1))
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(repr(str(v)) for v in value)}]")
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}")
        else:
            lines.append(f"{pad}{key}: {value!r}" if isinstance(value, str) else f"{pad}{key}: {value}")
    return "\n".join(lines)


@contextlib.contextmanager
def running_registry(
    root: Path,
    *,
    http_extra: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    ca_file: Path | None = None,
) -> Iterator[RegistryServer]:
    """Start a registry storing under ``root``; ``http_extra`` adds to the ``http`` section (e.g. a
    ``tls`` block, then pass the CA as ``ca_file``), ``auth`` is the ``auth`` section."""
    reason = registry_available()
    if reason is not None:
        pytest.skip(reason)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", **(http_extra or {})},
    }
    if auth:
        config["auth"] = auth
    config_path = root / "config.yml"
    config_path.write_text(_yaml(config) + "\n")
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
    )
    scheme = "https" if http_extra and "tls" in http_extra else "http"
    server = RegistryServer(host=f"127.0.0.1:{port}", url=f"{scheme}://127.0.0.1:{port}", root=root,
                            ca_file=ca_file)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()[-2000:]}")
            try:
                verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file \
                    else False
                httpx.get(f"{server.url}/v2/", verify=verify, timeout=2.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not answer in time") from None
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A plain-HTTP registry without authentication on 127.0.0.1, empty, for one test."""
    with running_registry(tmp_path / "registry") as server:
        yield server


# --------------------------------------------------------------------------------------------------
# TLS: a throw-away CA and certificates for 127.0.0.1


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key, as PEM files (and the objects, for signing)."""

    cert_file: Path
    key_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertifiedKey:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    return CertifiedKey(cert_file, key_file, cert, key)


def make_ca(directory: Path, common_name: str = "Coffer test CA") -> CertifiedKey:
    """A self-signed CA (P-256), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, "ca", cert, key)


def issue_cert(ca: CertifiedKey, directory: Path, stem: str, *, server: bool = True) -> CertifiedKey:
    """A leaf certificate signed by ``ca``: a TLS server certificate for 127.0.0.1 and localhost, or
    (``server=False``) a signing certificate (the token server's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"coffer test {stem}"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return _write_pair(directory, stem, cert, key)


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1; ``http_extra`` goes to :func:`running_registry`."""

    ca: CertifiedKey
    server: CertifiedKey

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_file

    @property
    def http_extra(self) -> dict[str, Any]:
        return {"tls": {"certificate": str(self.server.cert_file), "key": str(self.server.key_file)}}


def make_tls(directory: Path) -> TlsFiles:
    ca = make_ca(directory)
    return TlsFiles(ca=ca, server=issue_cert(ca, directory, "server"))


# --------------------------------------------------------------------------------------------------
# Basic authentication (htpasswd, bcrypt)


def htpasswd_auth(directory: Path, users: dict[str, str]) -> dict[str, Any]:
    """Write an htpasswd file for ``users`` and return the registry's ``auth`` section for it.

    Python's bcrypt writes ``$2b$`` hashes, which the registry's Go bcrypt accepts as it does ``$2y$``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "htpasswd"
    path.write_text(
        "".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for user, pw in users.items())
    )
    return {"htpasswd": {"realm": "coffer-test", "path": str(path)}}


# --------------------------------------------------------------------------------------------------
# Token authentication: a tiny token server issuing ES256 JWTs the registry trusts

TOKEN_ISSUER = "coffer-test-token-issuer"
TOKEN_SERVICE = "coffer-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _QuietServer(http.server.ThreadingHTTPServer):
    """Clients hanging up early (as they should on an oversized answer) are not errors here."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@dataclass
class TokenServer:
    """A running token server; ``requests`` records (account, scopes) of each token request."""

    realm: str
    signer: CertifiedKey
    ca: CertifiedKey
    users: dict[str, str]
    requests: list[tuple[str | None, list[str]]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, Any]:
        """The registry's ``auth`` section trusting this server."""
        return {"token": {"realm": self.realm, "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
                          "rootcertbundle": str(self.ca.cert_file)}}

    def issue(self, account: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name and account is not None:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        leaf = base64.b64encode(self.signer.cert.public_bytes(serialization.Encoding.DER)).decode()
        header = {"typ": "JWT", "alg": "ES256", "x5c": [leaf]}
        claims = {"iss": TOKEN_ISSUER, "sub": account or "", "aud": TOKEN_SERVICE, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode()))
        der = self.signer.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def check(self, authorization: str | None) -> tuple[bool, str | None]:
        """(allowed, account) for a request's Authorization header; no header is anonymous."""
        if authorization is None:
            return True, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return False, None
        return True, user


@contextlib.contextmanager
def running_token_server(directory: Path, users: dict[str, str]) -> Iterator[TokenServer]:
    """Serve ``GET /token`` on 127.0.0.1 (plain http) in a thread; anonymous requests get a token
    without access rights, wrong credentials a 401."""
    ca = make_ca(directory / "token-ca", "Coffer test token CA")
    signer = issue_cert(ca, directory / "token-ca", "token-signer", server=False)
    holder: list[TokenServer] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server = holder[0]
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            allowed, account = server.check(self.headers.get("Authorization"))
            if url.path != "/token" or not allowed:
                self.send_response(404 if url.path != "/token" else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            scopes = query.get("scope", [])
            server.requests.append((account, scopes))
            token = server.issue(account, scopes)
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    holder.append(TokenServer(realm=f"http://127.0.0.1:{port}/token", signer=signer, ca=ca, users=users))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# --------------------------------------------------------------------------------------------------
# A scripted registry that says whatever a test wants (lies included)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunked: bool = False  # send without Content-Length (Transfer-Encoding: chunked)


@dataclass
class ScriptedRegistry:
    """``routes`` maps (method, path) to a :class:`Reply`; unknown routes answer 404 with an error
    document, ``GET /v2/`` answers 200 unless routed. ``seen`` records (method, path)."""

    host: str
    routes: dict[tuple[str, str], Reply] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def scripted_registry() -> Iterator[ScriptedRegistry]:
    holder: list[ScriptedRegistry] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            try:
                self._reply()
            except OSError:  # the client hung up early, as it should on an oversized answer
                self.close_connection = True

        def _reply(self) -> None:
            server = holder[0]
            path = urllib.parse.urlsplit(self.path).path
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            server.seen.append((self.command, path))
            reply = server.routes.get((self.command, path))
            if reply is None and path == "/v2/":
                reply = Reply(200, {}, b"{}")
            if reply is None:
                reply = Reply(404, {"Content-Type": "application/json"},
                              b'{"errors":[{"code":"NOT_FOUND","message":"not scripted"}]}')
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self.command != "HEAD":
                    for start in range(0, len(reply.body), 65536):
                        piece = reply.body[start : start + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                return
            if "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    holder.append(ScriptedRegistry(host=f"127.0.0.1:{httpd.server_address[1]}"))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
