"""Builders of synthetic TPM structures and TCG event logs for the tests (big-endian TPM encoding,
little-endian event logs), written from the specification layouts."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from coffer.evidence.tpm import structures as st


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def pcr_select(bank: int, pcrs: Sequence[int], size: int = 3) -> bytes:
    bitmap = bytearray(size)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">HB", bank, size) + bytes(bitmap)


def attest(
    *,
    extra: bytes = b"nonce",
    selections: Sequence[bytes] | None = None,
    pcr_digest: bytes = b"\0" * 32,
    magic: int = st.TPM_GENERATED_VALUE,
    attest_type: int = st.TPM_ST_ATTEST_QUOTE,
    signer: bytes = b"\x00\x0b" + b"\x11" * 32,
) -> bytes:
    sels = list(selections) if selections is not None else [pcr_select(st.ALG_SHA256, range(24))]
    return (
        struct.pack(">IH", magic, attest_type)
        + tpm2b(signer)
        + tpm2b(extra)
        + struct.pack(">QIIB", 123456, 7, 1, 1)
        + struct.pack(">Q", 0x2020_0312_0012_0003)
        + struct.pack(">I", len(sels))
        + b"".join(sels)
        + tpm2b(pcr_digest)
    )


def quote_for(pcrs: Sequence[bytes], *, extra: bytes = b"nonce", hash_name: str = "sha256") -> bytes:
    """A TPMS_ATTEST quoting every given sha256 PCR with the right digest."""
    digest = hashlib.new(hash_name, b"".join(pcrs)).digest()
    return attest(extra=extra, selections=[pcr_select(st.ALG_SHA256, range(len(pcrs)))], pcr_digest=digest)


def sign_rsassa(key: rsa.RSAPrivateKey, message: bytes, alg: int = st.ALG_SHA256) -> bytes:
    h = st.crypto_hash(alg, "test")
    sig = key.sign(message, padding.PKCS1v15(), h)
    return struct.pack(">HH", st.ALG_RSASSA, alg) + tpm2b(sig)


def sign_rsapss(key: rsa.RSAPrivateKey, message: bytes, alg: int = st.ALG_SHA256) -> bytes:
    h = st.crypto_hash(alg, "test")
    sig = key.sign(message, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
    return struct.pack(">HH", st.ALG_RSAPSS, alg) + tpm2b(sig)


def sign_ecdsa(key: ec.EllipticCurvePrivateKey, message: bytes, alg: int = st.ALG_SHA256) -> bytes:
    size = (key.curve.key_size + 7) // 8
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(st.crypto_hash(alg, "test"))))
    return (struct.pack(">HH", st.ALG_ECDSA, alg) + tpm2b(r.to_bytes(size, "big"))
            + tpm2b(s.to_bytes(size, "big")))


# fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, restricted, sign
AK_ATTRIBUTES = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 16) | (1 << 18)


def rsa_public_area(key: rsa.RSAPublicKey, *, attributes: int = AK_ATTRIBUTES) -> bytes:
    n = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    return (struct.pack(">HHI", st.ALG_RSA, st.ALG_SHA256, attributes) + tpm2b(b"")
            + struct.pack(">H", st.ALG_NULL)  # symmetric
            + struct.pack(">HH", st.ALG_RSASSA, st.ALG_SHA256)  # scheme
            + struct.pack(">HI", key.key_size, 0) + tpm2b(n))


def ecc_public_area(key: ec.EllipticCurvePublicKey, *, attributes: int = AK_ATTRIBUTES) -> bytes:
    curve = {256: st.ECC_NIST_P256, 384: st.ECC_NIST_P384}[key.curve.key_size]
    size = key.curve.key_size // 8
    nums = key.public_numbers()
    return (struct.pack(">HHI", st.ALG_ECC, st.ALG_SHA256, attributes) + tpm2b(b"")
            + struct.pack(">H", st.ALG_NULL)
            + struct.pack(">HH", st.ALG_ECDSA, st.ALG_SHA256)
            + struct.pack(">HH", curve, st.ALG_NULL)
            + tpm2b(nums.x.to_bytes(size, "big")) + tpm2b(nums.y.to_bytes(size, "big")))


# ---------------------------------------------------------------------------------------------
# TCG event logs

ALG_SIZES = {st.ALG_SHA1: 20, st.ALG_SHA256: 32, st.ALG_SHA384: 48}
ALG_HASH = {st.ALG_SHA1: "sha1", st.ALG_SHA256: "sha256", st.ALG_SHA384: "sha384"}


def spec_id_header(algs: Sequence[int]) -> bytes:
    body = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
            + b"".join(struct.pack("<HH", a, ALG_SIZES[a]) for a in algs) + b"\0")
    return struct.pack("<II", 0, 3) + b"\0" * 20 + struct.pack("<I", len(body)) + body


def event2(pcr: int, event_type: int, data: bytes, algs: Sequence[int],
           digests: dict[int, bytes] | None = None) -> bytes:
    out = struct.pack("<III", pcr, event_type, len(algs))
    for a in algs:
        d = (digests or {}).get(a) or hashlib.new(ALG_HASH[a], data).digest()
        out += struct.pack("<H", a) + d
    return out + struct.pack("<I", len(data)) + data


def event_log(events: Sequence[tuple[int, int, bytes]], algs: Sequence[int] = (st.ALG_SHA256,),
              padding_byte: bytes = b"") -> bytes:
    log = spec_id_header(algs) + b"".join(event2(p, t, d, algs) for p, t, d in events)
    return log + padding_byte * 64


def replay_expected(events: Sequence[tuple[int, int, bytes]], hash_name: str = "sha256",
                    start: dict[int, bytes] | None = None) -> dict[int, bytes]:
    size = hashlib.new(hash_name).digest_size
    values: dict[int, bytes] = dict(start or {})
    for pcr, event_type, data in events:
        if event_type == 3:
            continue
        values[pcr] = hashlib.new(hash_name, values.get(pcr, bytes(size))
                                  + hashlib.new(hash_name, data).digest()).digest()
    return values
