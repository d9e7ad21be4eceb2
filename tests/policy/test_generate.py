"""Policies generated from realistic Kubernetes manifests, with images served by a real registry.

The images (small OCI images whose configs carry Entrypoint, Cmd, Env, User and WorkingDir like the
real ones) are pushed to a throw-away docker-registry under the names the manifests use, and read
through a MirrorResolver that maps docker.io and ghcr.io to it. Each generated policy must admit
exactly the requests the annotated pods make, through the real Rego engine, and deny variants.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer._internal.net import free_port
from coffer.errors import CofferError, FormatError, TransportError, UsageError
from coffer.image import media
from coffer.image.layout import OciLayout
from coffer.image.locations import open_destination
from coffer.image.models import ImageConfig, Manifest
from coffer.image.pipeline import copy_image
from coffer.image.reference import parse_reference
from coffer.image.transport import OciLayoutSource, TransportOptions
from coffer.policy import engine, initdata
from coffer.policy.engine import Decision, PolicyEngine
from coffer.policy.generate import (
    GeneratedWorkload,
    GenerationResult,
    MirrorResolver,
    OciLayoutResolver,
    generate,
    parse_mirrors,
)
from coffer.policy.model import User
from coffer.policy.requests import (
    ContainerSpec,
    container_request,
    exec_request,
    read_stream_request,
    sandbox_request,
    write_stream_request,
)
from tests.image.imagebuild import layer_tar
from tests.support.registry import RegistryServer, running_registry

MANIFESTS = Path(__file__).parent / "manifests"
INSECURE = TransportOptions(insecure=True, timeout=10.0)
HEX64 = re.compile(r"sha256:[0-9a-f]{64}")

#: name as pushed (repository:tag in the mirror) -> image config "config" section.
IMAGES: dict[str, dict[str, Any]] = {
    "library/nginx:1.25": {
        "Entrypoint": ["/docker-entrypoint.sh"],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NGINX_VERSION=1.25.5"],
        "StopSignal": "SIGQUIT",
    },
    "library/redis:7.2": {
        "Entrypoint": ["docker-entrypoint.sh"],
        "Cmd": ["redis-server"],
        "WorkingDir": "/data",
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "REDIS_VERSION=7.2.5"],
    },
    "library/busybox:1.36": {
        "Cmd": ["sh"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    },
    "example/shop:2.0": {
        "Entrypoint": ["/app/server"],
        "Cmd": ["--port", "80"],
        "User": "1000:1000",
        "WorkingDir": "/app",
        "Env": ["PATH=/usr/bin:/bin", "SHOP_MODE=production"],
    },
}


def image_config(run: dict[str, Any], layer: bytes) -> bytes:
    import hashlib

    obj = {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    return json.dumps(obj, separators=(",", ":")).encode()


def build_layout(root: Path, names: dict[str, dict[str, Any]]) -> OciLayout:
    """One layout holding an image per name, each tagged with its name."""
    layout = OciLayout.create(root)
    for name, run in names.items():
        layer = layer_tar(name.replace("/", "-").replace(":", "-"))
        config = layout.write_bytes(image_config(run, layer), media.OCI_CONFIG)
        layer_desc = layout.write_bytes(layer, media.OCI_LAYER_TAR)
        manifest = layout.write_manifest(
            Manifest(media_type=media.OCI_MANIFEST, config=config, layers=(layer_desc,))
        )
        layout.set_ref(manifest, name)
    return layout


@dataclass(frozen=True)
class Images:
    registry: RegistryServer
    digests: dict[str, str]
    configs: dict[str, ImageConfig]

    @property
    def resolver(self) -> MirrorResolver:
        return MirrorResolver(
            parse_mirrors([f"docker.io={self.registry.host}", f"ghcr.io={self.registry.host}"]), INSECURE
        )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    root = tmp_path_factory.mktemp("images")
    layout = build_layout(root / "layout", IMAGES)
    digests: dict[str, str] = {}
    configs: dict[str, ImageConfig] = {}
    with running_registry(root / "registry") as registry:
        for name in IMAGES:
            descriptor = layout.resolve(name)
            configs[name] = layout.read_config(layout.read_manifest(descriptor).config)
            with OciLayoutSource(parse_reference(f"oci:{layout.root}:{name}")) as source:  # type: ignore[arg-type]
                destination = open_destination(f"docker://{registry.host}/{name}", INSECURE)
                with destination:
                    result = copy_image(source, destination)
                    destination.commit()
            digests[name] = result.root.digest
        yield Images(registry=registry, digests=digests, configs=configs)


# --------------------------------------------------------------------------------------------------
# The pods the annotated manifests make


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    kind = obj["kind"]
    if kind == "Pod":
        return obj
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def workload_objects(result: GenerationResult) -> dict[str, dict[str, Any]]:
    """Output documents by workload name (List items included)."""
    found: dict[str, dict[str, Any]] = {}

    def visit(obj: dict[str, Any]) -> None:
        if obj.get("kind") == "List":
            for item in obj["items"]:
                visit(item)
        elif obj.get("kind") in (
            "Pod",
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
        ):
            found[obj["metadata"]["name"]] = obj

    for doc in yaml.safe_load_all(result.manifest):
        if doc:
            visit(doc)
    return found


def tables(path: Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    import base64

    config_maps: dict[str, dict[str, str]] = {}
    secrets: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(path.read_bytes()):
        if doc and doc["kind"] == "ConfigMap":
            config_maps[doc["metadata"]["name"]] = doc.get("data", {})
        elif doc and doc["kind"] == "Secret":
            secrets[doc["metadata"]["name"]] = {
                **{k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()},
                **doc.get("stringData", {}),
            }
    return config_maps, secrets


@dataclass
class RunningPod:
    """One pod of a workload as the runtime starts it, from the annotated manifest."""

    workload: GeneratedWorkload
    obj: dict[str, Any]
    specs: dict[str, ContainerSpec]
    name: str
    engine: PolicyEngine

    def create_sandbox(self) -> None:
        decision = self.engine.decide(
            "CreateSandboxRequest",
            sandbox_request(name=self.workload.name, namespace=self.workload.namespace),
        )
        assert decision.allowed, decision.explanation()

    def request(self, container: str, **changes: Any) -> dict[str, Any]:
        spec = self.specs[container]
        return container_request(container_id=f"id-{container}", name=container, image=spec.image, spec=spec)

    def create(self, container: str, request: dict[str, Any] | None = None) -> Decision:
        return self.engine.decide("CreateContainerRequest", request or self.request(container))


def running_pod(
    result: GenerationResult, name: str, images: Images, fixture: Path, pod_ip: str = "10.244.1.17"
) -> RunningPod:
    workload = result.workload(name)
    obj = workload_objects(result)[name]
    template = pod_template(obj)
    spec = template["spec"]
    pod_name = name if obj["kind"] == "Pod" else f"{name}-7d9f8b6c5d-x2x4q"
    config_maps, secrets = tables(fixture)
    labels = (template.get("metadata") or {}).get("labels") or {}
    fields = {
        "metadata.name": pod_name,
        "status.podIP": pod_ip,
        **{f"metadata.labels['{k}']": v for k, v in labels.items()},
    }
    if workload.namespace:
        fields["metadata.namespace"] = workload.namespace
    pod_spec = dict(spec)
    if obj["kind"] == "StatefulSet":
        pod_spec["volumes"] = [
            *spec.get("volumes", []),
            *(
                {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": t["metadata"]["name"]}}
                for t in obj["spec"]["volumeClaimTemplates"]
            ),
        ]
    specs = {}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        repo = container["image"].split("/", 1)[1].split("@")[0]
        config = images.configs[repo]
        specs[container["name"]] = ContainerSpec.from_kubernetes(
            container,
            image=config,
            pod_spec=pod_spec,
            config_maps=config_maps,
            secrets=secrets,
            fields=fields,
            hostname=spec.get("hostname") or pod_name,
            reveal_secrets=True,
        )
    return RunningPod(
        workload=workload, obj=obj, specs=specs, name=pod_name, engine=PolicyEngine(workload.policy_rego)
    )


def generated(name: str, images: Images, **options: Any) -> GenerationResult:
    return generate((MANIFESTS / name).read_bytes(), image_resolver=images.resolver, source=name, **options)


# --------------------------------------------------------------------------------------------------
# NGINX Deployment


def test_nginx_deployment_policy_admits_the_pods_requests(images: Images) -> None:
    result = generated("nginx-deployment.yaml", images)
    assert result.warnings == ()
    assert [(w.kind, w.name, w.namespace) for w in result.workloads] == [("Deployment", "nginx", "web")]
    pod = running_pod(result, "nginx", images, MANIFESTS / "nginx-deployment.yaml")
    nginx = pod.specs["nginx"]
    # What the runtime will start, pinned from the image config and the pod spec.
    assert nginx.args == ("/docker-entrypoint.sh", "nginx", "-g", "daemon off;")
    assert nginx.capabilities == ("CHOWN", "SETGID", "SETUID", "NET_BIND_SERVICE")
    assert nginx.no_new_privileges
    assert nginx.read_only_root
    policy = pod.workload.policy.containers[0]
    assert policy.image == f"docker.io/library/nginx@{images.digests['library/nginx:1.25']}"
    assert policy.allow.exec == (("nginx", "-t", "-q"), ("/usr/sbin/nginx", "-s", "quit"))
    assert policy.allow.logs
    assert not policy.allow.stdin
    assert {m.destination: m.source for m in policy.mounts} == {
        "/etc/nginx/conf.d": "configmap:nginx-conf",
        "/var/cache/nginx": "emptydir:cache",
        "/var/run": "emptydir:run",
    }

    pod.create_sandbox()
    decision = pod.create("nginx")
    assert decision.allowed, decision.explanation()
    probe = exec_request(container_id="id-nginx", args=["nginx", "-t", "-q"], spec=nginx)
    assert pod.engine.decide("ExecProcessRequest", probe).allowed
    hook = exec_request(container_id="id-nginx", args=["/usr/sbin/nginx", "-s", "quit"], spec=nginx)
    assert pod.engine.decide("ExecProcessRequest", hook).allowed
    assert pod.engine.decide("ReadStreamRequest", read_stream_request(container_id="id-nginx")).allowed
    stdin = pod.engine.decide("WriteStreamRequest", write_stream_request(container_id="id-nginx"))
    assert not stdin.allowed


def test_nginx_variants_are_denied(images: Images) -> None:
    result = generated("nginx-deployment.yaml", images)
    pod = running_pod(result, "nginx", images, MANIFESTS / "nginx-deployment.yaml")
    pod.create_sandbox()

    def denied(mutate: Any, expect: str) -> None:
        request = pod.request("nginx")
        mutate(request)
        decision = pod.engine.decide("CreateContainerRequest", request)
        assert not decision.allowed, expect
        assert expect in decision.explanation(), decision.explanation()

    denied(lambda r: r["OCI"]["Process"]["Args"].append("-T"), "rgs")
    denied(lambda r: r["OCI"]["Process"]["Env"].append("LD_PRELOAD=/tmp/evil.so"), "LD_PRELOAD")
    denied(lambda r: r["OCI"]["Process"]["Env"].append("POD_IP=not-an-ip"), "POD_IP")
    denied(lambda r: r.update(image="docker.io/library/nginx@sha256:" + "0" * 64), "image")
    denied(lambda r: r.update(image="docker.io/library/nginx:1.25"), "image")
    denied(lambda r: r["OCI"]["Root"].update(Readonly=False), "ead")
    denied(lambda r: r["OCI"]["Process"]["Capabilities"]["Bounding"].append("CAP_SYS_ADMIN"), "SYS_ADMIN")
    denied(
        lambda r: r["OCI"]["Mounts"].append(
            {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rprivate", "rw"]}
        ),
        "/host",
    )

    assert pod.create("nginx").allowed
    nginx = pod.specs["nginx"]
    shell = pod.engine.decide(
        "ExecProcessRequest", exec_request(container_id="id-nginx", args=["sh"], spec=nginx)
    )
    assert not shell.allowed
    assert "sh" in shell.explanation()


def test_nginx_output_manifest_carries_runtime_class_pinned_image_and_initdata(images: Images) -> None:
    result = generated("nginx-deployment.yaml", images, runtime_class="kata-coffer")
    docs = list(yaml.safe_load_all(result.manifest))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Deployment"]
    template = docs[2]["spec"]["template"]
    assert template["spec"]["runtimeClassName"] == "kata-coffer"
    digest = images.digests["library/nginx:1.25"]
    assert template["spec"]["containers"][0]["image"] == f"docker.io/library/nginx:1.25@{digest}"
    assert template["metadata"]["labels"] == {"app": "nginx", "tier": "frontend"}
    value = template["metadata"]["annotations"][initdata.ANNOTATION]
    workload = result.workload("nginx")
    assert value == workload.annotation
    document = initdata.parse_initdata_document(initdata.decode_annotation(value))
    assert document.policy == engine.compile_policy(workload.policy) == workload.policy_rego
    assert document.raw == workload.initdata
    # Everything else is as the input had it.
    assert docs[0] == yaml.safe_load_all((MANIFESTS / "nginx-deployment.yaml").read_bytes()).__next__()


def test_logs_can_be_refused(images: Images) -> None:
    result = generated("nginx-deployment.yaml", images, allow_logs=False)
    pod = running_pod(result, "nginx", images, MANIFESTS / "nginx-deployment.yaml")
    pod.create_sandbox()
    assert pod.create("nginx").allowed
    logs = pod.engine.decide("ReadStreamRequest", read_stream_request(container_id="id-nginx"))
    assert not logs.allowed


# --------------------------------------------------------------------------------------------------
# Redis StatefulSet, Job/CronJob, multi-container Pod


def test_redis_statefulset_env_from_configmap_and_secret(images: Images) -> None:
    result = generated("redis-statefulset.yaml", images)
    pod = running_pod(result, "redis", images, MANIFESTS / "redis-statefulset.yaml")
    redis = pod.workload.policy.containers[0]
    assert redis.args == (
        "docker-entrypoint.sh",
        "redis-server",
        "--maxmemory",
        "256mb",
        "--maxmemory-policy",
        "allkeys-lru",
        "--requirepass",
        "$(not expanded)",
    )
    env = {e.name: (e.value, e.pattern) for e in redis.env}
    assert env["MAXMEMORY"] == ("256mb", None)
    assert env["REDIS_MAXMEMORY_POLICY"] == ("allkeys-lru", None)
    assert env["REDIS_VERSION"] == ("7.2.5", None)
    assert "not a valid name" not in env
    assert env["REDIS_PASSWORD"][0] is None  # the secret's value is not in the policy...
    assert "correct-horse" not in pod.workload.policy_rego  # ...nor in the annotation carrying it
    assert b"correct-horse" not in initdata.decode_annotation(pod.workload.annotation)
    assert redis.user == User(uid=999, gid=999, additional_gids=())
    assert redis.working_dir == "/data"
    assert [(m.destination, m.source) for m in redis.mounts] == [("/data", "pvc:data")]

    pod.create_sandbox()
    decision = pod.create("redis")
    assert decision.allowed, decision.explanation()
    ping = exec_request(container_id="id-redis", args=["redis-cli", "ping"], spec=pod.specs["redis"])
    assert pod.engine.decide("ExecProcessRequest", ping).allowed
    flush = exec_request(container_id="id-redis", args=["redis-cli", "flushall"], spec=pod.specs["redis"])
    assert not pod.engine.decide("ExecProcessRequest", flush).allowed


def test_redis_changed_configmap_value_is_denied(images: Images) -> None:
    result = generated("redis-statefulset.yaml", images)
    pod = running_pod(result, "redis", images, MANIFESTS / "redis-statefulset.yaml")
    pod.create_sandbox()
    request = pod.request("redis")
    env = request["OCI"]["Process"]["Env"]
    env[env.index("MAXMEMORY=256mb")] = "MAXMEMORY=64gb"
    decision = pod.create("redis", request)
    assert not decision.allowed
    assert "MAXMEMORY" in decision.explanation()


def test_job_and_cronjob_in_a_list(images: Images) -> None:
    result = generated("job.yaml", images)
    assert [(w.kind, w.name) for w in result.workloads] == [
        ("Job", "db-migrate"),
        ("CronJob", "nightly-report"),
    ]
    docs = list(yaml.safe_load_all(result.manifest))
    assert docs[0]["spec"]["template"]["spec"]["runtimeClassName"] == "coffer"
    cron = docs[1]["items"][0]["spec"]["jobTemplate"]["spec"]["template"]
    assert cron["spec"]["runtimeClassName"] == "coffer"
    assert initdata.ANNOTATION in cron["metadata"]["annotations"]
    report = result.workload("nightly-report").policy.containers[0]
    assert report.args == ("echo", "report for yesterday")
    for name in ("db-migrate", "nightly-report"):
        pod = running_pod(result, name, images, MANIFESTS / "job.yaml")
        pod.create_sandbox()
        for container in pod.specs:
            decision = pod.create(container)
            assert decision.allowed, decision.explanation()
            assert not pod.engine.decide(
                "ExecProcessRequest",
                exec_request(container_id=f"id-{container}", args=["sh"], spec=pod.specs[container]),
            ).allowed


def test_multi_container_pod(images: Images) -> None:
    result = generated("multi-container-pod.yaml", images)
    pod = running_pod(result, "shop", images, MANIFESTS / "multi-container-pod.yaml")
    policy = {c.name: c for c in pod.workload.policy.containers}
    assert list(policy) == ["prepare", "app", "log-shipper"]
    assert policy["app"].image == f"ghcr.io/example/shop@{images.digests['example/shop:2.0']}"
    assert policy["app"].args == ("/app/server", "--port", "8080", "--log", "/var/log/app/app.log")
    assert policy["app"].user == User(uid=1000, gid=1000)
    assert policy["app"].working_dir == "/app"
    assert policy["app"].allow.exec == ()
    assert policy["log-shipper"].allow.stdin
    assert not policy["app"].allow.stdin
    assert [(m.source, m.options) for m in policy["log-shipper"].mounts] == [
        ("emptydir:logs", ("rbind", "rprivate", "ro")),
        ("/var/log", ("rbind", "rprivate", "ro")),
    ]

    pod.create_sandbox()
    for name in ("prepare", "app", "log-shipper"):
        decision = pod.create(name)
        assert decision.allowed, decision.explanation()
    probe = ["sh", "-c", "test -f /var/log/app/app.log"]
    shipper, app = pod.specs["log-shipper"], pod.specs["app"]
    assert pod.engine.decide(
        "ExecProcessRequest", exec_request(container_id="id-log-shipper", args=probe, spec=shipper)
    ).allowed
    # The sidecar's probe is not the app's.
    assert not pod.engine.decide(
        "ExecProcessRequest", exec_request(container_id="id-app", args=probe, spec=app)
    ).allowed
    assert pod.engine.decide(
        "WriteStreamRequest", write_stream_request(container_id="id-log-shipper")
    ).allowed
    assert not pod.engine.decide("WriteStreamRequest", write_stream_request(container_id="id-app")).allowed


def test_multi_container_pod_variants_are_denied(images: Images) -> None:
    result = generated("multi-container-pod.yaml", images)
    pod = running_pod(result, "shop", images, MANIFESTS / "multi-container-pod.yaml")
    pod.create_sandbox()
    # The app's image with the sidecar's name, a wrong user, a writable host path.
    request = pod.request("app")
    request["name"] = "log-shipper"
    assert not pod.create("log-shipper", request).allowed
    request = pod.request("app")
    request["OCI"]["Process"]["User"]["UID"] = 0
    assert "1000" in pod.create("app", request).explanation()
    request = pod.request("log-shipper")
    for mount in request["OCI"]["Mounts"]:
        if mount["destination"] == "/host/var/log":
            mount["options"] = ["rbind", "rprivate", "rw"]
    assert not pod.create("log-shipper", request).allowed
    request = pod.request("app")
    request["name"] = "debugger"
    decision = pod.create("debugger", request)
    assert not decision.allowed
    assert "debugger" in decision.explanation()


# --------------------------------------------------------------------------------------------------
# Pulling or not


def test_no_pull_with_digest_references(images: Images) -> None:
    digest = images.digests["library/busybox:1.36"]
    manifest = f"""
apiVersion: v1
kind: Pod
metadata: {{name: tool}}
spec:
  containers:
    - name: tool
      image: busybox@{digest}
      command: ["sleep", "3600"]
      securityContext: {{runAsUser: 1000}}
""".encode()
    result = generate(manifest, pull=False)
    container = result.workload("tool").policy.containers[0]
    assert container.image == f"docker.io/library/busybox@{digest}"
    assert container.args == ("sleep", "3600")
    assert container.user == User(uid=1000, gid=0)
    assert not any("not pinned" in w for w in result.warnings)
    assert any("image config was not read" in w for w in result.warnings)
    out = yaml.safe_load(result.manifest)
    assert out["spec"]["containers"][0]["image"] == f"docker.io/library/busybox@{digest}"


def test_no_pull_warns_about_tags_and_keeps_them() -> None:
    manifest = (MANIFESTS / "job.yaml").read_bytes().split(b"\n---\n")[0]
    result = generate(manifest, pull=False)
    pinned = [w for w in result.warnings if "not pinned by digest" in w]
    assert len(pinned) == 1
    assert "busybox:1.36" in pinned[0]
    assert result.workload("db-migrate").policy.containers[0].image == "busybox:1.36"
    assert (
        yaml.safe_load_all(result.manifest).__next__()["spec"]["template"]["spec"]["containers"][0]["image"]
        == "busybox:1.36"
    )


def test_no_pull_needs_the_command() -> None:
    with pytest.raises(FormatError, match=r"containers\[0\]\.command: is required when the image config"):
        generate((MANIFESTS / "nginx-deployment.yaml").read_bytes(), pull=False)


def test_unreachable_registry_names_the_image() -> None:
    resolver = MirrorResolver(
        {"docker.io": f"127.0.0.1:{free_port()}"}, TransportOptions(insecure=True, timeout=2.0)
    )
    with pytest.raises(TransportError, match=r"image 'busybox:1\.36'"):
        generate((MANIFESTS / "job.yaml").read_bytes(), image_resolver=resolver)


def test_image_missing_from_the_registry(images: Images) -> None:
    manifest = (MANIFESTS / "job.yaml").read_bytes().replace(b"busybox:1.36", b"busybox:9.9")
    with pytest.raises(CofferError, match="busybox"):
        generate(manifest, image_resolver=images.resolver)


def test_oci_layout_resolver(tmp_path: Path, images: Images) -> None:
    build_layout(tmp_path / "layout", {"docker.io/library/busybox:1.36": IMAGES["library/busybox:1.36"]})
    resolver = OciLayoutResolver(tmp_path / "layout")
    pinned, config = resolver.resolve("busybox:1.36")
    assert HEX64.search(pinned)
    assert pinned.startswith("docker.io/library/busybox@")
    assert config.cmd == ("sh",)
    result = generate((MANIFESTS / "job.yaml").read_bytes(), image_resolver=resolver)
    assert result.workload("db-migrate").policy.containers[0].image == pinned
    with pytest.raises(UsageError, match="not in the layout"):
        resolver.resolve("nginx:1.25")


def test_mirror_parsing() -> None:
    assert parse_mirrors(["docker.io=127.0.0.1:5000/hub"]) == {"docker.io": "127.0.0.1:5000/hub"}
    with pytest.raises(UsageError):
        parse_mirrors(["docker.io"])


# --------------------------------------------------------------------------------------------------
# Malformed manifests


POD = """apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  containers:
    - name: c
      image: busybox@sha256:{hex}
      command: ["true"]
"""
DIGEST_HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            POD.replace("      image: busybox@sha256:{hex}\n", ""),
            r"document 1 \(Pod 'p'\).*manifests:7: spec\.containers\[0\]\.image: is required",
            id="missing-image",
        ),
        pytest.param(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n"
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
            r"document 2 \(Widget 'w'\).*manifests:6: kind: kind 'Widget' is not supported",
            id="unknown-kind",
        ),
        pytest.param(
            POD + '      command: ["false"]\n',
            r"manifests:10:7: spec\.containers\[0\]\.command: "
            "duplicate key 'command'",
            id="duplicate-key",
        ),
        pytest.param("a: &x [1, 2]\nb: *x\n", "aliases are not accepted", id="alias"),
        pytest.param(
            POD + "      env:\n        - name: N\n          value: 5\n",
            r"manifests:12: spec\.containers\[0\]\.env\[0\]\.value: must be a string",
            id="env-number",
        ),
        pytest.param(
            POD + "      volumeMounts:\n        - {name: data, mountPath: /data}\n",
            r"spec\.containers\[0\]\.volumeMounts\[0\]\.name: no volume named 'data'",
            id="no-volume",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p\nspec: {}\n",
            r"manifests:\d+:\d+: ",
            id="yaml-syntax",
        ),
        pytest.param("- just\n- a list\n", "document 1.*not a mapping", id="not-a-mapping"),
        pytest.param(
            POD + "      securityContext:\n        capabilities: {add: [SYS_WIZARD]}\n",
            r"securityContext\.capabilities\.add\[0\]: unknown capability 'SYS_WIZARD'",
            id="unknown-capability",
        ),
        pytest.param(
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Gadget\n"
            "    metadata: {name: g}\n",
            r"manifests:5: items\[0\]\.kind: kind 'Gadget'",
            id="list-item",
        ),
        pytest.param(
            POD.replace("  containers:", "  initContainers: []\n  containers: {}\n  x:"),
            r"spec\.containers: must be a list",
            id="containers-not-a-list",
        ),
        pytest.param(
            POD.replace("name: p", "name: Bad_Name"),
            r"metadata\.name: 'Bad_Name' is not a valid",
            id="bad-name",
        ),
        pytest.param(
            POD.replace("busybox@sha256:{hex}", "Busybox!!"),
            r"spec\.containers\[0\]\.image: .*Busybox",
            id="bad-image",
        ),
        pytest.param(
            POD.replace("kind: Pod", "kind: Deployment"),
            r"spec\.template: is required",
            id="deployment-without-template",
        ),
        pytest.param(
            POD + "      env:\n        - name: S\n          valueFrom:\n            secretKeyRef: "
            "{name: s, key: k}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: '***'}\n",
            r"document 2 \(Secret 's'\).*data\.k: is not base64",
            id="secret-not-base64",
        ),
        pytest.param(
            POD + "      env:\n        - name: C\n          valueFrom:\n            configMapKeyRef: "
            "{name: cm, key: nope}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n"
            "data: {k: v}\n",
            r"configMapKeyRef\.key: ConfigMap 'cm' has no key 'nope'",
            id="configmap-key-missing",
        ),
        pytest.param(
            POD.replace('["true"]', '["echo", 7]'), r"command\[1\]: must be a string", id="command-number"
        ),
    ],
)
def test_malformed_manifest_is_refused_with_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(FormatError, match=expected):
        generate(text.replace("{hex}", DIGEST_HEX).encode(), pull=False)


def test_secret_value_is_not_in_the_error() -> None:
    text = POD + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: 'hunter2-not-b64!'}\n"
    with pytest.raises(FormatError) as caught:
        generate(text.replace("{hex}", DIGEST_HEX).encode(), pull=False)
    assert "hunter2" not in str(caught.value)


def test_image_user_name_needs_run_as_user(tmp_path: Path) -> None:
    build_layout(tmp_path / "layout", {"docker.io/library/app:1": {"Cmd": ["/app"], "User": "appuser"}})
    text = POD.replace("busybox@sha256:{hex}", "app:1").replace('      command: ["true"]\n', "")
    with pytest.raises(UsageError, match="runAsUser"):
        generate(text.encode(), image_resolver=OciLayoutResolver(tmp_path / "layout"))
    fixed = text + "      securityContext: {runAsUser: 1001, runAsGroup: 1001}\n"
    result = generate(fixed.encode(), image_resolver=OciLayoutResolver(tmp_path / "layout"))
    assert result.workload("p").policy.containers[0].user == User(uid=1001, gid=1001)


def test_oversized_manifest_is_refused() -> None:
    with pytest.raises(FormatError, match="exceeds the limit"):
        generate(b"#" * (8 * 1024 * 1024 + 1), pull=False)


def test_empty_stream_warns() -> None:
    result = generate(b"---\n", pull=False)
    assert result.workloads == ()
    assert any("no workloads" in w for w in result.warnings)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(alphabet=string.printable, max_size=300),
        st.sampled_from([POD.replace("{hex}", DIGEST_HEX)]).flatmap(
            lambda base: st.tuples(
                st.integers(0, len(base)), st.text(alphabet=" :-[]{}\n#&*!|>'\"x0", max_size=8)
            ).map(lambda cut: base[: cut[0]] + cut[1] + base[cut[0] :])
        ),
    )
)
def test_only_coffer_errors_escape(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(CofferError):
        generate(raw, pull=False)
