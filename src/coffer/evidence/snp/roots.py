"""The built-in AMD trust anchors for SEV-SNP, pinned by SHA-256 of their DER encoding.

For each product AMD publishes a self-signed root (ARK), the intermediate that signs VCEKs (ASK,
``CN=SEV-<product>``) and the one that signs VLEKs (ASVK, ``CN=SEV-VLEK-<product>``). They ship with
Coffer as PEM files under ``coffer/evidence/roots/`` and are checked against the pins below, and
against each other, the first time they are used. Users never supply a root: a root that arrives with
evidence must equal the built-in one.

Tests build a :class:`SnpTrustStore` of their own and pass it to the verifier as ``roots=``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from coffer.errors import ConfigError
from coffer.evidence.x509util import AMD_RSA_PSS, ChainError, check_issued_by, load_certificate

# SHA-256 of the DER encoding of each built-in certificate.
PINS: dict[str, dict[str, str]] = {
    "Milan": {
        "ark": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "ask": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        "asvk": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    },
    "Genoa": {
        "ark": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "ask": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        "asvk": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    },
    "Turin": {
        "ark": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        "ask": "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        "asvk": "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
    },
}


@dataclass(frozen=True)
class ProductRoots:
    """One product's ARK and the two intermediates it signed."""

    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate

    def intermediate(self, signer: str) -> x509.Certificate:
        return self.asvk if signer == "vlek" else self.ask

    @cached_property
    def ark_der(self) -> bytes:
        return _der(self.ark)

    @cached_property
    def intermediate_ders(self) -> frozenset[bytes]:
        return frozenset((_der(self.ask), _der(self.asvk)))

    def check(self, product: str) -> None:
        """The ARK is self-signed and issued both intermediates (raises ChainError)."""
        check_issued_by(self.ark, self.ark, f"ARK-{product}", rsa_pss=AMD_RSA_PSS)
        check_issued_by(self.ask, self.ark, f"ASK-{product}", rsa_pss=AMD_RSA_PSS)
        check_issued_by(self.asvk, self.ark, f"ASVK-{product}", rsa_pss=AMD_RSA_PSS)


class SnpTrustStore:
    """The AMD roots a verification trusts, by product name. Each product's ARK must be self-signed
    and have issued its ASK and ASVK; that is checked once, here."""

    def __init__(self, products: Mapping[str, ProductRoots]) -> None:
        for product, roots in products.items():
            try:
                roots.check(product)
            except ChainError as exc:
                raise ConfigError(f"AMD {product} roots do not chain: {exc}") from exc
        self._products = dict(products)

    @property
    def products(self) -> tuple[str, ...]:
        return tuple(self._products)

    def get(self, product: str) -> ProductRoots | None:
        return self._products.get(product)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _load_pinned(product: str, role: str) -> x509.Certificate:
    name = f"amd-{product.lower()}-{role}.pem"
    try:
        data = resources.files("coffer").joinpath("evidence", "roots", name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"built-in AMD certificate {name} is missing from the installation") from exc
    cert = load_certificate(data, name)
    digest = hashlib.sha256(_der(cert)).hexdigest()
    if digest != PINS[product][role]:
        raise ConfigError(f"built-in AMD certificate {name} does not match its pin (SHA-256 {digest})")
    return cert


@lru_cache(maxsize=1)
def builtin_roots() -> SnpTrustStore:
    """AMD's published roots for Milan, Genoa and Turin, verified against their pins once."""
    products: dict[str, ProductRoots] = {}
    for product in PINS:
        ark = _load_pinned(product, "ark")
        ask = _load_pinned(product, "ask")
        asvk = _load_pinned(product, "asvk")
        products[product] = ProductRoots(ark=ark, ask=ask, asvk=asvk)
    return SnpTrustStore(products)
