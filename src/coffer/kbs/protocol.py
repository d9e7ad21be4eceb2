"""Wire models of the Trustee KBS protocol, version 0.4.0 (the RCAR handshake and its errors).

Both sides use these: the KBS parses what guests send with the strict ``parse_*`` functions, the
guest client builds its messages with the same models, and ``to_json()`` gives the JSON object each
model is sent as. Field names are the ones on the wire (``extra-params``, ``tee-pubkey``,
``primary_evidence``...), which mix kebab and snake case exactly as Trustee does.

Bad input raises :class:`coffer.errors.ProtocolError` whose ``kind`` is the Trustee error type name
(and so decides the HTTP status through :data:`ERROR_STATUS`) and whose ``detail`` reads like
Trustee's message for the same failure. Details name fields, never values: a nonce or key is public,
but evidence and resources are not echoed back.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from coffer._internal.encoding import load_json_object
from coffer.attestation.binding import InitData, runtime_data_preimage
from coffer.errors import FormatError, ProtocolError

PROTOCOL_VERSION: Final = "0.4.0"
_VERSION_TRIPLE: Final = (0, 4, 0)

KBS_PREFIX: Final = "/kbs/v0"
SESSION_COOKIE: Final = "kbs-session-id"
ERROR_TYPE_PREFIX: Final = "https://github.com/confidential-containers/kbs/errors/"

# Largest request body accepted (Trustee's default ``payload_request_size`` is 2 MiB).
MAX_BODY_BYTES: Final = 2 * 1024 * 1024

# Largest ``extra-params`` an ``/auth`` request may carry, serialised as compact JSON. Real guests
# send ``""`` or a short object (offered hash algorithms); the session keeps what is accepted here.
MAX_EXTRA_PARAMS_BYTES: Final = 4 * 1024

# TEE names as they appear on the wire (kbs-types ``Tee`` serde names).
TEE_NAMES: Final = frozenset({
    "az-snp-vtpm", "az-tdx-vtpm", "cca", "csv", "hygondcu", "nvidia", "sample", "sampledevice",
    "se", "sgx", "snp", "tdx", "tpm",
})

# Hash algorithms the guest offers in ``extra-params`` (kbs-types ``HashAlgorithm``, lowercase).
HASH_ALGORITHMS: Final = ("sha256", "sha384", "sha512")
DEFAULT_HASH_ALGORITHM: Final = "sha384"

# Every Trustee error type name. Trustee answers 404 only for a bad path or an unknown plugin;
# everything else is 401, which tells a guest to run the handshake again.
ERROR_KINDS: Final = (
    "AdminAuthInitialization", "AdminAuthAccess", "AttestationError", "HTTPFailed", "HTTPSFailed",
    "InvalidRequestPath", "JweError", "PluginManagerInitialization", "PluginNotFound",
    "PluginInternalError", "PolicyDeny", "ParsePolicyError", "PolicyEngineError", "RvpsError",
    "SerdeError", "StorageBackendInitialization", "TokenNotFound", "TokenVerifierError",
    "PrometheusError",
)
_NOT_FOUND_KINDS: Final = frozenset({"InvalidRequestPath", "PluginNotFound"})
ERROR_STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {kind: 404 if kind in _NOT_FOUND_KINDS else 401 for kind in ERROR_KINDS})

AUTH_FAILED: Final = "Attestation error: RCAR handshake Auth failed"
ATTEST_FAILED: Final = "Attestation error: RCAR handshake Attest failed"

_NONCE_BYTES: Final = 32
_SEMVER = re.compile(
    r"\A(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")
_SEGMENT = r"[a-zA-Z0-9_\-]+[a-zA-Z0-9_\-.]*"
_RESOURCE_PATH = re.compile(rf"\A(?P<repo>{_SEGMENT})/(?P<type>{_SEGMENT})/(?P<tag>{_SEGMENT})\Z")
_MAX_RESOURCE_PATH = 1024


def status_for(kind: str) -> int:
    """HTTP status Trustee uses for an error kind (401 for any kind it does not list)."""
    return ERROR_STATUS.get(kind, 401)


def auth_failed(cause: str) -> ProtocolError:
    """The error ``/auth`` reports, with Trustee's message shape."""
    return ProtocolError("AttestationError", f"{AUTH_FAILED}: {cause}")


def attest_failed(cause: str) -> ProtocolError:
    """The error ``/attest`` reports, with Trustee's message shape."""
    return ProtocolError("AttestationError", f"{ATTEST_FAILED}: {cause}")


def make_nonce() -> str:
    """A fresh challenge nonce: standard base64 (padded) of 32 random bytes, 44 characters."""
    return base64.b64encode(secrets.token_bytes(_NONCE_BYTES)).decode("ascii")


# --------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True, kw_only=True)
class Request:
    """``POST /kbs/v0/auth`` body: the guest's protocol version, TEE and extra parameters."""

    version: str
    tee: str
    extra_params: Any = field(default="", hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "tee": self.tee, "extra-params": self.extra_params}

    def supported_hash_algorithms(self) -> tuple[str, ...]:
        """What the guest offered in ``extra-params`` (empty for old guests that send ``""``)."""
        if isinstance(self.extra_params, Mapping):
            offered = self.extra_params.get("supported-hash-algorithms")
            if isinstance(offered, list):
                return tuple(a for a in offered if isinstance(a, str))
        return ()


@dataclass(frozen=True, kw_only=True)
class Challenge:
    """``/auth`` response body: the nonce to bind, and extra parameters (``""`` except for IBM SE)."""

    nonce: str
    extra_params: Any = field(default="", hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "extra-params": self.extra_params}

    def hash_algorithm(self) -> str:
        """The runtime-data hash the KBS selected; SHA-384 unless ``extra-params`` says otherwise."""
        if isinstance(self.extra_params, Mapping):
            selected = self.extra_params.get("selected-hash-algorithm")
            if isinstance(selected, str) and selected in HASH_ALGORITHMS:
                return selected
        return DEFAULT_HASH_ALGORITHM


@dataclass(frozen=True, kw_only=True)
class RuntimeData:
    """The nonce from the challenge and the guest's ephemeral public key (a JWK)."""

    nonce: str
    tee_pubkey: dict[str, Any] = field(hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "tee-pubkey": dict(self.tee_pubkey)}


@dataclass(frozen=True, kw_only=True)
class TeeEvidence:
    """Composite evidence: the primary TEE's JSON, and other devices' evidence as a JSON *string*."""

    primary_evidence: Any = field(hash=False)
    additional_evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"primary_evidence": self.primary_evidence, "additional_evidence": self.additional_evidence}


@dataclass(frozen=True, kw_only=True)
class Attestation:
    """``POST /kbs/v0/attest`` body."""

    init_data: InitData | None
    runtime_data: RuntimeData
    tee_evidence: TeeEvidence

    def to_json(self) -> dict[str, Any]:
        init = None if self.init_data is None else {"format": self.init_data.format,
                                                    "body": self.init_data.body}
        return {
            "init-data": init,
            "runtime-data": self.runtime_data.to_json(),
            "tee-evidence": self.tee_evidence.to_json(),
        }

    def primary_runtime_data(self) -> dict[str, Any]:
        """``{"additional-evidence", "nonce", "tee-pubkey"}``: the structure the primary evidence binds
        in protocol 0.4.0 (its digest is what the TEE report carries)."""
        return runtime_data_preimage(self.runtime_data.nonce, self.runtime_data.tee_pubkey,
                                     self.tee_evidence.additional_evidence)


@dataclass(frozen=True, kw_only=True)
class ErrorInformation:
    """Error body of every non-200 KBS answer (RFC 7807 style)."""

    kind: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"type": ERROR_TYPE_PREFIX + self.kind, "detail": self.detail}

    @property
    def status(self) -> int:
        return status_for(self.kind)

    @classmethod
    def from_error(cls, error: ProtocolError) -> ErrorInformation:
        return cls(kind=error.kind, detail=error.detail)

    def to_error(self) -> ProtocolError:
        return ProtocolError(self.kind, self.detail)


# --------------------------------------------------------------------------------------------------
# Strict parsers


_Fail = Callable[[str], ProtocolError]


def _client_failed(cause: str) -> ProtocolError:
    return ProtocolError("SerdeError", f"malformed KBS response: {cause}")


def _load(data: bytes, what: str, fail: _Fail) -> dict[str, Any]:
    try:
        return load_json_object(data, what, max_bytes=MAX_BODY_BYTES)
    except FormatError as exc:
        raise fail(f"deserialize {what}: {exc.reason}") from exc


def _string(obj: Mapping[str, Any], key: str, what: str, fail: _Fail) -> str:
    if key not in obj:
        raise fail(f"deserialize {what}: missing field `{key}`")
    value = obj[key]
    if not isinstance(value, str):
        raise fail(f"deserialize {what}: field `{key}` must be a string")
    return value


def _object(obj: Mapping[str, Any], key: str, what: str, fail: _Fail) -> dict[str, Any]:
    if key not in obj:
        raise fail(f"deserialize {what}: missing field `{key}`")
    value = obj[key]
    if not isinstance(value, dict):
        raise fail(f"deserialize {what}: field `{key}` must be an object")
    return value


def check_version(version: str) -> None:
    """Trustee's exact semver requirement ``=0.4.0`` (build metadata ignored, pre-releases refused)."""
    match = _SEMVER.match(version)
    if match is None:
        raise auth_failed("failed to parse KBS version")
    triple = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    if triple != _VERSION_TRIPLE or match.group(4) is not None:
        raise auth_failed(f"KBS Client Protocol Version Mismatch: expect ={PROTOCOL_VERSION} "
                          f"while the request is {version[:64]}")


def parse_request(data: bytes) -> Request:
    """Parse and check an ``/auth`` body: JSON shape, known TEE name, protocol version 0.4.0."""
    obj = _load(data, "Request", auth_failed)
    version = _string(obj, "version", "Request", auth_failed)
    tee = _string(obj, "tee", "Request", auth_failed)
    if tee not in TEE_NAMES:
        raise auth_failed("deserialize Request: unknown variant for field `tee`")
    if "extra-params" not in obj:
        raise auth_failed("deserialize Request: missing field `extra-params`")
    check_version(version)
    extra_params = obj["extra-params"]
    size = len(json.dumps(extra_params, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > MAX_EXTRA_PARAMS_BYTES:
        raise auth_failed(f"field `extra-params` is larger than {MAX_EXTRA_PARAMS_BYTES} bytes")
    return Request(version=version, tee=tee, extra_params=extra_params)


def parse_challenge(data: bytes) -> Challenge:
    """Parse an ``/auth`` answer (guest side)."""
    obj = _load(data, "Challenge", _client_failed)
    nonce = _string(obj, "nonce", "Challenge", _client_failed)
    if not nonce:
        raise _client_failed("deserialize Challenge: empty nonce")
    if "extra-params" not in obj:
        raise _client_failed("deserialize Challenge: missing field `extra-params`")
    return Challenge(nonce=nonce, extra_params=obj["extra-params"])


def normalize_tee_pubkey(value: Any, *, what: str = "tee-pubkey") -> dict[str, Any]:
    """The guest key as kbs-types ``TeePubKey`` carries it: ``kty`` tag plus its fields, others dropped.

    Trustee re-serializes the typed key before hashing the runtime data, so unknown members never
    reach the report-data pre-image; dropping them here keeps both sides hashing the same bytes.
    Supported families are checked by the JWE layer, not here.
    """
    if not isinstance(value, dict):
        raise attest_failed(f"deserialize Attestation: `{what}` must be an object")
    kty = value.get("kty")
    if kty == "EC":
        names: tuple[str, ...] = ("crv", "alg", "x", "y")
    elif kty == "RSA":
        names = ("alg", "n", "e")
    else:
        raise attest_failed(f"deserialize Attestation: unknown `kty` of `{what}`")
    out: dict[str, Any] = {"kty": kty}
    for name in names:
        member = value.get(name)
        if not isinstance(member, str):
            raise attest_failed(f"deserialize Attestation: `{what}` field `{name}` missing or not a string")
        out[name] = member
    return out


def _init_data(value: Any) -> InitData | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise attest_failed("deserialize Attestation: `init-data` must be an object or null")
    fmt = _string(value, "format", "Attestation init-data", attest_failed)
    body = _string(value, "body", "Attestation init-data", attest_failed)
    return InitData(format=fmt, body=body)


def parse_attestation(data: bytes) -> Attestation:
    """Parse an ``/attest`` body (protocol 0.4.0 shape; unknown members are ignored like serde does)."""
    obj = _load(data, "Attestation", attest_failed)
    init_data = _init_data(obj.get("init-data"))
    runtime = _object(obj, "runtime-data", "Attestation", attest_failed)
    nonce = _string(runtime, "nonce", "Attestation runtime-data", attest_failed)
    if "tee-pubkey" not in runtime:
        raise attest_failed("deserialize Attestation: missing field `tee-pubkey`")
    pubkey = normalize_tee_pubkey(runtime["tee-pubkey"])
    evidence = _object(obj, "tee-evidence", "Attestation", attest_failed)
    if "primary_evidence" not in evidence:
        raise attest_failed("deserialize Attestation: missing field `primary_evidence`")
    additional = _string(evidence, "additional_evidence", "Attestation tee-evidence", attest_failed)
    return Attestation(
        init_data=init_data,
        runtime_data=RuntimeData(nonce=nonce, tee_pubkey=pubkey),
        tee_evidence=TeeEvidence(primary_evidence=evidence["primary_evidence"],
                                 additional_evidence=additional),
    )


def parse_error_information(data: bytes) -> ErrorInformation:
    """Parse an error body (guest side). A ``type`` outside Trustee's URL space is kept whole."""
    obj = _load(data, "ErrorInformation", _client_failed)
    type_url = _string(obj, "type", "ErrorInformation", _client_failed)
    detail = _string(obj, "detail", "ErrorInformation", _client_failed)
    kind = type_url.removeprefix(ERROR_TYPE_PREFIX) if type_url.startswith(ERROR_TYPE_PREFIX) else type_url
    if not kind:
        raise _client_failed("deserialize ErrorInformation: empty error type")
    return ErrorInformation(kind=kind, detail=detail)


def parse_token_response(data: bytes) -> str:
    """The ``/attest`` answer ``{"token": "<JWT>"}`` (guest side)."""
    obj = _load(data, "attestation response", _client_failed)
    token = _string(obj, "token", "attestation response", _client_failed)
    if token.count(".") != 2:
        raise _client_failed("attestation token is not a compact JWS")
    return token


# --------------------------------------------------------------------------------------------------
# Resource paths


def parse_resource_path(path: str) -> tuple[str, str, str]:
    """Split ``repo/type/tag`` (Trustee's resource plugin regex: three segments of
    ``[A-Za-z0-9_-]`` then ``[A-Za-z0-9_.-]*``). Anything else is Trustee's ``PluginInternalError``."""
    match = _RESOURCE_PATH.match(path) if len(path) <= _MAX_RESOURCE_PATH else None
    if match is None:
        raise ProtocolError("PluginInternalError",
                            "Plugin internal error: resource path must be <repository>/<type>/<tag>")
    return match.group("repo"), match.group("type"), match.group("tag")


def parse_resource_uri(uri: str) -> str:
    """``kbs:///repo/type/tag`` (or ``kbs://<host>/repo/type/tag``, or a bare ``repo/type/tag``) to the
    checked ``repo/type/tag`` path. The host part, like in the guest, is ignored."""
    if uri.startswith("kbs://"):
        rest = uri[len("kbs://"):]
        slash = rest.find("/")
        if slash < 0:
            raise ProtocolError("PluginInternalError", "Plugin internal error: kbs:// URI without a path")
        rest = rest[slash + 1:]
    else:
        rest = uri.removeprefix("/")
    parse_resource_path(rest)
    return rest
