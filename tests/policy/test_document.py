"""The policy document: strict YAML/JSON parsing with line/field errors, canonical dumps, the schema."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coffer.errors import CofferError, FormatError, UsageError
from coffer.policy.document import (
    LINUX_CAPABILITIES,
    MAX_POLICY_BYTES,
    SCHEMA,
    PolicyFormatError,
    dump_policy,
    load_policy_file,
    normalise_capability,
    parse_policy,
    regex_problem,
)
from coffer.policy.model import (
    AttestationRequirement,
    ContainerPolicy,
    EnvRule,
    HostAccess,
    Mount,
    Secret,
    SignatureRequirement,
    User,
    WorkloadPolicy,
    to_obj,
)

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"docker.io/library/nginx@{DIGEST}"
PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
PEM_INDENTED = "\n".join("          " + line for line in PEM.splitlines())

FULL_YAML = f"""\
version: 1
name: web
namespace: default
attestation:
  tee: [snp, tdx]
  min_tcb: {{snp: {{bootloader: 3, tee: 0, snp: 8, microcode: 115}}}}
  allow_debug: false
debug: false
containers:
  - name: nginx
    image: {IMAGE}
    signature:
      keys:
        - |
{PEM_INDENTED}
    args: ["nginx", "-g", "daemon off;"]
    env:
      - PATH=/usr/local/sbin:/usr/bin
      - {{name: POD_IP, pattern: "[0-9.]+"}}
      - {{name: GREETING, value: "a: b"}}
    working_dir: /
    user: {{uid: 101, gid: 101, additional_gids: [5]}}
    capabilities: [CHOWN, cap_net_bind_service]
    no_new_privileges: true
    privileged: false
    read_only_root: true
    mounts:
      - {{destination: /etc/nginx/conf.d, type: bind, source: "configmap:nginx-conf", options: [ro]}}
    allow:
      exec: [["nginx", "-s", "reload"]]
      exec_patterns: ["nginx -t( -q)?"]
      logs: true
      stdin: false
      copy_files: ["/data/in/[^/]+"]
    secrets:
      - {{resource: "kbs:///default/secret/db", env: DB_PASSWORD}}
      - {{resource: "kbs:///default/secret/tls", file: /run/secrets/tls.pem}}
  - name: sidecar
    image: quay.io/org/side:1.0@{DIGEST}
    args: [/side]
"""

FULL = WorkloadPolicy(
    name="web",
    namespace="default",
    attestation=AttestationRequirement(
        tee=("snp", "tdx"),
        min_tcb={"snp": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}},
    ),
    containers=(
        ContainerPolicy(
            name="nginx",
            image=IMAGE,
            signature=SignatureRequirement(keys=(PEM,)),
            args=("nginx", "-g", "daemon off;"),
            env=(
                EnvRule(name="PATH", value="/usr/local/sbin:/usr/bin"),
                EnvRule(name="POD_IP", pattern="[0-9.]+"),
                EnvRule(name="GREETING", value="a: b"),
            ),
            user=User(uid=101, gid=101, additional_gids=(5,)),
            capabilities=("CHOWN", "NET_BIND_SERVICE"),
            read_only_root=True,
            mounts=(Mount(destination="/etc/nginx/conf.d", source="configmap:nginx-conf", options=("ro",)),),
            allow=HostAccess(
                exec=(("nginx", "-s", "reload"),),
                exec_patterns=("nginx -t( -q)?",),
                logs=True,
                copy_files=("/data/in/[^/]+",),
            ),
            secrets=(
                Secret(resource="kbs:///default/secret/db", env="DB_PASSWORD"),
                Secret(resource="kbs:///default/secret/tls", file="/run/secrets/tls.pem"),
            ),
        ),
        ContainerPolicy(name="sidecar", image=f"quay.io/org/side:1.0@{DIGEST}", args=("/side",)),
    ),
)

MINIMAL_YAML = f"version: 1\nname: app\ncontainers:\n  - name: app\n    image: {IMAGE}\n    args: [app]\n"


def _schema_validator() -> Any:
    jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="jsonschema_rs validates the JSON Schema")
    return jsonschema_rs.Draft202012Validator(SCHEMA)


# --------------------------------------------------------------------------------------------------
# Valid documents


def test_full_yaml_document_parses_to_the_model() -> None:
    assert parse_policy(FULL_YAML.encode(), source="policy.yaml") == FULL


def test_json_document_parses_like_yaml() -> None:
    assert parse_policy(json.dumps(yaml.safe_load(FULL_YAML), indent=2).encode()) == FULL


def test_json_indented_with_tabs_parses() -> None:
    assert parse_policy(json.dumps(to_obj(FULL), indent="\t").encode()) == FULL


def test_minimal_document_takes_the_model_defaults() -> None:
    policy = parse_policy(MINIMAL_YAML.encode())
    assert policy == WorkloadPolicy(
        name="app", containers=(ContainerPolicy(name="app", image=IMAGE, args=("app",)),)
    )
    container = policy.containers[0]
    assert container.working_dir == "/"
    assert container.user == User(uid=0, gid=0)
    assert container.no_new_privileges is True
    assert container.allow == HostAccess()
    assert policy.attestation == AttestationRequirement()


def test_utf8_bom_and_null_namespace_and_signature_are_accepted() -> None:
    text = MINIMAL_YAML.replace("name: app\n", "name: app\nnamespace: null\n", 1) + "    signature: null\n"
    assert parse_policy(b"\xef\xbb\xbf" + text.encode()).namespace is None


def test_capabilities_are_normalised_without_prefix_in_upper_case() -> None:
    assert normalise_capability(" cap_sys_admin ") == "SYS_ADMIN"
    text = MINIMAL_YAML + "    capabilities: [cap_chown, Kill, CAP_NET_RAW]\n"
    assert parse_policy(text.encode()).containers[0].capabilities == ("CHOWN", "KILL", "NET_RAW")
    assert len(LINUX_CAPABILITIES) == 41


def test_unpinned_image_is_accepted_for_lint_to_report() -> None:
    text = MINIMAL_YAML.replace(IMAGE, "nginx:1.27")
    assert parse_policy(text.encode()).containers[0].image == "nginx:1.27"


# --------------------------------------------------------------------------------------------------
# Round trips and stable output


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_dump_parse_round_trip_is_stable(fmt: str) -> None:
    first = dump_policy(FULL, fmt=fmt)  # type: ignore[arg-type]
    assert parse_policy(first) == FULL
    assert dump_policy(parse_policy(first), fmt=fmt) == first  # type: ignore[arg-type]


def test_yaml_dump_is_readable() -> None:
    text = dump_policy(FULL).decode()
    assert "  args: [nginx, -g, daemon off;]\n" in text
    assert "    - {name: POD_IP, pattern: '[0-9.]+'}\n" in text
    assert "-----BEGIN PUBLIC KEY-----\n" in text
    assert "- |\n" in text
    assert "&" not in text  # no anchors
    assert "*" not in text  # no aliases


def test_dump_json_is_json_of_the_canonical_object() -> None:
    assert json.loads(dump_policy(FULL, fmt="json")) == to_obj(FULL)


def test_unknown_dump_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        dump_policy(FULL, fmt="toml")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Malformed documents: each names the line and the field

TAIL = "containers: [{name: a, image: x, args: [a]}]\n"
HEAD = (
    f"version: 1\nname: web\ncontainers:\n  - name: nginx\n    image: {IMAGE}\n    args: [nginx]\n"  # 6 lines
)


def _c(extra: str) -> str:
    """A document with ``extra`` container lines from line 7."""
    return HEAD + extra


MALFORMED = [
    # (document, line, field, message fragment)
    (_c("    imagee: x\n"), 7, "containers[0].imagee", "did you mean 'image'"),
    (_c("    args: [x]\n"), 7, "containers[0].args", "duplicate key"),
    (
        _c("    env:\n      - {name: A, pattern: '(unclosed'}\n"),
        8,
        "containers[0].env[0].pattern",
        "not a valid",
    ),
    (
        _c("    env:\n      - A=1\n      - {name: B, pattern: '(?<=a)b'}\n"),
        9,
        "containers[0].env[1].pattern",
        "lookaround",
    ),
    (
        _c("    allow:\n      exec_patterns: ['(a)\\1']\n"),
        8,
        "containers[0].allow.exec_patterns[0]",
        "backreferences",
    ),
    (
        _c("    capabilities: [CHOWN, NET_BIND_SERVIC]\n"),
        7,
        "containers[0].capabilities[1]",
        "'NET_BIND_SERVICE'",
    ),
    (
        _c("    capabilities: [CHOWN, cap_chown]\n"),
        7,
        "containers[0].capabilities[1]",
        "duplicate capability",
    ),
    (_c("    env: ['1X=2']\n"), 7, "containers[0].env[0]", "not a valid environment variable name"),
    (_c("    env: [JUSTANAME]\n"), 7, "containers[0].env[0]", "expected NAME=VALUE"),
    (
        _c("    env:\n      - {name: A, value: x, pattern: y}\n"),
        8,
        "containers[0].env[0]",
        "exactly one of value",
    ),
    (
        _c("    secrets:\n      - {resource: 'kbs:///a/b/c', env: X, file: /x}\n"),
        8,
        "containers[0].secrets[0]",
        "exactly one of env",
    ),
    (
        _c("    secrets:\n      - {resource: 'https://x/y', env: X}\n"),
        8,
        "containers[0].secrets[0].resource",
        "kbs:///",
    ),
    (_c("    allow:\n      exec: ['nginx -s reload']\n"), 8, "containers[0].allow.exec[0]", "argv list"),
    (_c("    allow:\n      exec: [[]]\n"), 8, "containers[0].allow.exec[0]", "non-empty argv"),
    (_c("    mounts:\n      - {destination: etc/x}\n"), 8, "containers[0].mounts[0].destination", "absolute"),
    (_c("    user: {uid: -1, gid: 0}\n"), 7, "containers[0].user.uid", "between 0 and"),
    (_c("    user: {uid: 1}\n"), 7, "containers[0].user", "missing required field 'gid'"),
    (_c("    privileged: 'true'\n"), 7, "containers[0].privileged", "expected true or false"),
    (_c("    read_only_root: 1\n"), 7, "containers[0].read_only_root", "expected true or false"),
    (_c("    working_dir: app\n"), 7, "containers[0].working_dir", "absolute"),
    (_c("    allow:\n      copy_files: ['a{,3}']\n"), 8, "containers[0].allow.copy_files[0]", "{0,n}"),
    (
        _c("  - name: nginx\n    image: x\n    args: [y]\n"),
        7,
        "containers[1].name",
        "duplicate container name",
    ),
    (_c("  - name: no\n    image: x\n    args: [y]\n"), 7, "containers[1].name", "got a boolean (quote it)"),
    (_c("  - name: Web_1\n    image: x\n    args: [y]\n"), 7, "containers[1].name", "DNS-1123 label"),
    (
        _c("  - name: b\n    image: 'Nginx:latest'\n    args: [y]\n"),
        8,
        "containers[1].image",
        "invalid image",
    ),
    (_c("  - name: b\n    image: x\n"), 7, "containers[1]", "missing required field 'args'"),
    (_c("    signature: {keys: ['not a key']}\n"), 7, "containers[0].signature.keys[0]", "PEM public key"),
    ("version: 2\nname: web\ncontainers: []\n", 1, "version", "unsupported version 2"),
    ("version: '1'\nname: web\n" + TAIL, 1, "version", "expected the integer 1"),
    ("version: 1\nname: web\n", 1, "(document)", "missing required field 'containers'"),
    ("version: 1\nname: web\ncontainers: []\n", 3, "containers", "must not be empty"),
    ("version: 1\nnamespce: x\n", 2, "namespce", "did you mean 'namespace'"),
    (
        "version: 1\nname: web\nattestation: {tee: [snpp]}\n" + TAIL,
        3,
        "attestation.tee[0]",
        "did you mean 'snp'",
    ),
    (
        "version: 1\nname: web\nattestation:\n  tee: [tdx]\n  min_tcb: {snp: {}}\n" + TAIL,
        5,
        "attestation.min_tcb.snp",
        "not among",
    ),
    (
        "version: 1\nname: web\nattestation:\n  min_tcb: {snp: {bootloader: 256}}\n" + TAIL,
        4,
        "attestation.min_tcb.snp.bootloader",
        "255",
    ),
    ("- a\n- b\n", 1, "(document)", "expected a mapping, got a list"),
    ("version: 1\n1: x\n", 2, "(document)", "key '1' is not a string"),
    ("version: 1\nname: !!python/object:os.system x\n" + TAIL, 2, "name", "expected a string"),
    ("version: 1\nname: [unclosed\n", 3, None, "YAML"),
    ("version: 1\n---\nversion: 1\n", 2, None, "another document"),
    (
        '{\n  "version": 1,\n  "name": "web",\n'
        '  "containers": [{"name": "a", "image": "x", "args": "a"}]\n}\n',
        4,
        "containers[0].args",
        "expected a list, got a string",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"), MALFORMED)
def test_malformed_document_error_names_line_and_field(
    text: str, line: int, field: str | None, fragment: str
) -> None:
    with pytest.raises(PolicyFormatError) as info:
        parse_policy(text.encode(), source="policy.yaml")
    error = info.value
    message = str(error)
    assert isinstance(error, FormatError)
    assert error.line == line, message
    assert f"policy.yaml:{line}:" in message
    if field is not None:
        assert error.field == field, message
        assert f": {field}: " in message
    assert fragment in message


def test_error_column_points_at_the_value() -> None:
    with pytest.raises(PolicyFormatError) as info:
        parse_policy(_c("    env:\n      - {name: A, pattern: '(?=x)'}\n").encode(), source="policy.yaml")
    assert str(info.value).endswith(
        "policy.yaml:8:28: containers[0].env[0].pattern: lookaround ((?=, (?!, (?<=, (?<!) is not "
        "supported by the agent's regex engine"
    )


def test_alias_bomb_is_refused_before_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)
    )
    with pytest.raises(PolicyFormatError, match=r"policy:1:4: YAML anchors"):
        parse_policy(bomb.encode())


def test_alias_without_anchor_is_refused() -> None:
    with pytest.raises(PolicyFormatError, match="aliases"):
        parse_policy(b"version: 1\nname: *x\n")


def test_merge_key_is_refused() -> None:
    with pytest.raises(PolicyFormatError, match="not a string"):
        parse_policy(b"version: 1\n<<: {name: web}\n")


def test_oversized_document_is_refused_before_parsing() -> None:
    data = b"#" * (MAX_POLICY_BYTES + 1)
    with pytest.raises(PolicyFormatError, match="limit is 1048576"):
        parse_policy(data)


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(PolicyFormatError, match="nesting deeper"):
        parse_policy(b"[" * 50_000)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"# only a comment\n", "empty"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"a: \x07", "not allowed"),
    ],
)
def test_empty_binary_and_control_characters_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(PolicyFormatError, match=fragment):
        parse_policy(data)


def test_nul_in_a_string_is_refused() -> None:
    with pytest.raises(PolicyFormatError, match="NUL"):
        parse_policy(b'version: 1\nname: "a\\0b"\ncontainers: [{name: a, image: x, args: [a]}]\n')


def test_lone_surrogate_escape_is_refused() -> None:
    with pytest.raises(PolicyFormatError, match="surrogate"):
        parse_policy(b'version: 1\nname: "\\ud800"\ncontainers: [{name: a, image: x, args: [a]}]\n')


# --------------------------------------------------------------------------------------------------
# Regular expressions shared by Python and the agent's Rust regex engine


@pytest.mark.parametrize(
    "pattern",
    ["[0-9.]+", "a|b", "(?i)abc", "(?:a)+?", r"\d{1,3}", r"x\.y", "[]a]", "[^]a]", r"\x41", r"\u00e9",
     "(?P<n>a)", r"[\w-]+", r"\bword\b", "a{2}", "a{2,}", r"/data/[^/]+\.csv", "(?is:a.b)", "", r"\/x"],
)  # fmt: skip
def test_portable_pattern_is_accepted(pattern: str) -> None:
    assert regex_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern",
    ["(?=a)", "(?!a)", "(?<=a)b", "(?<!a)b", r"(a)\1", "(?P<x>a)(?P=x)", "(?>a)", "a*+", "a++", "a{2}+",
     "(?(1)a|b)", "(?#c)a", "[[:alpha:]]", "[a&&b]", "[a--b]", "a{", "a{,3}", r"a\Z", r"\0", "(?a)x",
     "(?x)a b", r"\<w", "a{1001}", "(", "*", "a" * 5000, r"\x4", r"\N{DIGIT ONE}", r"[\b]"],
)  # fmt: skip
def test_unportable_or_invalid_pattern_is_refused(pattern: str) -> None:
    assert regex_problem(pattern) is not None


# --------------------------------------------------------------------------------------------------
# Files


def test_load_policy_file_names_the_file_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "policy.yaml"
    good.write_text(FULL_YAML)
    assert load_policy_file(good) == FULL
    bad = tmp_path / "bad.yaml"
    bad.write_text(_c("    privileged: maybe\n"))
    with pytest.raises(PolicyFormatError, match=rf"{bad}:7:17: containers\[0\]\.privileged"):
        load_policy_file(bad)


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_unreadable_policy_file_is_a_usage_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="cannot read policy file"):
        load_policy_file(tmp_path / name)


def test_oversized_policy_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b" " * (MAX_POLICY_BYTES + 10))
    with pytest.raises(PolicyFormatError, match="limit"):
        load_policy_file(big)


# --------------------------------------------------------------------------------------------------
# JSON Schema kept in sync with the parser


def test_schema_is_a_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    assert jsonschema_rs.meta.is_valid(SCHEMA)  # valid against the 2020-12 meta-schema


@pytest.mark.parametrize("text", [FULL_YAML, MINIMAL_YAML])
def test_example_documents_and_their_dumps_validate_against_the_schema(text: str) -> None:
    validator = _schema_validator()
    validator.validate(yaml.safe_load(text))
    validator.validate(json.loads(dump_policy(parse_policy(text.encode()), fmt="json")))


def test_model_docstring_example_validates_against_schema_and_parses() -> None:
    from coffer.policy import model

    doc = model.__doc__ or ""
    example = doc.split("The shape (``version: 1``)::\n\n", 1)[1].split("\n\nEverything not allowed", 1)[0]
    text = "\n".join(line[4:] for line in example.splitlines()).replace("<64 hex>", "ab" * 32)
    text = text.replace('["-----BEGIN PUBLIC KEY-----..."]', json.dumps([PEM]))
    _schema_validator().validate(yaml.safe_load(text))
    assert parse_policy(text.encode()).name == "web"


@pytest.mark.parametrize(
    "text",
    [
        _c("    imagee: x\n"),
        _c("    env: ['1X=2']\n"),
        _c("    user: {uid: -1, gid: 0}\n"),
        _c("    allow:\n      exec: ['nginx -s reload']\n"),
        _c("    secrets:\n      - {resource: 'kbs:///a/b/c', env: X, file: /x}\n"),
        _c("    mounts:\n      - {destination: etc/x}\n"),
        _c("    privileged: 'true'\n"),
        "version: 2\nname: web\n" + TAIL,
        "version: 1\nname: Web\n" + TAIL,
        "version: 1\nname: web\ncontainers: []\n",
    ],
)
def test_structurally_malformed_documents_fail_the_schema_too(text: str) -> None:
    assert not _schema_validator().is_valid(yaml.safe_load(text))
    with pytest.raises(PolicyFormatError):
        parse_policy(text.encode())


# --------------------------------------------------------------------------------------------------
# Properties

_text = st.text(
    st.characters(exclude_characters="\x00", categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co")),
    max_size=16,
)
_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True)
_env_names = st.from_regex(r"[-._a-zA-Z][-._a-zA-Z0-9]{0,10}", fullmatch=True)
_patterns = st.sampled_from(["[0-9.]+", "a|b", "(?i)abc", "[^/]+", r"\d{1,3}", "/data/.*", ".*", r"x\.y", ""])
_paths = st.from_regex(r"/([a-z.]{1,6}/){0,2}[a-z]{1,6}", fullmatch=True).filter(lambda p: ".." not in p)
_segment = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,6}", fullmatch=True)


@st.composite
def _containers(draw: st.DrawFn, name: str) -> ContainerPolicy:
    repo = draw(st.sampled_from(["nginx", "quay.io/org/app", "127.0.0.1:5000/a/b", "redis"]))
    tag = draw(st.sampled_from(["", ":1.0", ":latest"]))
    digest = draw(st.sampled_from(["", f"@{DIGEST}"]))
    env = draw(
        st.lists(
            st.one_of(
                st.builds(lambda n, v: EnvRule(name=n, value=v), _env_names, _text),
                st.builds(lambda n, p: EnvRule(name=n, pattern=p), _env_names, _patterns),
            ),
            max_size=4,
            unique_by=lambda r: (r.name, r.value, r.pattern),
        )
    )
    secrets = draw(
        st.lists(
            st.one_of(
                st.builds(lambda r, e: Secret(resource=r, env=e), _segment, _env_names),
                st.builds(lambda r, f: Secret(resource=r, file=f), _segment, _paths),
            ),
            max_size=3,
            unique_by=lambda s: s.env or s.file,
        )
    )
    secrets = [Secret(resource=f"kbs:///default/{s.resource}/x", env=s.env, file=s.file) for s in secrets]
    argv = st.lists(_text, max_size=3).flatmap(lambda rest: _text.filter(bool).map(lambda a0: (a0, *rest)))
    return ContainerPolicy(
        name=name,
        image=f"{repo}{tag}{digest}" if tag or digest else repo,
        args=draw(argv),
        env=tuple(env),
        working_dir=draw(st.one_of(st.just("/"), _paths)),
        user=User(
            uid=draw(st.integers(0, 2**32 - 2)),
            gid=draw(st.integers(0, 70000)),
            additional_gids=tuple(draw(st.lists(st.integers(0, 70000), unique=True, max_size=3))),
        ),
        capabilities=tuple(draw(st.lists(st.sampled_from(LINUX_CAPABILITIES), unique=True, max_size=4))),
        no_new_privileges=draw(st.booleans()),
        privileged=draw(st.booleans()),
        read_only_root=draw(st.booleans()),
        mounts=tuple(
            draw(
                st.lists(
                    st.builds(
                        lambda d, t, s, o: Mount(destination=d, type=t, source=s, options=tuple(o)),
                        _paths,
                        st.sampled_from(["bind", "tmpfs", "fuse.sshfs"]),
                        _text,
                        st.lists(_text.filter(bool), max_size=3),
                    ),
                    max_size=3,
                    unique_by=lambda m: m.destination,
                )
            )
        ),
        allow=HostAccess(
            exec=tuple(draw(st.lists(argv, max_size=3, unique=True))),
            exec_patterns=tuple(draw(st.lists(_patterns, max_size=2, unique=True))),
            logs=draw(st.booleans()),
            stdin=draw(st.booleans()),
            copy_files=tuple(draw(st.lists(_patterns, max_size=2, unique=True))),
        ),
        secrets=tuple(secrets),
        signature=draw(st.sampled_from([None, SignatureRequirement(keys=(PEM,))])),
    )


@st.composite
def _policies(draw: st.DrawFn) -> WorkloadPolicy:
    names = draw(st.lists(_names, min_size=1, max_size=3, unique=True))
    tees = tuple(
        draw(st.lists(st.sampled_from(["snp", "tdx", "sample", "az-snp-vtpm"]), unique=True, max_size=3))
    )
    min_tcb: dict[str, dict[str, int]] = {}
    if draw(st.booleans()) and (not tees or "snp" in tees):
        min_tcb["snp"] = {"bootloader": draw(st.integers(0, 255)), "microcode": draw(st.integers(0, 255))}
    if draw(st.booleans()) and (not tees or "tdx" in tees):
        min_tcb["tdx"] = {"tee_tcb_svn": draw(st.integers(0, 2**32 - 1))}
    return WorkloadPolicy(
        name=draw(st.one_of(_names, st.builds(lambda a, b: f"{a}.{b}", _names, _names))),
        namespace=draw(st.one_of(st.none(), _names)),
        attestation=AttestationRequirement(tee=tees, min_tcb=min_tcb, allow_debug=draw(st.booleans())),
        debug=draw(st.booleans()),
        containers=tuple(draw(_containers(n)) for n in names),
    )


_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_policies(), st.sampled_from(["yaml", "json"]))
def test_dump_then_parse_gives_back_the_policy(policy: WorkloadPolicy, fmt: str) -> None:
    data = dump_policy(policy, fmt=fmt)  # type: ignore[arg-type]
    assert parse_policy(data) == policy
    assert dump_policy(policy, fmt=fmt) == data  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policies())
def test_every_dumped_policy_validates_against_the_schema(policy: WorkloadPolicy) -> None:
    _schema_validator().validate(json.loads(dump_policy(policy, fmt="json")))


def _only_coffer_errors(data: bytes) -> None:
    with contextlib.suppress(CofferError):
        parse_policy(data)


@_SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_coffer_errors(data: bytes) -> None:
    _only_coffer_errors(data)


@_SETTINGS
@given(st.text(alphabet="{}[]:,-'\"&*!|>#%@` \n\tabcxy019.=?/\\<", max_size=200))
def test_yaml_ish_text_raises_only_coffer_errors(text: str) -> None:
    _only_coffer_errors(text.encode())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


def _paths_in(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths_in(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths_in(value, (*prefix, i))
    return out


@_SETTINGS
@given(st.data())
def test_mutated_valid_documents_raise_only_coffer_errors(data: st.DataObject) -> None:
    obj = to_obj(FULL)
    path = data.draw(st.sampled_from(_paths_in(obj)[1:]))
    target = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = data.draw(_json_values)
    text = yaml.safe_dump(obj, allow_unicode=data.draw(st.booleans()))
    try:
        policy = parse_policy(text.encode())
    except PolicyFormatError as exc:
        error: PolicyFormatError | None = exc
    else:
        error = None
        assert parse_policy(dump_policy(policy)) == policy
    # Every refusal of a syntactically valid YAML document points at a line.
    assert error is None or error.line is not None
