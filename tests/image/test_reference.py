"""Transport references: oci:, docker-archive:, docker://."""

from __future__ import annotations

from pathlib import Path

import pytest

from coffer.errors import UsageError
from coffer.image.reference import DockerArchiveRef, OciLayoutRef, RegistryRef, parse_reference

DIGEST = "sha256:" + "c" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/tmp/layout", OciLayoutRef(path=Path("/tmp/layout"))),
        ("oci:/tmp/layout:v1.0", OciLayoutRef(path=Path("/tmp/layout"), tag="v1.0")),
        ("oci:rel/dir:", OciLayoutRef(path=Path("rel/dir"))),
        ("docker-archive:/tmp/a.tar", DockerArchiveRef(path=Path("/tmp/a.tar"))),
        ("docker-archive:/tmp/a.tar:@1", DockerArchiveRef(path=Path("/tmp/a.tar"), index=1)),
        (
            "docker-archive:/tmp/a.tar:busybox:latest",
            DockerArchiveRef(
                path=Path("/tmp/a.tar"),
                name=RegistryRef(host="docker.io", repository="library/busybox", tag="latest"),
            ),
        ),
        ("docker://busybox", RegistryRef(host="docker.io", repository="library/busybox", tag="latest")),
        ("docker://user/app:1", RegistryRef(host="docker.io", repository="user/app", tag="1")),
        (
            "docker://127.0.0.1:5000/team/app:v2",
            RegistryRef(host="127.0.0.1:5000", repository="team/app", tag="v2"),
        ),
        ("docker://localhost/app", RegistryRef(host="localhost", repository="app", tag="latest")),
        (
            f"docker://quay.io/org/app@{DIGEST}",
            RegistryRef(host="quay.io", repository="org/app", digest=DIGEST),
        ),
        (
            f"docker://[::1]:5000/app:t@{DIGEST}",
            RegistryRef(host="[::1]:5000", repository="app", tag="t", digest=DIGEST),
        ),
    ],
)
def test_parses_reference(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


def test_registry_reference_properties() -> None:
    ref = parse_reference(f"docker://127.0.0.1:5000/app:t@{DIGEST}")
    assert isinstance(ref, RegistryRef)
    assert ref.reference == DIGEST
    assert ref.name == "127.0.0.1:5000/app"
    assert str(ref) == f"docker://127.0.0.1:5000/app:t@{DIGEST}"
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "busybox",
        "http://host/app",
        "oci:",
        "oci::tag",
        "oci:/p:bad tag",
        "docker-archive:",
        "docker-archive:/a.tar:@x",
        "docker-archive:/a.tar:app",
        f"docker-archive:/a.tar:app@{DIGEST}",
        "docker:busybox",
        "docker://",
        "docker://Upper/Case",
        "docker://host/app:bad:tag",
        "docker://host/app@sha256:short",
        "docker://host/app@md5:" + "0" * 32,
        "docker://host/a//b",
        "docker://host/app:" + "t" * 129,
        "docker://bad_host.example/app",
        "docker://" + "a" * 300,
    ],
)
def test_rejects_bad_reference(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)
