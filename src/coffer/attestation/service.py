"""The attestation service: Trustee-shaped evidence in, an EAR token out.

:meth:`AttestationService.attest` runs, in order:

1. adapt the ``primary_evidence`` JSON the guest sent (Trustee's attester shapes, see
   :func:`evidence_bytes`) into what the evidence library verifies;
2. compute the report data the evidence must carry: D = SHA-384(JCS(runtime data)) where the runtime
   data is ``{"additional-evidence", "nonce", "tee-pubkey"}``, placed per TEE by
   :func:`~coffer.attestation.binding.report_data_for`;
3. verify the evidence (:func:`coffer.evidence.verify`, at the service clock's time, with the
   registered ``trusted_ak`` reference values as trusted TPM attestation keys); a rejection raises
   :class:`~coffer.errors.VerificationError` naming the verifier's step; an SNP report from any VMPL
   but 0 is refused here (step "check VMPL"), and non-empty ``additional_evidence`` is refused up
   front (device evidence is not verified yet);
4. check init-data, when the guest sent it: its digest must be what the TEE's launch-time register
   holds (HOST_DATA, MRCONFIGID, CONFIGID, PCR 8); a mismatch is a VerificationError at the step after
   the verifier's last one;
5. appraise: the Rego policy (``default`` unless replaced) turns the claims and the reference values
   into an AR4SI trust vector, and the vector into ``ear.status``;
6. issue the EAR token (ES256), valid for ``token_ttl``.

Requests that do not have the expected shape raise ``ProtocolError("AttestationError", ...)``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from coffer import __version__
from coffer._internal.clock import utc_now
from coffer._internal.encoding import b64_decode, load_json_object, to_jsonable
from coffer.attestation.binding import (
    MAX_INITDATA_DEPTH,
    InitData,
    check_nesting,
    initdata_digest,
    initdata_expected,
    parse_initdata,
    report_data_for,
    runtime_data_digest,
)
from coffer.attestation.policy import (
    DEFAULT_CPU_POLICY,
    DEFAULT_POLICY_ID,
    Appraisal,
    canonical_policy_id,
    compiled,
)
from coffer.attestation.reference_values import TRUSTED_AK, ReferenceValues
from coffer.attestation.token import TokenSigner, TokenVerifier
from coffer.errors import FormatError, ProtocolError, VerificationError
from coffer.evidence import verify as verify_evidence_bytes
from coffer.evidence.base import VerifyOptions
from coffer.evidence.collateral import CollateralSource
from coffer.kbs.store import NS_POLICIES, Store

EAT_PROFILE = "tag:github.com,2024:confidential-containers/Trustee"
DEFAULT_ISSUER = "coffer-attestation-service"
VERIFIER_ID = {"developer": "coffer", "build": f"coffer-attestation-service {__version__}"}
POLICY_KEY_PREFIX = "attestation-policy/"
POLICY_ID_RE = re.compile(r"\A[A-Za-z0-9_.\-]{1,64}\Z")
SUPPORTED_TEES = ("sample", "snp", "tdx", "sgx", "tpm", "az-snp-vtpm", "az-tdx-vtpm")
MAX_QUOTE_BYTES = 64 * 1024
MAX_EVENT_LOG_BYTES = 4 * 1024 * 1024
_INITDATA_CLAIM_KEYS_AS_TOML = ("aa.toml", "cdh.toml")
SNP_REQUIRED_VMPL = 0


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("AttestationError", detail)


@dataclass(frozen=True, kw_only=True)
class AttestationResult:
    """The issued token and its claims (the JWT payload)."""

    token: str
    claims: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class VerifiedEvidence:
    """Verified claims as JSON (``claims``), the report data the hardware carried, and the value of
    the register init-data is bound to (None when the TEE form has none)."""

    tee: str
    claims: dict[str, Any]
    report_data: bytes
    init_field: bytes | None


# --------------------------------------------------------------------------------------------------
# Evidence adaptation


def _object(primary_evidence: Any) -> dict[str, Any]:
    if isinstance(primary_evidence, bytes | str):
        raw = primary_evidence.encode() if isinstance(primary_evidence, str) else primary_evidence
        try:
            return load_json_object(raw, "primary evidence")
        except FormatError as exc:
            raise _bad(f"primary evidence: {exc}") from exc
    if not isinstance(primary_evidence, Mapping):
        raise _bad("primary evidence must be a JSON object")
    return dict(primary_evidence)


def _std_b64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 8:
        raise _bad(f"{what} must be a base64 string of at most {limit} bytes")
    try:
        return b64_decode(value, what)
    except FormatError as exc:
        raise _bad(f"{what} is not base64") from exc


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def is_trustee_sample(doc: Mapping[str, Any]) -> bool:
    """Trustee's unsigned sample form ``{"svn": "1", "report_data": "<base64>"}``."""
    return "signature" not in doc and "report_data" in doc and set(doc) <= {"svn", "report_data"}


def evidence_bytes(tee: str, primary_evidence: Any) -> tuple[bytes, bytes | None]:
    """The bytes the evidence library verifies for a Trustee primary evidence, and (TDX) the CC event
    log carried next to the quote."""
    doc = _object(primary_evidence)
    if tee in ("tdx", "sgx"):
        unknown = set(doc) - {"quote", "cc_eventlog", "aa_eventlog", "quote_type"}
        if unknown:
            raise _bad(f"{tee} evidence has unknown field(s) {sorted(unknown)}")
        quote = _std_b64(doc.get("quote"), f"{tee} quote", MAX_QUOTE_BYTES)
        log_value = doc.get("cc_eventlog")
        log = None if log_value in (None, "") else _std_b64(log_value, "cc_eventlog", MAX_EVENT_LOG_BYTES)
        return quote, log
    if tee == "snp" and "attestation_report" not in doc:
        raise _bad("snp evidence needs attestation_report")
    return _json_bytes(doc), None


class AttestationService:
    """Verifies evidence, appraises it and issues EAR tokens. Thread-safe.

    ``collateral`` supplies SNP endorsements and Intel collateral; ``clock`` is the time every
    validity window is checked at and tokens are stamped with; ``allow_debug`` lets debug guests
    through verification (the default policy still rates them contraindicated); ``cache_seconds``
    bounds how long policies and reference values read from the store are reused (local writes are
    seen at once, another replica's within that time).
    """

    def __init__(self, store: Store, *, collateral: CollateralSource,
                 clock: Callable[[], datetime] = utc_now,
                 token_ttl: timedelta = timedelta(minutes=5), issuer: str = DEFAULT_ISSUER,
                 allow_debug: bool = False, cache_seconds: float = 1.0) -> None:
        self.store = store
        self.collateral = collateral
        self.clock = clock
        self.token_ttl = token_ttl
        self.issuer = issuer
        self.allow_debug = allow_debug
        self.reference_values = ReferenceValues(store, clock=clock, cache_seconds=cache_seconds)
        self.signer = TokenSigner(store, clock=clock)
        self._cache_seconds = cache_seconds
        self._policy_lock = threading.Lock()
        self._policy_cache: dict[str, tuple[float, str | None]] = {}

    # -- policies ---------------------------------------------------------------------------------

    def set_policy(self, policy_id: str, rego_text: str) -> None:
        """Store an appraisal policy after compiling it (FormatError when it does not compile or
        lacks ``package policy``). ``default``/``default_cpu`` replace the built-in default."""
        key = self._policy_key(policy_id)
        compiled(rego_text)
        self.store.put(NS_POLICIES, key, rego_text.encode("utf-8"))
        with self._policy_lock:
            self._policy_cache.pop(key, None)

    def get_policy(self, policy_id: str) -> str | None:
        """The policy text (the built-in one for ``default`` unless replaced), or None."""
        text = self._stored_policy(self._policy_key(policy_id), cached=False)
        if text is None and canonical_policy_id(policy_id) == DEFAULT_POLICY_ID:
            return DEFAULT_CPU_POLICY
        return text

    def delete_policy(self, policy_id: str) -> bool:
        """Remove a stored policy (``default`` falls back to the built-in one)."""
        key = self._policy_key(policy_id)
        removed = self.store.delete(NS_POLICIES, key)
        with self._policy_lock:
            self._policy_cache.pop(key, None)
        return removed

    def list_policies(self) -> dict[str, str]:
        """policy id -> ``stored`` or ``built-in``."""
        out = {DEFAULT_POLICY_ID: "built-in"}
        for entry in self.store.list_entries(NS_POLICIES, prefix=POLICY_KEY_PREFIX, now=self.clock()):
            out[entry.key.removeprefix(POLICY_KEY_PREFIX)] = "stored"
        return out

    @staticmethod
    def _policy_key(policy_id: str) -> str:
        if not isinstance(policy_id, str) or not POLICY_ID_RE.match(policy_id):
            raise FormatError("attestation policy",
                              f"policy id {policy_id!r} must match {POLICY_ID_RE.pattern}")
        return POLICY_KEY_PREFIX + canonical_policy_id(policy_id)

    def _stored_policy(self, key: str, *, cached: bool = True) -> str | None:
        tick = time.monotonic()
        if cached:
            with self._policy_lock:
                hit = self._policy_cache.get(key)
            if hit is not None and tick - hit[0] < self._cache_seconds:
                return hit[1]
        entry = self.store.get(NS_POLICIES, key, now=self.clock())
        text = entry.value.decode("utf-8") if entry is not None else None
        with self._policy_lock:
            self._policy_cache[key] = (tick, text)
        return text

    def _policy_text(self, policy_id: str) -> str:
        text = self._stored_policy(self._policy_key(policy_id))
        if text is not None:
            return text
        if canonical_policy_id(policy_id) == DEFAULT_POLICY_ID:
            return DEFAULT_CPU_POLICY
        raise _bad(f"no attestation policy {policy_id!r}")

    # -- tokens -----------------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        return self.signer.jwks()

    def token_verifier(self, *, leeway_seconds: int = 0) -> TokenVerifier:
        """A verifier trusting this service's signing key."""
        return TokenVerifier(self.jwks(), leeway_seconds=leeway_seconds)

    # -- verification -----------------------------------------------------------------------------

    def verify_evidence(self, tee: str, primary_evidence: Any, *, expected_report_data: bytes,
                        at: datetime | None = None,
                        reference: Mapping[str, Any] | None = None) -> VerifiedEvidence:
        """Adapt and verify one primary evidence against ``expected_report_data`` (already placed by
        the TEE's rule). Raises VerificationError or ProtocolError."""
        if tee not in SUPPORTED_TEES:
            raise _bad(f"TEE {tee!r} is not supported (supported: {', '.join(SUPPORTED_TEES)})")
        moment = at or self.clock()
        doc = _object(primary_evidence)
        if tee == "sample" and is_trustee_sample(doc):
            return _verify_trustee_sample(doc, expected_report_data)
        data, event_log = evidence_bytes(tee, doc)
        snapshot = reference if reference is not None else self.reference_values.snapshot()
        trusted: tuple[bytes, ...] = ()
        if tee == "tpm":
            trusted = tuple(bytes.fromhex(v) for v in snapshot.get(TRUSTED_AK, ()) if isinstance(v, str))
        options = VerifyOptions(at=moment, expected_report_data=expected_report_data,
                                allow_debug=self.allow_debug, trusted_keys=trusted)
        claims = verify_evidence_bytes(tee, data, collateral=self.collateral, options=options)
        out = claims.to_dict()
        if tee == "snp" and out.get("vmpl") != SNP_REQUIRED_VMPL:
            # The evidence library verifies reports from any VMPL; a KBS releases secrets only to
            # the guest's most privileged context (as Trustee's SNP verifier does).
            raise VerificationError(tee, len(out.get("steps") or ()) + 1, "check VMPL",
                                    f"the report comes from VMPL {out.get('vmpl')}; only VMPL "
                                    f"{SNP_REQUIRED_VMPL} is accepted")
        if event_log is not None:
            out["cc_eventlog"] = _check_ccel(tee, event_log, out)
        return VerifiedEvidence(tee=tee, claims=out, report_data=claims.report_data,
                                init_field=_init_field(tee, out))

    def attest(self, *, tee: str, primary_evidence: Any, runtime_data: Mapping[str, Any],
               additional_evidence: str = "", init_data: InitData | None = None,
               policy_id: str = DEFAULT_POLICY_ID) -> AttestationResult:
        """Verify, appraise and issue a token (see the module docstring for the steps)."""
        if tee not in SUPPORTED_TEES:
            raise _bad(f"TEE {tee!r} is not supported (supported: {', '.join(SUPPORTED_TEES)})")
        if not isinstance(additional_evidence, str):
            raise _bad("additional_evidence must be a string")
        if additional_evidence:
            # Nothing verifies device evidence yet; fail closed rather than copy it, unverified,
            # into the token.
            raise _bad("additional device evidence is not supported yet")
        runtime = to_jsonable(dict(runtime_data))
        if runtime.get("additional-evidence", additional_evidence) != additional_evidence:
            raise _bad("runtime data names different additional evidence")
        runtime["additional-evidence"] = additional_evidence
        try:
            digest = runtime_data_digest(runtime)
            expected = report_data_for(tee, digest)
        except FormatError as exc:
            raise _bad(f"runtime data: {exc}") from exc
        now = self.clock()
        reference = self.reference_values.snapshot()
        verified = self.verify_evidence(tee, primary_evidence, expected_report_data=expected, at=now,
                                        reference=reference)
        init_claims = self._check_init_data(verified, init_data)
        annotated: dict[str, Any] = {
            "report_data": verified.report_data.hex(),
            "init_data": verified.init_field.hex() if verified.init_field is not None else "",
            "runtime_data_claims": runtime,
            "init_data_claims": init_claims,
            tee: verified.claims,
        }
        appraisal = self.appraise(annotated, policy_id=policy_id, reference=reference)
        iat = int(now.timestamp())
        # Policy extensions first, so the service's own claims always win over them.
        submod: dict[str, Any] = {
            **appraisal.extensions,
            "ear.status": appraisal.status,
            "ear.trustworthiness-vector": appraisal.trust_vector,
            "ear.appraisal-policy-id": policy_id,
            "ear.veraison.annotated-evidence": annotated,
        }
        # Everything below is JSON already (verified claims come from Claims.to_dict()).
        claims: dict[str, Any] = {
            "eat_profile": EAT_PROFILE,
            "iat": iat,
            "exp": iat + int(self.token_ttl.total_seconds()),
            "iss": self.issuer,
            "ear.verifier-id": VERIFIER_ID,
            "submods": {"cpu0": submod},
        }
        return AttestationResult(token=self.signer.issue(claims), claims=claims)

    def appraise(self, policy_input: Mapping[str, Any], *, policy_id: str = DEFAULT_POLICY_ID,
                 reference: Mapping[str, Any] | None = None) -> Appraisal:
        """Run the appraisal policy over a policy input (``{"<tee>": claims, ...}``)."""
        snapshot = reference if reference is not None else self.reference_values.snapshot()
        return compiled(self._policy_text(policy_id)).appraise(policy_id, policy_input, snapshot)

    def _check_init_data(self, verified: VerifiedEvidence,
                         init_data: InitData | None) -> dict[str, Any] | None:
        if init_data is None:
            return None
        tee = verified.tee
        step = len(verified.claims.get("steps") or ()) + 1
        if init_data.format != "toml":
            raise _bad(f"init-data format {init_data.format!r} is not supported (only toml)")
        body = init_data.body.encode("utf-8")
        try:
            _, digest = initdata_digest(body)
            claim, want = initdata_expected(tee, digest)
            doc = parse_initdata(body)
        except FormatError as exc:
            raise _bad(f"init-data: {exc}") from exc
        if verified.init_field is None:
            raise VerificationError(tee, step, "check init-data",
                                    f"this {tee} evidence carries no {claim} to bind init-data to")
        if verified.init_field != want:
            raise VerificationError(tee, step, "check init-data",
                                    f"{claim} {verified.init_field.hex()} is not the init-data digest "
                                    f"binding {want.hex()}")
        try:
            return _init_data_claims(doc)
        except FormatError as exc:
            raise _bad(f"init-data: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Helpers


def _verify_trustee_sample(doc: Mapping[str, Any], expected: bytes) -> VerifiedEvidence:
    svn = doc.get("svn", "")
    if not isinstance(svn, str | int) or isinstance(svn, bool):
        raise _bad("sample evidence svn must be a string")
    report_data = _std_b64(doc.get("report_data"), "sample report_data", 64)
    if report_data != expected:
        raise VerificationError("sample", 1, "check report data",
                                f"report data {report_data.hex()} does not match the expected "
                                f"{expected.hex()}")
    claims = {"tee": "sample", "insecure": True, "form": "trustee", "svn": str(svn),
              "report_data": report_data.hex(), "steps": ["1 check report data"]}
    return VerifiedEvidence(tee="sample", claims=claims, report_data=report_data, init_field=None)


def _pcr8(pcrs: Any) -> bytes | None:
    if isinstance(pcrs, Mapping):
        bank = pcrs.get("sha256")
        if isinstance(bank, Mapping) and isinstance(bank.get("8"), str):
            return bytes.fromhex(bank["8"])
    return None


def _init_field(tee: str, claims: Mapping[str, Any]) -> bytes | None:
    def hex_claim(value: Any) -> bytes | None:
        return bytes.fromhex(value) if isinstance(value, str) else None

    if tee == "snp":
        return hex_claim(claims.get("host_data"))
    if tee == "tdx":
        return hex_claim(claims.get("mr_config_id"))
    if tee == "sgx":
        return hex_claim(claims.get("config_id"))
    if tee == "sample":
        raw = hex_claim(claims.get("init_data"))
        return raw.ljust(64, b"\0") if raw is not None else None
    if tee == "tpm":
        return _pcr8(claims.get("pcrs"))
    tpm = claims.get("tpm")
    return _pcr8(tpm.get("pcrs")) if isinstance(tpm, Mapping) else None


def _check_ccel(tee: str, log: bytes, claims: Mapping[str, Any]) -> dict[str, Any]:
    from coffer.evidence.eventlog import replay_ccel  # noqa: PLC0415

    step = len(claims.get("steps") or ()) + 1
    try:
        result = replay_ccel(log)
        problems = result.mismatches([bytes.fromhex(claims[f"rtmr{i}"]) for i in range(4)])
    except FormatError as exc:
        raise VerificationError(tee, step, "replay CC event log", str(exc)) from exc
    if problems:
        raise VerificationError(tee, step, "replay CC event log", "; ".join(problems))
    summary: dict[str, Any] = result.to_dict()
    return summary


def _extract_policy_data(text: str) -> Any:
    """The JSON value after ``policy_data :=`` in an agent policy (None when there is none or it is
    not JSON). FormatError when it nests too deeply or holds a non-finite number."""
    marker = re.search(r"(?m)^\s*policy_data\s*:?=\s*", text)
    if marker is None:
        return None

    def no_constants(name: str) -> Any:
        raise FormatError("init-data policy_data", f"{name} is not valid JSON")

    try:
        value, _ = json.JSONDecoder(parse_constant=no_constants).raw_decode(text, marker.end())
    except RecursionError:
        raise FormatError("init-data policy_data", "nested too deeply") from None
    except ValueError:
        return None
    check_nesting(value, "init-data policy_data")
    return value


def _init_data_claims(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[data]`` table of an initdata document as token claims: ``aa.toml``/``cdh.toml`` parsed,
    ``policy.rego`` reduced to the ``policy_data`` it declares (``agent_policy_claims``). TOML dates
    and times become ISO 8601 strings. FormatError when a value nests too deeply or is not finite."""
    import tomllib  # noqa: PLC0415

    data = doc.get("data")
    out: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        return out
    for key, value in data.items():
        if key == "policy.rego" and isinstance(value, str):
            extracted = _extract_policy_data(value)
            if extracted is not None:
                out["agent_policy_claims"] = extracted
            continue
        if key in _INITDATA_CLAIM_KEYS_AS_TOML and isinstance(value, str):
            try:
                parsed = tomllib.loads(value)
            except tomllib.TOMLDecodeError:
                pass
            except RecursionError:
                raise FormatError(f"init-data {key}", "nested too deeply") from None
            else:
                check_nesting(parsed, f"init-data {key}")
                out[key] = to_jsonable(parsed)
                continue
        out[key] = to_jsonable(value)
    check_nesting(out, "init-data claims", MAX_INITDATA_DEPTH + 2)
    return out
