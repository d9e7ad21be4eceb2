"""The hand-written walker for the PCK certificate's SGX extension."""

from __future__ import annotations

import contextlib

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import FormatError
from coffer.evidence.dcap import parse_quote
from coffer.evidence.dcap.pck import SGX_EXTENSION_OID, parse_pck_extension, pck_ca_type, pck_extension
from coffer.evidence.x509util import load_certificates
from tests.conftest import vector_bytes
from tests.evidence.dcap.synth import der, der_int, der_seq, entry, sgx_extension


def _pck(path: str) -> x509.Certificate:
    return load_certificates(parse_quote(vector_bytes(path)).qe.pck_chain_pem)[0]


def _raw_extension(cert: x509.Certificate) -> bytes:
    value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


@pytest.mark.vectors
def test_processor_ca_pck_of_sgx_sample() -> None:
    cert = _pck("dcap-qvl/sample/sgx_quote")
    ext = pck_extension(cert)
    assert pck_ca_type(cert.issuer) == "processor"
    assert ext.fmspc.hex() == "00a067110000"
    assert ext.pce_id == b"\0\0"
    assert ext.tcb.components == (11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert ext.tcb.pcesvn == 13
    assert ext.tcb.cpusvn == bytes(ext.tcb.components)
    assert ext.platform_instance_id is None


@pytest.mark.vectors
def test_platform_ca_pck_with_configuration() -> None:
    cert = _pck("go-tdx-guest/testing/testdata/tdx_prod_quote_SPR_E4.dat")
    ext = pck_extension(cert)
    assert pck_ca_type(cert.issuer) == "platform"
    assert ext.fmspc.hex() == "50806f000000"
    assert ext.sgx_type == 1
    assert ext.platform_instance_id is not None
    assert ext.dynamic_platform is True
    assert ext.cached_keys is False
    assert ext.smt_enabled is True
    assert ext.to_dict()["tcb"]["pcesvn"] == 11


def test_synthetic_extension_round_trip() -> None:
    comps = tuple(range(16))
    ext = parse_pck_extension(sgx_extension(fmspc=b"\1\2\3\4\5\6", components=comps, pcesvn=300))
    assert ext.tcb.components == comps
    assert ext.tcb.pcesvn == 300
    assert ext.fmspc == b"\1\2\3\4\5\6"


def test_rejects_missing_fmspc() -> None:
    ok = sgx_extension(fmspc=b"\0" * 6, components=(0,) * 16, pcesvn=1)
    # rebuild without the FMSPC entry
    tcb = [entry(f"2.{i}", der_int(0)) for i in range(1, 17)]
    tcb += [entry("2.17", der_int(1)), entry("2.18", der(0x04, bytes(16)))]
    without = der_seq(entry("1", der(0x04, bytes(16))), entry("2", der_seq(*tcb)),
                      entry("3", der(0x04, b"\0\0")), entry("5", der_int(0, tag=0x0A)))
    parse_pck_extension(ok)
    with pytest.raises(FormatError, match="FMSPC"):
        parse_pck_extension(without)


def test_rejects_duplicate_entry() -> None:
    ext = sgx_extension(fmspc=b"\0" * 6, components=(0,) * 16, pcesvn=1)
    # append a second PPID inside the outer SEQUENCE
    dup = der_seq(ext[2:] if ext[1] < 0x80 else ext[2 + (ext[1] & 0x7F):], entry("1", der(0x04, bytes(16))))
    with pytest.raises(FormatError, match="duplicate"):
        parse_pck_extension(dup)


def test_rejects_negative_svn() -> None:
    tcb = [entry(f"2.{i}", der(0x02, b"\xff")) for i in range(1, 17)]
    tcb += [entry("2.17", der_int(1)), entry("2.18", der(0x04, bytes(16)))]
    bad = der_seq(entry("1", der(0x04, bytes(16))), entry("2", der_seq(*tcb)),
                  entry("3", der(0x04, b"\0\0")), entry("4", der(0x04, bytes(6))),
                  entry("5", der_int(0, tag=0x0A)))
    with pytest.raises(FormatError, match="negative"):
        parse_pck_extension(bad)


def test_rejects_indefinite_length() -> None:
    with pytest.raises(FormatError, match="indefinite"):
        parse_pck_extension(b"\x30\x80\x00\x00")


def test_rejects_length_overrunning_container() -> None:
    with pytest.raises(FormatError, match="overruns"):
        parse_pck_extension(b"\x30\x05\x30\x10\x00")


def test_rejects_unknown_pck_ca_name() -> None:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Some Other CA")])
    with pytest.raises(FormatError, match="not an Intel SGX PCK CA"):
        pck_ca_type(name)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_pck_extension(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_extension_only_raises_format_error(data: st.DataObject) -> None:
    base = bytearray(sgx_extension(fmspc=b"\0\1\2\3\4\5", components=tuple(range(16)), pcesvn=9))
    for _ in range(data.draw(st.integers(1, 4))):
        base[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FormatError):
        parse_pck_extension(bytes(base[: data.draw(st.integers(0, len(base)))]))
