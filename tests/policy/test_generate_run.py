"""The policy for ``coffer run`` arguments comes from the same generator as for Kubernetes pods."""

from __future__ import annotations

from pathlib import Path

import pytest

from coffer.errors import UsageError
from coffer.policy import initdata
from coffer.policy.engine import PolicyEngine
from coffer.policy.generate import OciLayoutResolver, generate_for_run
from coffer.policy.requests import container_request, exec_request
from tests.image.imagebuild import make_image

IMAGE = "docker.io/library/app:1"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    make_image(tmp_path / "images", tag=IMAGE)
    return tmp_path / "images"


def test_run_arguments_become_a_pinned_policy_that_admits_exactly_that_run(layout: Path) -> None:
    workload = generate_for_run(
        name="app", image=IMAGE, command=["echo", "hi"], env={"MODE": "test"},
        image_resolver=OciLayoutResolver(layout), allow_exec=(("cat", "/etc/hostname"),),
    )  # fmt: skip
    container = workload.policy.containers[0]
    assert "@sha256:" in container.image
    assert container.args == ("echo", "hi")  # CMD replaces the image's Cmd
    assert {e.name for e in container.env} >= {"PATH", "MODE"}
    assert container.allow.exec == (("cat", "/etc/hostname"),)
    assert initdata.parse_initdata_document(workload.initdata).policy == workload.policy_rego
    assert initdata.decode_annotation(workload.annotation) == workload.initdata

    engine = PolicyEngine(workload.policy_rego)
    spec = workload.specs[0]
    request = container_request(container_id="c1", name="app", image=container.image, spec=spec)
    assert engine.decide("CreateContainerRequest", request).allowed
    assert engine.decide(
        "ExecProcessRequest", exec_request(container_id="c1", args=["cat", "/etc/hostname"], spec=spec)
    ).allowed
    denied = engine.decide("ExecProcessRequest", exec_request(container_id="c1", args=["sh"], spec=spec))
    assert not denied.allowed
    request["OCI"]["Process"]["Args"] = ["sh"]
    assert not engine.decide("CreateContainerRequest", {**request, "container_id": "c2"}).allowed


def test_no_exec_by_default(layout: Path) -> None:
    workload = generate_for_run(name="app", image=IMAGE, image_resolver=OciLayoutResolver(layout))
    assert workload.policy.containers[0].allow.exec == ()
    assert workload.policy.containers[0].allow.logs is True


def test_unknown_image_is_a_clear_error(layout: Path) -> None:
    with pytest.raises(UsageError, match="not in the layout"):
        generate_for_run(
            name="app", image="docker.io/library/other:1", image_resolver=OciLayoutResolver(layout)
        )
