"""The runc bundle built from a CreateContainerRequest (no runc needed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, UsageError
from coffer.guest import bundle
from coffer.policy.requests import DEFAULT_MOUNTS, MASKED_PATHS, READONLY_PATHS, SHARED_DIR

CAPS = ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]


def oci_params(*, args: list[str] | None = None, env: list[str] | None = None,
               mounts: list[dict[str, Any]] | None = None, uid: int = 0, gid: int = 0,
               readonly: bool = False) -> dict[str, Any]:
    """The request's OCI object, shaped like coffer.policy.requests.container_request builds it."""
    standard = [{"destination": d, "type": t, "source": s.format(sandbox="sb"), "options": list(o)}
                for d, t, s, o in DEFAULT_MOUNTS]
    return {
        "Version": "1.1.0",
        "Process": {
            "Terminal": False,
            "User": {"UID": uid, "GID": gid, "AdditionalGids": []},
            "Args": args or ["/bin/sh", "-c", "echo hello"],
            "Env": env if env is not None else ["PATH=/bin"],
            "Cwd": "/",
            "Capabilities": {"Bounding": CAPS, "Effective": CAPS, "Inheritable": [], "Permitted": CAPS,
                             "Ambient": []},
            "NoNewPrivileges": True,
        },
        "Root": {"Path": "rootfs", "Readonly": readonly},
        "Mounts": standard + (mounts or []),
        "Annotations": {"io.kubernetes.cri.container-name": "app"},
        "Linux": {"Namespaces": [{"type": "ipc", "path": ""}, {"type": "uts", "path": ""},
                                 {"type": "mount", "path": ""}],
                  "Devices": [], "Sysctl": {}, "MaskedPaths": list(MASKED_PATHS),
                  "ReadonlyPaths": list(READONLY_PATHS)},
        "Hooks": None,
    }


def build(tmp_path: Path, oci: dict[str, Any], **kw: Any) -> dict[str, Any]:
    storage = tmp_path / "storage"
    bundle.shared_dir(storage).mkdir(parents=True, exist_ok=True)
    return bundle.build_config(oci, tmp_path / "rootfs", storage=storage, etc_dir=tmp_path / "etc",
                               hostname="web", cgroups_path="/coffer-test-c1", **kw)


def test_process_and_root_come_from_the_request(tmp_path: Path) -> None:
    config = build(tmp_path, oci_params(args=["/bin/echo", "hi"], env=["A=1"], uid=1000, gid=1000,
                                        readonly=True))
    process = config["process"]
    assert process["args"] == ["/bin/echo", "hi"]
    assert process["env"] == ["A=1"]
    assert process["user"] == {"uid": 1000, "gid": 1000}
    assert process["capabilities"]["bounding"] == CAPS
    assert process["capabilities"]["ambient"] == []
    assert process["noNewPrivileges"] is True
    assert config["root"] == {"path": str(tmp_path / "rootfs"), "readonly": True}
    assert config["hostname"] == "web"


def test_terminal_is_never_given(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Process"]["Terminal"] = True
    assert build(tmp_path, oci)["process"]["terminal"] is False


def test_network_namespace_is_shared_and_namespace_paths_ignored(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Linux"]["Namespaces"] = [{"type": "network", "path": "/proc/1/ns/net"},
                                  {"type": "pid", "path": "/proc/1/ns/pid"}]
    namespaces = build(tmp_path, oci)["linux"]["namespaces"]
    assert namespaces == [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]


def test_standard_mounts_are_the_guests_own(tmp_path: Path) -> None:
    config = build(tmp_path, oci_params())
    by_dest = {m["destination"]: m for m in config["mounts"]}
    assert set(by_dest) == {*bundle.STANDARD_MOUNTS, *bundle.ETC_FILES}
    assert "ro" in by_dest["/sys"]["options"]
    assert "ro" in by_dest["/sys/fs/cgroup"]["options"]
    # The request's /run/kata-containers/... sources are replaced by files in the bundle.
    assert by_dest["/etc/hostname"]["source"] == str(tmp_path / "etc" / "hostname")


def test_host_path_bind_mount_is_refused(tmp_path: Path) -> None:
    oci = oci_params(mounts=[{"destination": "/host", "type": "bind", "source": "/etc", "options": ["ro"]}])
    with pytest.raises(UsageError, match="outside the sandbox's shared storage"):
        build(tmp_path, oci)


def test_bind_of_another_containers_rootfs_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "storage" / "containers" / "c2" / "rootfs"
    other.mkdir(parents=True)
    oci = oci_params(mounts=[{"destination": "/x", "type": "bind", "source": str(other), "options": []}])
    with pytest.raises(UsageError, match="outside"):
        build(tmp_path, oci)


def test_shared_volume_is_mapped_into_storage(tmp_path: Path) -> None:
    source = f"{SHARED_DIR}/c1-configmap-conf"
    oci = oci_params(mounts=[{"destination": "/etc/conf", "type": "bind", "source": source,
                              "options": ["rbind", "rprivate", "ro"]}])
    config = build(tmp_path, oci)
    mount = next(m for m in config["mounts"] if m["destination"] == "/etc/conf")
    expected = bundle.shared_dir(tmp_path / "storage").resolve() / "c1-configmap-conf"
    assert mount["source"] == str(expected)
    assert expected.is_dir()
    assert mount["options"] == ["rbind", "rprivate", "ro"]


def test_symlink_in_shared_storage_leading_out_is_refused(tmp_path: Path) -> None:
    shared = bundle.shared_dir(tmp_path / "storage")
    shared.mkdir(parents=True)
    (shared / "evil").symlink_to("/etc")
    oci = oci_params(mounts=[{"destination": "/x", "type": "bind", "source": f"{SHARED_DIR}/evil",
                              "options": ["ro"]}])
    with pytest.raises(UsageError, match="outside"):
        build(tmp_path, oci)


def test_dotdot_in_bind_source_is_refused(tmp_path: Path) -> None:
    oci = oci_params(mounts=[{"destination": "/x", "type": "bind", "source": f"{SHARED_DIR}/../../../etc",
                              "options": []}])
    with pytest.raises(UsageError, match=r"'\.\.'"):
        build(tmp_path, oci)


def test_shared_propagation_option_is_refused(tmp_path: Path) -> None:
    oci = oci_params(mounts=[{"destination": "/x", "type": "bind", "source": f"{SHARED_DIR}/v",
                              "options": ["rshared"]}])
    with pytest.raises(UsageError, match="rshared"):
        build(tmp_path, oci)


def test_unknown_mount_type_is_refused(tmp_path: Path) -> None:
    oci = oci_params(mounts=[{"destination": "/x", "type": "overlay", "source": "overlay", "options": []}])
    with pytest.raises(UsageError, match="overlay"):
        build(tmp_path, oci)


def test_hooks_are_refused(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Hooks"] = {"prestart": [{"path": "/bin/true"}]}
    with pytest.raises(UsageError, match="Hooks"):
        build(tmp_path, oci)


def test_empty_masked_paths_still_get_runcs_defaults(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Linux"]["MaskedPaths"] = []
    oci["Linux"]["ReadonlyPaths"] = []
    linux = build(tmp_path, oci)["linux"]
    assert set(bundle.DEFAULT_MASKED_PATHS) <= set(linux["maskedPaths"])
    assert set(bundle.DEFAULT_READONLY_PATHS) <= set(linux["readonlyPaths"])


def test_bad_capability_name_is_refused(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Process"]["Capabilities"]["Bounding"] = ["chown; rm -rf"]
    with pytest.raises(UsageError, match="capability"):
        build(tmp_path, oci)


def test_env_without_equals_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="NAME=VALUE"):
        build(tmp_path, oci_params(env=["JUSTANAME"]))


def test_nul_in_args_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="NUL"):
        build(tmp_path, oci_params(args=["/bin/sh\x00"]))


def test_secret_additions_are_appended(tmp_path: Path) -> None:
    secret_file = tmp_path / "storage" / "containers" / "c1" / "secrets" / "0-x"
    extra = bundle.BundleMount(destination="/run/secrets/token", source=secret_file)
    config = build(tmp_path, oci_params(env=["A=1"]), extra_env=["TOKEN=s3cr3t"], extra_mounts=[extra])
    assert config["process"]["env"] == ["A=1", "TOKEN=s3cr3t"]
    mount = config["mounts"][-1]
    assert mount["destination"] == "/run/secrets/token"
    assert "ro" in mount["options"]


def test_secret_file_over_an_existing_mount_is_refused(tmp_path: Path) -> None:
    extra = bundle.BundleMount(destination="/etc/hostname", source=tmp_path / "x")
    with pytest.raises(UsageError, match="/etc/hostname"):
        build(tmp_path, oci_params(), extra_mounts=[extra])


def test_exec_process_without_capabilities_gets_none() -> None:
    process = bundle.process_json({"Args": ["cat", "/etc/hostname"], "Env": [], "Cwd": "/",
                                   "User": {"UID": 0, "GID": 0, "AdditionalGids": []}, "Terminal": False,
                                   "Capabilities": None})
    assert all(values == [] for values in process["capabilities"].values())
    assert process["noNewPrivileges"] is True


def test_config_sha256_ignores_key_order_but_not_values() -> None:
    oci = oci_params()
    reordered = json.loads(json.dumps(oci, sort_keys=True))
    assert bundle.config_sha256(oci) == bundle.config_sha256(reordered)
    changed = copy.deepcopy(oci)
    changed["Process"]["Args"] = ["/bin/sh", "-c", "echo bye"]
    assert bundle.config_sha256(changed) != bundle.config_sha256(oci)


def test_written_config_is_deterministic_and_private(tmp_path: Path) -> None:
    config = build(tmp_path, oci_params())
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    bundle.write_bundle(one, config)
    bundle.write_bundle(two, json.loads(json.dumps(config)))
    assert (one / "config.json").read_bytes() == (two / "config.json").read_bytes()
    assert (one / "config.json").stat().st_mode & 0o777 == 0o600


def test_etc_files(tmp_path: Path) -> None:
    bundle.write_etc_files(tmp_path / "etc", "web", b"nameserver 10.0.0.1\n")
    assert (tmp_path / "etc" / "hostname").read_text() == "web\n"
    assert "web" in (tmp_path / "etc" / "hosts").read_text()


def test_bad_hostname_is_refused() -> None:
    with pytest.raises(UsageError):
        bundle.check_hostname("-bad host")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_field = st.sampled_from(["Process", "Root", "Mounts", "Linux", "Hooks", "Annotations"])
_inner = st.sampled_from(["Args", "Env", "Cwd", "User", "Capabilities", "NoNewPrivileges", "Readonly",
                          "MaskedPaths", "Sysctl", "destination", "type", "source", "options"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=_field, inner=_inner, value=_json)
def test_malformed_requests_raise_only_typed_errors(tmp_path: Path, field: str, inner: str,
                                                    value: Any) -> None:
    volume = {"destination": "/v", "type": "bind", "source": f"{SHARED_DIR}/v", "options": []}
    oci = oci_params(mounts=[volume])
    target = oci[field]
    if isinstance(target, dict):
        target[inner] = value
    elif isinstance(target, list) and target:
        target[-1][inner] = value
    else:
        oci[field] = value
    try:
        build(tmp_path, oci)
        bundle.config_sha256(oci)
    except CofferError:
        pass


def test_host_chosen_masked_and_readonly_paths_are_not_applied(tmp_path: Path) -> None:
    """The host may not hide a config or secret file from the workload, or make its data read-only."""
    oci = oci_params()
    oci["Linux"]["MaskedPaths"] = [*oci["Linux"]["MaskedPaths"], "/etc/nginx/nginx.conf",
                                   "/run/secrets/tls.pem"]
    oci["Linux"]["ReadonlyPaths"] = [*oci["Linux"]["ReadonlyPaths"], "/var", "/tmp"]
    config = build(tmp_path, oci)
    assert "/etc/nginx/nginx.conf" not in config["linux"]["maskedPaths"]
    assert "/run/secrets/tls.pem" not in config["linux"]["maskedPaths"]
    assert "/var" not in config["linux"]["readonlyPaths"]
    assert config["linux"]["maskedPaths"] == sorted(bundle.DEFAULT_MASKED_PATHS)


def test_host_chosen_sysctls_are_refused_and_annotations_dropped(tmp_path: Path) -> None:
    oci = oci_params()
    oci["Linux"]["Sysctl"] = {"kernel.domainname": "host-chosen"}
    with pytest.raises(UsageError, match="sysctl"):
        build(tmp_path, oci)
    assert "annotations" not in build(tmp_path, oci_params())
