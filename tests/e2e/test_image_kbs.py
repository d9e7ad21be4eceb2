"""An image encrypted with ``--key kbs:///…`` against a real ``coffer kbs serve``: the key-encryption key
is generated locally and uploaded through the admin API (never printed), and the image decrypts only
after a successful attestation handshake; a refused attestation or release leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

from coffer.image import ocicrypt
from coffer.image.layout import OciLayout
from tests.e2e.support import (
    SAMPLE_RESOURCE_POLICY,
    AdminKey,
    KbsProcess,
    admin_get,
    run_coffer,
    set_resource_policy,
)
from tests.image.imagebuild import layer_blobs, make_image

KEY = "kbs:///default/key/image-kek"


def test_kbs_key_decrypts_only_after_attestation(
    tmp_path: Path, admin_key: AdminKey, sqlite_kbs: KbsProcess
) -> None:
    kbs = sqlite_kbs
    make_image(tmp_path / "src", n_layers=2)
    admin = ["--kbs", kbs.url, "--admin-token", admin_key.token()]

    encrypted = run_coffer(
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--key",
        KEY,
        *admin,
        "--json",
    )
    report = json.loads(encrypted.stdout)
    assert report["keys"] == [{"type": "kbs", "kid": KEY, "key": "created"}]
    layout = OciLayout.open(tmp_path / "enc")
    for layer in layout.read_manifest(layout.resolve("latest")).layers:
        packets = ocicrypt.parse_provider_annotation(layer.annotations[ocicrypt.ANNOTATION_PROVIDER_AA])
        assert [p.kid for p in packets] == [KEY]
    # The KEK went to the KBS and nowhere else: not on stdout or stderr.
    kek = admin_get(kbs.url, admin_key, f"/kbs/v0/resources/{KEY.removeprefix('kbs:///')}")
    assert len(kek) == 32
    assert kek.hex() not in encrypted.stdout + encrypted.stderr

    # A second image with the same key name reuses the KEK.
    again = run_coffer(
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc2'}:latest",
        "--key",
        KEY,
        *admin,
        "--json",
    )
    assert json.loads(again.stdout)["keys"][0]["key"] == "reused"

    # The default resource policy refuses sample evidence: decryption refused, nothing written.
    refused = run_coffer(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--kbs",
        kbs.url,
        "--tee",
        "sample",
        "--json",
        check=False,
    )
    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout)["error"] == "PolicyDeny"
    assert "refused" in refused.stderr
    assert not (tmp_path / "dec").exists()
    assert not list(tmp_path.glob(".dec*"))  # no staging directory left either

    # Unpacking straight from the encrypted image is refused the same way.
    refused_unpack = run_coffer(
        "image",
        "unpack",
        f"oci:{tmp_path / 'enc'}:latest",
        str(tmp_path / "root"),
        "--kbs",
        kbs.url,
        "--tee",
        "sample",
        check=False,
    )
    assert refused_unpack.returncode == 1
    assert not (tmp_path / "root").exists()

    # Once the owner's policy releases keys to this (sample) guest, the attested decryption succeeds.
    set_resource_policy(kbs.url, admin_key, SAMPLE_RESOURCE_POLICY)
    done = run_coffer(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--kbs",
        kbs.url,
        "--tee",
        "sample",
        "--json",
    )
    assert json.loads(done.stdout)["kbs_keys"] == [KEY]
    assert layer_blobs(tmp_path / "dec") == layer_blobs(tmp_path / "src")
    run_coffer(
        "image",
        "unpack",
        f"oci:{tmp_path / 'enc'}:latest",
        str(tmp_path / "root"),
        "--kbs",
        kbs.url,
        "--tee",
        "sample",
    )
    assert (tmp_path / "root" / "img0" / "hello.txt").read_bytes() == b"img0"


def test_key_under_a_forbidden_path_is_never_released(
    tmp_path: Path, admin_key: AdminKey, sqlite_kbs: KbsProcess
) -> None:
    kbs = sqlite_kbs
    set_resource_policy(kbs.url, admin_key, SAMPLE_RESOURCE_POLICY)  # everything but forbidden/…
    make_image(tmp_path / "src", n_layers=1)
    run_coffer(
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--key",
        "kbs:///forbidden/key/x",
        "--kbs",
        kbs.url,
        "--admin-token",
        admin_key.token(),
    )
    refused = run_coffer(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:latest",
        f"oci:{tmp_path / 'dec'}:latest",
        "--kbs",
        kbs.url,
        "--tee",
        "sample",
        check=False,
    )
    assert refused.returncode == 1
    assert not (tmp_path / "dec").exists()


def test_encrypt_without_admin_token_is_a_usage_error(tmp_path: Path) -> None:
    make_image(tmp_path / "src", n_layers=1)
    done = run_coffer(
        "image",
        "encrypt",
        f"oci:{tmp_path / 'src'}:latest",
        f"oci:{tmp_path / 'enc'}:latest",
        "--key",
        KEY,
        "--kbs",
        "http://127.0.0.1:9",
        check=False,
    )
    assert done.returncode == 2
    assert "admin token" in done.stderr
    assert not (tmp_path / "enc").exists()
