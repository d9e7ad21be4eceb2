"""Verification of TPM 2.0 quotes (tee ``tpm``), and the quote checks the Azure vTPM verifiers reuse.

Evidence is the JSON document of the Trustee ``tpm`` attester::

    {"ak_public": "<base64 DER SubjectPublicKeyInfo>",
     "tpm_quote": {"message": "<base64 TPMS_ATTEST>", "signature": "<base64 TPMT_SIGNATURE>",
                   "pcrs": ["<hex PCR0>", ..., "<hex PCR23>"]},
     "event_log": "<base64 TCG event log>"}            # optional

Binary fields may also be hex strings or JSON arrays of byte values (other Trustee variants); the AK
may also be PEM, or a TPM2B_PUBLIC / TPMT_PUBLIC as the TPM returns it. ``signature`` may be a raw
RSASSA-PKCS1-v1_5/SHA-256 signature whose length is the AK modulus size (the Azure form).

Steps (a rejection names the step):

1. parse evidence: JSON, field decoding, PCR values;
2. attestation key: load the AK; a TPM-format AK must be a restricted signing key;
3. quote signature: RSASSA-PKCS1-v1_5, RSASSA-PSS or ECDSA (P-256/P-384/P-521), by the scheme and
   hash named in TPMT_SIGNATURE, over the TPMS_ATTEST bytes;
4. attestation structure: magic TPM_GENERATED_VALUE and type TPM_ST_ATTEST_QUOTE;
5. nonce: extraData must equal ``options.expected_report_data`` **exactly** (no padding or
   truncation: the TPM returns qualifyingData as given, so a relying party that pads its nonce must
   pass the padded value);
6. PCR digest: the hash of the signing scheme over the selected PCR values, bank by bank in
   selection order and ascending index within a bank, must equal pcrDigest;
7. event log (only when one is supplied): replaying it must reproduce every quoted PCR it touches.

The AK itself is not yet rooted in hardware here (credential activation against an EK comes later),
so the claims are ``insecure`` unless the AK's SubjectPublicKeyInfo is in ``options.trusted_keys``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coffer._internal.encoding import b64_decode, hex_decode, load_json_object
from coffer.errors import FormatError
from coffer.evidence.base import Claims, StepRunner, VerifyOptions, check_report_data
from coffer.evidence.collateral import CollateralSource
from coffer.evidence.tpm import structures as st

TEE = "tpm"
_WHAT = "TPM evidence"
MAX_EVIDENCE_BYTES = 8 * 1024 * 1024  # an event log can be large
MAX_PCRS = 32
_HEX = re.compile(r"\A(?:[0-9a-fA-F]{2})+\Z")
_DIGEST_BANKS = {20: st.ALG_SHA1, 32: st.ALG_SHA256, 48: st.ALG_SHA384, 64: st.ALG_SHA512}

# TPMA_OBJECT bits that make a key an attestation key.
_TPMA_RESTRICTED = 1 << 16
_TPMA_SIGN = 1 << 18

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


# --------------------------------------------------------------------------------------------------
# Attestation key


@dataclass(frozen=True)
class AttestationKey:
    """An attestation key: the ``cryptography`` key, its DER SubjectPublicKeyInfo, and the TPM
    public area when it was given in TPM form."""

    key: PublicKey
    spki_der: bytes
    tpm_public: st.TpmtPublic | None = None

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.spki_der).digest()


MIN_RSA_AK_BITS = 2048


def _from_key(key: object, tpm_public: st.TpmtPublic | None = None) -> AttestationKey:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise FormatError("attestation key", "only RSA and EC attestation keys are supported")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_AK_BITS:
        raise FormatError("attestation key", f"RSA key of {key.key_size} bits; at least "
                                             f"{MIN_RSA_AK_BITS} required")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return AttestationKey(key, der, tpm_public)


@lru_cache(maxsize=256)
def load_ak(data: bytes) -> AttestationKey:
    """Load an AK from PEM, DER SubjectPublicKeyInfo, TPM2B_PUBLIC or TPMT_PUBLIC (cached: parsing
    the same key again on the warm path is wasted work)."""
    what = "attestation key"
    if not data:
        raise FormatError(what, "empty")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return _from_key(serialization.load_pem_public_key(data.strip()))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise FormatError(what, "PEM public key does not parse") from exc
    if data[0] == 0x30:
        try:
            return _from_key(serialization.load_der_public_key(data))
        except (ValueError, UnsupportedAlgorithm):
            pass  # might still be a TPM structure that happens to start with 0x30
    if len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2:
        public = st.parse_public_sized(data)
    else:
        try:
            public = st.parse_public(data)
        except FormatError as exc:
            raise FormatError(what, "neither PEM, DER SubjectPublicKeyInfo, TPM2B_PUBLIC nor "
                                    "TPMT_PUBLIC") from exc
    return _from_key(public.public_key(), public)


def rsa_jwk_to_ak(jwk: Mapping[str, Any], what: str = "JWK") -> AttestationKey:
    """An RSA attestation key from a JWK (``kty`` RSA, base64url ``n`` and ``e``)."""
    if jwk.get("kty") != "RSA":
        raise FormatError(what, "kty must be RSA")
    n_text, e_text = jwk.get("n"), jwk.get("e")
    if not isinstance(n_text, str) or not isinstance(e_text, str):
        raise FormatError(what, "n and e must be base64url strings")
    return _rsa_ak(n_text, e_text, what)


@lru_cache(maxsize=256)
def _rsa_ak(n_text: str, e_text: str, what: str) -> AttestationKey:
    n = int.from_bytes(b64_decode(n_text, f"{what} n"), "big")
    e = int.from_bytes(b64_decode(e_text, f"{what} e"), "big")
    if n.bit_length() < MIN_RSA_AK_BITS or n.bit_length() > 8 * st.MAX_RSA_KEY_BYTES or e < 3 or e % 2 == 0:
        raise FormatError(what, "RSA modulus or exponent out of range")
    try:
        return _from_key(rsa.RSAPublicNumbers(e, n).public_key())
    except ValueError as exc:
        raise FormatError(what, "not a valid RSA public key") from exc


def check_ak_attributes(steps: StepRunner, ak: AttestationKey) -> None:
    """A key given in TPM form must be a restricted signing key: only such a key refuses to sign
    data that begins with TPM_GENERATED_VALUE, which is what makes a quote unforgeable."""
    public = ak.tpm_public
    if public is None:
        return
    wanted = _TPMA_RESTRICTED | _TPMA_SIGN
    if public.object_attributes & wanted != wanted:
        steps.fail("the attestation key is not a restricted signing key")


# --------------------------------------------------------------------------------------------------
# Signature


def verify_quote_signature(ak: AttestationKey, message: bytes, signature: bytes) -> tuple[str, int]:
    """Verify ``signature`` over ``message`` with the AK; returns (scheme description, hash alg id).

    ``signature`` is a TPMT_SIGNATURE, or a bare RSASSA-PKCS1-v1_5/SHA-256 signature whose length
    equals the RSA modulus size. Raises InvalidSignature or FormatError.
    """
    key = ak.key
    if isinstance(key, rsa.RSAPublicKey) and len(signature) == (key.key_size + 7) // 8:
        key.verify(signature, message, padding.PKCS1v15(), st.crypto_hash(st.ALG_SHA256, "signature"))
        return "rsassa-sha256", st.ALG_SHA256
    sig = st.parse_signature(signature)
    algorithm = st.crypto_hash(sig.hash_alg, "TPMT_SIGNATURE")
    label = f"{sig.scheme}-{st.hash_name(sig.hash_alg)}"
    if sig.sig_alg in (st.ALG_RSASSA, st.ALG_RSAPSS):
        if not isinstance(key, rsa.RSAPublicKey):
            raise FormatError("TPMT_SIGNATURE", f"{sig.scheme} signature but the AK is not RSA")
        if len(sig.rsa_signature) != (key.key_size + 7) // 8:
            raise FormatError("TPMT_SIGNATURE", "RSA signature length does not match the AK")
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15() if sig.sig_alg == st.ALG_RSASSA
            else padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO))
        try:
            key.verify(sig.rsa_signature, message, pad, algorithm)
        except ValueError as exc:  # e.g. a digest too large for the key
            raise FormatError("TPMT_SIGNATURE", f"cannot be checked with this AK: {exc}") from exc
        return label, sig.hash_alg
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FormatError("TPMT_SIGNATURE", "ECDSA signature but the AK is not an EC key")
    der = encode_dss_signature(int.from_bytes(sig.ecc_r, "big"), int.from_bytes(sig.ecc_s, "big"))
    key.verify(der, message, ec.ECDSA(algorithm))
    return label, sig.hash_alg


# --------------------------------------------------------------------------------------------------
# PCR values


@dataclass(frozen=True)
class PcrValues:
    """PCR values sent alongside a quote: one bank (identified from the digest size), index -> value."""

    hash_alg: int
    values: Mapping[int, bytes]

    @property
    def bank(self) -> str:
        return st.hash_name(self.hash_alg)


def pcr_values(pcrs: Sequence[bytes] | Mapping[int, bytes], what: str = "PCR values") -> PcrValues:
    """Check PCR values (a list indexed by PCR number, or a mapping) and identify their bank."""
    items = dict(enumerate(pcrs)) if not isinstance(pcrs, Mapping) else dict(pcrs)
    if not items:
        raise FormatError(what, "no PCR values")
    if len(items) > MAX_PCRS or any(not 0 <= i < MAX_PCRS for i in items):
        raise FormatError(what, f"at most {MAX_PCRS} PCRs, indices 0..{MAX_PCRS - 1}")
    sizes = {len(v) for v in items.values()}
    if len(sizes) != 1:
        raise FormatError(what, "PCR values have different lengths")
    size = sizes.pop()
    if size not in _DIGEST_BANKS:
        raise FormatError(what, f"PCR values of {size} bytes match no hash bank")
    return PcrValues(_DIGEST_BANKS[size], {i: bytes(v) for i, v in sorted(items.items())})


def quoted_pcr_digest(quote: st.QuoteInfo, pcrs: PcrValues, hash_alg: int) -> tuple[bytes, dict[int, bytes]]:
    """The digest of the selected PCRs (selection order, ascending index) and the selected values.
    Raises FormatError when a selected PCR is not among the supplied values."""
    selected: dict[int, bytes] = {}
    concat = bytearray()
    for sel in quote.pcr_select:
        if not sel.pcrs:
            continue
        if sel.hash_alg != pcrs.hash_alg:
            raise FormatError("PCR values", f"the quote selects bank {sel.bank} but the evidence "
                                            f"carries {pcrs.bank} values")
        for index in sel.pcrs:
            value = pcrs.values.get(index)
            if value is None:
                raise FormatError("PCR values", f"PCR {index} is quoted but its value is missing")
            selected[index] = value
            concat += value
    if not selected:
        raise FormatError("TPMS_QUOTE_INFO", "the quote selects no PCR")
    return st.digest(hash_alg, bytes(concat), "PCR digest"), selected


# --------------------------------------------------------------------------------------------------
# The quote steps (shared with the Azure verifiers)


@dataclass(frozen=True, kw_only=True)
class VerifiedQuote:
    """What the quote steps established: the attestation, the scheme that signed it, and the PCR
    values the signature covers (only those; unquoted values are dropped)."""

    attest: st.TpmsAttest
    signature_scheme: str
    bank: str
    pcrs: dict[int, bytes]
    event_log: dict[str, Any] | None
    next_step: int

    def pcr_claims(self) -> dict[str, dict[str, bytes]]:
        return {self.bank: {str(i): v for i, v in sorted(self.pcrs.items())}}


def run_quote_steps(
    steps: StepRunner,
    first_step: int,
    *,
    ak: AttestationKey,
    message: bytes,
    signature: bytes,
    pcrs: PcrValues,
    expected_nonce: bytes | None,
    event_log: bytes | None = None,
) -> VerifiedQuote:
    """Run the signature, structure, nonce, PCR-digest and (optional) event-log steps, numbered from
    ``first_step``. ``expected_nonce`` is compared exactly with extraData (None skips the check)."""
    n = first_step
    with steps.step(n, "verify quote signature"):
        scheme, hash_alg = verify_quote_signature(ak, message, signature)
    n += 1
    with steps.step(n, "check attestation structure"):
        attest = st.parse_attest(message)
        if attest.magic != st.TPM_GENERATED_VALUE:
            steps.fail(f"magic {attest.magic:#010x} is not TPM_GENERATED_VALUE")
        if attest.type != st.TPM_ST_ATTEST_QUOTE or attest.quote is None:
            steps.fail(f"attestation type {attest.type:#06x} is not TPM_ST_ATTEST_QUOTE")
    quote = attest.quote
    n += 1
    with steps.step(n, "check nonce"):
        check_report_data(steps, attest.extra_data, expected_nonce)
    n += 1
    with steps.step(n, "check PCR digest"):
        computed, selected = quoted_pcr_digest(quote, pcrs, hash_alg)
        if not hmac.compare_digest(computed, quote.pcr_digest):
            steps.fail(f"digest of the PCR values {computed.hex()} does not match the quoted "
                       f"pcrDigest {quote.pcr_digest.hex()}")
    summary: dict[str, Any] | None = None
    if event_log is not None:
        n += 1
        with steps.step(n, "replay event log"):
            summary = replay_against_pcrs(steps, event_log, pcrs.hash_alg, selected)
    return VerifiedQuote(attest=attest, signature_scheme=scheme, bank=pcrs.bank, pcrs=selected,
                         event_log=summary, next_step=n + 1)


def replay_against_pcrs(
    steps: StepRunner, log: bytes, hash_alg: int, quoted: Mapping[int, bytes]
) -> dict[str, Any]:
    """Replay a TCG event log in ``hash_alg`` and require every quoted PCR it touches to match."""
    from coffer.evidence.eventlog.tcg import parse_event_log, replay  # noqa: PLC0415

    parsed = parse_event_log(log)
    replayed = replay(parsed.events, hash_alg)
    checked: list[int] = []
    for index, value in sorted(replayed.items()):
        if index not in quoted:
            continue
        if quoted[index] != value:
            steps.fail(f"replaying the event log gives PCR {index} = {value.hex()}, the quote says "
                       f"{quoted[index].hex()}")
        checked.append(index)
    if not checked:
        steps.fail("the event log touches none of the quoted PCRs")
    return {"events": len(parsed.events), "bank": st.hash_name(hash_alg), "replayed_pcrs": checked}


# --------------------------------------------------------------------------------------------------
# Evidence JSON


def decode_blob(value: object, what: str, *, max_len: int = MAX_EVIDENCE_BYTES) -> bytes:
    """A binary field of evidence JSON: a hex string, a base64 (standard or URL-safe) string, or a
    JSON array of byte values."""
    if isinstance(value, str):
        raw = hex_decode(value, what) if _HEX.match(value) else b64_decode(value, what)
    elif isinstance(value, list):
        if len(value) > max_len or not all(type(b) is int and 0 <= b <= 255 for b in value):
            raise FormatError(what, "must be an array of byte values")
        raw = bytes(value)
    else:
        raise FormatError(what, "must be a hex or base64 string or an array of bytes")
    if len(raw) > max_len:
        raise FormatError(what, f"{len(raw)} bytes exceeds the {max_len}-byte limit")
    return raw


def decode_pcr_list(value: object, what: str = "pcrs") -> list[bytes]:
    if not isinstance(value, list) or not value or len(value) > MAX_PCRS:
        raise FormatError(what, f"must be a list of 1..{MAX_PCRS} PCR values")
    out: list[bytes] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if len(item) > 128 or not _HEX.match(item):
                raise FormatError(what, f"PCR {i} is not a hex string of at most 64 bytes")
            out.append(bytes.fromhex(item))
        else:
            out.append(decode_blob(item, f"{what}[{i}]", max_len=64))
    return out


@dataclass(frozen=True, kw_only=True)
class QuoteParts:
    """A quote as transported: the signed TPMS_ATTEST, the signature, and the PCR values."""

    message: bytes
    signature: bytes
    pcrs: tuple[bytes, ...]


def decode_quote_object(value: object, what: str = "tpm_quote") -> QuoteParts:
    if not isinstance(value, dict):
        raise FormatError(what, "must be an object with message, signature and pcrs")
    missing = {"message", "signature", "pcrs"} - set(value)
    if missing:
        raise FormatError(what, f"missing field(s) {sorted(missing)}")
    return QuoteParts(
        message=decode_blob(value["message"], f"{what}.message", max_len=st.MAX_ATTEST),
        signature=decode_blob(value["signature"], f"{what}.signature", max_len=1024),
        pcrs=tuple(decode_pcr_list(value["pcrs"], f"{what}.pcrs")),
    )


def parse_bincode_quote(data: bytes) -> QuoteParts:
    """The azure-cvm-tooling ``Quote`` serialised with bincode: u64-LE length + signature, u64-LE
    length + message, u64-LE count + that many 32-byte SHA-256 PCR values."""
    from coffer._internal.binreader import Reader  # noqa: PLC0415

    reader = Reader(data, "bincode vTPM quote")

    def sized(field: str, limit: int) -> bytes:
        size = reader.u64(f"{field} length")
        if size > limit:
            raise reader.fail(f"{field} length {size} exceeds {limit}")
        return reader.read(size, field)

    signature = sized("signature", 1024)
    message = sized("message", st.MAX_ATTEST)
    count = reader.u64("PCR count")
    if count == 0 or count > MAX_PCRS:
        raise reader.fail(f"PCR count {count} outside 1..{MAX_PCRS}")
    pcrs = tuple(reader.read(32, f"PCR {i}") for i in range(count))
    reader.expect_end()
    return QuoteParts(message=message, signature=signature, pcrs=pcrs)


@dataclass(frozen=True, kw_only=True)
class TpmEvidence:
    """Decoded ``tpm`` evidence (for display and verification)."""

    ak_public: bytes
    quote: QuoteParts
    event_log: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tee": TEE, "ak_public": self.ak_public.hex()}
        try:
            out["ak_public_sha256"] = load_ak(self.ak_public).sha256.hex()
        except FormatError as exc:
            out["ak_public_error"] = str(exc)
        try:
            out["attest"] = st.parse_attest(self.quote.message).to_dict()
        except FormatError as exc:
            out["attest_error"] = str(exc)
        try:
            out["signature"] = st.parse_signature(self.quote.signature).to_dict()
        except FormatError:
            out["signature"] = {"raw": self.quote.signature.hex()}
        out["pcrs"] = [p.hex() for p in self.quote.pcrs]
        if self.event_log is not None:
            from coffer.evidence.eventlog.tcg import parse_event_log  # noqa: PLC0415

            try:
                out["event_log"] = parse_event_log(self.event_log).to_dict()
            except FormatError as exc:
                out["event_log_error"] = str(exc)
        return out


def parse_tpm_evidence(data: bytes) -> TpmEvidence:
    doc = load_json_object(data, _WHAT, max_bytes=MAX_EVIDENCE_BYTES)
    unknown = set(doc) - {"ak_public", "tpm_quote", "event_log"}
    if unknown:
        raise FormatError(_WHAT, f"unknown field(s) {sorted(unknown)}")
    if "ak_public" not in doc or "tpm_quote" not in doc:
        raise FormatError(_WHAT, "needs ak_public and tpm_quote")
    ak_value = doc["ak_public"]
    if isinstance(ak_value, str) and ak_value.lstrip().startswith("-----BEGIN"):
        ak_public = ak_value.encode()
    else:
        ak_public = decode_blob(ak_value, "ak_public", max_len=st.MAX_PUBLIC + 2)
    log_value = doc.get("event_log")
    event_log = None if log_value in (None, "") else decode_blob(log_value, "event_log")
    return TpmEvidence(ak_public=ak_public, quote=decode_quote_object(doc["tpm_quote"]),
                       event_log=event_log)


# --------------------------------------------------------------------------------------------------
# Claims and entry points


@dataclass(frozen=True, kw_only=True)
class TpmClaims(Claims):
    """Claims of a verified TPM quote. ``report_data`` is the quote's extraData (the nonce)."""

    ak_public_sha256: bytes
    ak_trusted: bool
    signature_scheme: str
    pcrs: dict[str, dict[str, bytes]]
    clock: st.ClockInfo
    firmware_version: int
    qualified_signer: bytes
    event_log: dict[str, Any] | None = field(default=None)


def verify_tpm_quote(
    message: bytes,
    signature: bytes,
    pcrs: Sequence[bytes] | Mapping[int, bytes],
    ak_public: bytes | AttestationKey,
    *,
    options: VerifyOptions | None = None,
    event_log: bytes | None = None,
    tee: str = TEE,
) -> TpmClaims:
    """Verify one TPM quote (the steps in this module's docstring) and return its claims."""
    options = options or VerifyOptions()
    steps = StepRunner(tee)
    with steps.step(1, "parse evidence"):
        values = pcr_values(pcrs)
    with steps.step(2, "load attestation key"):
        ak = ak_public if isinstance(ak_public, AttestationKey) else load_ak(bytes(ak_public))
        check_ak_attributes(steps, ak)
    verified = run_quote_steps(steps, 3, ak=ak, message=message, signature=signature, pcrs=values,
                               expected_nonce=options.expected_report_data, event_log=event_log)
    trusted = ak.spki_der in options.trusted_keys
    return TpmClaims(
        tee=tee,
        insecure=not trusted,
        report_data=verified.attest.extra_data,
        steps=steps.done,
        ak_public_sha256=ak.sha256,
        ak_trusted=trusted,
        signature_scheme=verified.signature_scheme,
        pcrs=verified.pcr_claims(),
        clock=verified.attest.clock_info,
        firmware_version=verified.attest.firmware_version,
        qualified_signer=verified.attest.qualified_signer,
        event_log=verified.event_log,
    )


def verify_tpm_evidence(data: bytes, options: VerifyOptions | None = None) -> TpmClaims:
    """Verify ``tpm`` evidence JSON; a malformed document is rejected at step 1."""
    options = options or VerifyOptions()
    steps = StepRunner(TEE)
    with steps.step(1, "parse evidence"):
        evidence = parse_tpm_evidence(data)
    q = evidence.quote
    return verify_tpm_quote(q.message, q.signature, q.pcrs, evidence.ak_public, options=options,
                            event_log=evidence.event_log)


class TpmHandler:
    """The ``tpm`` TEE handler (input is the evidence JSON)."""

    name: ClassVar[str] = TEE
    input_kind: ClassVar[Literal["binary", "json"]] = "json"

    def parse(self, data: bytes) -> TpmEvidence:
        return parse_tpm_evidence(data)

    def verify(self, data: bytes, collateral: CollateralSource, options: VerifyOptions) -> Claims:
        del collateral  # a TPM quote needs no vendor collateral
        return verify_tpm_evidence(data, options)


HANDLER = TpmHandler()
