"""Workload policies generated from Kubernetes manifests, and the manifests annotated to carry them.

:func:`generate` reads a YAML stream (``kubectl apply -f`` style: several documents, ``List`` objects
nested), and for every workload -- Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob --
writes one :class:`~coffer.policy.model.WorkloadPolicy`: each container (init containers first) with
its image pinned by digest, the exact argv, environment, working directory, user, capabilities and
mounts the runtime will use (:class:`coffer.policy.requests.ContainerSpec` resolves them from the pod,
the image config and the ConfigMaps/Secrets in the same stream), exec allowed only for the commands
the kubelet itself runs (exec probes, lifecycle hooks), logs allowed unless ``allow_logs=False``,
stdin only for ``stdin: true`` containers.

The manifests come back with ``spec.runtimeClassName`` set on every pod spec, each image replaced by
its pinned reference (so what the runtime asks for is what the policy names), and the initdata
annotation ``io.katacontainers.config.hypervisor.cc_init_data`` carrying the compiled policy. Other
kinds that belong with a workload (Service, ConfigMap, Namespace, ...) pass through unchanged;
anything else is refused, because a policy silently missing a workload is worse than an error.

Images are read through an :class:`ImageResolver`: :class:`RegistryResolver` (the registries the
references name), :class:`MirrorResolver` (the same names, content from a mirror, e.g. a local
registry standing in for Docker Hub) or :class:`OciLayoutResolver` (an OCI layout whose index entries
are named by full references). With ``pull=False`` nothing is read: references must already carry a
digest (a warning lists those that do not) and the container must give its ``command``.

Errors in the manifests are :class:`~coffer.errors.FormatError` naming the document (1-based, in
stream order), its kind and name, the line and the field path.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import yaml  # type: ignore[import-untyped]  # types-PyYAML is not installed

from coffer.errors import FormatError, TransportError, UsageError
from coffer.image.locations import open_source
from coffer.image.models import ImageConfig
from coffer.image.pipeline import PlatformChoice, select_manifest
from coffer.image.reference import OciLayoutRef, RegistryRef, parse_registry_name
from coffer.image.transport import OciLayoutSource, TransportOptions
from coffer.policy import engine, initdata
from coffer.policy.model import AttestationRequirement, ContainerPolicy, HostAccess, WorkloadPolicy
from coffer.policy.requests import (
    DNS_LABEL_PATTERN,
    ContainerSpec,
    FieldPath,
    ManifestFieldError,
    field_map,
    field_maps,
    field_req_str,
    field_str,
    path_text,
    policy_mounts,
)

MAX_MANIFEST_BYTES: Final = 8 * 1024 * 1024
MAX_DOCUMENTS: Final = 1000
MAX_DEPTH: Final = 64
MAX_LIST_NESTING: Final = 8

#: Where each workload kind keeps its pod template.
POD_PATHS: Final[Mapping[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
#: Kinds that go with workloads and pass through unchanged.
PASS_THROUGH: Final = frozenset({
    "ConfigMap", "Secret", "Service", "ServiceAccount", "Namespace", "PersistentVolumeClaim",
    "PersistentVolume", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Ingress",
    "NetworkPolicy", "HorizontalPodAutoscaler", "PodDisruptionBudget", "LimitRange", "ResourceQuota",
    "StorageClass", "Endpoints", "EndpointSlice", "PriorityClass", "RuntimeClass",
})  # fmt: skip
RUNTIME_CLASS_FIELD: Final = "runtimeClassName"

_STR_TAG: Final = "tag:yaml.org,2002:str"
_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


# --------------------------------------------------------------------------------------------------
# Image resolvers


class ImageResolver(Protocol):
    """Reads an image named in a manifest: the reference pinned by digest, and its config."""

    def resolve(self, reference: str) -> tuple[str, ImageConfig]:
        """``(HOST/REPO@sha256:..., config)`` for a reference as written in a pod (``nginx:1.25``)."""
        ...


def _pinned(ref: RegistryRef, digest: str) -> str:
    return f"{ref.name}@{digest}"


def _read(source_ref: OciLayoutRef | RegistryRef, options: TransportOptions,
          platform: PlatformChoice | None) -> tuple[str, ImageConfig]:
    with open_source(source_ref, options) as source:
        root = source.root()
        _, manifest = select_manifest(source, platform)
        return root.digest, source.read_config(manifest.config)


def _wrap_transport(reference: str, exc: TransportError) -> TransportError:
    return TransportError(f"image {reference!r} could not be read: {exc}")


@dataclass(frozen=True)
class RegistryResolver:
    """Each image from the registry its reference names (Docker Hub for short names)."""

    options: TransportOptions = field(default_factory=TransportOptions)
    platform: PlatformChoice | None = None

    def resolve(self, reference: str) -> tuple[str, ImageConfig]:
        ref = parse_registry_name(reference)
        try:
            digest, config = _read(ref, self.options, self.platform)
        except TransportError as exc:
            raise _wrap_transport(reference, exc) from exc
        return _pinned(ref, ref.digest or digest), config


def parse_mirrors(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["docker.io=127.0.0.1:5000", ...]`` -> ``{"docker.io": "127.0.0.1:5000"}``."""
    mirrors: dict[str, str] = {}
    for item in items:
        registry, sep, mirror = item.partition("=")
        if not sep or not registry or not mirror:
            raise UsageError(f"mirror {item!r} is not REGISTRY=MIRROR[/PREFIX]")
        mirrors[registry] = mirror
    return mirrors


@dataclass(frozen=True)
class MirrorResolver:
    """Images named as in the manifests, read from mirrors: ``{"docker.io": "127.0.0.1:5000"}`` reads
    ``docker.io/library/nginx:1.25`` from ``127.0.0.1:5000/library/nginx:1.25`` and pins it as
    ``docker.io/library/nginx@sha256:...``. A mirror may add a path prefix (``host:port/dockerhub``).
    Registries without a mirror are read directly."""

    mirrors: Mapping[str, str]
    options: TransportOptions = field(default_factory=TransportOptions)
    platform: PlatformChoice | None = None

    def resolve(self, reference: str) -> tuple[str, ImageConfig]:
        ref = parse_registry_name(reference)
        mirror = self.mirrors.get(ref.host)
        source_ref = ref
        if mirror is not None:
            host, _, prefix = mirror.partition("/")
            repository = f"{prefix.strip('/')}/{ref.repository}" if prefix.strip("/") else ref.repository
            source_ref = parse_registry_name(f"{host}/{repository}" + (f":{ref.tag}" if ref.tag else "")
                                             + (f"@{ref.digest}" if ref.digest else ""))
        try:
            digest, config = _read(source_ref, self.options, self.platform)
        except TransportError as exc:
            where = f" (mirror {source_ref.name})" if mirror is not None else ""
            raise TransportError(f"image {reference!r}{where} could not be read: {exc}") from exc
        return _pinned(ref, ref.digest or digest), config


@dataclass(frozen=True)
class OciLayoutResolver:
    """Images from one OCI layout whose index entries are named (``org.opencontainers.image.ref.name``)
    by full references: ``docker.io/library/nginx:1.25``, or the reference as the manifest writes it."""

    path: Path
    platform: PlatformChoice | None = None

    def resolve(self, reference: str) -> tuple[str, ImageConfig]:
        ref = parse_registry_name(reference)
        candidates = [ref.familiar, reference, f"{ref.name}:{ref.tag}" if ref.tag else ref.name]
        source = OciLayoutSource(OciLayoutRef(path=self.path))
        names = {e.annotations.get("org.opencontainers.image.ref.name") for e in
                 source.layout.read_index().manifests}
        for candidate in candidates:
            if candidate in names:
                digest, config = _read(OciLayoutRef(path=self.path, tag=candidate), TransportOptions(),
                                       self.platform)
                if ref.digest is not None and digest != ref.digest:
                    raise UsageError(f"image {reference!r}: the layout {self.path} holds {digest} under "
                                     f"{candidate!r}, not the digest the manifest names")
                return _pinned(ref, digest), config
        raise UsageError(f"image {reference!r} is not in the layout {self.path} (no index entry named "
                         f"{ref.familiar!r})")


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, kw_only=True)
class GeneratedWorkload:
    """One workload's policy and what carries it."""

    kind: str
    name: str
    namespace: str | None
    #: 1-based position of the document in the stream (a List's items share their List's).
    document: int
    policy: WorkloadPolicy
    #: The containers as the runtime will start them (init containers first), for requests and tests.
    specs: tuple[ContainerSpec, ...]
    policy_rego: str
    initdata: bytes
    annotation: str


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    workloads: tuple[GeneratedWorkload, ...]
    warnings: tuple[str, ...]
    #: The manifests with runtime class, pinned images and the initdata annotation (YAML stream).
    manifest: bytes

    def workload(self, name: str) -> GeneratedWorkload:
        for workload in self.workloads:
            if workload.name == name:
                return workload
        raise UsageError(f"no workload named {name!r} (have: {', '.join(w.name for w in self.workloads)})")


# --------------------------------------------------------------------------------------------------
# YAML with positions


@dataclass
class _Document:
    index: int
    obj: dict[str, Any]
    lines: dict[FieldPath, int]
    #: Where this object sits in its document (a List item: ("items", n)).
    prefix: FieldPath = ()

    def line_of(self, path: FieldPath) -> int | None:
        full = (*self.prefix, *path)
        while True:
            if full in self.lines:
                return self.lines[full]
            if not full:
                return None
            full = full[:-1]

    def label(self) -> str:
        kind = self.obj.get("kind")
        meta = self.obj.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        text = f"document {self.index}"
        if isinstance(kind, str):
            text += f" ({kind}" + (f" {name!r}" if isinstance(name, str) else "") + ")"
        return text

    def error(self, path: FieldPath, reason: str, source: str) -> FormatError:
        line = self.line_of(path)
        where = f"{source}:{line}: " if line is not None else f"{source}: "
        return FormatError(f"Kubernetes manifest {self.label()}",
                           f"{where}{path_text((*self.prefix, *path))}: {reason}")


def _convert(node: Any, path: FieldPath, lines: dict[FieldPath, int], seen: set[int], *, depth: int,
             loader: Any) -> Any:
    if id(node) in seen:
        raise _YamlError(node.start_mark,
                         "YAML anchors with aliases are not accepted (they can expand without bound)")
    seen.add(id(node))
    if depth > MAX_DEPTH:
        raise _YamlError(node.start_mark, f"nested deeper than {MAX_DEPTH} levels")
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _YamlError(key_node.start_mark, "a mapping key must be a plain value")
            key = str(key_node.value)
            if key == "<<" and key_node.tag != _STR_TAG:
                raise _YamlError(key_node.start_mark, "YAML merge keys are not accepted")
            if key in out:
                raise _YamlError(key_node.start_mark, f"{path_text((*path, key))}: duplicate key {key!r}")
            out[key] = _convert(value_node, (*path, key), lines, seen, depth=depth + 1, loader=loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, n), lines, seen, depth=depth + 1, loader=loader)
                for n, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    loader.constructed_objects.clear()  # scalars only: nothing to share, and nothing to keep
    return value


class _YamlError(Exception):
    def __init__(self, mark: Any, reason: str) -> None:
        self.mark = mark
        self.reason = reason


def _load(data: bytes, source: str) -> list[_Document]:
    what = "Kubernetes manifests"
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(what, f"{source}: {len(data)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(what, f"{source}: not UTF-8 text", offset=exc.start) from exc
    documents: list[_Document] = []
    index = 0
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        while loader.check_node():
            index += 1
            if index > MAX_DOCUMENTS:
                raise FormatError(what, f"{source}: more than {MAX_DOCUMENTS} documents")
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[FieldPath, int] = {}
            obj = _convert(node, (), lines, set(), depth=0, loader=loader)
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise FormatError(f"Kubernetes manifest document {index}",
                                  f"{source}:{lines[()]}: the document is not a mapping")
            documents.append(_Document(index=index, obj=obj, lines=lines))
    except _YamlError as exc:
        raise FormatError(f"Kubernetes manifest document {index}",
                          f"{source}:{exc.mark.line + 1}:{exc.mark.column + 1}: {exc.reason}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise FormatError(what, f"{where}: {exc.problem or exc.context or 'invalid YAML'}") from None
    except RecursionError:
        raise FormatError(what, f"{source}: nested too deeply") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise FormatError(what, f"{source}: invalid YAML ({exc.__class__.__name__})") from None
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def _flatten(doc: _Document, source: str, depth: int = 0) -> Iterator[_Document]:
    """A document, or each item of a ``List`` (recursively)."""
    kind = doc.obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in doc.obj):
        if depth >= MAX_LIST_NESTING:
            raise doc.error((), f"Lists nested more than {MAX_LIST_NESTING} deep", source)
        for n, item in enumerate(_items(doc, source)):
            yield from _flatten(_Document(index=doc.index, obj=item, lines=doc.lines,
                                          prefix=(*doc.prefix, "items", n)), source, depth + 1)
        return
    yield doc


def _items(doc: _Document, source: str) -> list[dict[str, Any]]:
    items = doc.obj.get("items")
    if not isinstance(items, list):
        raise doc.error(("items",), "must be a list", source)
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise doc.error(("items", n), "must be a mapping", source)
    return items


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class _Objects:
    """ConfigMaps and Secrets by namespace ("" for none given) and name."""

    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def tables(self, namespace: str | None) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
        ns = namespace or ""
        return ({name: t for (n, name), t in self.config_maps.items() if n == ns},
                {name: t for (n, name), t in self.secrets.items() if n == ns})


def _string_table(doc: _Document, key: str, source: str) -> dict[str, str]:
    table = doc.obj.get(key)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise doc.error((key,), "must be a mapping", source)
    for name, value in table.items():
        if not isinstance(value, str):
            raise doc.error((key, name), "must be a string (quote numbers and booleans)", source)
    return dict(table)


def _collect_objects(doc: _Document, objects: _Objects, source: str) -> None:
    name, namespace = _name(doc, source)
    if doc.obj["kind"] == "ConfigMap":
        table = _string_table(doc, "data", source)
        objects.config_maps[(namespace or "", name)] = table
        return
    table = {}
    for key, value in _string_table(doc, "data", source).items():
        try:
            table[key] = base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError):
            # The value is secret: the message names the key only.
            raise doc.error(("data", key), "is not base64 of UTF-8 text", source) from None
    table.update(_string_table(doc, "stringData", source))
    objects.secrets[(namespace or "", name)] = table


def _name(doc: _Document, source: str) -> tuple[str, str | None]:
    try:
        meta = field_map(doc.obj, "metadata", (), required=True)
        name = field_req_str(meta, "name", ("metadata",))
        namespace = field_str(meta, "namespace", ("metadata",))
    except ManifestFieldError as exc:
        raise doc.error(exc.path, exc.field_reason, source) from None
    if not _NAME_RE.fullmatch(name) or len(name) > 253:
        raise doc.error(("metadata", "name"), f"{name[:80]!r} is not a valid Kubernetes name", source)
    if namespace is not None and (not re.fullmatch(DNS_LABEL_PATTERN, namespace) or len(namespace) > 63):
        raise doc.error(("metadata", "namespace"), f"{namespace[:80]!r} is not a valid namespace", source)
    return name, namespace


def _regex_literal(text: str) -> str:
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$" else ch for ch in text)


@dataclass
class _Settings:
    resolver: ImageResolver
    pull: bool
    allow_logs: bool
    runtime_class: str
    namespace: str | None
    debug: bool
    attestation: AttestationRequirement
    algorithm: str
    aa_toml: str | None
    cdh_toml: str | None
    source: str
    warnings: list[str] = field(default_factory=list)
    resolved: dict[str, tuple[str, ImageConfig | None]] = field(default_factory=dict)
    unpinned: list[str] = field(default_factory=list)


def _image(reference: str, settings: _Settings, doc: _Document, path: FieldPath
           ) -> tuple[str, str, ImageConfig | None]:
    """(policy image, manifest image, config) for a container's image reference."""
    try:
        ref = parse_registry_name(reference)
    except UsageError as exc:
        raise doc.error(path, str(exc), settings.source) from None
    if reference not in settings.resolved:
        if settings.pull:
            settings.resolved[reference] = settings.resolver.resolve(reference)
        elif ref.digest is not None:
            settings.resolved[reference] = (f"{ref.name}@{ref.digest}", None)
        else:
            settings.resolved[reference] = (reference, None)
            settings.unpinned.append(reference)
    pinned, config = settings.resolved[reference]
    if "@" not in pinned:
        return pinned, reference, config
    digest = pinned.rsplit("@", 1)[1]
    shown = f"{ref.name}:{ref.tag}@{digest}" if ref.tag else pinned
    return pinned, shown, config


def _workload(doc: _Document, objects: _Objects, settings: _Settings
              ) -> tuple[GeneratedWorkload, dict[str, Any]]:
    kind = doc.obj["kind"]
    source = settings.source
    name, namespace = _name(doc, source)
    namespace = namespace or settings.namespace
    out = copy.deepcopy(doc.obj)
    template_path = POD_PATHS[kind]
    try:
        template: dict[str, Any] = doc.obj
        out_template: dict[str, Any] = out
        walked: FieldPath = ()
        for key in template_path:
            template = field_map(template, key, walked, required=True)
            out_template = out_template[key]
            walked = (*walked, key)
        pod_meta = field_map(template, "metadata", template_path)
        pod_spec = field_map(template, "spec", template_path, required=True)
        spec_path = (*template_path, "spec")
        if kind == "StatefulSet":
            pod_spec = _with_claim_templates(doc.obj, pod_spec)
        config_maps, secrets = objects.tables(namespace)
        fields: dict[str, str] = {}
        patterns: dict[str, str] = {}
        hostname = field_str(pod_spec, "hostname", spec_path)
        if kind == "Pod":
            fields["metadata.name"] = name
            hostname = hostname or name
        else:
            patterns["metadata.name"] = _regex_literal(name) + "-[a-z0-9]([-a-z0-9]*[a-z0-9])?"
        if namespace is not None:
            fields["metadata.namespace"] = namespace
        fields["spec.serviceAccountName"] = field_str(pod_spec, "serviceAccountName", spec_path) or "default"
        for key, value in field_map(pod_meta, "labels", (*template_path, "metadata")).items():
            if isinstance(value, str):
                fields[f"metadata.labels['{key}']"] = value
        specs: list[ContainerSpec] = []
        containers: list[ContainerPolicy] = []
        out_spec = out_template["spec"]
        entries = [*field_maps(pod_spec, "initContainers", spec_path),
                   *field_maps(pod_spec, "containers", spec_path, required=True)]
        if not field_maps(pod_spec, "containers", spec_path):
            raise ManifestFieldError((*spec_path, "containers"), "must name at least one container")
        if field_maps(pod_spec, "ephemeralContainers", spec_path):
            raise ManifestFieldError((*spec_path, "ephemeralContainers"),
                                     "ephemeral containers cannot be pinned by a policy")
        for container_path, container in entries:
            image_ref = field_req_str(container, "image", container_path)
            policy_image, shown_image, config = _image(image_ref, settings, doc, (*container_path, "image"))
            unknown: list[str] = []
            spec = ContainerSpec.from_kubernetes(
                {**container, "image": shown_image}, image=config, pod_spec=pod_spec,
                config_maps=config_maps, secrets=secrets, fields=fields, field_patterns=patterns,
                hostname=hostname, path=container_path, unknown_config_maps=unknown)
            if any(c.name == spec.name for c in containers):
                raise ManifestFieldError((*container_path, "name"),
                                         f"container name {spec.name!r} is used twice")
            for missing in sorted(set(unknown)):
                settings.warnings.append(
                    f"{doc.label()}: container {spec.name!r} takes variables from ConfigMap {missing!r}, "
                    "which is not in the manifests: their values are not pinned (any value is allowed)")
            if config is None:
                settings.warnings.append(
                    f"{doc.label()}: container {spec.name!r}: the image config was not read (no pull): "
                    "variables, working directory and user the image sets are not in the policy")
            specs.append(spec)
            containers.append(ContainerPolicy(
                name=spec.name, image=policy_image, args=spec.args, env=spec.env,
                working_dir=spec.working_dir, user=spec.user, capabilities=spec.capabilities,
                no_new_privileges=spec.no_new_privileges, privileged=spec.privileged,
                read_only_root=spec.read_only_root, mounts=policy_mounts(spec),
                allow=HostAccess(exec=spec.exec_commands, logs=settings.allow_logs, stdin=spec.stdin)))
            # The output pod asks for exactly the image the policy pins.
            list_key, n = container_path[-2], container_path[-1]
            assert isinstance(list_key, str)
            assert isinstance(n, int)
            out_spec[list_key][n]["image"] = shown_image
    except ManifestFieldError as exc:
        raise doc.error(exc.path, exc.field_reason, source) from None

    policy = WorkloadPolicy(name=name, namespace=namespace, containers=tuple(containers),
                            attestation=settings.attestation, debug=settings.debug)
    policy_rego = engine.compile_policy(policy)
    data = initdata.build_initdata(policy_rego, algorithm=settings.algorithm, aa_toml=settings.aa_toml,
                                   cdh_toml=settings.cdh_toml)
    annotation = initdata.initdata_annotation(data)
    out_spec[RUNTIME_CLASS_FIELD] = settings.runtime_class
    out_meta = out_template.get("metadata")
    if not isinstance(out_meta, dict):
        out_meta = out_template["metadata"] = {}
    annotations = out_meta.get("annotations")
    if annotations is None:
        annotations = out_meta["annotations"] = {}
    if not isinstance(annotations, dict):
        raise doc.error((*template_path, "metadata", "annotations"), "must be a mapping", source)
    annotations[initdata.ANNOTATION] = annotation
    return GeneratedWorkload(kind=kind, name=name, namespace=namespace, document=doc.index, policy=policy,
                             specs=tuple(specs), policy_rego=policy_rego, initdata=data,
                             annotation=annotation), out


def _with_claim_templates(statefulset: Mapping[str, Any], pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The pod spec with a volume for each of the StatefulSet's ``volumeClaimTemplates`` (each pod
    gets a claim of its own, mounted by the template's name)."""
    extra = []
    spec = field_map(statefulset, "spec", ())
    for item_path, claim in field_maps(spec, "volumeClaimTemplates", ("spec",)):
        meta = field_map(claim, "metadata", item_path, required=True)
        claim_name = field_req_str(meta, "name", (*item_path, "metadata"))
        extra.append({"name": claim_name, "persistentVolumeClaim": {"claimName": claim_name}})
    if not extra:
        return pod_spec
    volumes = [volume for _, volume in field_maps(pod_spec, "volumes", ("spec", "template", "spec"))]
    return {**pod_spec, "volumes": [*volumes, *extra]}


def _set_item(obj: dict[str, Any], prefix: FieldPath, value: dict[str, Any]) -> None:
    """Replace the object at ``prefix`` (a List item path) inside ``obj``."""
    target: Any = obj
    for key in prefix[:-1]:
        target = target[key]
    target[prefix[-1]] = value


def generate(
    manifests: bytes,
    *,
    image_resolver: ImageResolver | None = None,
    runtime_class: str = "coffer",
    pull: bool = True,
    allow_logs: bool = True,
    namespace: str | None = None,
    debug: bool = False,
    attestation: AttestationRequirement | None = None,
    initdata_algorithm: str = "sha256",
    aa_toml: str | None = None,
    cdh_toml: str | None = None,
    source: str = "manifests",
) -> GenerationResult:
    """Policies for every workload in ``manifests`` and the manifests annotated to carry them.

    ``image_resolver`` reads images when ``pull`` (default: :class:`RegistryResolver`); with
    ``pull=False`` no image is read. ``namespace`` applies where a workload names none (then the
    policy pins it). ``source`` names the input in error messages.
    """
    if not _NAME_RE.fullmatch(runtime_class) or len(runtime_class) > 253:
        raise UsageError(f"runtime class {runtime_class!r} is not a valid Kubernetes name")
    settings = _Settings(resolver=image_resolver or RegistryResolver(), pull=pull, allow_logs=allow_logs,
                         runtime_class=runtime_class, namespace=namespace, debug=debug,
                         attestation=attestation or AttestationRequirement(), algorithm=initdata_algorithm,
                         aa_toml=aa_toml, cdh_toml=cdh_toml, source=source)
    documents = _load(manifests, source)
    items: list[_Document] = []
    for doc in documents:
        items.extend(_flatten(doc, source))
    objects = _Objects()
    for item in items:
        kind = item.obj.get("kind")
        if not isinstance(kind, str) or not kind:
            raise item.error(("kind",), "is required", source)
        if not isinstance(item.obj.get("apiVersion"), str):
            raise item.error(("apiVersion",), "is required", source)
        if kind in ("ConfigMap", "Secret"):
            _collect_objects(item, objects, source)
        elif kind not in POD_PATHS and kind not in PASS_THROUGH:
            raise item.error(("kind",), f"kind {kind!r} is not supported (workloads: "
                                        f"{', '.join(POD_PATHS)}; other kinds must not hide pods)", source)
    outputs: dict[int, dict[str, Any]] = {doc.index: copy.deepcopy(doc.obj) for doc in documents}
    workloads: list[GeneratedWorkload] = []
    seen: set[tuple[str | None, str, str]] = set()
    for item in items:
        kind = item.obj["kind"]
        if kind not in POD_PATHS:
            continue
        workload, out = _workload(item, objects, settings)
        key = (workload.namespace, kind, workload.name)
        if key in seen:
            raise item.error(("metadata", "name"), f"a second {kind} named {workload.name!r}", source)
        seen.add(key)
        workloads.append(workload)
        if item.prefix:
            _set_item(outputs[item.index], item.prefix, out)
        else:
            outputs[item.index] = out
    if settings.unpinned:
        settings.warnings.append(
            "images not pinned by digest (kept as written; the policy will refuse any other reference "
            "string, but a tag can move): " + ", ".join(dict.fromkeys(settings.unpinned)))
    if not workloads:
        settings.warnings.append(f"{source}: no workloads (Pod, Deployment, ...) found")
    text = yaml.safe_dump_all([outputs[doc.index] for doc in documents], sort_keys=False,
                              default_flow_style=False, allow_unicode=True, width=1 << 20)
    return GenerationResult(workloads=tuple(workloads), warnings=tuple(dict.fromkeys(settings.warnings)),
                            manifest=text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# From `coffer run` arguments


def generate_for_run(
    *,
    name: str,
    image: str,
    command: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    image_resolver: ImageResolver | None = None,
    pull: bool = True,
    allow_logs: bool = True,
    allow_exec: tuple[tuple[str, ...], ...] = (),
    stdin: bool = False,
    debug: bool = False,
    attestation: AttestationRequirement | None = None,
    aa_toml: str | None = None,
    cdh_toml: str | None = None,
) -> GeneratedWorkload:
    """The policy for one container started as ``coffer run [-e K=V]… IMAGE [CMD…]`` would start it.

    The arguments become a one-container Pod (``CMD`` replaces the image's Cmd, as ``docker run``
    does, i.e. the Pod's ``args``) that goes through :func:`generate`, so a run and a Kubernetes
    deployment of the same container get the same policy. ``allow_exec`` adds exact commands the host
    may exec (none by default).
    """
    container: dict[str, Any] = {"name": name, "image": image}
    if command:
        container["args"] = list(command)
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if stdin:
        container["stdin"] = True
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}
    result = generate(
        yaml.safe_dump(pod, sort_keys=False).encode("utf-8"), image_resolver=image_resolver, pull=pull,
        allow_logs=allow_logs, debug=debug, attestation=attestation, aa_toml=aa_toml, cdh_toml=cdh_toml,
        source=f"coffer run {name}")
    workload = result.workloads[0]
    if not allow_exec:
        return workload
    first = workload.policy.containers[0]
    allowed = replace(first.allow, exec=tuple(dict.fromkeys((*first.allow.exec, *allow_exec))))
    policy = replace(workload.policy, containers=(replace(first, allow=allowed),
                                                  *workload.policy.containers[1:]))
    policy_rego = engine.compile_policy(policy)
    document = initdata.build_initdata(policy_rego, algorithm="sha256", aa_toml=aa_toml, cdh_toml=cdh_toml)
    return replace(workload, policy=policy, policy_rego=policy_rego, initdata=document,
                   annotation=initdata.initdata_annotation(document))
