"""Policy lint: each check fires on a minimal example, and a clean policy has no findings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from coffer.policy.document import dump_policy, parse_policy
from coffer.policy.lint import DANGEROUS_ENV, Finding, lint
from coffer.policy.model import (
    AttestationRequirement,
    ContainerPolicy,
    EnvRule,
    HostAccess,
    Secret,
    User,
    WorkloadPolicy,
)

DIGEST = "sha256:" + "cd" * 32

CLEAN_CONTAINER = ContainerPolicy(
    name="web",
    image=f"registry.example/team/web:1.2@{DIGEST}",
    args=("/usr/bin/web", "--port", "8080"),
    env=(
        EnvRule(name="PATH", value="/usr/local/bin:/usr/bin:/bin"),
        EnvRule(name="POD_IP", pattern="[0-9.]+"),
    ),
    working_dir="/srv",
    user=User(uid=1000, gid=1000),
    capabilities=("NET_BIND_SERVICE",),
    read_only_root=True,
    allow=HostAccess(
        exec=(("/usr/bin/web", "--reload"),), exec_patterns=("/usr/bin/web --check( -q)?",), logs=True
    ),
    secrets=(Secret(resource="kbs:///default/web/tls", file="/run/secrets/tls.pem"),),
)
CLEAN = WorkloadPolicy(
    name="web",
    attestation=AttestationRequirement(tee=("snp", "tdx")),
    containers=(CLEAN_CONTAINER,),
)


def _container(**changes: object) -> WorkloadPolicy:
    return replace(CLEAN, containers=(replace(CLEAN_CONTAINER, **changes),))  # type: ignore[arg-type]


def _allow(**changes: object) -> WorkloadPolicy:
    return _container(allow=replace(CLEAN_CONTAINER.allow, **changes))  # type: ignore[arg-type]


def _env(*rules: EnvRule) -> WorkloadPolicy:
    return _container(env=(*CLEAN_CONTAINER.env, *rules))


def test_clean_policy_has_no_findings() -> None:
    assert lint(CLEAN) == []
    assert lint(parse_policy(dump_policy(CLEAN))) == []


CASES: list[tuple[str, Callable[[], WorkloadPolicy], str, str, str]] = [
    # (defect, policy, severity, where, message fragment)
    ("unpinned image", lambda: _container(image="nginx:1.27"), "error", "containers[0].image", "not pinned"),
    ("image tag only", lambda: _container(image="quay.io/a/b"), "error", "containers[0].image", "not pinned"),
    (
        "exec pattern .*",
        lambda: _allow(exec_patterns=(".*",)),
        "error",
        "containers[0].allow.exec_patterns[0]",
        "admits any command",
    ),
    (
        "exec pattern sh .*",
        lambda: _allow(exec_patterns=("sh .*",)),
        "error",
        "containers[0].allow.exec_patterns[0]",
        "shell or interpreter",
    ),
    (
        "exec pattern bash -c",
        lambda: _allow(exec_patterns=("(/bin/)?bash -c [a-z ]+",)),
        "error",
        "containers[0].allow.exec_patterns[0]",
        "shell or interpreter",
    ),
    (
        "exec pattern python -c",
        lambda: _allow(exec_patterns=("python3 -c .+",)),
        "error",
        "containers[0].allow.exec_patterns[0]",
        "shell or interpreter",
    ),
    (
        "interactive shell",
        lambda: _allow(exec=(("/bin/sh",),)),
        "error",
        "containers[0].allow.exec[0]",
        "interactive shell",
    ),
    (
        "shell with fixed command",
        lambda: _allow(exec=(("sh", "-c", "nginx -s reload"),)),
        "warning",
        "containers[0].allow.exec[0]",
        "may run sh",
    ),
    (
        "interpreter",
        lambda: _allow(exec=(("python3", "/app/manage.py", "migrate"),)),
        "warning",
        "containers[0].allow.exec[0]",
        "may run python3",
    ),
    (
        "LD_PRELOAD exact",
        lambda: _env(EnvRule(name="LD_PRELOAD", value="/lib/x.so")),
        "error",
        "containers[0].env[2]",
        "LD_PRELOAD",
    ),
    (
        "NODE_OPTIONS pattern",
        lambda: _env(EnvRule(name="NODE_OPTIONS", pattern=".*")),
        "error",
        "containers[0].env[2]",
        "NODE_OPTIONS",
    ),
    (
        "BASH_ENV",
        lambda: _env(EnvRule(name="BASH_ENV", value="/x")),
        "error",
        "containers[0].env[2]",
        "BASH_ENV",
    ),
    (
        "PATH pattern",
        lambda: _env(EnvRule(name="PATH", pattern="/[a-z/:]+")),
        "error",
        "containers[0].env[2]",
        "search path",
    ),
    (
        "PATH .*",
        lambda: _env(EnvRule(name="PATH", pattern=".*")),
        "error",
        "containers[0].env[2]",
        "search path",
    ),
    (
        "any-value pattern",
        lambda: _env(EnvRule(name="MODE", pattern=".*")),
        "warning",
        "containers[0].env[2]",
        "admits any value",
    ),
    ("privileged", lambda: _container(privileged=True), "error", "containers[0].privileged", "privileged"),
    (
        "SYS_ADMIN",
        lambda: _container(capabilities=("CHOWN", "SYS_ADMIN")),
        "error",
        "containers[0].capabilities[1]",
        "CAP_SYS_ADMIN",
    ),
    (
        "SYS_PTRACE",
        lambda: _container(capabilities=("SYS_PTRACE",)),
        "error",
        "containers[0].capabilities[0]",
        "CAP_SYS_PTRACE",
    ),
    (
        "DAC_READ_SEARCH",
        lambda: _container(capabilities=("DAC_READ_SEARCH",)),
        "error",
        "containers[0].capabilities[0]",
        "CAP_DAC_READ_SEARCH",
    ),
    (
        "SYS_MODULE",
        lambda: _container(capabilities=("SYS_MODULE",)),
        "error",
        "containers[0].capabilities[0]",
        "CAP_SYS_MODULE",
    ),
    (
        "NET_ADMIN",
        lambda: _container(capabilities=("NET_ADMIN",)),
        "warning",
        "containers[0].capabilities[0]",
        "CAP_NET_ADMIN",
    ),
    ("root user", lambda: _container(user=User(uid=0, gid=0)), "warning", "containers[0].user.uid", "root"),
    (
        "no_new_privileges false",
        lambda: _container(no_new_privileges=False),
        "warning",
        "containers[0].no_new_privileges",
        "setuid",
    ),
    (
        "writable root",
        lambda: _container(read_only_root=False),
        "warning",
        "containers[0].read_only_root",
        "writable root",
    ),
    ("stdin", lambda: _allow(stdin=True), "warning", "containers[0].allow.stdin", "stdin"),
    (
        "copy_files",
        lambda: _allow(copy_files=("/data/in/[^/]+",)),
        "warning",
        "containers[0].allow.copy_files[0]",
        "copy files",
    ),
    (
        "copy_files anything",
        lambda: _allow(copy_files=("/.*",)),
        "error",
        "containers[0].allow.copy_files[0]",
        "any file",
    ),
    ("debug", lambda: replace(CLEAN, debug=True), "error", "debug", "decision log"),
    (
        "no tee",
        lambda: replace(CLEAN, attestation=AttestationRequirement()),
        "warning",
        "attestation.tee",
        "no TEE type",
    ),
    (
        "sample tee",
        lambda: replace(CLEAN, attestation=AttestationRequirement(tee=("snp", "sample"))),
        "error",
        "attestation.tee",
        "sample",
    ),
    (
        "allow_debug",
        lambda: replace(CLEAN, attestation=AttestationRequirement(tee=("snp",), allow_debug=True)),
        "error",
        "attestation.allow_debug",
        "debug-enabled",
    ),
    (
        "secret as env",
        lambda: _container(secrets=(Secret(resource="kbs:///a/b/c", env="DB_PASSWORD"),)),
        "warning",
        "containers[0].secrets[0].env",
        "environment variable",
    ),
    (
        "secret env also host-settable",
        lambda: _container(secrets=(Secret(resource="kbs:///a/b/c", env="POD_IP"),)),
        "error",
        "containers[0].secrets[0].env",
        "host may also set POD_IP",
    ),
]


@pytest.mark.parametrize(
    ("make", "severity", "where", "fragment"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_check_fires_on_minimal_example(
    make: Callable[[], WorkloadPolicy], severity: str, where: str, fragment: str
) -> None:
    findings = lint(make())
    matching = [f for f in findings if f.where == where and fragment in f.message]
    assert matching, findings
    assert all(f.severity == severity for f in matching)
    assert all(f.hint for f in matching)


def test_every_finding_has_a_hint_and_a_readable_form() -> None:
    noisy = replace(
        CLEAN,
        debug=True,
        containers=(
            replace(
                CLEAN_CONTAINER,
                image="nginx",
                privileged=True,
                user=User(uid=0, gid=0),
                allow=HostAccess(exec=(("bash",),), exec_patterns=(".*",), stdin=True, copy_files=(".*",)),
            ),
        ),
    )
    findings = lint(noisy)
    assert len(findings) >= 7
    for finding in findings:
        assert isinstance(finding, Finding)
        assert finding.severity in ("warning", "error")
        assert len(finding.hint) > 10
        assert str(finding).startswith(f"{finding.severity}: {finding.where}: ")


def test_findings_follow_document_order() -> None:
    second = replace(CLEAN_CONTAINER, name="side", image="side:1")
    findings = lint(replace(CLEAN, debug=True, containers=(replace(CLEAN_CONTAINER, image="web:1"), second)))
    assert [f.where for f in findings] == ["debug", "containers[0].image", "containers[1].image"]


@pytest.mark.parametrize("name", sorted(DANGEROUS_ENV))
def test_every_dangerous_variable_is_reported(name: str) -> None:
    findings = lint(_env(EnvRule(name=name, value="x")))
    assert [f.severity for f in findings] == ["error"]


def test_narrow_env_pattern_is_not_reported() -> None:
    assert lint(_env(EnvRule(name="PORT", pattern="[0-9]{1,5}"))) == []
