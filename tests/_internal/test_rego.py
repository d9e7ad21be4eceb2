"""Engines are bound to their thread: compiling, evaluating and dropping policies from many threads
must neither panic nor drop an engine on the wrong thread (pytest turns that into an error)."""

from __future__ import annotations

import gc
import threading

import pytest

from coffer._internal import rego
from coffer.attestation.policy import CompiledPolicy
from coffer.errors import FormatError
from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY, validate_policy

POLICY = 'package policy\n\ntrust_claims := {"hardware": 2} if input.ok\n'


def test_policies_used_and_dropped_from_many_threads() -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            policy = CompiledPolicy(POLICY + f"# {index % 3}\n")
            claims, _ = policy.evaluate({"ok": True}, {})
            assert claims == {"hardware": 2}
            validate_policy(ALLOW_ALL_RESOURCE_POLICY)
            del policy
            gc.collect()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    assert errors == []


def test_errors_on_the_rego_thread_reach_the_caller_without_its_frames() -> None:
    with pytest.raises(FormatError) as info:
        CompiledPolicy("package policy\ntrust_claims := {")
    assert info.value.__traceback__ is not None  # re-raised here, with this thread's frames only


def test_run_on_the_rego_thread_itself_is_direct() -> None:
    assert rego.run(lambda: rego.run(lambda: 41) + 1) == 42
