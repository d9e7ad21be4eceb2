"""coffer.policy.engine: the decision table through the real regorus engine, compilation, state,
fail-closed behaviour, the decision log and thread binding."""

from __future__ import annotations

import copy
import json
import logging
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
        'CreateSandbox: sandbox name "other" is not the policy\'s "web"',
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
