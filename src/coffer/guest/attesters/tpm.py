"""The ``tpm`` attester (a TPM 2.0 quote), and the attestation-key helpers the server side uses.

Evidence is the Trustee ``tpm`` JSON::

    {"ak_public": "<std base64 DER SubjectPublicKeyInfo>",
     "tpm_quote": {"signature": "<std base64 TPMT_SIGNATURE>", "message": "<std base64 TPMS_ATTEST>",
                   "pcrs": ["<hex PCR0>", ..., "<hex PCR23>"]}}

with the quote's qualifying data = the first 32 bytes of the runtime-data digest. The TPM is driven
through the ``tpm2-tools`` programs (``TPM2TOOLS_TCTI`` set to the given TCTI, e.g.
``device:/dev/tpmrm0`` or ``swtpm:path=...``).

The attestation key (AK) is a restricted RSA-2048 RSASSA/SHA-256 signing key created under the
endorsement key (EK) and persisted, so later quotes use the same key. A verifier trusts it in one
of two ways:

* enrollment: record :func:`enroll_ak` (the AK's SubjectPublicKeyInfo) out of band and pass it in
  ``VerifyOptions.trusted_keys``;
* credential activation: the server checks the EK certificate against the manufacturer CA and the
  AK's attributes, encrypts a secret to the EK bound to the AK's name
  (:func:`make_credential_challenge`); only the TPM holding both keys recovers it
  (:meth:`TpmAttester.activate_credential`). :func:`enroll_by_activation` runs the whole exchange.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from coffer._internal.clock import as_utc, utc_now
from coffer.errors import FormatError, UnsupportedError, VerificationError
from coffer.evidence.tpm import structures as st
from coffer.guest.attesters.base import AttesterError, b64, check_digest

EK_HANDLE = 0x81010001  # TCG EK Credential Profile: the RSA EK's persistent handle
AK_HANDLE = 0x81010002  # where this attester persists its AK
EK_CERT_NV_INDEX = 0x01C00002  # RSA 2048 EK certificate
TPM_RH_ENDORSEMENT = 0x4000000B
NONCE_SIZE = 32
CREDENTIAL_FILE_MAGIC = 0xBADCC0DE  # the tpm2-tools file format of a credential blob

# TPMA_OBJECT bits an AK must (or must not) have.
TPMA_FIXED_TPM = 1 << 1
TPMA_FIXED_PARENT = 1 << 4
TPMA_SENSITIVE_DATA_ORIGIN = 1 << 5
TPMA_RESTRICTED = 1 << 16
TPMA_DECRYPT = 1 << 17
TPMA_SIGN = 1 << 18
AK_REQUIRED_ATTRIBUTES = (TPMA_FIXED_TPM | TPMA_FIXED_PARENT | TPMA_SENSITIVE_DATA_ORIGIN
                          | TPMA_RESTRICTED | TPMA_SIGN)

_HANDLE_LINE = re.compile(r"^\s*-\s*(0x[0-9a-fA-F]+)\s*$", re.MULTILINE)


# --------------------------------------------------------------------------------------------------
# tpm2-tools


class Tpm2Tools:
    """Runs tpm2-tools programs against one TCTI (``None``: the tools' default, the TPM device)."""

    def __init__(self, tcti: str | None = None, *, timeout: float = 60.0) -> None:
        self.tcti = tcti
        self.timeout = timeout

    def run(self, tool: str, *args: str, cwd: Path | None = None, tcti: bool = True) -> str:
        path = shutil.which(tool)
        if path is None:
            raise UnsupportedError(f"{tool} is not installed (Debian package tpm2-tools)")
        env = dict(os.environ)
        if tcti and self.tcti is not None:
            env["TPM2TOOLS_TCTI"] = self.tcti
        env.pop("TSS2_LOG", None)
        try:
            result = subprocess.run(  # noqa: S603 - fixed program, arguments are not a shell line
                [path, *args], cwd=cwd, env=env, capture_output=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise AttesterError(f"{tool} did not finish in {self.timeout:.0f} s") from exc
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise AttesterError(f"{tool} failed ({result.returncode}): {' | '.join(tail)}")
        return result.stdout.decode(errors="replace")

    def persistent_handles(self) -> set[int]:
        out = self.run("tpm2_getcap", "handles-persistent")
        return {int(h, 16) for h in _HANDLE_LINE.findall(out)}


# --------------------------------------------------------------------------------------------------
# The attester


@dataclass(frozen=True)
class AkInfo:
    """The attestation key: its TPM2B_PUBLIC as the TPM reports it, the parsed public area, and
    its DER SubjectPublicKeyInfo (what verifiers and ``trusted_keys`` use)."""

    tpm2b_public: bytes
    public: st.TpmtPublic
    spki_der: bytes

    @property
    def name(self) -> bytes:
        return self.public.name()


def ak_info(tpm2b_public: bytes) -> AkInfo:
    public = st.parse_public_sized(tpm2b_public)
    spki = public.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return AkInfo(tpm2b_public=tpm2b_public, public=public, spki_der=spki)


class TpmAttester:
    """Quotes PCRs of one bank with an AK under the EK.

    ``pcrs`` are the quoted PCR indices (all 24 by default, as Trustee), ``bank`` their hash bank.
    ``event_log``, when given and readable, is added as ``event_log`` (std base64) for verifiers
    that replay it (Coffer's does; Trustee's ignores unknown fields).
    """

    tee = "tpm"

    def __init__(
        self,
        tcti: str | None = None,
        *,
        ak_handle: int = AK_HANDLE,
        ek_handle: int = EK_HANDLE,
        bank: str = "sha256",
        pcrs: Sequence[int] = tuple(range(24)),
        event_log: Path | None = None,
        tools: Tpm2Tools | None = None,
    ) -> None:
        if bank not in ("sha1", "sha256", "sha384", "sha512"):
            raise ValueError(f"unsupported PCR bank {bank!r}")
        if not pcrs or any(not 0 <= i < 24 for i in pcrs) or len(set(pcrs)) != len(pcrs):
            raise ValueError("pcrs must be distinct indices 0..23")
        self.tools = tools or Tpm2Tools(tcti)
        self.ak_handle = ak_handle
        self.ek_handle = ek_handle
        self.bank = bank
        self.pcrs = tuple(sorted(pcrs))
        self.event_log = event_log
        self._ak: AkInfo | None = None

    # ---------------------------------------------------------------------------- keys

    def _workdir(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="coffer-tpm-")

    def ensure_ek(self) -> None:
        """Create and persist the standard RSA EK when the TPM has none at ``ek_handle``."""
        if self.ek_handle in self.tools.persistent_handles():
            return
        with self._workdir() as work:
            self.tools.run("tpm2_createek", "-c", f"{self.ek_handle:#x}", "-G", "rsa", "-u", "ek.pub",
                           cwd=Path(work))

    def ensure_ak(self) -> AkInfo:
        """The AK, created under the EK and persisted at ``ak_handle`` on first use."""
        if self._ak is not None:
            return self._ak
        # Usually the AK is there already (persisted in the TPM's state): read it with one tool run,
        # and list the persistent handles only when that fails.
        with contextlib.suppress(AttesterError):
            self._ak = ak_info(self._read_public(self.ak_handle))
            return self._ak
        if self.ak_handle not in self.tools.persistent_handles():
            self.ensure_ek()
            with self._workdir() as work:
                cwd = Path(work)
                self.tools.run("tpm2_createak", "-C", f"{self.ek_handle:#x}", "-c", "ak.ctx", "-G", "rsa",
                               "-g", "sha256", "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name", cwd=cwd)
                self.tools.run("tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", f"{self.ak_handle:#x}",
                               cwd=cwd)
                self.tools.run("tpm2_flushcontext", "-t", cwd=cwd)
        self._ak = ak_info(self._read_public(self.ak_handle))
        return self._ak

    def _read_public(self, handle: int) -> bytes:
        with self._workdir() as work:
            self.tools.run("tpm2_readpublic", "-c", f"{handle:#x}", "-o", "pub.tpm2b", cwd=Path(work))
            return (Path(work) / "pub.tpm2b").read_bytes()

    def ak_public(self) -> bytes:
        """The AK's DER SubjectPublicKeyInfo (what a verifier enrolls)."""
        return self.ensure_ak().spki_der

    def ek_public(self) -> rsa.RSAPublicKey:
        self.ensure_ek()
        key = st.parse_public_sized(self._read_public(self.ek_handle)).public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise UnsupportedError("only an RSA endorsement key is supported")
        return key

    def ek_certificate(self) -> bytes | None:
        """The EK certificate (DER) from NV index 0x01C00002, or None when the TPM has none."""
        with self._workdir() as work:
            try:
                self.tools.run("tpm2_nvread", f"{EK_CERT_NV_INDEX:#x}", "-o", "ek.crt", cwd=Path(work))
            except AttesterError:
                return None
            return _strip_der_padding((Path(work) / "ek.crt").read_bytes())

    def activate_credential(self, credential: bytes) -> bytes:
        """TPM2_ActivateCredential of a credential blob (tpm2-tools file format, as produced by
        :func:`make_credential`) with the AK and the EK; returns the secret it carries."""
        self.ensure_ak()
        with self._workdir() as work:
            cwd = Path(work)
            (cwd / "cred.in").write_bytes(credential)
            self.tools.run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=cwd)
            try:
                self.tools.run("tpm2_policysecret", "-S", "session.ctx", "-c", f"{TPM_RH_ENDORSEMENT:#x}",
                               cwd=cwd)
                self.tools.run("tpm2_activatecredential", "-c", f"{self.ak_handle:#x}",
                               "-C", f"{self.ek_handle:#x}", "-i", "cred.in", "-o", "secret.out",
                               "-P", "session:session.ctx", cwd=cwd)
            finally:
                # A successful activation already flushed the session.
                with contextlib.suppress(AttesterError):
                    self.tools.run("tpm2_flushcontext", "session.ctx", cwd=cwd)
            return (cwd / "secret.out").read_bytes()

    # ---------------------------------------------------------------------------- quote

    def read_pcrs(self) -> list[bytes]:
        """The selected PCR values of the bank, in index order."""
        size = st.HASH_SIZES[_BANK_IDS[self.bank]]
        with self._workdir() as work:
            self.tools.run("tpm2_pcrread", self._selection(), "-o", "pcrs.bin", cwd=Path(work))
            raw = (Path(work) / "pcrs.bin").read_bytes()
        if len(raw) != size * len(self.pcrs):
            raise AttesterError(f"tpm2_pcrread returned {len(raw)} bytes for {len(self.pcrs)} PCRs")
        return [raw[i * size:(i + 1) * size] for i in range(len(self.pcrs))]

    def _selection(self) -> str:
        return f"{self.bank}:" + ",".join(str(i) for i in self.pcrs)

    def quote(self, qualifying_data: bytes) -> tuple[bytes, bytes, list[bytes]]:
        """TPM2_Quote over the selected PCRs: (TPMS_ATTEST, TPMT_SIGNATURE, PCR values).

        The PCR values are read by the same tpm2_quote run, right after the quote; if a PCR was
        extended in between (the quoted digest differs), the pair is taken again."""
        self.ensure_ak()
        size = st.HASH_SIZES[_BANK_IDS[self.bank]]
        for _ in range(3):
            with self._workdir() as work:
                cwd = Path(work)
                self.tools.run("tpm2_quote", "-c", f"{self.ak_handle:#x}", "-l", self._selection(),
                               "-q", qualifying_data.hex(), "-m", "msg.bin", "-s", "sig.bin",
                               "-g", "sha256", "-o", "pcrs.bin", "-F", "values", cwd=cwd)
                message = (cwd / "msg.bin").read_bytes()
                signature = (cwd / "sig.bin").read_bytes()
                raw = (cwd / "pcrs.bin").read_bytes()
            if len(raw) != size * len(self.pcrs):
                raise AttesterError(f"tpm2_quote returned {len(raw)} bytes of PCR values for "
                                    f"{len(self.pcrs)} PCRs")
            values = [raw[i * size:(i + 1) * size] for i in range(len(self.pcrs))]
            attest = st.parse_attest(message)
            if attest.quote is None:
                raise AttesterError("tpm2_quote did not return a quote")
            if attest.quote.pcr_digest == hashlib.sha256(b"".join(values)).digest():
                return message, signature, values
        raise AttesterError("PCR values kept changing while quoting")

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        digest = check_digest(runtime_digest)
        nonce = digest[:NONCE_SIZE].ljust(NONCE_SIZE, b"\0")
        message, signature, values = self.quote(nonce)
        pcrs = [b"\0" * len(values[0])] * 24
        for index, value in zip(self.pcrs, values, strict=True):
            pcrs[index] = value
        doc: dict[str, Any] = {
            "ak_public": b64(self.ak_public()),
            "tpm_quote": {"signature": b64(signature), "message": b64(message),
                          "pcrs": [p.hex() for p in pcrs]},
        }
        if self.event_log is not None and self.event_log.is_file():
            doc["event_log"] = b64(self.event_log.read_bytes())
        return doc


_BANK_IDS = {"sha1": st.ALG_SHA1, "sha256": st.ALG_SHA256, "sha384": st.ALG_SHA384,
             "sha512": st.ALG_SHA512}


def _strip_der_padding(data: bytes) -> bytes:
    """NV indexes are often larger than the certificate: keep the DER SEQUENCE, drop the rest."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[:2 + data[1]]
    n = data[1] & 0x7F
    if n == 0 or n > 4 or len(data) < 2 + n:
        return data
    return data[:2 + n + int.from_bytes(data[2:2 + n], "big")]


# --------------------------------------------------------------------------------------------------
# Server side: enrollment and credential activation


def enroll_ak(attester: TpmAttester) -> bytes:
    """Enrollment: the AK's DER SubjectPublicKeyInfo, to be recorded by the relying party (and
    passed in ``VerifyOptions.trusted_keys``) over a channel it already trusts."""
    return attester.ak_public()


def _kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (TPM 2.0 Part 1, 11.4.10.2: SP 800-108 counter mode)."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(key, counter.to_bytes(4, "big") + label + b"\0" + context_u + context_v
                        + bits.to_bytes(4, "big"), hashlib.sha256).digest()
    return out[:bits // 8]


def make_credential(ek_public: rsa.RSAPublicKey, object_name: bytes, secret: bytes) -> bytes:
    """TPM2_MakeCredential done in software (TPM 2.0 Part 1, 24: credential protection) for an RSA
    EK with the standard template (SHA-256 name algorithm, AES-128-CFB): returns the credential in
    the tpm2-tools file format (magic, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET)."""
    if not 1 <= len(secret) <= 64:
        raise ValueError("the credential secret must be 1..64 bytes")
    if len(object_name) != 34 or object_name[:2] != st.ALG_SHA256.to_bytes(2, "big"):
        raise ValueError("the object name must be a SHA-256 TPM name (34 bytes)")
    seed = secrets.token_bytes(32)
    encrypted_seed = ek_public.encrypt(seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                          algorithm=hashes.SHA256(), label=b"IDENTITY\0"))
    sym_key = _kdfa(seed, b"STORAGE", object_name, b"", 128)
    # The TPM protects credentials with AES-CFB and a zero IV (the key is single-use).
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(len(secret).to_bytes(2, "big") + secret) + encryptor.finalize()
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", b"", 256)
    outer_hmac = hmac.new(hmac_key, enc_identity + object_name, hashlib.sha256).digest()
    id_object = len(outer_hmac).to_bytes(2, "big") + outer_hmac + enc_identity
    return (CREDENTIAL_FILE_MAGIC.to_bytes(4, "big") + (1).to_bytes(4, "big")
            + len(id_object).to_bytes(2, "big") + id_object
            + len(encrypted_seed).to_bytes(2, "big") + encrypted_seed)


def check_ak_public(tpm2b_public: bytes) -> AkInfo:
    """Parse an AK's TPM2B_PUBLIC and require an attestation key's attributes: fixedTPM,
    fixedParent, sensitiveDataOrigin, restricted, sign, and not decrypt. Raises FormatError."""
    info = ak_info(tpm2b_public)
    attributes = info.public.object_attributes
    if attributes & AK_REQUIRED_ATTRIBUTES != AK_REQUIRED_ATTRIBUTES or attributes & TPMA_DECRYPT:
        raise FormatError("attestation key", f"objectAttributes {attributes:#010x} are not those of a "
                                             "restricted, non-duplicable signing key")
    if info.public.name_alg != st.ALG_SHA256:
        raise FormatError("attestation key", "the AK's name algorithm must be SHA-256")
    return info


def verify_ek_certificate(ek_cert: bytes, ca_certs: Sequence[bytes], *, at: datetime | None = None
                          ) -> rsa.RSAPublicKey:
    """Check that the EK certificate chains to one of ``ca_certs`` (DER; the trust anchors and any
    intermediates), every certificate valid at ``at``; returns the EK public key.
    Raises VerificationError (tee ``tpm``, step 1 "verify EK certificate")."""
    when = as_utc(at) if at is not None else utc_now()

    def fail(reason: str) -> VerificationError:
        return VerificationError("tpm", 1, "verify EK certificate", reason)

    try:
        cert = x509.load_der_x509_certificate(ek_cert)
        pool = [x509.load_der_x509_certificate(c) for c in ca_certs]
    except ValueError as exc:
        raise fail("a certificate does not parse") from exc
    if not pool:
        raise fail("no trusted CA certificate configured")
    current = cert
    for _ in range(len(pool) + 1):
        if not current.not_valid_before_utc <= when <= current.not_valid_after_utc:
            raise fail(f"certificate {current.subject.rfc4514_string()!r} is not valid at {when}")
        issuer = next((c for c in pool if c.subject == current.issuer and c is not current), None)
        if issuer is None:
            raise fail(f"no trusted issuer {current.issuer.rfc4514_string()!r}")
        try:
            current.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise fail(f"signature by {issuer.subject.rfc4514_string()!r} does not verify") from exc
        if issuer.subject == issuer.issuer:
            if not issuer.not_valid_before_utc <= when <= issuer.not_valid_after_utc:
                raise fail("the root CA certificate is not valid at the reference time")
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                raise fail("only RSA endorsement keys are supported")
            return key
        current = issuer
    raise fail("certificate chain too long")


@dataclass(frozen=True)
class CredentialChallenge:
    """What the server keeps (``secret``, ``ak``) and sends (``credential``)."""

    credential: bytes
    secret: bytes
    ak: AkInfo


def make_credential_challenge(
    ek_cert: bytes, ak_tpm2b_public: bytes, *, ca_certs: Sequence[bytes], at: datetime | None = None
) -> CredentialChallenge:
    """Server step of credential activation: EK certificate checked against ``ca_certs``, AK
    attributes checked, a fresh 32-byte secret wrapped to the EK and bound to the AK's name."""
    ek_public = verify_ek_certificate(ek_cert, ca_certs, at=at)
    ak = check_ak_public(ak_tpm2b_public)
    secret = secrets.token_bytes(32)
    return CredentialChallenge(credential=make_credential(ek_public, ak.name, secret), secret=secret, ak=ak)


def check_activation(challenge: CredentialChallenge, returned_secret: bytes) -> bytes:
    """Final server step: the secret came back, so the AK lives in the EK's TPM. Returns the AK's
    DER SubjectPublicKeyInfo to trust. Raises VerificationError otherwise."""
    if not hmac.compare_digest(challenge.secret, returned_secret):
        raise VerificationError("tpm", 2, "activate credential", "the returned secret does not match")
    return challenge.ak.spki_der


def enroll_by_activation(attester: TpmAttester, *, ca_certs: Sequence[bytes],
                         at: datetime | None = None) -> bytes:
    """Both sides of credential activation in one call (for tests and local tools): returns the
    AK's DER SubjectPublicKeyInfo once the TPM proved it holds the certified EK and the AK."""
    ek_cert = attester.ek_certificate()
    if ek_cert is None:
        raise VerificationError("tpm", 1, "verify EK certificate", "the TPM has no EK certificate")
    challenge = make_credential_challenge(ek_cert, attester.ensure_ak().tpm2b_public,
                                          ca_certs=ca_certs, at=at)
    return check_activation(challenge, attester.activate_credential(challenge.credential))
