"""``coffer policy ...``: write, review, bind and explain workload policies.

``generate`` makes a policy from Kubernetes manifests, ``check`` lints one, ``compile`` prints the
Rego the agent enforces, ``initdata`` and ``digest`` give the bytes delivered to the TEE and the
values the TEE holds for them, ``explain`` replays agent requests against a policy and says why each
is allowed or denied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from coffer._internal.files import read_bounded_text
from coffer.cli._output import Output
from coffer.errors import FormatError, UsageError
from coffer.policy import initdata as initdata_mod
from coffer.policy.document import load_policy_file
from coffer.policy.engine import PolicyEngine, compile_policy
from coffer.policy.lint import lint

EXIT_OK = 0
EXIT_DENIED = 1
MAX_INPUT_FILE = 4 * 1024 * 1024

_EPILOG = """\
The policy document format is described in docs/policy.md. Exit status: 0 success (explain: every
request allowed; check: no errors, or no findings with --strict), 1 a request denied or findings,
2 usage error, 3 other error.
"""


def register(groups: Any) -> None:
    parser = groups.add_parser(
        "policy",
        help="workload policies: generate, check, compile, digest, explain",
        description="The workload policy says what the host may ask of the agent; initdata binds it to "
        "the TEE.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")

    check = commands.add_parser("check", help="lint a policy: warnings a reviewer can act on")
    check.add_argument("policy", type=Path, metavar="POLICY", help="policy document (YAML or JSON)")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=run_check)

    compile_ = commands.add_parser("compile", help="print the Rego (package agent_policy) the agent enforces")
    compile_.add_argument("policy", type=Path, metavar="POLICY")
    compile_.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of stdout")
    compile_.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    compile_.set_defaults(handler=run_compile)

    init = commands.add_parser("initdata", help="write the initdata TOML (and its annotation) for a policy")
    _initdata_options(init)
    init.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the TOML here")
    init.add_argument(
        "--annotation",
        action="store_true",
        help="print the pod annotation value (base64(gzip(toml))) instead of the TOML",
    )
    init.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    init.set_defaults(handler=run_initdata)

    digest = commands.add_parser(
        "digest", help="the initdata digest and where each TEE holds it (SNP HOSTDATA, TDX MRCONFIGID, PCR 8)"
    )
    source = digest.add_mutually_exclusive_group(required=True)
    source.add_argument("policy", type=Path, nargs="?", metavar="POLICY", help="policy document")
    source.add_argument("--initdata", type=Path, metavar="FILE", help="an initdata TOML file as delivered")
    source.add_argument(
        "--manifest", type=Path, metavar="FILE", help="a Kubernetes manifest carrying the initdata annotation"
    )
    _initdata_options(digest, with_policy=False)
    digest.add_argument("--json", action="store_true", help="machine-readable output")
    digest.set_defaults(handler=run_digest)

    explain = commands.add_parser("explain", help="decide agent requests with a policy and say why")
    explain.add_argument(
        "--policy",
        type=Path,
        required=True,
        metavar="POLICY",
        help="policy document, or a compiled policy.rego (--rego)",
    )
    explain.add_argument("--rego", action="store_true", help="--policy is a compiled policy.rego")
    explain.add_argument(
        "--request",
        type=Path,
        required=True,
        metavar="R.json",
        help='{"request": "ExecProcessRequest", "input": {...}} or a list of them, '
        "decided in order (state carries over, as in the agent)",
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(handler=run_explain)

    _register_generate(commands)
    parser.set_defaults(handler=lambda args, out: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _initdata_options(parser: argparse.ArgumentParser, *, with_policy: bool = True) -> None:
    if with_policy:
        parser.add_argument("policy", type=Path, metavar="POLICY", help="policy document")
    parser.add_argument(
        "--algorithm",
        choices=("sha256", "sha384", "sha512"),
        default="sha256",
        help="initdata digest algorithm (default sha256)",
    )
    parser.add_argument("--aa-toml", type=Path, metavar="FILE", help="attestation agent config to include")
    parser.add_argument(
        "--cdh-toml", type=Path, metavar="FILE", help="confidential data hub config to include"
    )


def _read_text(path: Path | None, what: str) -> str | None:
    return None if path is None else read_bounded_text(path, what, MAX_INPUT_FILE)

def build_initdata_for(args: argparse.Namespace, policy_path: Path) -> bytes:
    """The exact initdata bytes for a policy file with the command's options."""
    policy = load_policy_file(policy_path)
    return initdata_mod.build_initdata(
        compile_policy(policy),
        algorithm=args.algorithm,
        aa_toml=_read_text(args.aa_toml, "aa.toml"),
        cdh_toml=_read_text(args.cdh_toml, "cdh.toml"),
    )


def _write_or_print(path: Path | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------------
# Commands


def run_check(args: argparse.Namespace, out: Output) -> int:
    findings = lint(load_policy_file(args.policy))
    errors = [f for f in findings if f.severity == "error"]
    if args.json:
        out.result(
            {
                "policy": str(args.policy),
                "ok": not errors and not (args.strict and findings),
                "findings": [
                    {"severity": f.severity, "where": f.where, "message": f.message, "hint": f.hint}
                    for f in findings
                ],
            }
        )
    else:
        for f in findings:
            sys.stdout.write(f"{args.policy}: {f.severity}: {f.where}: {f.message}\n    hint: {f.hint}\n")
        sys.stdout.write(f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)\n")
    return EXIT_DENIED if errors or (args.strict and findings) else EXIT_OK


def run_compile(args: argparse.Namespace, out: Output) -> int:
    _write_or_print(args.output, compile_policy(load_policy_file(args.policy)).encode("utf-8"))
    return EXIT_OK


def run_initdata(args: argparse.Namespace, out: Output) -> int:
    doc = build_initdata_for(args, args.policy)
    if args.annotation:
        _write_or_print(args.output, (initdata_mod.initdata_annotation(doc) + "\n").encode("ascii"))
    else:
        _write_or_print(args.output, doc)
    return EXIT_OK


def _initdata_from_manifest(path: Path) -> bytes:
    import yaml  # type: ignore[import-untyped]  # noqa: PLC0415 - only this command needs it

    text = _read_text(path, "manifest")
    assert text is not None
    found: list[str] = []
    try:
        for doc in yaml.safe_load_all(text):
            found.extend(_annotations_with_initdata(doc))
    except yaml.YAMLError as exc:
        raise FormatError(str(path), f"not YAML: {exc}") from exc
    if not found:
        raise UsageError(f"{path} has no {initdata_mod.ANNOTATION} annotation")
    if len(set(found)) > 1:
        raise UsageError(f"{path} holds {len(set(found))} different initdata annotations; give one workload")
    return initdata_mod.decode_annotation(found[0])


def _annotations_with_initdata(node: Any) -> list[str]:
    """Every initdata annotation value in a manifest (pods and pod templates, lists included)."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            annotations = item.get("annotations")
            if isinstance(annotations, dict) and isinstance(annotations.get(initdata_mod.ANNOTATION), str):
                found.append(annotations[initdata_mod.ANNOTATION])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def run_digest(args: argparse.Namespace, out: Output) -> int:
    if args.initdata is not None:
        raw = _read_text(args.initdata, "initdata")
        assert raw is not None
        doc = raw.encode("utf-8")
        initdata_mod.parse_initdata_document(doc)
    elif args.manifest is not None:
        doc = _initdata_from_manifest(args.manifest)
        initdata_mod.parse_initdata_document(doc)
    else:
        doc = build_initdata_for(args, args.policy)
    values = initdata_mod.digests(doc).to_json()
    out.result({**values, "initdata_bytes": len(doc)}, title="initdata digest")
    return EXIT_OK


def _requests(path: Path) -> list[tuple[str, dict[str, Any]]]:
    text = _read_text(path, "request file")
    assert text is not None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    items = raw if isinstance(raw, list) else [raw]
    requests: list[tuple[str, dict[str, Any]]] = []
    for n, item in enumerate(items):
        where = f"{path}[{n}]" if isinstance(raw, list) else str(path)
        if not isinstance(item, dict) or not isinstance(item.get("request"), str):
            raise UsageError(f'{where}: each entry needs "request" (a request name) and "input" (an object)')
        body = item.get("input", {})
        if not isinstance(body, dict):
            raise UsageError(f'{where}: "input" must be an object')
        requests.append((item["request"], body))
    return requests


def run_explain(args: argparse.Namespace, out: Output) -> int:
    if args.rego:
        text = _read_text(args.policy, "policy.rego")
        assert text is not None
        engine = PolicyEngine(text)
    else:
        engine = PolicyEngine(load_policy_file(args.policy))
    decisions = [engine.decide(name, body) for name, body in _requests(args.request)]
    if args.json:
        out.result(
            {
                "decisions": [
                    {
                        "request": d.request,
                        "allowed": d.allowed,
                        "container": d.container,
                        "reasons": list(d.reasons),
                    }
                    for d in decisions
                ],
                "all_allowed": all(d.allowed for d in decisions),
            }
        )
    else:
        for d in decisions:
            verdict = "ALLOWED" if d.allowed else "DENIED"
            why = "; ".join(d.reasons) if d.reasons else ("allowed by the policy" if d.allowed else "denied")
            sys.stdout.write(f"{verdict}: {d.request}: {why}\n")
    return EXIT_OK if all(d.allowed for d in decisions) else EXIT_DENIED


def _register_generate(commands: Any) -> None:
    gen = commands.add_parser(
        "generate",
        help="generate policies from Kubernetes manifests (and annotate the manifests)",
        description="Generate one policy per workload (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, "
        "Job, CronJob) from Kubernetes YAML, reading each image's config so defaults are pinned "
        "and tags resolved to digests; write the manifests with runtimeClassName and the initdata "
        "annotation set.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument(
        "manifest", type=Path, metavar="MANIFEST.yaml", help="Kubernetes manifests ('-' for stdin)"
    )
    gen.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="annotated manifests (default: stdout)"
    )
    gen.add_argument(
        "--policy-dir",
        type=Path,
        metavar="DIR",
        help="also write each workload's policy as DIR/<name>.policy.yaml (and .rego, .initdata.toml)",
    )
    gen.add_argument(
        "--image-source",
        action="append",
        default=[],
        metavar="REGISTRY=MIRROR|oci:DIR",
        help="read images from a mirror registry (names stay as written) or an OCI layout whose "
        "entries are named by full references; repeatable",
    )
    gen.add_argument(
        "--no-pull",
        action="store_true",
        help="do not read images: references must carry digests (a warning lists those that do not)",
    )
    gen.add_argument(
        "--runtime-class", default="coffer", metavar="NAME", help="runtimeClassName (default coffer)"
    )
    gen.add_argument("--namespace", metavar="NS", help="namespace for workloads that name none (pinned)")
    gen.add_argument("--no-logs", action="store_true", help="do not allow reading container logs")
    gen.add_argument(
        "--debug-policy",
        action="store_true",
        help="decision log on in the agent (visible in the attestation claims; not for production)",
    )
    gen.add_argument("--algorithm", choices=("sha256", "sha384", "sha512"), default="sha256")
    gen.add_argument("--aa-toml", type=Path, metavar="FILE", help="attestation agent config for initdata")
    gen.add_argument(
        "--cdh-toml", type=Path, metavar="FILE", help="confidential data hub config for initdata"
    )
    gen.add_argument("--insecure", action="store_true", help="plain http to loopback registries")
    gen.add_argument("--ca-cert", type=Path, metavar="PEM", help="CA bundle for registries")
    gen.add_argument(
        "--platform", metavar="OS/ARCH", help="platform of multi-arch images (default: this machine)"
    )
    gen.add_argument("--json", action="store_true", help="print a JSON summary instead of the manifests")
    gen.set_defaults(handler=run_generate)


def _resolver(args: argparse.Namespace) -> Any:
    from coffer.image.pipeline import parse_platform  # noqa: PLC0415 - generate only
    from coffer.image.transport import TransportOptions  # noqa: PLC0415
    from coffer.policy import generate as gen  # noqa: PLC0415

    options = TransportOptions(ca_file=args.ca_cert, insecure=args.insecure)
    platform = parse_platform(args.platform) if args.platform else None
    layouts = [item.removeprefix("oci:") for item in args.image_source if item.startswith("oci:")]
    mirrors = [item for item in args.image_source if not item.startswith("oci:")]
    if (layouts and mirrors) or len(layouts) > 1:
        raise UsageError("--image-source: give mirrors (REGISTRY=MIRROR, repeatable) or one oci:DIR")
    if layouts:
        return gen.OciLayoutResolver(Path(layouts[0]), platform)
    if mirrors:
        return gen.MirrorResolver(gen.parse_mirrors(mirrors), options, platform)
    return gen.RegistryResolver(options, platform)


def run_generate(args: argparse.Namespace, out: Output) -> int:
    from coffer.policy import generate as gen  # noqa: PLC0415 - generate only
    from coffer.policy.document import dump_policy  # noqa: PLC0415

    if str(args.manifest) == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_FILE + 1)
        if len(data) > MAX_INPUT_FILE:
            raise UsageError(f"manifests larger than {MAX_INPUT_FILE} bytes")
    else:
        text = _read_text(args.manifest, "manifest")
        assert text is not None
        data = text.encode("utf-8")
    result = gen.generate(
        data,
        image_resolver=_resolver(args),
        runtime_class=args.runtime_class,
        pull=not args.no_pull,
        allow_logs=not args.no_logs,
        namespace=args.namespace,
        debug=args.debug_policy,
        initdata_algorithm=args.algorithm,
        aa_toml=_read_text(args.aa_toml, "aa.toml"),
        cdh_toml=_read_text(args.cdh_toml, "cdh.toml"),
        source=str(args.manifest),
    )
    for warning in result.warnings:
        sys.stderr.write(f"coffer: warning: {warning}\n")
    written: list[str] = []
    if args.policy_dir is not None:
        args.policy_dir.mkdir(parents=True, exist_ok=True)
        for w in result.workloads:
            base = args.policy_dir / w.name
            for suffix, content in (
                (".policy.yaml", dump_policy(w.policy, fmt="yaml")),
                (".rego", w.policy_rego.encode("utf-8")),
                (".initdata.toml", w.initdata),
            ):
                Path(f"{base}{suffix}").write_bytes(content)
                written.append(f"{base}{suffix}")
    if args.output is not None:
        args.output.write_bytes(result.manifest)
    if args.json:
        out.result(
            {
                "workloads": [
                    {
                        "kind": w.kind,
                        "name": w.name,
                        "namespace": w.namespace,
                        "containers": [{"name": c.name, "image": c.image} for c in w.policy.containers],
                        "initdata": initdata_mod.digests(w.initdata).to_json(),
                    }
                    for w in result.workloads
                ],
                "warnings": list(result.warnings),
                "written": written,
                "manifest": str(args.output) if args.output is not None else None,
            }
        )
    elif args.output is None:
        sys.stdout.buffer.write(result.manifest)
        sys.stdout.flush()
    return EXIT_OK
