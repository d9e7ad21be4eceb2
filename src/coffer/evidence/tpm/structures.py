"""Parsers for the TPM 2.0 structures a quote is made of (TPM 2.0 Library, Part 2).

All TPM structures are big-endian. Every count and size field is checked against a limit from the
specification before anything is read, so a lying length can neither read past the end nor make the
parser allocate or loop without bound. The parsers are pure: bytes in, a frozen dataclass out, or
:class:`~coffer.errors.FormatError`.

Covered here:

* ``TPMS_ATTEST`` with the ``TPMS_QUOTE_INFO`` body (the message a TPM2_Quote signs);
* ``TPMT_SIGNATURE`` for RSASSA, RSAPSS and ECDSA;
* ``TPMT_PUBLIC`` / ``TPM2B_PUBLIC`` for RSA and ECC keys (an attestation key as the TPM reports it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coffer._internal.binreader import Reader
from coffer._internal.encoding import to_json_object
from coffer.errors import FormatError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

# TPM_ALG_ID values used here.
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_SM3_256 = 0x0012
ALG_RSASSA = 0x0014
ALG_RSAES = 0x0015
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017
ALG_ECDSA = 0x0018
ALG_ECDH = 0x0019
ALG_ECDAA = 0x001A
ALG_SM2 = 0x001B
ALG_ECSCHNORR = 0x001C
ALG_ECC = 0x0023

# Names of the hash algorithms (the names used in claims: "sha256" etc.) and their digest sizes.
HASH_NAMES: dict[int, str] = {
    ALG_SHA1: "sha1",
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
    ALG_SM3_256: "sm3_256",
}
HASH_SIZES: dict[int, int] = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64, ALG_SM3_256: 32}
_CRYPTO_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    ALG_SHA1: hashes.SHA1,
    ALG_SHA256: hashes.SHA256,
    ALG_SHA384: hashes.SHA384,
    ALG_SHA512: hashes.SHA512,
}

# TPM_ECC_CURVE values and the matching cryptography curves.
ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004
ECC_NIST_P521 = 0x0005
_CURVES: dict[int, ec.EllipticCurve] = {
    ECC_NIST_P256: ec.SECP256R1(),
    ECC_NIST_P384: ec.SECP384R1(),
    ECC_NIST_P521: ec.SECP521R1(),
}
_CURVE_SIZES: dict[int, int] = {ECC_NIST_P256: 32, ECC_NIST_P384: 48, ECC_NIST_P521: 66}

# Limits (Part 2 sizes for a TPM with SHA-512 and RSA-4096 support, rounded up).
MAX_DIGEST = 64  # sizeof(TPMU_HA)
MAX_NAME = 2 + MAX_DIGEST  # TPM2B_NAME: hash alg + digest (a handle is 4 bytes)
MAX_DATA = 64  # TPM2B_DATA (sizeof(TPMT_HA))
MAX_PCR_BANKS = 16  # HASH_COUNT is at most a handful; 16 is generous
MAX_PCR_SELECT = 32  # PCR_SELECT_MAX bytes (256 PCRs; real TPMs have 24)
MAX_RSA_KEY_BYTES = 512  # RSA-4096
MAX_ECC_PARAMETER = 66  # P-521
MAX_ATTEST = 1024  # sizeof(TPMS_ATTEST) is well below this
MAX_PUBLIC = 1024  # sizeof(TPMT_PUBLIC) for RSA-4096 with a SHA-512 policy


def hash_name(alg: int) -> str:
    return HASH_NAMES.get(alg, f"alg_{alg:#06x}")


def crypto_hash(alg: int, what: str) -> hashes.HashAlgorithm:
    """The ``cryptography`` hash for a TPM hash algorithm id (SHA-1/256/384/512)."""
    try:
        return _CRYPTO_HASHES[alg]()
    except KeyError:
        raise FormatError(what, f"unsupported hash algorithm {alg:#06x}") from None


def digest(alg: int, data: bytes, what: str = "TPM digest") -> bytes:
    """Hash ``data`` with a TPM hash algorithm (SHA-1/256/384/512)."""
    name = HASH_NAMES.get(alg)
    if name is None or alg == ALG_SM3_256:
        raise FormatError(what, f"unsupported hash algorithm {alg:#06x}")
    return hashlib.new(name, data).digest()


# --------------------------------------------------------------------------------------------------
# TPMS_ATTEST


@dataclass(frozen=True, kw_only=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: milliseconds the TPM has been powered, reset/restart counters, and whether
    the clock value is known to be no earlier than any value reported before (``safe``)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, kw_only=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a hash bank and the PCR indices selected in it, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        return hash_name(self.hash_alg)


@dataclass(frozen=True, kw_only=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO: which PCRs were quoted and the digest of their values."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True, kw_only=True)
class TpmsAttest:
    """A parsed TPMS_ATTEST. ``quote`` is set only when ``type`` is TPM_ST_ATTEST_QUOTE; for other
    attestation types the body is kept unparsed in ``attested``. Checking ``magic`` and ``type`` is
    the verifier's job (so that a display of foreign data still works)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    quote: QuoteInfo | None
    attested: bytes

    @property
    def is_quote(self) -> bool:
        return self.magic == TPM_GENERATED_VALUE and self.type == TPM_ST_ATTEST_QUOTE

    def to_dict(self) -> dict[str, Any]:
        out = to_json_object(self)
        if self.quote is not None:
            out["quote"]["pcr_select"] = [
                {"bank": sel.bank, "pcrs": list(sel.pcrs)} for sel in self.quote.pcr_select
            ]
        return out


def _pcr_selection(reader: Reader) -> tuple[PcrSelection, ...]:
    count = reader.u32_be("TPML_PCR_SELECTION count")
    if count > MAX_PCR_BANKS:
        raise reader.fail(f"PCR selection lists {count} banks, at most {MAX_PCR_BANKS} allowed")
    out: list[PcrSelection] = []
    for _ in range(count):
        alg = reader.u16_be("PCR selection hash")
        size = reader.u8("sizeofSelect")
        if size > MAX_PCR_SELECT:
            raise reader.fail(f"sizeofSelect {size} exceeds {MAX_PCR_SELECT}")
        bitmap = reader.read(size, "pcrSelect")
        pcrs = tuple(
            byte_index * 8 + bit
            for byte_index, byte in enumerate(bitmap)
            for bit in range(8)
            if byte >> bit & 1
        )
        out.append(PcrSelection(hash_alg=alg, pcrs=pcrs))
    return tuple(out)


def parse_attest(data: bytes) -> TpmsAttest:
    """Parse a TPMS_ATTEST (the signed message of a quote). The structure must fill ``data``
    exactly: every byte of it is signed, so unexplained bytes are refused."""
    if len(data) > MAX_ATTEST:
        raise FormatError("TPMS_ATTEST", f"{len(data)} bytes exceeds the {MAX_ATTEST}-byte limit")
    reader = Reader(data, "TPMS_ATTEST")
    magic = reader.u32_be("magic")
    attest_type = reader.u16_be("type")
    signer = reader.sized_be16("qualifiedSigner", limit=MAX_NAME)
    extra = reader.sized_be16("extraData", limit=MAX_DATA)
    clock = reader.u64_be("clock")
    reset_count = reader.u32_be("resetCount")
    restart_count = reader.u32_be("restartCount")
    safe = reader.u8("safe")
    if safe > 1:
        raise reader.fail(f"clockInfo.safe is {safe}, must be 0 or 1")
    firmware = reader.u64_be("firmwareVersion")
    body_start = reader.offset
    quote: QuoteInfo | None = None
    if magic == TPM_GENERATED_VALUE and attest_type == TPM_ST_ATTEST_QUOTE:
        selection = _pcr_selection(reader)
        pcr_digest = reader.sized_be16("pcrDigest", limit=MAX_DIGEST)
        reader.expect_end()
        quote = QuoteInfo(pcr_select=selection, pcr_digest=pcr_digest)
    attested = data[body_start:]
    return TpmsAttest(
        magic=magic,
        type=attest_type,
        qualified_signer=signer,
        extra_data=extra,
        clock_info=ClockInfo(clock=clock, reset_count=reset_count, restart_count=restart_count,
                             safe=bool(safe)),
        firmware_version=firmware,
        quote=quote,
        attested=attested,
    )


# --------------------------------------------------------------------------------------------------
# TPMT_SIGNATURE


@dataclass(frozen=True, kw_only=True)
class TpmtSignature:
    """A parsed TPMT_SIGNATURE. RSA schemes fill ``rsa_signature``; ECDSA fills ``ecc_r``/``ecc_s``
    (big-endian integers, as the TPM sends them)."""

    sig_alg: int
    hash_alg: int
    rsa_signature: bytes = b""
    ecc_r: bytes = b""
    ecc_s: bytes = b""

    @property
    def scheme(self) -> str:
        return {ALG_RSASSA: "rsassa", ALG_RSAPSS: "rsapss", ALG_ECDSA: "ecdsa"}.get(
            self.sig_alg, f"alg_{self.sig_alg:#06x}")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "hash": hash_name(self.hash_alg), **{
            k: v for k, v in to_json_object(self).items() if k in ("rsa_signature", "ecc_r", "ecc_s") and v}}


def parse_signature(data: bytes) -> TpmtSignature:
    """Parse a TPMT_SIGNATURE for RSASSA, RSAPSS or ECDSA; other schemes are refused. The
    structure must fill ``data`` exactly."""
    reader = Reader(data, "TPMT_SIGNATURE")
    sig_alg = reader.u16_be("sigAlg")
    if sig_alg in (ALG_RSASSA, ALG_RSAPSS):
        hash_alg = reader.u16_be("hash")
        sig = reader.sized_be16("signature", limit=MAX_RSA_KEY_BYTES)
        if not sig:
            raise reader.fail("empty RSA signature")
        reader.expect_end()
        return TpmtSignature(sig_alg=sig_alg, hash_alg=hash_alg, rsa_signature=sig)
    if sig_alg == ALG_ECDSA:
        hash_alg = reader.u16_be("hash")
        r = reader.sized_be16("signatureR", limit=MAX_ECC_PARAMETER)
        s = reader.sized_be16("signatureS", limit=MAX_ECC_PARAMETER)
        if not r or not s:
            raise reader.fail("empty ECDSA signature component")
        reader.expect_end()
        return TpmtSignature(sig_alg=sig_alg, hash_alg=hash_alg, ecc_r=r, ecc_s=s)
    raise reader.fail(f"unsupported signature algorithm {sig_alg:#06x} (RSASSA, RSAPSS and ECDSA are "
                      "supported)", offset=0)


# --------------------------------------------------------------------------------------------------
# TPMT_PUBLIC


@dataclass(frozen=True, kw_only=True)
class TpmtPublic:
    """A parsed TPMT_PUBLIC for an RSA or ECC key. ``raw`` is the exact TPMT_PUBLIC encoding, from
    which the key's TPM name (nameAlg ‖ H(TPMT_PUBLIC)) is computed."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    rsa_bits: int = 0
    rsa_exponent: int = 0
    rsa_modulus: bytes = b""
    curve: int = 0
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    raw: bytes = b""

    def name(self) -> bytes:
        """The TPM name of the object: nameAlg (u16) followed by its digest of TPMT_PUBLIC."""
        return self.name_alg.to_bytes(2, "big") + digest(self.name_alg, self.raw, "TPMT_PUBLIC")

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object (raises FormatError if the numbers are invalid)."""
        try:
            if self.type == ALG_RSA:
                return rsa.RSAPublicNumbers(self.rsa_exponent,
                                            int.from_bytes(self.rsa_modulus, "big")).public_key()
            curve = _CURVES[self.curve]
            return ec.EllipticCurvePublicNumbers(int.from_bytes(self.ecc_x, "big"),
                                                 int.from_bytes(self.ecc_y, "big"), curve).public_key()
        except (ValueError, KeyError) as exc:
            raise FormatError("TPMT_PUBLIC", "the key parameters do not form a valid public key") from exc

    def to_dict(self) -> dict[str, Any]:
        out = to_json_object(self)
        out.pop("raw", None)
        return out


def _sym_def(reader: Reader) -> None:
    alg = reader.u16_be("symmetric algorithm")
    if alg != ALG_NULL:
        reader.u16_be("symmetric keyBits")
        reader.u16_be("symmetric mode")


def _scheme(reader: Reader, what: str) -> tuple[int, int]:
    scheme = reader.u16_be(f"{what} scheme")
    if scheme in (ALG_NULL, ALG_RSAES):
        return scheme, ALG_NULL
    hash_alg = reader.u16_be(f"{what} scheme hash")
    if scheme == ALG_ECDAA:
        reader.u16_be("ECDAA count")
    return scheme, hash_alg


def parse_public(data: bytes) -> TpmtPublic:
    """Parse a TPMT_PUBLIC (no size prefix) for an RSA or ECC key; it must fill ``data``."""
    if len(data) > MAX_PUBLIC:
        raise FormatError("TPMT_PUBLIC", f"{len(data)} bytes exceeds the {MAX_PUBLIC}-byte limit")
    reader = Reader(data, "TPMT_PUBLIC")
    key_type = reader.u16_be("type")
    name_alg = reader.u16_be("nameAlg")
    if name_alg not in HASH_NAMES or name_alg == ALG_SM3_256:
        raise reader.fail(f"unsupported nameAlg {name_alg:#06x}")
    attributes = reader.u32_be("objectAttributes")
    policy = reader.sized_be16("authPolicy", limit=MAX_DIGEST)
    if key_type == ALG_RSA:
        _sym_def(reader)
        scheme, scheme_hash = _scheme(reader, "RSA")
        bits = reader.u16_be("keyBits")
        exponent = reader.u32_be("exponent") or 65537
        modulus = reader.sized_be16("unique (RSA modulus)", limit=MAX_RSA_KEY_BYTES)
        if not modulus or len(modulus) * 8 != bits:
            raise reader.fail(f"RSA modulus is {len(modulus)} bytes, keyBits says {bits}")
        reader.expect_end()
        return TpmtPublic(type=key_type, name_alg=name_alg, object_attributes=attributes,
                          auth_policy=policy, scheme=scheme, scheme_hash=scheme_hash, rsa_bits=bits,
                          rsa_exponent=exponent, rsa_modulus=modulus, raw=bytes(data))
    if key_type == ALG_ECC:
        _sym_def(reader)
        scheme, scheme_hash = _scheme(reader, "ECC")
        curve = reader.u16_be("curveID")
        if curve not in _CURVES:
            raise reader.fail(f"unsupported ECC curve {curve:#06x}")
        kdf = reader.u16_be("kdf scheme")
        if kdf != ALG_NULL:
            reader.u16_be("kdf hash")
        x = reader.sized_be16("unique x", limit=MAX_ECC_PARAMETER)
        y = reader.sized_be16("unique y", limit=MAX_ECC_PARAMETER)
        size = _CURVE_SIZES[curve]
        if len(x) > size or len(y) > size or not x or not y:
            raise reader.fail(f"ECC point coordinates do not fit curve {curve:#06x}")
        reader.expect_end()
        return TpmtPublic(type=key_type, name_alg=name_alg, object_attributes=attributes,
                          auth_policy=policy, scheme=scheme, scheme_hash=scheme_hash, curve=curve,
                          ecc_x=x, ecc_y=y, raw=bytes(data))
    raise reader.fail(f"unsupported key type {key_type:#06x} (RSA and ECC are supported)", offset=0)


def parse_public_sized(data: bytes) -> TpmtPublic:
    """Parse a TPM2B_PUBLIC (u16 size, then TPMT_PUBLIC); the size must cover the rest of ``data``."""
    reader = Reader(data, "TPM2B_PUBLIC")
    inner = reader.sized_be16("publicArea", limit=MAX_PUBLIC)
    reader.expect_end()
    return parse_public(inner)
