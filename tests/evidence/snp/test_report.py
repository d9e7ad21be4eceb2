"""The ATTESTATION_REPORT parser: real reports, malformed ones, and a property test."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence import parse
from coffer.evidence.snp import parse_report
from coffer.evidence.snp.report import TcbVersion, product_from_cpuid
from tests.conftest import vector_bytes
from tests.evidence.snp.synth import ReportSpec, Tcb, build_report

S1 = "virtee-sev/tests/certs_data/report_milan.hex"


def s1() -> bytes:
    return bytes.fromhex(vector_bytes(S1).decode().strip())


def with_bytes(data: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(data)
    out[offset : offset + len(value)] = value
    return bytes(out)


def test_parses_virtee_milan_v2_report() -> None:
    report = parse_report(s1())
    assert report.version == 2
    assert report.product is None
    assert report.cpuid_family is None
    assert report.reported_tcb.raw.hex() == "0300000000000873"
    assert report.reported_tcb.to_dict() == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert str(report.current_version) == "1.52.4"
    assert report.policy.raw == 0x30000
    assert report.policy.abi_major == 0
    assert report.policy.smt is True
    assert report.signer_info.signing_key == "vcek"
    assert report.signature_algo == 1
    assert report.chip_id.hex().startswith("d49554ec717f4e5b")
    assert report.kds_hwid() == report.chip_id
    json.dumps(report.to_dict())


def test_parses_aws_v3_report_with_cpuid() -> None:
    raw = base64.b64decode(vector_bytes("constellation/internal/attestation/aws/snp/testdata/report.txt"))
    report = parse_report(raw)
    assert report.version == 3
    assert (report.cpuid_family, report.cpuid_model, report.cpuid_stepping) == (0x19, 0x01, 0x01)
    assert report.product == "Milan"
    assert report.signer_info.signing_key == "vlek"
    assert report.reported_tcb.raw.hex() == "04000000000018d9"


def test_ignores_trailing_bytes_after_the_report() -> None:
    raw = vector_bytes("constellation/internal/attestation/snp/testdata/attestation.bin")
    report = parse_report(raw)
    assert len(report.raw) == 0x4A0
    assert report.policy.raw == 0x3001F


def test_handler_parse_gives_a_printable_dict() -> None:
    out = parse("snp", s1()).to_dict()
    assert out["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert out["policy"]["abi"] == "0.0"
    assert len(out["signature_r"]) == 96


def test_handler_parse_accepts_the_json_form() -> None:
    out = parse("snp", vector_bytes("trustee/attestation-service/tests/e2e/evidence.json")).to_dict()
    assert out["product"] == "Genoa"
    assert out["cpuid_model"] == 0xA0


def test_rejects_truncated_report() -> None:
    with pytest.raises(FormatError, match="at least"):
        parse_report(s1()[:0x49F])


@pytest.mark.parametrize("version", [0, 1, 4, 6, 0xFFFFFFFF])
def test_rejects_unsupported_version(version: int) -> None:
    with pytest.raises(FormatError, match="version"):
        parse_report(with_bytes(s1(), 0, version.to_bytes(4, "little")))


def test_rejects_signature_algorithm_other_than_ecdsa_p384() -> None:
    with pytest.raises(FormatError, match="signature algorithm"):
        parse_report(with_bytes(s1(), 0x34, (2).to_bytes(4, "little")))


@pytest.mark.parametrize("offset", [0x04C, 0x188, 0x19F, 0x1EB, 0x1EF, 0x1F8, 0x29F, 0x330, 0x49F])
def test_rejects_nonzero_reserved_byte(offset: int) -> None:
    with pytest.raises(FormatError, match="must be zero"):
        parse_report(with_bytes(s1(), offset, b"\x01"))


def test_rejects_policy_without_reserved_bit_17() -> None:
    with pytest.raises(FormatError, match="bit 17"):
        parse_report(with_bytes(s1(), 0x008, (0x10000).to_bytes(8, "little")))


def test_rejects_policy_with_undefined_high_bits() -> None:
    with pytest.raises(FormatError, match="reserved bits"):
        parse_report(with_bytes(s1(), 0x008, (0x30000 | 1 << 40).to_bytes(8, "little")))


def test_rejects_reserved_signing_key_code() -> None:
    with pytest.raises(FormatError, match="signing key"):
        parse_report(with_bytes(s1(), 0x048, (3 << 2).to_bytes(4, "little")))


def test_decodes_all_policy_bits() -> None:
    raw = build_report(ReportSpec(policy=(1 << 26) - 1 & ~0xFFFF | 0x0102 | 0x20000))
    policy = parse_report(raw).policy
    assert (policy.abi_major, policy.abi_minor) == (1, 2)
    assert policy.debug
    assert policy.migrate_ma
    assert policy.single_socket
    assert policy.cxl_allow
    assert policy.mem_aes_256_xts
    assert policy.rapl_dis
    assert policy.ciphertext_hiding
    assert policy.page_swap_disable


def test_v5_carries_mitigation_vectors() -> None:
    report = parse_report(build_report(ReportSpec(product="Genoa", version=5)))
    assert report.launch_mit_vector == 3
    assert report.current_mit_vector == 3
    assert report.product == "Genoa"


def test_turin_tcb_layout_puts_fmc_first() -> None:
    tcb = TcbVersion.decode(bytes.fromhex("0001000200000047"), turin=True)
    assert tcb.to_dict() == {"fmc": 0, "bootloader": 1, "tee": 0, "snp": 2, "microcode": 71}
    assert tcb.kds_params()[-1] == ("fmcSPL", 0)
    assert tcb.encode().hex() == "0001000200000047"


def test_turin_report_uses_8_byte_hwid() -> None:
    spec = ReportSpec(product="Turin", reported_tcb=Tcb(bootloader=1, snp=2, microcode=71, fmc=5))
    report = parse_report(build_report(spec))
    assert report.product == "Turin"
    assert report.reported_tcb.fmc == 5
    assert len(report.kds_hwid()) == 8


def test_v2_product_can_be_supplied() -> None:
    report = parse_report(s1(), product="Milan")
    assert report.product == "Milan"


def test_rejects_supplied_product_contradicting_cpuid() -> None:
    with pytest.raises(FormatError, match="CPUID"):
        parse_report(build_report(ReportSpec(product="Genoa")), product="Milan")


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [(0x19, 0x00, "Milan"), (0x19, 0x0F, "Milan"), (0x19, 0x10, "Genoa"), (0x19, 0x1F, "Genoa"),
     (0x19, 0xA0, "Genoa"), (0x19, 0xAF, "Genoa"), (0x1A, 0x00, "Turin"), (0x1A, 0x11, "Turin"),
     (0x19, 0x20, None), (0x17, 0x31, None), (0x1A, 0x50, None)],
)
def test_product_from_cpuid(family: int, model: int, product: str | None) -> None:
    assert product_from_cpuid(family, model) == product


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=0x4C0))
def test_random_input_only_raises_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_report(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x4A0 - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_real_report_only_raises_format_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(bytes.fromhex(vector_bytes(S1).decode().strip()))
    for offset, value in edits:
        data[offset] = value
    try:
        report = parse_report(bytes(data))
    except FormatError:
        return
    json.dumps(report.to_dict())
