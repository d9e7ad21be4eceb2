"""VCEK/VLEK extension parsing and the built-in AMD roots."""

from __future__ import annotations

import contextlib
import hashlib
from datetime import UTC, datetime
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence.snp import builtin_roots
from coffer.evidence.snp.certs import (
    OID_BL_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_UCODE_SPL,
    decode_der_integer,
    decode_hwid,
    parse_endorsement_der,
    parse_extension_values,
)
from coffer.evidence.snp.roots import PINS
from coffer.evidence.x509util import ChainError, check_issued_by, check_validity, load_certificate
from tests.conftest import vector_bytes

TRUSTEE_SNP = "trustee/deps/verifier/test_data/snp/"

# SHA-256 of the ARKs as published in the reference notes (independent of roots.PINS).
REFERENCE_ARK_PINS = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}


def test_turin_vcek_extensions_s13() -> None:
    _, ext = parse_endorsement_der(vector_bytes("virtee-sev/tests/certs_data/vcek_turin.der"))
    assert ext.struct_version == 1
    assert ext.product_name == "Turin"
    assert ext.fmc_spl == 0
    assert ext.ucode_spl == 9
    assert ext.hwid is not None
    assert ext.hwid.hex() == "1e550a8ee5cf9f4d"
    assert ext.csp_id is None


def test_turin_vcek_chains_to_builtin_turin_roots_s13() -> None:
    cert, _ = parse_endorsement_der(vector_bytes("virtee-sev/tests/certs_data/vcek_turin.der"))
    turin = builtin_roots().get("Turin")
    assert turin is not None
    check_issued_by(cert, turin.ask, "VCEK")
    check_validity(cert, datetime(2031, 11, 1, tzinfo=UTC), "VCEK")


@pytest.mark.parametrize(
    ("relative", "product"),
    [("trustee/deps/verifier/test_data/az-snp-vtpm/vcek.pem", "Milan"),
     ("trustee/deps/verifier/test_data/az-snp-vtpm/vcek-genoa.pem", "Genoa")],
)
def test_azure_vceks_chain_to_their_product_roots(relative: str, product: str) -> None:
    from coffer.evidence.x509util import certificate_ders

    leaf = certificate_ders(vector_bytes(relative))[0]
    cert, ext = parse_endorsement_der(leaf)
    assert ext.product == product
    roots = builtin_roots().get(product)
    assert roots is not None
    check_issued_by(cert, roots.ask, "VCEK")
    other = builtin_roots().get("Genoa" if product == "Milan" else "Milan")
    assert other is not None
    with pytest.raises(ChainError):
        check_issued_by(cert, other.ask, "VCEK")


def test_vlek_extensions_have_csp_id_and_no_hwid() -> None:
    _, ext = parse_endorsement_der(vector_bytes(TRUSTEE_SNP + "test-vlek.der"))
    assert ext.product_name == "Milan"
    assert ext.hwid is None
    assert ext.csp_id is not None
    assert ext.csp_id.startswith("CN=")
    assert ext.ucode_spl == 0xD9  # two content bytes: 02 02 00 d9


@pytest.mark.parametrize(("name", "ucode"), [("test-vcek-invalid-legacy.der", 0xA9),
                                             ("test-vcek-invalid-new.der", 0x1E)])
def test_trustee_vcek_encodings_parse(name: str, ucode: int) -> None:
    _, ext = parse_endorsement_der(vector_bytes(TRUSTEE_SNP + name))
    assert ext.product_name == "Milan-B0"
    assert ext.product == "Milan"
    assert ext.ucode_spl == ucode
    assert ext.hwid is not None
    assert len(ext.hwid) == 64
    assert ext.hwid[:4] == bytes([0, 1, 2, 3])


@pytest.mark.parametrize(("der", "value"), [("020100", 0), ("02017f", 127), ("02020080", 128),
                                            ("020200d9", 217), ("02030100ff", 0x100FF)])
def test_der_integer(der: str, value: int) -> None:
    assert decode_der_integer(bytes.fromhex(der)) == value


@pytest.mark.parametrize("der", ["", "02", "0200", "020180", "0202007f", "0301 00", "02020000",
                                 "020100ff", "0202ff", "028101" + "05", "0281"])
def test_rejects_bad_der_integer(der: str) -> None:
    with pytest.raises(FormatError):
        decode_der_integer(bytes.fromhex(der.replace(" ", "")))


def test_hwid_raw_and_octet_string() -> None:
    chip = bytes(range(64))
    assert decode_hwid(chip) == chip
    assert decode_hwid(b"\x04\x40" + chip) == chip
    assert decode_hwid(b"\x04\x08" + chip[:8]) == chip[:8]
    with pytest.raises(FormatError):
        decode_hwid(b"\x04\x05" + chip[:5])
    with pytest.raises(FormatError):
        decode_hwid(chip[:10])


def test_rejects_product_name_with_wrong_tag() -> None:
    with pytest.raises(FormatError, match="tag"):
        parse_extension_values({OID_PRODUCT_NAME: b"\x0c\x05Milan"})


def test_builtin_roots_match_their_pins_and_the_reference_ark_pins() -> None:
    store = builtin_roots()
    assert store.products == ("Milan", "Genoa", "Turin")
    for product, pin in REFERENCE_ARK_PINS.items():
        assert PINS[product]["ark"] == pin
        for role in ("ark", "ask", "asvk"):
            name = f"amd-{product.lower()}-{role}.pem"
            data = resources.files("coffer").joinpath("evidence", "roots", name)
            cert = load_certificate(data.read_bytes())
            from cryptography.hazmat.primitives.serialization import Encoding

            assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == PINS[product][role]
        roots = store.get(product)
        assert roots is not None
        assert roots.ask.subject.rfc4514_string().startswith(f"CN=SEV-{product}")
        assert roots.asvk.subject.rfc4514_string().startswith(f"CN=SEV-VLEK-{product}")


def test_builtin_roots_equal_the_vector_copies() -> None:
    from coffer.evidence.x509util import certificate_ders

    store = builtin_roots()
    for product in ("milan", "genoa", "turin"):
        roots = store.get(product.capitalize())
        assert roots is not None
        from cryptography.hazmat.primitives.serialization import Encoding

        ark = certificate_ders(vector_bytes(f"virtee-sev/src/certs/snp/builtin/{product}/ark.pem"))[0]
        assert roots.ark.public_bytes(Encoding.DER) == ark


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from([OID_BL_SPL, OID_UCODE_SPL, OID_HWID, OID_PRODUCT_NAME]),
    st.binary(max_size=80), max_size=4))
def test_random_extension_values_only_raise_format_error(raw: dict[str, bytes]) -> None:
    with contextlib.suppress(FormatError):
        parse_extension_values(raw)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 1318), st.integers(0, 255))
def test_mutated_vlek_certificate_only_raises_format_error(offset: int, value: int) -> None:
    data = bytearray(vector_bytes(TRUSTEE_SNP + "test-vlek.der"))
    data[offset] = value
    with contextlib.suppress(FormatError):
        parse_endorsement_der(bytes(data))
