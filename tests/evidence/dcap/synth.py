"""Synthetic DCAP platforms for tests: a private root, PCK CA, PCK certificate with the SGX
extension, TCB signing certificate, signed collateral, CRLs, and quotes signed by a fresh
attestation key. Every knob a negative test needs (validity, revocation, TCB levels, debug) is a
parameter of :func:`build`."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from coffer.evidence.collateral import IntelCollateral
from coffer.evidence.dcap.quote import INTEL_QE_VENDOR_ID

SGX_OID = "1.2.840.113741.1.13.1"
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
NOW = datetime(2030, 6, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------------------- DER


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        rest = arc
        chunk = [rest & 0x7F]
        rest >>= 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return der(0x06, bytes(body))


def der_int(value: int, tag: int = 0x02) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return der(tag, raw)


def der_seq(*items: bytes) -> bytes:
    return der(0x30, b"".join(items))


def entry(arc: str, value: bytes, prefix: str = SGX_OID) -> bytes:
    return der_seq(der_oid(f"{prefix}.{arc}"), value)


def sgx_extension(*, fmspc: bytes, components: tuple[int, ...], pcesvn: int,
                  pce_id: bytes = b"\0\0", ppid: bytes = b"\x11" * 16) -> bytes:
    tcb = [entry(f"2.{i + 1}", der_int(svn)) for i, svn in enumerate(components)]
    tcb.append(entry("2.17", der_int(pcesvn)))
    tcb.append(entry("2.18", der(0x04, bytes(components))))
    return der_seq(
        entry("1", der(0x04, ppid)),
        entry("2", der_seq(*tcb)),
        entry("3", der(0x04, pce_id)),
        entry("4", der(0x04, fmspc)),
        entry("5", der_int(0, tag=0x0A)),
    )


# ---------------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Corporation")])


def make_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, serial: int,
              not_before: datetime, not_after: datetime,
              extension: bytes | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_OID), extension), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def make_crl(issuer: str, key: ec.EllipticCurvePrivateKey, *, revoked: tuple[int, ...] = (),
             last: datetime, next_: datetime) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(_name(issuer))
               .last_update(last).next_update(next_))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


# ------------------------------------------------------------------------------------ collateral


def svn_list(values: tuple[int, ...]) -> list[dict[str, int]]:
    return [{"svn": v} for v in values]


def tcb_level(*, sgx: tuple[int, ...], pcesvn: int, tdx: tuple[int, ...], status: str,
              date: str = "2029-01-01T00:00:00Z", advisories: tuple[str, ...] = ()) -> dict[str, Any]:
    level: dict[str, Any] = {
        "tcb": {"sgxtcbcomponents": svn_list(sgx), "pcesvn": pcesvn, "tdxtcbcomponents": svn_list(tdx)},
        "tcbDate": date, "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def signed_json(key_name: str, obj: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    inner = json.dumps(obj, separators=(",", ":")).encode()
    signature = raw_sign(key, inner).hex().encode()
    return b'{"' + key_name.encode() + b'":' + inner + b',"signature":"' + signature + b'"}'


# ----------------------------------------------------------------------------------------- quote


def td_body(*, tee_tcb_svn: bytes, report_data: bytes, debug: bool) -> bytes:
    attrs = (1 if debug else 0) | (1 << 28)
    return (tee_tcb_svn + bytes(48) + bytes(48) + bytes(8) + attrs.to_bytes(8, "little")
            + bytes.fromhex("e742060000000000") + b"\x01" * 48 + bytes(48 * 3)
            + b"\x02" * 48 * 4 + report_data)


def enclave_report(*, mr_signer: bytes, isv_prod_id: int, isv_svn: int, report_data: bytes,
                   attributes: bytes = bytes([0x11]) + bytes(15)) -> bytes:
    out = (bytes(16) + bytes(4) + bytes(12) + bytes(16) + attributes + b"\x03" * 32 + bytes(32)
           + mr_signer + bytes(32) + bytes(64) + struct.pack("<HHH", isv_prod_id, isv_svn, 0)
           + bytes(42) + bytes(16) + report_data)
    assert len(out) == 384
    return out


@dataclass
class Platform:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    pck_ca: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey
    fmspc: bytes
    quote: bytes
    collateral: IntelCollateral
    extra: dict[str, Any] = field(default_factory=dict)


def build(*, now: datetime = NOW, pck_not_after: datetime | None = None,
          pck_crl_revokes_pck: bool = False, root_crl_revokes_ca: bool = False,
          levels: list[dict[str, Any]] | None = None, debug: bool = False,
          tee_tcb_svn: bytes = bytes([3, 0, 5]) + bytes(13), report_data: bytes = b"\x42" * 64,
          qe_isvsvn: int = 4, root_cn: str = "Test SGX Root CA",
          collateral_fmspc: bytes | None = None) -> Platform:
    """A TDX v4 platform whose quote verifies at ``now`` with status UpToDate by default."""
    year = timedelta(days=365)
    fmspc = bytes.fromhex("00a06d080000")
    components = (2, 2, 7, 7, 4, 1, 0, 2) + (0,) * 8
    root_key, ca_key, pck_key, signer_key, att_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
    root = make_cert(root_cn, root_key, root_cn, root_key, ca=True, serial=1,
                     not_before=now - 10 * year, not_after=now + 10 * year)
    ca_cn = "Intel SGX PCK Platform CA"
    pck_ca = make_cert(ca_cn, ca_key, root_cn, root_key, ca=True, serial=2,
                       not_before=now - 5 * year, not_after=now + 5 * year)
    pck = make_cert("Intel SGX PCK Certificate", pck_key, ca_cn, ca_key, ca=False, serial=0x1234,
                    not_before=now - year, not_after=pck_not_after or now + year,
                    extension=sgx_extension(fmspc=fmspc, components=components, pcesvn=11))
    signer = make_cert("Intel SGX TCB Signing", signer_key, root_cn, root_key, ca=False, serial=3,
                       not_before=now - year, not_after=now + year)

    auth = bytes(range(32))
    att_pub = att_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
    qe_report = enclave_report(mr_signer=TD_QE_MRSIGNER, isv_prod_id=2, isv_svn=qe_isvsvn,
                               report_data=hashlib.sha256(att_pub + auth).digest() + bytes(32))
    chain = pem(pck, pck_ca, root)
    qe_block = (qe_report + raw_sign(pck_key, qe_report) + struct.pack("<H", len(auth)) + auth
                + struct.pack("<HI", 5, len(chain)) + chain)
    header = struct.pack("<HHIHH", 4, 2, 0x81, 0, 0) + INTEL_QE_VENDOR_ID + bytes(20)
    body = td_body(tee_tcb_svn=tee_tcb_svn, report_data=report_data, debug=debug)
    signed = header + body
    sig_data = raw_sign(att_key, signed) + att_pub + struct.pack("<HI", 6, len(qe_block)) + qe_block
    quote = signed + struct.pack("<I", len(sig_data)) + sig_data

    issue = (now - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    next_update = (now + timedelta(days=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    zero_signer = "00" * 48
    tcb_info = {
        "id": "TDX", "version": 3, "issueDate": issue, "nextUpdate": next_update,
        "fmspc": (collateral_fmspc or fmspc).hex(), "pceId": "0000", "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tdxModule": {"mrsigner": zero_signer, "attributes": "0000000000000000",
                      "attributesMask": "FFFFFFFFFFFFFFFF"},
        "tdxModuleIdentities": [{
            "id": "TDX_01", "mrsigner": zero_signer, "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
            "tcbLevels": [{"tcb": {"isvsvn": 4}, "tcbDate": "2029-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
                          {"tcb": {"isvsvn": 2}, "tcbDate": "2028-01-01T00:00:00Z", "tcbStatus": "OutOfDate",
                           "advisoryIDs": ["INTEL-SA-01036"]}]}],
        "tcbLevels": levels if levels is not None else [
            tcb_level(sgx=components, pcesvn=11, tdx=(3, 0, 5) + (0,) * 13, status="UpToDate"),
        ],
    }
    qe_identity = {
        "id": "TD_QE", "version": 2, "issueDate": issue, "nextUpdate": next_update,
        "tcbEvaluationDataNumber": 17, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000", "mrsigner": TD_QE_MRSIGNER.hex().upper(),
        "isvprodid": 2,
        "tcbLevels": [{"tcb": {"isvsvn": 4}, "tcbDate": "2029-02-01T00:00:00Z", "tcbStatus": "UpToDate"},
                      {"tcb": {"isvsvn": 1}, "tcbDate": "2027-02-01T00:00:00Z", "tcbStatus": "OutOfDate",
                       "advisoryIDs": ["INTEL-SA-00999"]}],
    }
    signer_der = signer.public_bytes(Encoding.DER)
    root_der = root.public_bytes(Encoding.DER)
    collateral = IntelCollateral(
        tcb_info=signed_json("tcbInfo", tcb_info, signer_key),
        tcb_info_issuer_chain=(signer_der, root_der),
        qe_identity=signed_json("enclaveIdentity", qe_identity, signer_key),
        qe_identity_issuer_chain=(signer_der, root_der),
        pck_crl=make_crl(ca_cn, ca_key, revoked=(0x1234,) if pck_crl_revokes_pck else (),
                         last=now - timedelta(days=1), next_=now + timedelta(days=29)),
        pck_crl_issuer_chain=(pck_ca.public_bytes(Encoding.DER), root_der),
        root_ca_crl=make_crl(root_cn, root_key, revoked=(2,) if root_crl_revokes_ca else (),
                             last=now - timedelta(days=30), next_=now + timedelta(days=300)),
        source="synthetic",
    )
    return Platform(root=root, root_key=root_key, pck_ca=pck_ca, pck_ca_key=ca_key, pck=pck,
                    pck_key=pck_key, signer=signer, signer_key=signer_key, attestation_key=att_key,
                    fmspc=fmspc, quote=quote, collateral=collateral,
                    extra={"tcb_info": tcb_info, "qe_identity": qe_identity})
