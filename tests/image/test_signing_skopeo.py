"""Interop with containers/image (skopeo) through a real registry and ``use-sigstore-attachments``.

Debian's skopeo 1.9.3 is built with sigstore signing and sigstore policy checks disabled ("Debian-local
change: sigstore disabled"), but it still copies sigstore signatures: it reads ``.sig`` attachments
into ``dir:`` signature files and writes them back as attachments. These tests use that to check that
containers/image reads what Coffer writes and that Coffer verifies what containers/image writes. The
sign and policy tests run when the installed skopeo supports sigstore, and skip (naming why) otherwise.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from coffer.errors import VerificationError
from coffer.image.locations import open_destination, open_source
from coffer.image.reference import RegistryRef
from coffer.image.signing import (
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    SigningKey,
    build_payload,
    parse_payload,
    sign_image,
)
from coffer.image.transport import TransportOptions
from coffer.image.trust_policy import load_policy, verify_image
from tests.image.test_signing import (
    PASSWORD,
    KeyPair,
)
from tests.support.registry import RegistryServer, registry  # noqa: F401

SKOPEO = shutil.which("skopeo")
SIGSTORE_DISABLED = "sigstore disabled"
SIGSTORE_MAGIC = b"\x00sigstore-json\n"

pytestmark = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (apt-get install skopeo)")

OPTIONS = TransportOptions(insecure=True)


def _registries_d(tmp_path: Path, host: str) -> Path:
    directory = tmp_path / "registries.d"
    directory.mkdir(exist_ok=True)
    (directory / "coffer.yaml").write_text(f'docker:\n  "{host}":\n    use-sigstore-attachments: true\n')
    return directory


def _skopeo(registries_d: Path, *args: str, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    command = [SKOPEO, "--registries.d", str(registries_d)]
    command += ["--policy", str(policy)] if policy is not None else ["--insecure-policy"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, check=False)


def _sigstore_dir_signature(key: SigningKey, identity: str, digest: str) -> bytes:
    payload = build_payload(identity, digest)
    document = {
        "mimeType": SIMPLESIGNING_MEDIA_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(key.sign(payload)).decode()},
    }
    return SIGSTORE_MAGIC + json.dumps(document).encode()


def _policy_file(tmp_path: Path, public_pem: bytes, host: str) -> Path:
    (tmp_path / "trusted.pub").write_bytes(public_pem)
    policy = {"default": [{"type": "reject"}], "transports": {
        "docker": {host: [{"type": "sigstoreSigned", "keyPath": str(tmp_path / "trusted.pub"),
                           "signedIdentity": {"type": "matchRepository"}}]},
        "oci": {"": [{"type": "insecureAcceptAnything"}]},
        "dir": {"": [{"type": "insecureAcceptAnything"}]}}}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


def test_containers_image_reads_coffer_signatures(tmp_path: Path, pushed: RegistryRef, keys: KeyPair) -> None:
    with open_source(pushed, OPTIONS) as source, open_destination(pushed, OPTIONS) as destination:
        result = sign_image(source, destination, keys.key, docker_reference=pushed.familiar)
        destination.commit()
    out = tmp_path / "dir"
    done = _skopeo(_registries_d(tmp_path, pushed.host), "copy", "--src-tls-verify=false",
                   f"docker://{pushed.familiar}", f"dir:{out}")
    assert done.returncode == 0, done.stderr
    data = (out / "signature-1").read_bytes()
    assert data.startswith(SIGSTORE_MAGIC)
    document = json.loads(data[len(SIGSTORE_MAGIC):])
    assert document["mimeType"] == SIMPLESIGNING_MEDIA_TYPE
    payload = base64.b64decode(document["payload"])
    signature = base64.b64decode(document["annotations"][SIGNATURE_ANNOTATION])
    assert parse_payload(payload).manifest_digest == result.manifest_digest
    assert keys.key.public_key.verify(payload, signature)
    assert not (out / "signature-2").exists()


def test_coffer_verifies_signatures_written_by_containers_image(tmp_path: Path, pushed: RegistryRef,
                                                                keys: KeyPair, other_key: SigningKey) -> None:
    registries_d = _registries_d(tmp_path, pushed.host)
    local = tmp_path / "dir"
    done = _skopeo(registries_d, "copy", "--src-tls-verify=false", f"docker://{pushed.familiar}",
                   f"dir:{local}")
    assert done.returncode == 0, done.stderr
    with open_source(pushed, OPTIONS) as source:
        digest = source.root().digest
    (local / "signature-1").write_bytes(_sigstore_dir_signature(keys.key, pushed.familiar, digest))
    target = RegistryRef(host=pushed.host, repository="team/copied", tag="1.0")
    done = _skopeo(registries_d, "copy", "--dest-tls-verify=false", f"dir:{local}", f"docker://{target.familiar}")
    assert done.returncode == 0, done.stderr

    policy = load_policy(_policy_file(tmp_path, keys.public_pem, pushed.host))
    # containers/image wrote the attachment; the signed identity is the original repository, so under
    # matchRepository the copy verifies only as the image its signer named.
    with open_source(target, OPTIONS) as source, pytest.raises(VerificationError) as info:
        verify_image(policy, target, source)
    assert info.value.step == 6
    with open_source(target, OPTIONS) as source:
        accepted = verify_image(policy, pushed, source)
    assert accepted.manifest_digest == digest
    (tmp_path / "o").mkdir()
    other = load_policy(_policy_file(tmp_path / "o", other_key.public_key.to_pem(), pushed.host))
    with open_source(target, OPTIONS) as source, pytest.raises(VerificationError) as info:
        verify_image(other, pushed, source)
    assert info.value.step == 4


def test_skopeo_signs_with_a_coffer_key(tmp_path: Path, pushed: RegistryRef, keys: KeyPair) -> None:
    (tmp_path / "cosign.key").write_bytes(keys.private_pem)
    (tmp_path / "pass").write_bytes(PASSWORD)
    target = RegistryRef(host=pushed.host, repository="team/skopeo-signed", tag="1.0")
    done = _skopeo(_registries_d(tmp_path, pushed.host), "copy", "--src-tls-verify=false",
                   "--dest-tls-verify=false", "--sign-by-sigstore-private-key", str(tmp_path / "cosign.key"),
                   "--sign-passphrase-file", str(tmp_path / "pass"),
                   f"docker://{pushed.familiar}", f"docker://{target.familiar}")
    if done.returncode != 0 and SIGSTORE_DISABLED in done.stderr:
        pytest.skip("this skopeo is built without sigstore signing (Debian-local change)")
    assert done.returncode == 0, done.stderr
    policy = load_policy(_policy_file(tmp_path, keys.public_pem, pushed.host))
    with open_source(target, OPTIONS) as source:
        assert verify_image(policy, target, source).signed


def test_skopeo_policy_accepts_coffer_signature_only_with_the_right_key(
    tmp_path: Path, pushed: RegistryRef, keys: KeyPair, other_key: SigningKey
) -> None:
    with open_source(pushed, OPTIONS) as source, open_destination(pushed, OPTIONS) as destination:
        sign_image(source, destination, keys.key, docker_reference=pushed.familiar)
        destination.commit()
    registries_d = _registries_d(tmp_path, pushed.host)
    right = _policy_file(tmp_path, keys.public_pem, pushed.host)
    done = _skopeo(registries_d, "copy", "--src-tls-verify=false", f"docker://{pushed.familiar}",
                   f"oci:{tmp_path / 'out'}:x", policy=right)
    if done.returncode != 0 and SIGSTORE_DISABLED in done.stderr:
        pytest.skip("this skopeo is built without sigstore policy checks (Debian-local change)")
    assert done.returncode == 0, done.stderr
    (tmp_path / "w").mkdir()
    wrong = _policy_file(tmp_path / "w", other_key.public_key.to_pem(), pushed.host)
    done = _skopeo(registries_d, "copy", "--src-tls-verify=false", f"docker://{pushed.familiar}",
                   f"oci:{tmp_path / 'out2'}:x", policy=wrong)
    assert done.returncode != 0
