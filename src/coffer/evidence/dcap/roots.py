"""The pinned Intel SGX Root CA: the one trust anchor of every DCAP verification.

The certificate ships as ``coffer/evidence/roots/intel-sgx-root-ca.pem`` and is checked against the
SHA-256 of its DER encoding pinned here when it is loaded, so a modified file cannot become a trust
anchor. It is loaded once per process.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from coffer.errors import ConfigError
from coffer.evidence.x509util import load_certificate

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
_ROOT_FILE = "intel-sgx-root-ca.pem"


@lru_cache(maxsize=1)
def intel_sgx_root_ca() -> x509.Certificate:
    """The Intel SGX Root CA certificate, after checking its pinned fingerprint."""
    pem = resources.files("coffer.evidence").joinpath("roots", _ROOT_FILE).read_bytes()
    cert = load_certificate(pem, "Intel SGX Root CA")
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    if digest != INTEL_SGX_ROOT_CA_SHA256:
        raise ConfigError(f"built-in {_ROOT_FILE} has SHA-256 {digest}, expected the pinned "
                          f"{INTEL_SGX_ROOT_CA_SHA256}")
    return cert


@lru_cache(maxsize=1)
def intel_sgx_root_ca_der() -> bytes:
    return intel_sgx_root_ca().public_bytes(Encoding.DER)
