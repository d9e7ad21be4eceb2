"""The resource policy (Rego via regorus): default denies sample and anything not affirming."""

from __future__ import annotations

from typing import Any

import pytest

from coffer.errors import ProtocolError
from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY, DEFAULT_RESOURCE_POLICY, ResourcePolicy
from coffer.kbs.store import MemoryStore

PATH = ("default", "key", "one")


def token(*submods: tuple[str, str]) -> dict[str, Any]:
    return {
        "iss": "coffer",
        "submods": {
            f"cpu{i}": {"ear.status": status,
                        "ear.veraison.annotated-evidence": {tee: {"measurement": "ab"}, "report_data": "00"}}
            for i, (tee, status) in enumerate(submods)
        },
    }


def test_default_allows_affirming_hardware_evidence() -> None:
    policy = ResourcePolicy(MemoryStore())
    assert policy.is_default()
    assert policy.get() == DEFAULT_RESOURCE_POLICY
    assert policy.allows(token(("snp", "affirming")), resource_path=PATH)
    assert policy.allows(token(("tdx", "affirming"), ("tpm", "affirming")), resource_path=PATH)


@pytest.mark.parametrize("status", ["warning", "contraindicated", "none", ""])
def test_default_denies_not_affirming(status: str) -> None:
    assert not ResourcePolicy(MemoryStore()).allows(token(("snp", status)), resource_path=PATH)


def test_default_denies_sample_evidence_even_affirming() -> None:
    assert not ResourcePolicy(MemoryStore()).allows(token(("sample", "affirming")), resource_path=PATH)


def test_default_denies_when_one_submod_is_not_affirming() -> None:
    claims = token(("snp", "affirming"), ("nvidia", "warning"))
    assert not ResourcePolicy(MemoryStore()).allows(claims, resource_path=PATH)


def test_default_denies_token_without_submods() -> None:
    policy = ResourcePolicy(MemoryStore())
    assert not policy.allows({"submods": {}}, resource_path=PATH)
    assert not policy.allows({}, resource_path=PATH)


def test_default_denies_other_plugins() -> None:
    assert not ResourcePolicy(MemoryStore()).allows(token(("snp", "affirming")), resource_path=PATH,
                                                    plugin="sample")


def test_set_policy_is_shared_by_replicas_and_resettable() -> None:
    store = MemoryStore()
    ResourcePolicy(store).set(ALLOW_ALL_RESOURCE_POLICY)
    replica = ResourcePolicy(store)
    assert not replica.is_default()
    assert replica.allows(token(("sample", "warning")), resource_path=PATH)
    assert replica.reset()
    assert not replica.allows(token(("sample", "warning")), resource_path=PATH)


def test_policy_sees_resource_path_and_query() -> None:
    policy = ResourcePolicy(MemoryStore())
    policy.set('package policy\nimport rego.v1\ndefault allow := false\n'
               'allow if {\n data["resource-path"][0] == "team-a"\n data.query.version == "2"\n}\n')
    claims = token(("snp", "affirming"))
    assert policy.allows(claims, resource_path=("team-a", "key", "x"), query={"version": "2"})
    assert not policy.allows(claims, resource_path=("team-a", "key", "x"), query={"version": "1"})
    assert not policy.allows(claims, resource_path=("team-b", "key", "x"), query={"version": "2"})


def test_non_boolean_allow_denies() -> None:
    policy = ResourcePolicy(MemoryStore())
    policy.set('package policy\nallow := "yes"\n')
    assert not policy.allows(token(("snp", "affirming")), resource_path=PATH)
    policy.set("package policy\nallow := 1\n")
    assert not policy.allows(token(("snp", "affirming")), resource_path=PATH)


def test_policy_without_allow_rule_denies() -> None:
    policy = ResourcePolicy(MemoryStore())
    policy.set("package policy\nsomething := true\n")
    assert not policy.allows(token(("snp", "affirming")), resource_path=PATH)


def test_rejects_policy_that_does_not_compile() -> None:
    store = MemoryStore()
    policy = ResourcePolicy(store)
    with pytest.raises(ProtocolError) as info:
        policy.set("package policy\nallow if {")
    assert info.value.kind == "PolicyEngineError"
    assert "Stack backtrace" not in info.value.detail
    assert policy.is_default()


def test_rejects_policy_with_wrong_package() -> None:
    with pytest.raises(ProtocolError, match="package"):
        ResourcePolicy(MemoryStore()).set("package other\nallow := true\n")


def test_stored_policy_that_no_longer_compiles_denies() -> None:
    from coffer.kbs.resource_policy import RESOURCE_POLICY_KEY
    from coffer.kbs.store import NS_POLICIES

    store = MemoryStore()
    store.put(NS_POLICIES, RESOURCE_POLICY_KEY, b"package policy\nallow if {")
    assert not ResourcePolicy(store).allows(token(("snp", "affirming")), resource_path=PATH)
