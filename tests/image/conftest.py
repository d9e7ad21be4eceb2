"""Fixtures shared by the signing, trust-policy and skopeo-signing tests: cosign keys and an image
pushed to a local registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from coffer.image.reference import RegistryRef
from coffer.image.signing import SigningKey
from tests.image.test_signing import KeyPair, new_key_pair, new_plain_key, push_test_image
from tests.support.registry import RegistryServer, registry  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def keys() -> KeyPair:
    """One cosign key pair per module: scrypt N=65536 makes each one cost ~0.2 s."""
    return new_key_pair()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    """A second signer, created directly (cheap: no scrypt)."""
    return new_plain_key()


@pytest.fixture
def pushed(tmp_path: Path, registry: RegistryServer) -> RegistryRef:  # noqa: F811
    return push_test_image(tmp_path, registry)
