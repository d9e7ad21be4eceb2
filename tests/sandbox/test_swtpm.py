"""The software TPM sandbox: manufacture with EK certificates from a private local CA, start on a
unix socket or a loopback TCP port, restart on the same state, and stop leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from coffer.sandbox import swtpm
from coffer.sandbox.swtpm import EK_CERT_NV_RSA, Swtpm

pytestmark = pytest.mark.skipif(
    not (swtpm.available() and shutil.which("tpm2_getcap")),
    reason="swtpm / tpm2-tools not installed (apt-get install swtpm swtpm-tools tpm2-tools "
           "libtss2-tcti-swtpm0)")


def _tool(tcti: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, check=True, text=True,
                            env={"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"})
    return result.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie would still answer; Popen.wait() in stop() reaps it, so this is a real process.
    return True


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_start_serves_a_manufactured_tpm_and_stop_cleans_up(tmp_path: Path, transport: str) -> None:
    tpm = Swtpm(tmp_path / "state", transport=transport, ca_dir=tmp_path / "ca")  # type: ignore[arg-type]
    with tpm:
        pid = tpm.pid
        assert pid is not None
        assert tpm.running
        tcti = tpm.tcti
        if transport == "tcp":
            assert tcti.startswith("swtpm:host=127.0.0.1,port=")
        handles = _tool(tcti, "tpm2_getcap", "handles-persistent")
        assert "0x81010001" in handles  # the RSA EK
        _tool(tcti, "tpm2_nvread", f"{EK_CERT_NV_RSA:#x}", "-o", "ek.der", cwd=tmp_path)
        sock_dir = Path(tcti.split("=", 1)[1]).parent if transport == "unix" else None
    assert tpm.pid is None
    assert not _alive(pid)
    if sock_dir is not None:
        assert not sock_dir.exists()
    with pytest.raises(swtpm.SwtpmError):
        _ = tpm.tcti


def test_ek_certificate_is_issued_by_the_private_ca(tmp_path: Path) -> None:
    with Swtpm(tmp_path / "state", ca_dir=tmp_path / "ca") as tpm:
        _tool(tpm.tcti, "tpm2_nvread", f"{EK_CERT_NV_RSA:#x}", "-o", "ek.der", cwd=tmp_path)
    raw = (tmp_path / "ek.der").read_bytes()
    issuer_der, root_der = tpm.local_ca.certificates()
    issuer = x509.load_der_x509_certificate(issuer_der)
    root = x509.load_der_x509_certificate(root_der)
    # The NV index may be larger than the certificate; load_der refuses trailing bytes, so cut it.
    length = int.from_bytes(raw[2:4], "big") + 4
    ek = x509.load_der_x509_certificate(raw[:length])
    ek.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
    assert str(tmp_path) in str(tpm.local_ca.directory)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    tpm = Swtpm(tmp_path / "state", ca_dir=tmp_path / "ca")
    with tpm:
        _tool(tpm.tcti, "tpm2_nvdefine", "0x01500001", "-C", "o", "-s", "8")
    assert tpm.manufactured
    with tpm:
        assert "0x1500001" in _tool(tpm.tcti, "tpm2_getcap", "handles-nv-index")


def test_two_tpms_share_one_ca_but_have_different_eks(tmp_path: Path) -> None:
    eks = []
    for name in ("a", "b"):
        with Swtpm(tmp_path / name, ca_dir=tmp_path / "ca") as tpm:
            _tool(tpm.tcti, "tpm2_readpublic", "-c", "0x81010001", "-o", f"{name}.pub", cwd=tmp_path)
        eks.append((tmp_path / f"{name}.pub").read_bytes())
    assert eks[0] != eks[1]
    assert len(list((tmp_path / "ca").glob("issuercert.pem"))) == 1


def test_start_failure_is_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Swtpm(state, ca_dir=tmp_path / "ca").manufacture()
    (state / "tpm2-00.permall").write_bytes(b"garbage")
    tpm = Swtpm(state)
    with pytest.raises(swtpm.SwtpmError):
        tpm.start()
    assert not tpm.running
