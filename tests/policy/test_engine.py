"""coffer.policy.engine: the decision table through the real regorus engine, compilation, state,
fail-closed behaviour, the decision log and thread binding."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from coffer.errors import FormatError, UsageError
from coffer.policy import requests as rq
from coffer.policy.engine import (
    RULES,
    Decision,
    PolicyEngine,
    compile_policy,
    policy_data,
    split_policy,
)
from coffer.policy.model import (
    ALWAYS_ALLOWED,
    ContainerPolicy,
    EnvRule,
    HostAccess,
    Mount,
    User,
    WorkloadPolicy,
)

D_NGINX = "sha256:" + "1" * 64
D_REDIS = "sha256:" + "2" * 64
D_TOOLS = "sha256:" + "3" * 64
NGINX_IMAGE = f"docker.io/library/nginx@{D_NGINX}"
REDIS_IMAGE = f"docker.io/library/redis@{D_REDIS}"
TOOLS_IMAGE = f"docker.io/library/busybox@{D_TOOLS}"
RW = ("rbind", "rprivate", "rw")
RO = ("rbind", "rprivate", "ro")

NGINX = ContainerPolicy(
    name="nginx",
    image=NGINX_IMAGE,
    args=("nginx", "-g", "daemon off;"),
    env=(EnvRule(name="PATH", value="/usr/local/sbin:/usr/bin"), EnvRule(name="POD_IP", pattern="[0-9.]+")),
    working_dir="/",
    user=User(uid=101, gid=101),
    capabilities=("CHOWN", "NET_BIND_SERVICE"),
    no_new_privileges=True,
    mounts=(Mount(destination="/etc/nginx/conf.d", source="configmap:nginx-conf", options=RO),),
    allow=HostAccess(
        exec=(("nginx", "-s", "reload"),), exec_patterns=("cat /var/log/nginx/[a-z]+\\.log",), logs=True
    ),
)
REDIS = ContainerPolicy(
    name="redis",
    image=REDIS_IMAGE,
    args=("redis-server", "/etc/redis/redis.conf"),
    env=(EnvRule(name="PATH", value="/usr/bin"), EnvRule(name="REDIS_PASSWORD", pattern="(?s).*")),
    working_dir="/data",
    user=User(uid=999, gid=999, additional_gids=(1000, 2000)),
    capabilities=(),
    no_new_privileges=True,
    read_only_root=True,
    mounts=(
        Mount(destination="/data", source="/var/lib/redis", options=RW),
        Mount(destination="/etc/redis", source="configmap:redis-conf", options=RO),
    ),
    allow=HostAccess(stdin=True, copy_files=("/run/kata-containers/shared/containers/[^/]+-redis-conf/.*",)),
)
TOOLS = ContainerPolicy(
    name="tools",
    image=TOOLS_IMAGE,
    args=("sleep", "infinity"),
    working_dir="/",
    user=User(uid=0, gid=0),
    capabilities=("SYS_ADMIN",),
    no_new_privileges=False,
    privileged=True,
)
POLICY = WorkloadPolicy(name="web", namespace="default", containers=(NGINX, REDIS, TOOLS))

SPECS = {
    "nginx": rq.ContainerSpec(
        name="nginx",
        image=NGINX_IMAGE,
        args=NGINX.args,
        env=(
            EnvRule(name="PATH", value="/usr/local/sbin:/usr/bin"),
            EnvRule(name="POD_IP", value="10.1.2.3"),
        ),
        user=User(uid=101, gid=101),
        capabilities=("CHOWN", "NET_BIND_SERVICE"),
        no_new_privileges=True,
        mounts=(
            rq.VolumeMount(
                destination="/etc/nginx/conf.d", kind="configmap", source="nginx-conf", read_only=True
            ),
        ),
    ),
    "redis": rq.ContainerSpec(
        name="redis",
        image=REDIS_IMAGE,
        args=REDIS.args,
        env=(EnvRule(name="PATH", value="/usr/bin"), EnvRule(name="REDIS_PASSWORD", value="s3cret-value")),
        working_dir="/data",
        user=User(uid=999, gid=999, additional_gids=(2000, 1000)),
        capabilities=(),
        no_new_privileges=True,
        read_only_root=True,
        mounts=(
            rq.VolumeMount(destination="/data", kind="hostpath", source="/var/lib/redis"),
            rq.VolumeMount(destination="/etc/redis", kind="configmap", source="redis-conf", read_only=True),
        ),
    ),
    "tools": rq.ContainerSpec(
        name="tools",
        image=TOOLS_IMAGE,
        args=TOOLS.args,
        env=(),
        capabilities=rq.ALL_CAPABILITIES,
        privileged=True,
    ),
}
IDS = {"nginx": "c-nginx", "redis": "c-redis", "tools": "c-tools"}


def create(name: str, container_id: str | None = None) -> dict[str, Any]:
    return rq.container_request(
        container_id=container_id or IDS[name], name=name, image=SPECS[name].image, spec=SPECS[name]
    )


def exec_in(name: str, args: list[str], **kw: Any) -> dict[str, Any]:
    return rq.exec_request(container_id=IDS[name], args=args, spec=SPECS[name], **kw)


def started(*, names: tuple[str, ...] = ("nginx", "redis", "tools")) -> PolicyEngine:
    """An engine with the sandbox and the given containers created through the policy."""
    engine = PolicyEngine(POLICY)
    assert engine.decide("CreateSandboxRequest", rq.sandbox_request(name="web", namespace="default")).allowed
    for name in names:
        decision = engine.decide("CreateContainerRequest", create(name))
        assert decision.allowed, decision.explanation()
    return engine


def edit(
    name: str, change: Callable[[dict[str, Any]], object], container_id: str = "c-new"
) -> dict[str, Any]:
    req = create(name, container_id)
    change(req)
    return req


def proc(req: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = req["OCI"]["Process"]
    return p


@dataclass(frozen=True)
class Row:
    id: str
    request: str
    input: dict[str, Any]
    allowed: bool
    says: str
    fresh: bool = False  # decided on an engine without the sandbox and containers


def _mounts_add(req: dict[str, Any], mount: dict[str, Any]) -> None:
    req["OCI"]["Mounts"].append(mount)


def _set_opts(req: dict[str, Any]) -> None:
    for m in req["OCI"]["Mounts"]:
        if m["destination"] == "/etc/nginx/conf.d":
            m["options"] = ["rbind", "rprivate", "rw"]


CC = "CreateContainerRequest"
EP = "ExecProcessRequest"
ROWS = [
    # baselines
    Row(
        "sandbox_ok",
        "CreateSandboxRequest",
        rq.sandbox_request(name="web", namespace="default"),
        True,
        "",
        True,
    ),
    Row("create_nginx_ok", CC, create("nginx", "c-new"), True, "nginx", True),
    Row("create_redis_ok", CC, create("redis", "c-new"), True, "redis", True),
    Row("create_privileged_tools_ok", CC, create("tools", "c-new"), True, "tools", True),
    Row(
        "create_tagged_same_digest_ok",
        CC,
        edit("nginx", lambda r: r.update(image=f"docker.io/library/nginx:1.27@{D_NGINX}")),
        True,
        "nginx",
    ),
    Row("exec_allowed", EP, exec_in("nginx", ["nginx", "-s", "reload"]), True, "nginx"),
    Row("exec_pattern_match", EP, exec_in("nginx", ["cat", "/var/log/nginx/access.log"]), True, "nginx"),
    Row(
        "exec_in_another_working_directory",
        EP,
        exec_in("nginx", ["nginx", "-s", "reload"], cwd="/etc"),
        False,
        'process.Cwd "/etc" is not the container\'s working directory',
    ),
    Row(
        "exec_dropping_no_new_privileges",
        EP,
        {**exec_in("nginx", ["nginx", "-s", "reload"]),
         "process": {**exec_in("nginx", ["nginx", "-s", "reload"])["process"], "NoNewPrivileges": False}},
        False,
        "process.NoNewPrivileges must be true",
    ),
    Row("logs_allowed", "ReadStreamRequest", rq.read_stream_request(container_id="c-nginx"), True, "nginx"),
    Row(
        "stderr_allowed",
        "ReadStreamRequest",
        rq.read_stream_request(container_id="c-nginx", stream="stderr"),
        True,
        "nginx",
    ),
    Row(
        "stdin_allowed", "WriteStreamRequest", rq.write_stream_request(container_id="c-redis"), True, "redis"
    ),
    Row(
        "close_stdin_allowed",
        "CloseStdinRequest",
        rq.write_stream_request(container_id="c-redis"),
        True,
        "redis",
    ),
    Row(
        "copy_file_allowed",
        "CopyFileRequest",
        rq.copy_file_request(
            container_id="c-redis", path="/run/kata-containers/shared/containers/abc-redis-conf/redis.conf"
        ),
        True,
        "",
    ),
    Row(
        "copy_file_before_create_allowed",
        "CopyFileRequest",
        rq.copy_file_request(
            container_id="not-yet", path="/run/kata-containers/shared/containers/abc-redis-conf/redis.conf"
        ),
        True,
        "",
    ),
    Row("remove_container", "RemoveContainerRequest", {"container_id": "c-nginx"}, True, ""),
    # CreateContainer violations
    Row(
        "changed_args",
        CC,
        edit("nginx", lambda r: proc(r).update(Args=["nginx", "-g", "daemon on;"])),
        False,
        'args ["nginx","-g","daemon on;"] differ from the policy\'s ["nginx","-g","daemon off;"]',
    ),
    Row(
        "extra_arg",
        CC,
        edit("nginx", lambda r: proc(r)["Args"].append("-c/tmp/evil.conf")),
        False,
        "differ from the policy's",
    ),
    Row(
        "injected_ld_preload",
        CC,
        edit("nginx", lambda r: proc(r)["Env"].append("LD_PRELOAD=/tmp/x.so")),
        False,
        'container "nginx": env LD_PRELOAD is not allowed (allowed: PATH, POD_IP)',
    ),
    Row(
        "env_value_not_matching_pattern",
        CC,
        edit("nginx", lambda r: proc(r).update(Env=["PATH=/usr/local/sbin:/usr/bin", "POD_IP=1.2.3.4;rm"])),
        False,
        'env POD_IP has a value the policy does not allow (it must match "[0-9.]+")',
    ),
    Row(
        "env_exact_value_changed",
        CC,
        edit("nginx", lambda r: proc(r).update(Env=["PATH=/tmp:/usr/bin"])),
        False,
        'env PATH has a value the policy does not allow (it must be "/usr/local/sbin:/usr/bin")',
    ),
    Row(
        "unpinned_image",
        CC,
        edit("nginx", lambda r: r.update(image="docker.io/library/nginx:latest")),
        False,
        'image "docker.io/library/nginx:latest" is not the policy\'s image',
    ),
    Row(
        "different_digest",
        CC,
        edit("nginx", lambda r: r.update(image=f"docker.io/library/nginx@sha256:{'f' * 64}")),
        False,
        "is not the policy's image",
    ),
    Row(
        "different_repository_same_digest",
        CC,
        edit("nginx", lambda r: r.update(image=f"evil.example/library/nginx@{D_NGINX}")),
        False,
        'image "evil.example/library/nginx@',
    ),
    Row(
        "privileged_via_devices",
        CC,
        edit("nginx", lambda r: r["OCI"]["Linux"].update(Devices=[{"path": "/dev/mem", "type": "c"}])),
        False,
        'Linux.Devices ["/dev/mem"] makes the container privileged',
    ),
    Row(
        "privileged_via_capability",
        CC,
        edit("nginx", lambda r: proc(r)["Capabilities"]["Bounding"].append("CAP_SYS_ADMIN")),
        False,
        'capability "CAP_SYS_ADMIN" in Process.Capabilities.Bounding is not allowed',
    ),
    Row(
        "privileged_via_empty_masked_paths",
        CC,
        edit("nginx", lambda r: r["OCI"]["Linux"].update(MaskedPaths=[])),
        False,
        "Linux.MaskedPaths is empty",
    ),
    Row(
        "extra_host_path_mount",
        CC,
        edit(
            "nginx",
            lambda r: _mounts_add(
                r, {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}
            ),
        ),
        False,
        'mount of "/host" (type "bind", source "/", options ["rbind","rw"]) is not allowed',
    ),
    Row("mount_with_different_options", CC, edit("nginx", _set_opts), False, 'mount of "/etc/nginx/conf.d"'),
    Row(
        "required_env_dropped",
        CC,
        edit("nginx", lambda r: r["OCI"]["Process"].update(
            Env=[e for e in r["OCI"]["Process"]["Env"] if not e.startswith("PATH=")])),
        False,
        'env "PATH" is missing',
    ),
    Row(
        "required_mount_dropped",
        CC,
        edit("nginx", lambda r: r["OCI"].update(
            Mounts=[m for m in r["OCI"]["Mounts"] if m["destination"] != "/etc/nginx/conf.d"])),
        False,
        'mount "/etc/nginx/conf.d" is missing',
    ),
    Row(
        "volume_of_another_container",
        CC,
        edit(
            "nginx",
            lambda r: [
                m.update(source=m["source"].replace(r["container_id"], "c-redis"))
                for m in r["OCI"]["Mounts"]
                if m["destination"] == "/etc/nginx/conf.d"
            ],
        ),
        False,
        'mount of "/etc/nginx/conf.d"',
    ),
    Row(
        "mount_from_other_configmap",
        CC,
        edit(
            "nginx",
            lambda r: r["OCI"]["Mounts"][-1].update(
                source="/run/kata-containers/shared/containers/c-new-configmap-other"
            ),
        ),
        False,
        'the policy mounts "/etc/nginx/conf.d" from "configmap:nginx-conf"',
    ),
    Row(
        "ambient_capability",
        CC,
        edit("nginx", lambda r: proc(r)["Capabilities"].update(Ambient=["CAP_CHOWN"])),
        False,
        "Process.Capabilities.Ambient must be empty unless the container is privileged",
    ),
    Row(
        "uid_change",
        CC,
        edit("nginx", lambda r: proc(r)["User"].update(UID=0)),
        False,
        "user id 0 is not the policy's 101",
    ),
    Row(
        "additional_gids_change",
        CC,
        edit("redis", lambda r: proc(r)["User"].update(AdditionalGids=[0])),
        False,
        "additional groups [0] are not the policy's [1000,2000]",
    ),
    Row(
        "cwd_change",
        CC,
        edit("nginx", lambda r: proc(r).update(Cwd="/tmp")),
        False,
        'working directory "/tmp" is not the policy\'s "/"',
    ),
    Row(
        "no_new_privileges_false",
        CC,
        edit("nginx", lambda r: proc(r).update(NoNewPrivileges=False)),
        False,
        "Process.NoNewPrivileges must be true",
    ),
    Row(
        "read_only_root_required",
        CC,
        edit("redis", lambda r: r["OCI"]["Root"].update(Readonly=False)),
        False,
        "the root filesystem must be read-only",
    ),
    Row(
        "hooks_present",
        CC,
        edit("nginx", lambda r: r["OCI"].update(Hooks={"prestart": [{"path": "/bin/sh"}]})),
        False,
        "OCI.Hooks must be null",
    ),
    Row(
        "unknown_container_name",
        CC,
        edit("nginx", lambda r: r.update(name="miner")),
        False,
        'no container named "miner" in the policy',
    ),
    Row(
        "container_id_reused",
        CC,
        create("nginx", "c-redis"),
        False,
        'container id "c-redis" is already in use',
    ),
    Row(
        "many_violations_all_reported",
        CC,
        edit("nginx", lambda r: (proc(r)["Env"].append("LD_PRELOAD=/x"), proc(r).update(Cwd="/tmp"))),
        False,
        "working directory",
    ),
    # Exec
    Row(
        "exec_not_allowed_in_container",
        EP,
        exec_in("redis", ["redis-cli", "info"]),
        False,
        'ExecProcess: container "redis": command ["redis-cli","info"] is not allowed '
        "(the policy allows no exec",
    ),
    Row(
        "exec_other_command",
        EP,
        exec_in("nginx", ["sh"]),
        False,
        'ExecProcess: container "nginx": command ["sh"] is not allowed (allowed: ["nginx", "-s", "reload"]',
    ),
    Row(
        "exec_pattern_non_match",
        EP,
        exec_in("nginx", ["cat", "/etc/shadow"]),
        False,
        'command ["cat","/etc/shadow"]',
    ),
    Row(
        "exec_pattern_trailing_text",
        EP,
        exec_in("nginx", ["cat", "/var/log/nginx/a.log", "/etc/shadow"]),
        False,
        "is not allowed",
    ),
    Row(
        "exec_in_container_not_created",
        EP,
        rq.exec_request(container_id="c-ghost", args=["nginx", "-s", "reload"]),
        False,
        'ExecProcess: container id "c-ghost" was not created through the policy',
    ),
    Row(
        "exec_with_injected_env",
        EP,
        exec_in("nginx", ["nginx", "-s", "reload"], env=["LD_PRELOAD=/x.so"]),
        False,
        "env LD_PRELOAD is not allowed",
    ),
    Row(
        "exec_as_root",
        EP,
        exec_in("nginx", ["nginx", "-s", "reload"], user=User(uid=0, gid=0)),
        False,
        "user id 0 is not the policy's 101",
    ),
    Row(
        "exec_with_capabilities",
        EP,
        {
            **exec_in("nginx", ["nginx", "-s", "reload"]),
            "process": {
                **exec_in("nginx", ["nginx", "-s", "reload"])["process"],
                "Capabilities": {"Bounding": ["CAP_SYS_ADMIN"]},
            },
        },
        False,
        "an exec may not carry capabilities",
    ),
    # Streams and files
    Row(
        "logs_not_allowed",
        "ReadStreamRequest",
        rq.read_stream_request(container_id="c-redis"),
        False,
        'ReadStream: logs of container "redis" are not allowed by the policy',
    ),
    Row(
        "bad_stream_name",
        "ReadStreamRequest",
        {"container_id": "c-nginx", "exec_id": "", "stream": "stdin"},
        False,
        'stream "stdin" is neither stdout nor stderr',
    ),
    Row(
        "stdin_not_allowed",
        "WriteStreamRequest",
        rq.write_stream_request(container_id="c-nginx"),
        False,
        'WriteStream: stdin of container "nginx" is not allowed by the policy',
    ),
    Row(
        "close_stdin_not_allowed",
        "CloseStdinRequest",
        rq.write_stream_request(container_id="c-nginx"),
        False,
        'CloseStdin: stdin of container "nginx" is not allowed',
    ),
    Row(
        "copy_file_denied",
        "CopyFileRequest",
        rq.copy_file_request(container_id="c-redis", path="/etc/passwd"),
        False,
        'CopyFile: path "/etc/passwd" is not allowed',
    ),
    Row(
        "copy_file_dotdot",
        "CopyFileRequest",
        rq.copy_file_request(
            container_id="c-redis",
            path="/run/kata-containers/shared/containers/abc-redis-conf/../../../etc/passwd",
        ),
        False,
        'has a ".." component',
    ),
    Row(
        "copy_file_no_patterns_for_container",
        "CopyFileRequest",
        rq.copy_file_request(
            container_id="c-nginx", path="/run/kata-containers/shared/containers/abc-redis-conf/x"
        ),
        False,
        "the policy allows no file copies into this container",
    ),
    # Sandbox
    Row(
        "sandbox_bad_name",
        "CreateSandboxRequest",
        rq.sandbox_request(name="other", namespace="default"),
        False,
        'CreateSandbox: sandbox name "other" is not the policy\'s "web" (or a name a controller generates',
        True,
    ),
    Row(
        "sandbox_generated_name_of_a_controller",
        "CreateSandboxRequest",
        rq.sandbox_request(name="web-7d9f8c6b5-x2x4q", namespace="default"),
        True,
        "",
        True,
    ),
    Row(
        "sandbox_name_that_only_starts_like_the_policys",
        "CreateSandboxRequest",
        rq.sandbox_request(name="webserver", namespace="default"),
        False,
        'CreateSandbox: sandbox name "webserver" is not the policy\'s "web"',
        True,
    ),
    Row(
        "sandbox_generated_name_with_invalid_characters",
        "CreateSandboxRequest",
        rq.sandbox_request(name="web-X_Y", namespace="default"),
        False,
        'CreateSandbox: sandbox name "web-X_Y"',
        True,
    ),
    Row(
        "sandbox_bad_namespace",
        "CreateSandboxRequest",
        rq.sandbox_request(name="web", namespace="kube-system"),
        False,
        'namespace "kube-system" is not the policy\'s "default"',
        True,
    ),
    Row(
        "sandbox_kernel_modules",
        "CreateSandboxRequest",
        {**rq.sandbox_request(name="web", namespace="default"), "kernel_modules": ["evil"]},
        False,
        'kernel modules ["evil"] are not allowed',
        True,
    ),
    Row(
        "sandbox_guest_hook",
        "CreateSandboxRequest",
        {**rq.sandbox_request(name="web", namespace="default"), "guest_hook_path": "/hooks"},
        False,
        'guest hook path "/hooks" is not allowed',
        True,
    ),
    Row(
        "sandbox_twice",
        "CreateSandboxRequest",
        rq.sandbox_request(name="web", namespace="default"),
        False,
        "the sandbox has already been created",
    ),
    # Fixed answers
    Row(
        "set_policy",
        "SetPolicyRequest",
        {"policy": "package agent_policy\ndefault allow := true"},
        False,
        "SetPolicy is always denied: the policy is fixed at launch by initdata",
    ),
    Row("unknown_request", "PauseContainerRequest", {"container_id": "c-nginx"}, False, "unknown request"),
    Row("policy_data_is_not_a_request", "policy_data", {}, False, "unknown request"),
    Row(
        "reserved_pstate_field",
        EP,
        {**exec_in("nginx", ["sh"]), "pstate": {"containers": {"c-x": 0}}},
        False,
        'reserved field "pstate"',
    ),
    *[Row(f"always_{name}", name, {"container_id": "c-nginx"}, True, "") for name in ALWAYS_ALLOWED],
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_decision_table(row: Row) -> None:
    engine = PolicyEngine(POLICY) if row.fresh else started()
    decision = engine.decide(row.request, row.input)
    assert decision.allowed is row.allowed, decision.explanation()
    assert row.says in decision.explanation()
    if not row.allowed:
        assert decision.reasons
        assert "denied" in decision.explanation()


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 45


def test_every_violation_is_reported_together() -> None:
    req = edit(
        "nginx",
        lambda r: (
            proc(r)["Env"].append("LD_PRELOAD=/x"),
            proc(r).update(Cwd="/tmp"),
            proc(r)["User"].update(UID=0),
            r.update(image="nginx:latest"),
        ),
    )
    decision = started().decide(CC, req)
    text = decision.explanation()
    for part in ("env LD_PRELOAD", "working directory", "user id 0", 'image "nginx:latest"'):
        assert part in text
    assert len(decision.reasons) == 4


def test_state_ties_exec_to_created_container_and_remove_clears_it() -> None:
    engine = started(names=("nginx",))
    assert engine.state["containers"] == {"c-nginx": 0}
    assert engine.state["sandbox"]["name"] == "web"
    assert engine.decide(EP, exec_in("nginx", ["nginx", "-s", "reload"])).allowed
    assert engine.decide("RemoveContainerRequest", {"container_id": "c-nginx"}).allowed
    assert engine.state["containers"] == {}
    after = engine.decide(EP, exec_in("nginx", ["nginx", "-s", "reload"]))
    assert not after.allowed
    assert "was not created through the policy" in after.explanation()


def test_denied_create_does_not_change_state() -> None:
    engine = started(names=())
    before = engine.state
    assert not engine.decide(CC, edit("nginx", lambda r: proc(r).update(Cwd="/tmp"), "c-x")).allowed
    assert engine.state == before


def test_state_property_is_a_copy() -> None:
    engine = started(names=("nginx",))
    state = engine.state
    state["containers"]["c-fake"] = 1
    assert "c-fake" not in engine.state["containers"]


def test_compile_policy_is_deterministic() -> None:
    first = compile_policy(POLICY)
    again = compile_policy(copy.deepcopy(POLICY))
    assert first == again
    assert first.startswith(RULES)
    rules, data = split_policy(first)
    assert rules == RULES + "\n"
    assert data == json.loads(json.dumps(policy_data(POLICY)))
    assert data["container_index"] == {"nginx": 0, "redis": 1, "tools": 2}
    assert '\npolicy_data := {\n  "attestation"' in first


def test_compiled_text_decides_like_the_model() -> None:
    text = compile_policy(POLICY)
    from_model, from_text = PolicyEngine(POLICY), PolicyEngine(text)
    for row in ROWS:
        if row.request == "CreateSandboxRequest" and not row.fresh:
            continue
        a, b = from_model.decide(row.request, row.input), from_text.decide(row.request, row.input)
        assert (a.allowed, a.reasons) == (b.allowed, b.reasons), row.id


def test_different_policy_gives_different_text() -> None:
    changed = WorkloadPolicy(name="web", namespace="default", containers=(NGINX, REDIS))
    assert compile_policy(changed) != compile_policy(POLICY)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("package agent_policy\n", "no 'policy_data := ' line"),
        (RULES + '\npolicy_data := {"a": 1, "a": 2}\n', "duplicate key"),
        (RULES + '\npolicy_data := {"a": NaN}\n', "not valid JSON"),
        (RULES + "\npolicy_data := [1]\n", "not a JSON object"),
        (RULES + '\npolicy_data := {"a": 1} trailing\n', "text after"),
        (RULES + '\npolicy_data := {"a": \n', "not valid JSON"),
        ("package other\nx := 1\npolicy_data := {}\n", "package agent_policy"),
        ("package agent_policy\nx := \npolicy_data := {}\n", "does not compile"),
    ],
)
def test_malformed_policy_text_is_refused(text: str, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        PolicyEngine(text)


def test_duplicate_container_name_is_refused() -> None:
    with pytest.raises(FormatError, match="appears twice"):
        compile_policy(WorkloadPolicy(name="web", containers=(NGINX, NGINX)))


def test_invalid_pattern_is_refused_at_compile_time() -> None:
    bad = ContainerPolicy(
        name="x", image=NGINX_IMAGE, args=("x",), allow=HostAccess(exec_patterns=("x)|(.*",))
    )
    with pytest.raises(FormatError, match="invalid regex"):
        compile_policy(WorkloadPolicy(name="web", containers=(bad,)))


def test_broken_data_document_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    rules, data = split_policy(compile_policy(POLICY))
    data["containers"] = "not a list"
    engine = PolicyEngine(rules + "policy_data := " + json.dumps(data) + "\n")
    with caplog.at_level(logging.ERROR, logger="coffer.policy.engine"):
        decision = engine.decide(CC, create("nginx"))
    assert not decision.allowed
    assert engine.state["containers"] == {}


def test_rego_runtime_error_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    rules = (
        "package agent_policy\nimport rego.v1\n"
        'CreateContainerRequest := {"allowed": true, "ops": [], "reasons": [], '
        '"container": null} if { 1 / 0 > 0 }\n'
        "ExecProcessRequest := true\n"
    )
    engine = PolicyEngine(rules + "policy_data := {}\n")
    with caplog.at_level(logging.ERROR, logger="coffer.policy.engine"):
        crashed = engine.decide(CC, create("nginx"))
        not_object = engine.decide(EP, exec_in("nginx", ["sh"]))
        undefined = engine.decide("ReadStreamRequest", rq.read_stream_request(container_id="x"))
    for decision in (crashed, not_object, undefined):
        assert not decision.allowed
        assert decision.reasons[-1].endswith("policy evaluation failed")
    assert "policy evaluation failed" in caplog.text


def test_malformed_ops_fail_closed() -> None:
    rules = (
        "package agent_policy\nimport rego.v1\n"
        'CreateContainerRequest := {"allowed": true, "ops": [{"op": "move", "path": "/x"}], '
        '"reasons": [], "container": null}\n'
    )
    engine = PolicyEngine(rules + "policy_data := {}\n")
    decision = engine.decide(CC, create("nginx"))
    assert not decision.allowed
    assert engine.state == {"containers": {}}


@pytest.mark.parametrize(
    "bad",
    [
        {"OCI": "not an object"},
        {"OCI": {"Process": {"Env": "LD_PRELOAD=/x.so"}}},
        {"OCI": {"Process": {"Capabilities": {"Bounding": "CAP_SYS_ADMIN"}}}},
        {"OCI": {"Mounts": {"destination": "/host"}}},
        {"OCI": {"Process": {"Env": [1, None, {"a": "b"}]}}},
    ],
)
def test_malformed_create_fields_are_denied(bad: dict[str, Any]) -> None:
    req = create("nginx", "c-new")
    for key, value in bad.items():
        if isinstance(value, dict) and isinstance(req.get(key), dict):
            for k2, v2 in value.items():
                if isinstance(v2, dict) and isinstance(req[key].get(k2), dict):
                    req[key][k2].update(v2)
                else:
                    req[key][k2] = v2
        else:
            req[key] = value
    assert not started(names=()).decide(CC, req).allowed


def test_non_json_input_is_denied() -> None:
    engine = PolicyEngine(POLICY)
    assert not engine.decide(EP, {"container_id": object()}).allowed
    assert not engine.decide(EP, {"x": float("nan")}).allowed
    assert not engine.decide(EP, ["not", "a", "mapping"]).allowed  # type: ignore[arg-type]


def test_decision_log_with_debug_redacts_env(caplog: pytest.LogCaptureFixture) -> None:
    debug_policy = WorkloadPolicy(
        name="web", namespace="default", containers=(NGINX, REDIS, TOOLS), debug=True
    )
    engine = PolicyEngine(debug_policy)
    with caplog.at_level(logging.INFO, logger="coffer.policy.decisions"):
        engine.decide(CC, create("redis"))
        engine.decide(CC, edit("nginx", lambda r: proc(r)["Env"].append("LD_PRELOAD=/tmp/x.so")))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "coffer.policy.decisions"]
    assert [line["allowed"] for line in lines] == [True, False]
    assert "LD_PRELOAD" in lines[1]["reasons"][0]
    assert "REDIS_PASSWORD=<redacted>" in lines[0]["input"]["OCI"]["Process"]["Env"]
    assert "s3cret-value" not in caplog.text
    assert "/tmp/x.so" not in caplog.text


def test_no_decision_log_without_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="coffer.policy.decisions"):
        started(names=("nginx",))
    assert not [r for r in caplog.records if r.name == "coffer.policy.decisions"]


def test_debug_is_in_policy_data() -> None:
    assert policy_data(POLICY)["debug"] is False


def test_use_from_another_thread_is_refused() -> None:
    engine = PolicyEngine(POLICY)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            engine.decide("GuestDetailsRequest", {})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], UsageError)
    assert "thread" in str(errors[0])
    assert engine.decide("GuestDetailsRequest", {}).allowed


def test_engine_made_on_another_thread_is_dropped_there() -> None:
    box: list[PolicyEngine] = []
    thread = threading.Thread(target=lambda: box.append(PolicyEngine(POLICY)))
    thread.start()
    thread.join()
    box.clear()  # collected here; its regorus engine went with its thread
    assert PolicyEngine(POLICY).decide("GuestDetailsRequest", {}).allowed


def test_explanation_wording() -> None:
    allowed = Decision("ExecProcessRequest", True, (), "nginx")
    assert allowed.explanation() == 'ExecProcessRequest is allowed by the policy for container "nginx".'
    denied = Decision("SetPolicyRequest", False, ("a", "b"), None)
    assert denied.explanation() == "SetPolicyRequest is denied by the policy: a; b."


def test_fast_path_agrees_with_the_full_checks() -> None:
    """Every allowed CreateContainer/Exec row also passes the full check set (no reasons)."""
    import regorus  # type: ignore[import-untyped]

    rules, data = split_policy(compile_policy(POLICY))
    engine = regorus.Engine()
    engine.add_policy("policy.rego", rules)
    engine.add_data_json(json.dumps({"agent_policy": {"policy_data": data}}))
    state = {"containers": {"c-nginx": 0, "c-redis": 1, "c-tools": 2}}
    for row in ROWS:
        if row.request not in (CC, EP) or "pstate" in row.input:
            continue
        engine.set_input_json(
            json.dumps({**row.input, "pstate": state if row.request == EP else {"containers": {}}})
        )
        fast = engine.eval_rule("data.agent_policy." + ("cc_fast" if row.request == CC else "ep_fast"))
        full = engine.eval_rule("data.agent_policy." + ("cc_v" if row.request == CC else "ep_v"))
        if fast:
            assert not full, row.id


# --------------------------------------------------------------------------------------------------
# Fast paths: the engine decides CreateContainer and ExecProcess first with fast_* rules on a view of
# the request, run by the regorus RVM; the request rules (interpreter) decide whatever they do not
# allow. They must never allow what the request rule denies, and must agree with the interpreter.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from coffer.policy import engine as engine_mod  # noqa: E402
from tests.policy import fastcheck  # noqa: E402
from tests.policy.mutation import mutate  # noqa: E402


def _fast_rules() -> Any:
    """The loaded rules (interpreter + RVM) of POLICY."""
    rules, fast = engine_mod._load_rules(RULES, policy_data(POLICY))
    assert fast
    return rules


_LOADED = _fast_rules()
_STATE = {"containers": {"c-nginx": 0, "c-redis": 1, "c-tools": 2}}
_CONTEXT = engine_mod._view_context(policy_data(POLICY), _LOADED)


def _full(request: str, req: dict[str, Any], state: dict[str, Any]) -> Any:
    """The request rule's result on the whole request (the interpreter, as before the fast paths)."""
    return _LOADED.evaluate(request, json.dumps({**req, "pstate": state}))


def _check_fast(request: str, req: Any, state: dict[str, Any]) -> bool:
    """Whether the fast path allows ``req`` (see tests.policy.fastcheck)."""
    return fastcheck.fast_allows(_LOADED, _CONTEXT, request, req, state)


def _cc_state() -> dict[str, Any]:
    return {"containers": {"c-redis": 1}}


@pytest.mark.parametrize("row", [r for r in ROWS if r.request in engine_mod._FAST], ids=lambda r: r.id)
def test_fast_path_never_allows_what_the_request_rule_denies(row: Row) -> None:
    state = _cc_state() if row.request == CC else _STATE
    allowed = _check_fast(row.request, row.input, state)
    if not row.allowed:
        assert not allowed


def test_common_requests_are_decided_by_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = started()

    def no_interpreter(self: Any, rule: str, input_json: str) -> Any:
        raise AssertionError(f"{rule} went to the request rule")

    monkeypatch.setattr(engine_mod._Rules, "evaluate", no_interpreter)
    for name in ("nginx", "redis"):
        decision = engine.decide(CC, create(name, f"c-2-{name}"))
        assert decision.allowed
        assert decision.container == name
    assert engine.state["containers"]["c-2-redis"] == 1
    assert engine.decide(EP, exec_in("nginx", ["nginx", "-s", "reload"])).allowed
    removed = engine.decide("RemoveContainerRequest", {"container_id": "c-2-nginx"})
    assert (removed.allowed, removed.container) == (True, "nginx")
    assert "c-2-nginx" not in engine.state["containers"]
    # A request in another order (capabilities, options, groups) is the same request.
    req = create("redis", "c-3")
    proc(req)["Capabilities"]["Bounding"].reverse()
    proc(req)["User"]["AdditionalGids"] = [2000, 1000, 2000]
    for mount in req["OCI"]["Mounts"]:
        mount["options"].reverse()
    req["OCI"]["Mounts"].reverse()
    assert engine.decide(CC, req).allowed


def _same_decision(
    engine: PolicyEngine, request: str, req: dict[str, Any], state: dict[str, Any]
) -> Decision:
    """The engine decides ``req`` exactly as the request rule alone does."""
    decision = engine.decide(request, req)
    try:
        full = _full(request, req, state)
    except RuntimeError:  # a Rego error: the engine fails closed
        assert not decision.allowed
        assert decision.reasons[-1].endswith("policy evaluation failed")
        return decision
    assert decision.allowed is full["allowed"], (req, decision)
    assert decision.container == full["container"]
    assert set(decision.reasons) == set(full["reasons"])
    return decision


def _variants() -> list[tuple[str, Callable[[dict[str, Any]], object]]]:
    """Edits of a redis CreateContainer request near the fast path's edges."""

    def caps(r: dict[str, Any]) -> dict[str, Any]:
        c: dict[str, Any] = proc(r)["Capabilities"]
        return c

    def mounts(r: dict[str, Any]) -> list[dict[str, Any]]:
        m: list[dict[str, Any]] = r["OCI"]["Mounts"]
        return m

    def mount_at(r: dict[str, Any], dest: str) -> dict[str, Any]:
        return next(m for m in mounts(r) if m["destination"] == dest)

    return [
        ("same", lambda r: None),
        ("cap_with_newline", lambda r: caps(r).update(Bounding=["CAP_CHOWN\nCAP_KILL"])),
        ("cap_lowercase", lambda r: caps(r).update(Bounding=["chown"])),
        ("cap_not_list", lambda r: caps(r).update(Bounding="CAP_CHOWN")),
        ("cap_numbers", lambda r: caps(r).update(Effective=[1, True])),
        ("caps_missing_set", lambda r: caps(r).pop("Ambient")),
        ("caps_null", lambda r: proc(r).update(Capabilities=None)),
        ("caps_extra_set", lambda r: caps(r).update(Other=["CAP_SYS_ADMIN"])),
        ("gids_bool", lambda r: proc(r)["User"].update(AdditionalGids=[True, 1000, 2000])),
        ("gids_float", lambda r: proc(r)["User"].update(AdditionalGids=[1000.0, 2000])),
        ("gids_missing", lambda r: proc(r)["User"].pop("AdditionalGids")),
        ("uid_float", lambda r: proc(r)["User"].update(UID=999.0)),
        ("uid_bool", lambda r: proc(r)["User"].update(UID=True)),
        ("user_extra_key", lambda r: proc(r)["User"].update(Username="root")),
        ("env_no_equals", lambda r: proc(r)["Env"].append("PATH")),
        ("env_empty_name", lambda r: proc(r)["Env"].append("=x")),
        ("env_newline_value", lambda r: proc(r)["Env"].append("REDIS_PASSWORD=a\nb")),
        ("env_not_string", lambda r: proc(r)["Env"].append(5)),
        ("env_missing", lambda r: proc(r).pop("Env")),
        ("mount_duplicate", lambda r: mounts(r).append(dict(mount_at(r, "/data")))),
        ("mount_dest_tab", lambda r: mount_at(r, "/data").update(destination="/da\tta")),
        ("mount_dest_newline", lambda r: mount_at(r, "/data").update(destination="/data\n/proc\tproc")),
        ("mount_type_changed", lambda r: mount_at(r, "/data").update(type="tmpfs")),
        ("mount_default_as_bind", lambda r: mount_at(r, "/proc").update(type="bind", source="/")),
        ("mount_missing_default", lambda r: mounts(r).remove(mount_at(r, "/dev/mqueue"))),
        ("mount_missing_policy", lambda r: mounts(r).remove(mount_at(r, "/data"))),
        ("mount_source_other", lambda r: mount_at(r, "/data").update(source="/var/lib/other")),
        (
            "mount_shared_slash",
            lambda r: mount_at(r, "/etc/redis").update(
                source="/run/kata-containers/shared/containers/a/b-configmap-redis-conf"
            ),
        ),
        (
            "mount_shared_other_id",
            lambda r: mount_at(r, "/etc/redis").update(
                source="/run/kata-containers/shared/containers/other-configmap-redis-conf"
            ),
        ),
        ("mount_options_extra", lambda r: mount_at(r, "/data")["options"].append("suid")),
        ("mount_options_missing", lambda r: mount_at(r, "/data").pop("options")),
        ("mount_source_missing", lambda r: mount_at(r, "/data").pop("source")),
        ("mount_not_object", lambda r: r["OCI"]["Mounts"].append("/host")),
        ("masked_empty", lambda r: r["OCI"]["Linux"].update(MaskedPaths=[])),
        ("masked_missing", lambda r: r["OCI"]["Linux"].pop("MaskedPaths")),
        ("devices", lambda r: r["OCI"]["Linux"].update(Devices=[{"path": "/dev/mem"}])),
        ("hooks_missing", lambda r: r["OCI"].pop("Hooks")),
        ("hooks_empty", lambda r: r["OCI"].update(Hooks={})),
        ("nnp_missing", lambda r: proc(r).pop("NoNewPrivileges")),
        ("nnp_string", lambda r: proc(r).update(NoNewPrivileges="true")),
        ("readonly_false", lambda r: r["OCI"]["Root"].update(Readonly=False)),
        ("image_tagged", lambda r: r.update(image=f"docker.io/library/redis:7@{D_REDIS}")),
        ("image_missing", lambda r: r.pop("image")),
        ("id_reused", lambda r: r.update(container_id="c-redis")),
        ("id_with_slash_and_tilde", lambda r: r.update(container_id="a/b~c")),
        ("id_empty", lambda r: r.update(container_id="")),
        ("id_number", lambda r: r.update(container_id=7)),
        ("name_unknown", lambda r: r.update(name="miner")),
        ("args_tuple", lambda r: proc(r).update(Args=tuple(proc(r)["Args"]))),
        ("cwd_missing", lambda r: proc(r).pop("Cwd")),
        ("process_not_object", lambda r: r["OCI"].update(Process=[])),
    ]


@pytest.mark.parametrize(("name", "change"), _variants(), ids=[n for n, _ in _variants()])
def test_fast_path_variants_decide_as_the_request_rule(
    name: str, change: Callable[[dict[str, Any]], object]
) -> None:
    req = edit("redis", change, "c-v")
    _check_fast(CC, req, _cc_state())
    engine = PolicyEngine(POLICY)
    assert engine.decide(CC, create("redis", "c-redis")).allowed
    before = engine.state
    decision = _same_decision(engine, CC, req, {"containers": {"c-redis": 1}})
    if decision.allowed:
        assert engine.state["containers"] == {**before["containers"], req["container_id"]: 1}
    else:
        assert engine.state == before


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3000),
    st.sampled_from([1000.0, 101.0, 0.5]),
    st.sampled_from(
        [
            "",
            "/",
            "CAP_CHOWN",
            "CAP_SYS_ADMIN",
            "bind",
            "tmpfs",
            "/data",
            "a\nb",
            "x\ty",
            "PATH=/usr/bin",
            "REDIS_PASSWORD=x",
            "LD_PRELOAD=/x",
            "rbind",
            "rw",
            "ro",
        ]
    ),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["destination", "type", "source", "options", "UID", "GID", "AdditionalGids", "x"]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=6,
)



@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_never_allows_a_mutated_request_the_rule_denies(data: st.DataObject) -> None:
    request = data.draw(st.sampled_from([CC, EP]))
    req = create("redis", "c-m") if request == CC else exec_in("nginx", ["nginx", "-s", "reload"])
    mutate(data, req, _JSON)
    _check_fast(request, req, _cc_state() if request == CC else _STATE)


@pytest.mark.parametrize(
    ("pattern", "chars", "least"),
    [
        ("[a-z0-9-]+", "-0123456789abcdefghijklmnopqrstuvwxyz", 1),
        ("[0-9.]*", ".0123456789", 0),
        ("[0-9a-fA-F:.]+", ".0123456789:ABCDEFabcdef", 1),
        ("[-_a-z]+", "-_abcdefghijklmnopqrstuvwxyz", 1),
    ],
)
def test_character_class_patterns_get_a_charset(pattern: str, chars: str, least: int) -> None:
    assert engine_mod._charset(pattern) == {"chars": chars, "min": least}


@pytest.mark.parametrize(
    "pattern",
    [
        "[a-z]{3}",
        "[^a-z]+",
        "a+",
        "[a-z]+x",
        "[a-z-9]+",
        "[z-a]+",
        "[0-z]+",
        "[a\\-z]+",
        "[a-z]",
        "[]+",
        "[a-z]++",
        "(?s).*",
        "[\\w]+",
        "[ ]+",
    ],
)
def test_other_patterns_get_no_charset(pattern: str) -> None:
    assert engine_mod._charset(pattern) is None


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.sampled_from(["[a-z0-9-]+", "[0-9.]*", "[0-9a-fA-F:.,]+", "[-_a-zA-Z0-9]+"]),
    value=st.text(alphabet="az09-.,:_AFG\n/ é", max_size=6),
)
def test_charset_admits_exactly_what_the_pattern_does(pattern: str, value: str) -> None:
    charset = engine_mod._charset(pattern)
    assert charset is not None
    by_charset = len(value) >= charset["min"] and all(ch in charset["chars"] for ch in value)
    assert by_charset == (re.fullmatch(pattern, value) is not None)


def test_env_pattern_variables_take_the_fast_path_only_when_admitted() -> None:
    web = ContainerPolicy(
        name="web",
        image=NGINX_IMAGE,
        args=("web",),
        capabilities=(),
        no_new_privileges=True,
        env=(
            EnvRule(name="HOST", pattern="[a-z0-9-]+"),
            EnvRule(name="ANY", pattern="(?s).*"),
            EnvRule(name="IP", pattern="[0-9]+(\\.[0-9]+){3}"),
        ),
    )
    policy = WorkloadPolicy(name="web", containers=(web,))
    spec = rq.ContainerSpec(
        name="web", image=NGINX_IMAGE, args=("web",), env=(), capabilities=(), no_new_privileges=True
    )
    rules, fast = engine_mod._load_rules(RULES, policy_data(policy))
    assert fast
    for env, allowed in [
        (["HOST=web-1", "ANY=a\nb=c", "IP=10.0.0.1"], True),
        (["HOST=Web"], False),
        (["HOST="], False),
        (["HOST=web\n"], False),
        (["IP=10.0.0"], False),
        (["OTHER=x"], False),
    ]:
        req = rq.container_request(container_id="c1", name="web", image=NGINX_IMAGE, spec=spec)
        proc(req)["Env"] = env
        context = engine_mod._view_context(policy_data(policy), rules)
        view = engine_mod._VIEWS["CreateContainerRequest"](req, {}, context)
        assert view is not None
        fast = rules.evaluate_fast("fast_CreateContainerRequest", view)
        assert (fast != "<undefined>") is allowed, env
        full = rules.evaluate("CreateContainerRequest", json.dumps({**req, "pstate": {"containers": {}}}))
        assert full["allowed"] is allowed, env


def test_rules_other_than_the_module_rules_get_no_fast_path() -> None:
    rules, data = split_policy(compile_policy(POLICY))
    assert engine_mod._load_rules(rules, data)[1]
    assert not engine_mod._load_rules(rules + "\nextra := 1\n", data)[1]
