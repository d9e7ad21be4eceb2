"""The registry round trip with the command line only, against Debian's docker-registry and a real
``coffer kbs serve``: protect (encrypt with a KBS-held key + sign) and push an image, then, as the
workload would, verify it under a containers-policy.json, pull and decrypt it after attestation, and
unpack it. Unsigned images, signatures by another key and a retagged image are refused."""

from __future__ import annotations

import json
from pathlib import Path

from coffer.image.layout import OciLayout
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    KbsProcess,
    child_env,
    run_coffer,
    set_resource_policy,
)
from tests.image.imagebuild import make_image
from tests.support.registry import RegistryServer, registry  # noqa: F401

PASSWORD_ENV = {"COFFER_SIGNING_PASSWORD": "e2e-signing-password"}


def _policy(path: Path, host: str, public_key: Path) -> Path:
    policy = {
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {
                f"{host}/protected": [{"type": "sigstoreSigned", "keyPath": str(public_key)}],
                f"{host}/open": [{"type": "insecureAcceptAnything"}],
            }
        },
    }
    path.write_text(json.dumps(policy))
    return path


def test_protect_push_verify_pull_decrypt_unpack(
    tmp_path: Path,
    registry: RegistryServer,  # noqa: F811
    admin_key: AdminKey,
    sqlite_kbs: KbsProcess,
) -> None:
    env = child_env(PASSWORD_ENV)
    kbs = sqlite_kbs
    set_resource_policy(kbs.url, admin_key, SAMPLE_RESOURCE_POLICY)
    make_image(tmp_path / "src", n_layers=3, gz=True)
    run_coffer("image", "keygen", "--output-key-prefix", str(tmp_path / "cosign"), env=env)
    run_coffer("image", "keygen", "--output-key-prefix", str(tmp_path / "other"), env=env)
    image = f"docker://{registry.host}/protected/app:1.0"

    protected = run_coffer(
        "image", "protect", f"oci:{tmp_path / 'src'}:latest", image, "--insecure",
        "--key", "kbs:///default/key/app", "--kbs", kbs.url, "--admin-token", admin_key.token(),
        "--sign-key", str(tmp_path / "cosign.key"), "--json", env=env,
    )  # fmt: skip
    values = json.loads(protected.stdout)["reference_values"]
    manifest = values["manifests"][0]
    assert all(layer["encrypted"] for layer in manifest["layers"])
    assert values["signature"]["manifest_digest"] == values["manifest_digest"]
    assert values["signature"]["identity"] == f"{registry.host}/protected/app:1.0"

    policy = _policy(tmp_path / "policy.json", registry.host, tmp_path / "cosign.pub")
    verified = json.loads(
        run_coffer("image", "verify", image, "--policy", str(policy), "--insecure", "--json").stdout
    )
    assert verified["ok"] is True
    assert verified["manifest_digest"] == values["manifest_digest"]

    # "Elsewhere": pull by the verified digest, decrypting with the key the KBS releases after attestation.
    pinned = f"docker://{registry.host}/protected/app@{verified['manifest_digest']}"
    run_coffer(
        "image", "decrypt", pinned, f"oci:{tmp_path / 'pulled'}:1.0", "--insecure",
        "--kbs", kbs.url, "--tee", "sample", "--quiet",
    )  # fmt: skip
    pulled = OciLayout.open(tmp_path / "pulled")
    src = OciLayout.open(tmp_path / "src")
    assert (
        pulled.read_manifest(pulled.resolve("1.0")).layers == src.read_manifest(src.resolve("latest")).layers
    )
    run_coffer(
        "image", "unpack", pinned, str(tmp_path / "root"), "--insecure", "--kbs", kbs.url, "--tee", "sample"
    )
    assert (tmp_path / "root" / "img2" / "hello.txt").read_bytes() == b"img2"

    # Under the same policy: the other key's signature, an unsigned image and a retagged image fail.
    other_policy = _policy(tmp_path / "other-policy.json", registry.host, tmp_path / "other.pub")
    wrong_key = run_coffer("image", "verify", image, "--policy", str(other_policy), "--insecure", check=False)
    assert wrong_key.returncode == 1
    assert "step 4" in wrong_key.stderr

    unsigned = f"docker://{registry.host}/protected/plain:1.0"
    run_coffer("image", "copy", f"oci:{tmp_path / 'src'}:latest", unsigned, "--insecure")
    refused = run_coffer("image", "verify", unsigned, "--policy", str(policy), "--insecure", check=False)
    assert refused.returncode == 1
    assert "step 3" in refused.stderr

    # Someone pushes other content under the signed tag: the signature no longer matches it.
    make_image(tmp_path / "evil", n_layers=1, seed="evil")
    run_coffer("image", "copy", f"oci:{tmp_path / 'evil'}:latest", image, "--insecure")
    retagged = run_coffer("image", "verify", image, "--policy", str(policy), "--insecure", check=False)
    assert retagged.returncode == 1
    assert "step 3" in retagged.stderr  # no signature stored for the new digest

    # The default scope rejects everything else.
    open_image = f"docker://{registry.host}/elsewhere/x:1"
    run_coffer("image", "copy", f"oci:{tmp_path / 'src'}:latest", open_image, "--insecure")
    rejected = run_coffer("image", "verify", open_image, "--policy", str(policy), "--insecure", check=False)
    assert rejected.returncode == 1
