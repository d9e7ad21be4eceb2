"""The container requests a Kubernetes container makes: argv, env, user, capabilities, mounts."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UsageError
from coffer.image.models import ImageConfig
from coffer.policy.model import EnvRule, Mount, User
from coffer.policy.requests import (
    ALL_CAPABILITIES,
    ANY_VALUE,
    DEFAULT_CAPABILITIES,
    DEFAULT_MOUNTS,
    MASKED_PATHS,
    ContainerSpec,
    ManifestFieldError,
    VolumeMount,
    container_request,
    copy_file_request,
    exec_request,
    path_text,
    policy_mounts,
    read_stream_request,
    request_source,
    sandbox_request,
    write_stream_request,
)


def config(**run: Any) -> ImageConfig:
    obj = {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return ImageConfig.parse(json.dumps(obj).encode())


NGINX = config(
    Entrypoint=["/docker-entrypoint.sh"],
    Cmd=["nginx", "-g", "daemon off;"],
    Env=["PATH=/usr/bin:/bin", "NGINX_VERSION=1.25.5"],
)


def spec(container: dict[str, Any], image: ImageConfig | None = NGINX, **options: Any) -> ContainerSpec:
    return ContainerSpec.from_kubernetes(
        {"name": "c", "image": "nginx:1.25", **container}, image=image, hostname="pod", **options
    )


# --------------------------------------------------------------------------------------------------
# argv


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]),
        ({"command": ["nginx"]}, ["nginx"]),  # command replaces Entrypoint and drops Cmd
        ({"args": ["nginx", "-T"]}, ["/docker-entrypoint.sh", "nginx", "-T"]),
        ({"command": ["sh", "-c"], "args": ["echo hi"]}, ["sh", "-c", "echo hi"]),
        ({"command": [], "args": []}, ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]),
    ],
)
def test_argv_follows_kubelet(container: dict[str, Any], argv: list[str]) -> None:
    assert list(spec(container).args) == argv


def test_variable_references_in_args_are_expanded() -> None:
    got = spec(
        {
            "command": ["echo", "$(GREETING) $(NOBODY) $$(GREETING) $$ $"],
            "env": [{"name": "GREETING", "value": "hello"}],
        }
    )
    assert got.args == ("echo", "hello $(NOBODY) $(GREETING) $ $")


def test_image_argv_is_not_expanded() -> None:
    got = spec({"env": [{"name": "X", "value": "1"}]}, image=config(Cmd=["echo", "$(X)"]))
    assert got.args == ("echo", "$(X)")


def test_arg_from_a_run_time_value_is_refused() -> None:
    with pytest.raises(ManifestFieldError, match=r"args\[0\]: refers to a variable only known at run time"):
        spec(
            {
                "args": ["$(IP)"],
                "env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            }
        )


def test_no_command_at_all_is_refused() -> None:
    with pytest.raises(ManifestFieldError, match="neither the container nor the image"):
        spec({}, image=config())


# --------------------------------------------------------------------------------------------------
# env


def test_env_is_the_image_env_overlaid_by_the_pod() -> None:
    got = spec(
        {
            "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
            "env": [
                {"name": "PATH", "value": "/opt/bin"},
                {"name": "URL", "value": "http://$(CM_HOST):80"},
                {"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "HOST"}}},
            ],
        },
        config_maps={"cm": {"HOST": "db", "bad key": "x"}},
    )
    env = {e.name: e.value for e in got.env}
    assert env == {
        "PATH": "/opt/bin",
        "NGINX_VERSION": "1.25.5",
        "HOSTNAME": "pod",
        "CM_HOST": "db",
        "URL": "http://db:80",
        "KEY": "db",
    }
    assert (
        "PATH=/opt/bin"
        in container_request(container_id="x", name="c", image="i", spec=got)["OCI"]["Process"]["Env"]
    )


def test_run_time_values_become_patterns() -> None:
    got = spec(
        {
            "env": [
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "URL", "value": "http://$(IP):8080/x"},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                {"name": "MISSING", "valueFrom": {"configMapKeyRef": {"name": "elsewhere", "key": "k"}}},
            ]
        },
        secrets={"s": {"pw": "hunter2"}},
    )
    rules = {e.name: e for e in got.env}
    assert rules["IP"].value is None
    assert rules["IP"].pattern
    assert rules["URL"].pattern == r"http://(?:[0-9a-fA-F:.]+):8080/x"
    assert rules["CPU"].pattern == "[0-9]+"
    assert rules["PW"] == EnvRule(name="PW", pattern=ANY_VALUE)  # the secret stays out
    assert rules["MISSING"].pattern == ANY_VALUE
    with pytest.raises(UsageError, match="only known at run time"):
        got.env_list()


def test_concrete_fields_and_revealed_secrets_give_values() -> None:
    got = spec(
        {
            "env": [
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            ]
        },
        secrets={"s": {"pw": "hunter2"}},
        fields={"status.podIP": "10.0.0.3"},
        reveal_secrets=True,
    )
    assert {"IP=10.0.0.3", "PW=hunter2"} <= set(got.env_list())


def test_generated_pod_name_is_a_pattern() -> None:
    got = ContainerSpec.from_kubernetes(
        {"name": "c", "image": "i", "command": ["x"]},
        image=None,
        field_patterns={"metadata.name": "web-[a-z0-9]+"},
    )
    assert EnvRule(name="HOSTNAME", pattern="web-[a-z0-9]+") in got.env


def test_optional_missing_key_is_left_out() -> None:
    got = spec(
        {
            "env": [
                {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k", "optional": True}}}
            ]
        },
        config_maps={"cm": {}},
    )
    assert "K" not in {e.name for e in got.env}


def test_env_from_an_unknown_configmap_is_refused() -> None:
    with pytest.raises(ManifestFieldError, match=r"envFrom\[0\]\.configMapRef: ConfigMap 'gone' is not"):
        spec({"envFrom": [{"configMapRef": {"name": "gone"}}]})


# --------------------------------------------------------------------------------------------------
# user, capabilities, security


def test_user_from_the_image_and_the_pod() -> None:
    assert spec({}, image=config(Cmd=["x"], User="101:102")).user == User(uid=101, gid=102)
    assert spec({}, image=config(Cmd=["x"], User="101")).user == User(uid=101, gid=0)
    assert spec({}, image=config(Cmd=["x"])).user == User(uid=0, gid=0)
    pod = {"securityContext": {"runAsUser": 5, "runAsGroup": 6, "supplementalGroups": [8, 7], "fsGroup": 9}}
    assert spec({}, pod_spec=pod).user == User(uid=5, gid=6, additional_gids=(7, 8, 9))
    own = {"securityContext": {"runAsUser": 1}}
    assert spec(own, pod_spec=pod).user.uid == 1


def test_user_name_in_the_image_needs_run_as_user() -> None:
    image = config(Cmd=["x"], User="nginx")
    with pytest.raises(UsageError, match="runAsUser"):
        spec({}, image=image)
    assert spec({"securityContext": {"runAsUser": 101, "runAsGroup": 101}}, image=image).user == User(
        uid=101, gid=101
    )


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({}, set(DEFAULT_CAPABILITIES)),
        ({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}, {"NET_BIND_SERVICE"}),
        ({"drop": ["NET_RAW", "cap_mknod"]}, set(DEFAULT_CAPABILITIES) - {"NET_RAW", "MKNOD"}),
        ({"add": ["SYS_PTRACE"]}, {*DEFAULT_CAPABILITIES, "SYS_PTRACE"}),
        ({"add": ["ALL"]}, set(ALL_CAPABILITIES)),
    ],
)
def test_capabilities(capabilities: dict[str, Any], expected: set[str]) -> None:
    got = spec({"securityContext": {"capabilities": capabilities}})
    assert set(got.capabilities) == expected
    caps = container_request(container_id="x", name="c", image="i", spec=got)["OCI"]["Process"][
        "Capabilities"
    ]
    assert set(caps["Bounding"]) == {f"CAP_{c}" for c in expected}
    assert caps["Ambient"] == caps["Inheritable"] == []


def test_privileged_container_gets_everything() -> None:
    got = spec({"securityContext": {"privileged": True, "allowPrivilegeEscalation": False}})
    assert got.privileged
    assert got.capabilities == ALL_CAPABILITIES
    request = container_request(container_id="x", name="c", image="i", spec=got)
    assert request["OCI"]["Linux"]["Devices"]
    assert request["OCI"]["Linux"]["MaskedPaths"] == []


def test_hardening_flags() -> None:
    got = spec(
        {
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            "workingDir": "/srv",
            "tty": True,
            "stdin": True,
        }
    )
    request = container_request(container_id="x", name="c", image="i", spec=got)
    assert request["OCI"]["Process"]["NoNewPrivileges"] is True
    assert request["OCI"]["Root"] == {"Path": "rootfs", "Readonly": True}
    assert request["OCI"]["Process"]["Cwd"] == "/srv"
    assert request["OCI"]["Process"]["Terminal"] is True
    assert got.stdin
    plain = spec({})
    assert not plain.no_new_privileges
    assert plain.working_dir == "/"
    assert spec({}, image=config(Cmd=["x"], WorkingDir="/data")).working_dir == "/data"


# --------------------------------------------------------------------------------------------------
# mounts and the request shape


POD_VOLUMES = {
    "volumes": [
        {"name": "conf", "configMap": {"name": "nginx-conf"}},
        {"name": "tls", "secret": {"secretName": "tls"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "logs", "hostPath": {"path": "/var/log"}},
    ]
}


def test_volume_mounts_in_request_and_policy() -> None:
    got = spec(
        {
            "volumeMounts": [
                {"name": "conf", "mountPath": "/etc/nginx/conf.d", "readOnly": False},
                {"name": "tls", "mountPath": "/tls"},
                {"name": "scratch", "mountPath": "/tmp"},
                {"name": "logs", "mountPath": "/host/log", "readOnly": True},
            ]
        },
        pod_spec=POD_VOLUMES,
    )
    assert got.mounts[0] == VolumeMount(
        destination="/etc/nginx/conf.d", kind="configmap", source="nginx-conf", read_only=True
    )  # the kubelet mounts ConfigMaps read-only
    assert policy_mounts(got) == (
        Mount(
            destination="/etc/nginx/conf.d",
            source="configmap:nginx-conf",
            options=("rbind", "rprivate", "ro"),
        ),
        Mount(destination="/tls", source="secret:tls", options=("rbind", "rprivate", "ro")),
        Mount(destination="/tmp", source="emptydir:scratch", options=("rbind", "rprivate", "rw")),
        Mount(destination="/host/log", source="/var/log", options=("rbind", "rprivate", "ro")),
    )
    request = container_request(container_id="cid", name="c", image="i", spec=got)
    mounts = {m["destination"]: m for m in request["OCI"]["Mounts"]}
    assert {d for d, *_ in DEFAULT_MOUNTS} <= set(mounts)
    assert mounts["/host/log"]["source"] == "/var/log"  # a host path is bound as it is
    assert mounts["/tls"]["source"] == request_source(got.mounts[1], container_id="cid")
    assert mounts["/tls"]["source"].endswith("/cid-secret-tls")


@pytest.mark.parametrize(
    ("mounts", "volumes", "message"),
    [
        ([{"name": "x", "mountPath": "/x"}], [], r"volumeMounts\[0\]\.name: no volume named 'x'"),
        ([{"name": "v", "mountPath": "rel"}], [{"name": "v", "emptyDir": {}}], "must be an absolute path"),
        (
            [{"name": "v", "mountPath": "/a"}, {"name": "v", "mountPath": "/a"}],
            [{"name": "v", "emptyDir": {}}],
            "mounted twice",
        ),
        ([{"name": "v", "mountPath": "/a", "subPath": "b"}], [{"name": "v", "emptyDir": {}}], "subPath"),
        ([{"name": "v", "mountPath": "/a"}], [{"name": "v", "nfs": {"server": "s"}}], "nfs is not supported"),
        (
            [{"name": "v", "mountPath": "/a"}],
            [{"name": "v", "hostPath": {"path": "rel"}}],
            r"hostPath\.path: must be an absolute path",
        ),
    ],
)
def test_bad_volume_mounts(mounts: list[Any], volumes: list[Any], message: str) -> None:
    with pytest.raises(ManifestFieldError, match=message):
        spec({"volumeMounts": mounts}, pod_spec={"volumes": volumes})


def test_request_shape() -> None:
    got = spec({"env": [{"name": "A", "value": "1"}]})
    request = container_request(
        container_id="cid", name="c", image="docker.io/library/nginx@sha256:" + "a" * 64, spec=got
    )
    assert request["container_id"] == "cid"
    assert request["name"] == "c"
    oci = request["OCI"]
    assert oci["Hooks"] is None
    assert oci["Linux"]["MaskedPaths"] == list(MASKED_PATHS)
    assert oci["Process"]["User"] == {"UID": 0, "GID": 0, "AdditionalGids": []}
    assert oci["Process"]["Args"] == ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
    json.dumps(request)  # plain JSON all the way down


def test_other_requests() -> None:
    got = spec(
        {
            "livenessProbe": {"exec": {"command": ["cat", "/ok"]}},
            "lifecycle": {
                "postStart": {"exec": {"command": ["cat", "/ok"]}},
                "preStop": {"exec": {"command": ["nginx", "-s", "quit"]}},
            },
        }
    )
    assert got.exec_commands == (("cat", "/ok"), ("nginx", "-s", "quit"))
    request = exec_request(container_id="cid", args=["cat", "/ok"], spec=got)
    assert request["process"]["Env"] == got.env_list()
    assert request["process"]["User"]["UID"] == 0
    assert read_stream_request(container_id="cid", stream="stderr")["stream"] == "stderr"
    with pytest.raises(UsageError):
        read_stream_request(container_id="cid", stream="stdin")
    assert write_stream_request(container_id="cid") == {"container_id": "cid", "exec_id": ""}
    assert copy_file_request(container_id="cid", path="/x")["file_type"] == "Regular"
    assert sandbox_request(name="web", namespace="ns")["namespace"] == "ns"


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("container", "message"),
    [
        ({"name": "Not_A_Label"}, r"^malformed Kubernetes manifest: name: 'Not_A_Label' is not a DNS-1123"),
        ({"command": "nginx"}, r"command: must be a list, not a string"),
        ({"env": [{"name": "1X", "value": "v"}]}, r"env\[0\]\.name: '1X' is not a valid variable name"),
        (
            {"env": [{"name": "X", "value": "v", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]},
            "both value and valueFrom",
        ),
        (
            {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.nope"}}}]},
            "unsupported field",
        ),
        ({"env": [{"name": "X", "valueFrom": {}}]}, "must have exactly one of"),
        ({"securityContext": {"runAsUser": -1}}, r"securityContext\.runAsUser: -1 is out of range"),
        ({"securityContext": {"privileged": "yes"}}, "must be true or false"),
        (
            {"livenessProbe": {"exec": {"command": []}}},
            r"livenessProbe\.exec\.command: must be a non-empty list",
        ),
        ({"image": None}, r"image: is required"),
    ],
)
def test_malformed_container_names_the_field(container: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        spec(container)


def test_errors_carry_the_container_path() -> None:
    with pytest.raises(ManifestFieldError) as caught:
        ContainerSpec.from_kubernetes(
            {"name": "c", "image": "i", "args": [1]}, image=NGINX, path=("spec", "containers", 2)
        )
    assert caught.value.path == ("spec", "containers", 2, "args", 0)
    assert path_text(caught.value.path) == "spec.containers[2].args[0]"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
KEYS = [
    "name",
    "image",
    "command",
    "args",
    "env",
    "envFrom",
    "securityContext",
    "volumeMounts",
    "workingDir",
    "livenessProbe",
    "lifecycle",
    "stdin",
    "tty",
]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    st.dictionaries(st.sampled_from(["volumes", "securityContext"]), json_values, max_size=2),
)
def test_only_coffer_errors_escape(container: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    with contextlib.suppress(CofferError):
        got = ContainerSpec.from_kubernetes(
            {"name": "c", "image": "i", **container}, image=NGINX, pod_spec=pod_spec
        )
        container_request(container_id="x", name=got.name, image=got.image, spec=got)
