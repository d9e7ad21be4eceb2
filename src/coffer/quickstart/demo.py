"""``coffer quickstart``: the confidential run end to end on this machine, in about a minute.

:func:`run_quickstart` goes through these steps, printing one progress line per step (and one per
image where there are several):

1. build the sample images -- NGINX, Redis, Memcached and a Python web app from Debian packages
   (:mod:`coffer.quickstart.images`; cached after the first build);
2. start a local KBS and make the sandboxes' TPM trusted (:mod:`coffer.quickstart.trust`: AK enrolled
   by credential activation, reference values registered, the DEFAULT resource policy kept);
3. protect every image with ``coffer image protect``: layers encrypted with a key-encryption key the
   KBS holds at ``kbs:///default/key/<app>``, signed with a freshly generated cosign key, written to
   an OCI layout (``protected/<app>``) that names it ``coffer.local/demo/<app>:1``;
4. generate each workload policy from the ``coffer run`` arguments
   (:func:`coffer.policy.generate.generate_for_run` over the protected layout: the image pinned by
   digest, its argv, environment, user; logs allowed, exec denied) and require the signature by the
   demo key;
5. run each image with ``coffer run -d`` (published port, ``--kbs``, ``--image-layouts``,
   ``--policy``): the agent attests with the sandbox's TPM, gets the key, verifies the signature,
   decrypts and starts the unmodified application;
6. check each with a real client through the published port (HTTP GET; Redis PING/SET/GET;
   Memcached set/get);
7. ``coffer exec`` into NGINX: blocked by the policy;
8. a copy of the NGINX layout with one byte of an encrypted layer flipped: ``coffer run`` fails, the
   sandbox is gone, the error names the digest that did not match;
9. a changed policy: the host replaces initdata (with a policy allowing exec) after the launch
   measurement -- the agent refuses to start, the container never starts;
10. the attestation claims: ``coffer inspect`` (event log, register, the KBS token's claims) and the
    KBS audit of the key releases;
11. stop and remove everything (unless ``keep``).

Sandboxes live under a short private state directory (``/tmp/cof-*``: unix socket paths are limited
to 107 bytes), removed at the end unless ``keep``. Everything here is a development sandbox: the
host kernel can read the sandboxes' memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from coffer._internal.net import free_port
from coffer.errors import CofferError, TransportError, UnsupportedError, UsageError
from coffer.guest.containers import RUNC
from coffer.image import signing
from coffer.image.layout import REF_NAME, OciLayout
from coffer.policy.document import dump_policy
from coffer.policy.engine import compile_policy
from coffer.policy.generate import OciLayoutResolver, generate_for_run
from coffer.policy.initdata import aa_toml_for_kbs, build_initdata
from coffer.policy.model import SignatureRequirement, WorkloadPolicy
from coffer.quickstart import images
from coffer.quickstart.trust import DevTrust, child_env, coffer_command, setup_dev_trust

REGISTRY: Final = "coffer.local/demo"
TAG: Final = "1"
APPS: Final = ("nginx", "redis", "memcached", "python")
STEPS: Final = 11
SANDBOX_PREFIX: Final = "qs-"
RUN_TIMEOUT: Final = 180.0
CLIENT_TIMEOUT: Final = 20.0

Progress = Callable[[str], None]


class QuickstartError(CofferError):
    """A step of the quickstart did not give the expected result."""


def image_reference(app: str) -> str:
    return f"{REGISTRY}/{app}:{TAG}"


def key_uri(app: str) -> str:
    return f"kbs:///default/key/{app}"


# --------------------------------------------------------------------------------------------------
# Report


@dataclass
class StepResult:
    number: int
    title: str
    ok: bool
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"step": self.number, "title": self.title, "ok": self.ok, "seconds": round(self.seconds, 2),
                "detail": self.detail}


@dataclass
class AppResult:
    app: str
    image: str
    manifest_digest: str = ""
    host_port: int = 0
    sandbox: str = ""
    check: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "image": self.image, "manifest_digest": self.manifest_digest,
                "host_port": self.host_port, "sandbox": self.sandbox, "check": self.check}


@dataclass
class DemoReport:
    """What the quickstart did and showed."""

    work_dir: Path
    state_dir: Path
    ok: bool = False
    seconds: float = 0.0
    error: str = ""
    steps: list[StepResult] = field(default_factory=list)
    apps: dict[str, AppResult] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    kept: bool = False
    kbs_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "error": self.error or None,
                "work_dir": str(self.work_dir), "state_dir": str(self.state_dir), "kept": self.kept,
                "kbs": self.kbs_url, "development": True,
                "steps": [s.to_json() for s in self.steps],
                "apps": {k: v.to_json() for k, v in self.apps.items()},
                "refusals": dict(self.refusals), "claims": self.claims}


# --------------------------------------------------------------------------------------------------
# Clients


def _converse(port: int, request: bytes, until: bytes, timeout: float) -> bytes:
    """Send ``request`` to 127.0.0.1:port and read until the reply holds ``until`` (b"\0": to the
    end), retrying refused connections until ``timeout``."""
    return images.exchange(("127.0.0.1", port), request, timeout, until, min_wait=0.5)


def _resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def redis_check(port: int, *, timeout: float = CLIENT_TIMEOUT) -> str:
    """PING, SET and GET a random value (RESP over TCP, as redis-cli does)."""
    images.probe("redis", "127.0.0.1", port, timeout=timeout)
    value = secrets.token_hex(8).encode()
    reply = _converse(port, _resp(b"SET", b"coffer", value) + _resp(b"GET", b"coffer"),
                      b"\r\n" + value + b"\r\n", timeout)
    expected = b"+OK\r\n$%d\r\n%s\r\n" % (len(value), value)
    if reply != expected:
        raise TransportError(f"redis: SET/GET answered {reply[:100]!r}")
    return f"PING +PONG, SET coffer {value.decode()} +OK, GET coffer {value.decode()}"


def memcached_check(port: int, *, timeout: float = CLIENT_TIMEOUT) -> str:
    """set and get a random value (the memcached text protocol)."""
    images.probe("memcached", "127.0.0.1", port, timeout=timeout)
    value = secrets.token_hex(8).encode()
    stored = _converse(port, b"set coffer 0 60 %d\r\n%s\r\n" % (len(value), value), b"\r\n", timeout)
    if stored != b"STORED\r\n":
        raise TransportError(f"memcached: set answered {stored[:100]!r}")
    got = _converse(port, b"get coffer\r\n", b"END\r\n", timeout)
    if got != b"VALUE coffer 0 %d\r\n%s\r\nEND\r\n" % (len(value), value):
        raise TransportError(f"memcached: get answered {got[:100]!r}")
    return f"set coffer {value.decode()} STORED, get coffer {value.decode()}"


def http_check(app: str, port: int, *, timeout: float = CLIENT_TIMEOUT) -> str:
    status = images.probe(app, "127.0.0.1", port, timeout=timeout)
    body = _converse(port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", b"\0", timeout)
    text = body.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
    return f"GET / {status}" + (f": {text.splitlines()[0][:70]}" if text else "")


def check_app(app: str, port: int, *, timeout: float = CLIENT_TIMEOUT) -> str:
    """Check a running sample app at 127.0.0.1:``port`` with its real protocol; what it answered."""
    if app in ("nginx", "python"):
        return http_check(app, port, timeout=timeout)
    if app == "redis":
        return redis_check(port, timeout=timeout)
    if app == "memcached":
        return memcached_check(port, timeout=timeout)
    raise UsageError(f"unknown sample app {app!r}")


# --------------------------------------------------------------------------------------------------
# Pieces shared with the end-to-end tests


def run_coffer(args: list[str], *, env: dict[str, str], timeout: float = RUN_TIMEOUT,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """``coffer ARGS`` as a child process; with ``check`` a non-zero exit is a QuickstartError."""
    try:
        done = subprocess.run([*coffer_command(), *args], capture_output=True, text=True,  # noqa: S603
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise QuickstartError(f"coffer {' '.join(args[:2])} did not finish within {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        raise QuickstartError(f"coffer {' '.join(args[:3])} exited {done.returncode}: "
                              + (done.stderr.strip() or done.stdout.strip())[-1500:])
    return done


def write_signing_key(directory: Path) -> tuple[Path, Path, Path]:
    """A cosign key pair with a random password: (private key, public key, password file)."""
    directory.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24).encode()
    private_pem, public_pem = signing.generate_key_pair(password)
    private, public = directory / "cosign.key", directory / "cosign.pub"
    password_file = directory / "cosign.pw"
    for path, data in ((private, private_pem), (password_file, password + b"\n")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    public.write_bytes(public_pem)
    return private, public, password_file


def protect_command(source: Path, source_tag: str, destination: Path, reference: str, *, key: str,
                    kbs: str, token_file: Path, sign_key: Path | None,
                    password_file: Path | None) -> list[str]:
    """``coffer image protect`` (or ``encrypt`` when ``sign_key`` is None) from an OCI layout."""
    if sign_key is None:
        return ["image", "encrypt", f"oci:{source}:{source_tag}", f"oci:{destination}:{reference}",
                "--key", key, "--kbs", kbs, "--admin-token-file", str(token_file), "--json", "-q"]
    assert password_file is not None
    return ["image", "protect", f"oci:{source}:{source_tag}", f"oci:{destination}:{reference}",
            "--key", key, "--kbs", kbs, "--admin-token-file", str(token_file),
            "--sign-key", str(sign_key), "--key-password-file", str(password_file),
            "--identity", reference, "--json", "-q"]


def run_policy(app_name: str, reference: str, layout: Path, *, public_key: bytes | None,
               allow_exec: tuple[tuple[str, ...], ...] = (),
               command: list[str] | None = None) -> WorkloadPolicy:
    """The ``coffer run`` policy for ``reference`` in ``layout`` (pinned by digest), requiring the
    cosign signature of ``public_key`` when given."""
    workload = generate_for_run(name=app_name, image=reference, image_resolver=OciLayoutResolver(layout),
                                allow_exec=allow_exec, command=command)
    policy = workload.policy
    if public_key is not None:
        requirement = SignatureRequirement(keys=(public_key.decode(),))
        signed = tuple(replace(c, signature=requirement) for c in policy.containers)
        policy = replace(policy, containers=signed)
    return policy


def policy_initdata(policy: WorkloadPolicy, kbs: str | None = None) -> bytes:
    """The initdata ``coffer run --policy [--kbs URL]`` launches with for this policy."""
    return build_initdata(compile_policy(policy), aa_toml=aa_toml_for_kbs(kbs) if kbs else None)


def tamper_layer(layout: Path, reference: str) -> str:
    """Flip one byte in the middle of the largest layer blob of ``reference`` in ``layout``; the
    layer's digest."""
    oci = OciLayout.open(layout)
    entries = [e for e in oci.read_index().manifests if e.annotations.get(REF_NAME) == reference]
    if not entries:
        raise UsageError(f"{layout} has no image named {reference}")
    manifest = oci.read_manifest(entries[0])
    layer = max(manifest.layers, key=lambda d: d.size)
    blob = oci.blob_path(layer.digest)
    blob.chmod(0o644)
    with blob.open("r+b") as handle:
        handle.seek(layer.size // 2)
        byte = handle.read(1)
        handle.seek(layer.size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    return layer.digest


def swapped_initdata(work: Path, replacement_initdata: bytes) -> Path:
    """A file holding ``replacement_initdata``, for :meth:`DevTrust.env` ``swap_initdata``: the agent
    wrapper copies it over the sandbox's initdata after the host measured the original into PCR 8."""
    path = work / f"swapped-initdata-{secrets.token_hex(4)}.toml"
    path.write_bytes(replacement_initdata)
    return path


def sandbox_names(env: dict[str, str]) -> list[str]:
    listed = json.loads(run_coffer(["ps", "-a", "--json"], env=env, timeout=30).stdout)
    return [str(row["name"]) for row in listed]


# --------------------------------------------------------------------------------------------------
# The demo


class _Steps:
    def __init__(self, report: DemoReport, progress: Progress) -> None:
        self.report = report
        self.progress = progress

    @contextlib.contextmanager
    def step(self, number: int, title: str) -> Iterator[StepResult]:
        result = StepResult(number=number, title=title, ok=False, seconds=0.0)
        self.report.steps.append(result)
        started = time.monotonic()
        try:
            yield result
        except BaseException as exc:
            result.seconds = time.monotonic() - started
            result.detail = result.detail or str(exc)
            self.progress(f"[{number}/{STEPS}] {title} ... FAILED {result.seconds:.1f} s: {exc}")
            raise
        result.seconds = time.monotonic() - started
        result.ok = True
        self.progress(f"[{number}/{STEPS}] {title} ... done {result.seconds:.1f} s"
                      + (f"  ({result.detail})" if result.detail else ""))

    def line(self, number: int, text: str) -> None:
        self.progress(f"[{number}/{STEPS}]   {text}")


def preflight() -> None:
    """Refuse early, with what to install, when this machine cannot run the demo."""
    if os.geteuid() != 0:
        raise UnsupportedError("the quickstart needs root: sandboxes use namespaces, mounts and runc")
    missing = [tool for tool in ("unshare", "runc", "swtpm", "swtpm_setup", "tpm2_pcrextend", "tpm2_quote",
                                 "apt-get", "dpkg-deb") if shutil.which(tool) is None
               and not (tool == "runc" and Path(RUNC).exists())]
    if missing:
        raise UnsupportedError(f"the quickstart needs {', '.join(missing)} (apt-get install util-linux runc "
                               "swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0)")


def run_quickstart(work_dir: Path, *, progress: Progress = lambda line: None, keep: bool = False,
                   cache: Path | None = None, apps: tuple[str, ...] = APPS) -> DemoReport:
    """Run the demo (see the module docstring) with its files under ``work_dir``. Never raises for a
    failed step: the report says which step failed and why; everything started is stopped.
    Raises :class:`~coffer.errors.UnsupportedError` before starting when this machine lacks root or
    the tools (:func:`preflight`)."""
    preflight()
    started = time.monotonic()
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="cof-"))
    report = _demo_report(work_dir, state_dir)
    steps = _Steps(report, progress)
    trust: DevTrust | None = None
    env = child_env({"COFFER_STATE_DIR": str(state_dir)})
    try:
        trust = _demo(work_dir, state_dir, steps, cache=cache, apps=apps)
        report.ok = True
    except (CofferError, OSError, subprocess.SubprocessError, ValueError) as exc:
        report.error = str(exc)
    finally:
        _cleanup(report, steps, env, trust, keep=keep and report.ok)
        report.seconds = time.monotonic() - started
    return report


def _demo_report(work_dir: Path, state_dir: Path) -> DemoReport:
    return DemoReport(work_dir=work_dir, state_dir=state_dir)


def _demo(work: Path, state: Path, steps: _Steps, *, cache: Path | None,
          apps: tuple[str, ...]) -> DevTrust:
    report = steps.report
    for app in apps:
        report.apps[app] = AppResult(app=app, image=image_reference(app))

    with steps.step(1, "building the sample images (Debian packages, cached)") as result:
        built = {}
        for app in apps:
            t0 = time.monotonic()
            built[app] = images.build_image_detailed(app, work / "images", cache=cache)
            how = "cached" if built[app].cached else "built"
            steps.line(1, f"{app}: {how} {time.monotonic() - t0:.1f} s")
        result.detail = ", ".join(apps)

    with steps.step(2, "starting the KBS and trusting the sandbox TPM") as result:
        trust = setup_dev_trust(work, state)
        steps.line(2, f"KBS {trust.kbs.url}")
        report.kbs_url = trust.kbs.url
        result.detail = (f"{trust.kbs.url}; AK enrolled by credential activation, "
                         f"{len(trust.tpm.pcrs)} PCRs registered, resource policy: default")
    try:
        _after_trust(work, steps, trust, built, apps)
    except BaseException:
        trust.stop()
        raise
    return trust


def _after_trust(work: Path, steps: _Steps, trust: DevTrust, built: dict[str, images.BuildResult],
                 apps: tuple[str, ...]) -> None:
    report = steps.report
    kbs = trust.kbs
    env = trust.env()
    protected = work / "protected"
    sign_key, public_key, password_file = write_signing_key(work / "keys")

    with steps.step(3, "protecting the images (encrypt with KBS keys + cosign signature)") as result:
        shutil.rmtree(protected, ignore_errors=True)
        running = {}
        for app in apps:
            args = protect_command(built[app].layout, built[app].tag, protected / app, image_reference(app),
                                   key=key_uri(app), kbs=kbs.url, token_file=kbs.token_file,
                                   sign_key=sign_key, password_file=password_file)
            running[app] = (time.monotonic(), subprocess.Popen(  # noqa: S603 - fixed argument list
                [*coffer_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=env))
        for app, (t0, process) in running.items():
            out, err = process.communicate(timeout=RUN_TIMEOUT)
            if process.returncode != 0:
                raise QuickstartError(f"coffer image protect {app} exited {process.returncode}: "
                                      f"{err.strip()[-1500:]}")
            digest = json.loads(out)["reference_values"]["manifest_digest"]
            report.apps[app].manifest_digest = digest
            steps.line(3, f"{app}: {image_reference(app)}@{digest[:19]}… key {key_uri(app)} "
                          f"({time.monotonic() - t0:.1f} s)")
        result.detail = f"signing key {public_key}"

    policies: dict[str, Path] = {}
    pinned: dict[str, str] = {}
    public_pem = public_key.read_bytes()
    with steps.step(4, "generating the workload policies (image pinned, signature required, exec denied)"):
        for app in apps:
            policy = run_policy(f"{SANDBOX_PREFIX}{app}", image_reference(app), protected / app,
                                public_key=public_pem)
            path = work / "policies" / f"{app}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(dump_policy(policy))
            policies[app] = path
            pinned[app] = policy.containers[0].image

    with steps.step(5, "running the protected images (coffer run -d)") as result:
        for app in apps:
            t0 = time.monotonic()
            port = free_port()
            name = f"{SANDBOX_PREFIX}{app}"
            done = run_coffer(["run", "-d", "--name", name, "-p", f"{port}:{images.APPS[app].port}",
                               "--kbs", kbs.url, "--image-layouts", str(protected), "--policy",
                               str(policies[app]), pinned[app]], env=env)
            report.apps[app].host_port = port
            report.apps[app].sandbox = done.stdout.strip()
            steps.line(5, f"{name}: 127.0.0.1:{port} -> {images.APPS[app].port} "
                          f"({time.monotonic() - t0:.1f} s)")
        result.detail = "tee tpm (per-sandbox swtpm), development sandboxes"

    with steps.step(6, "checking each app with a real client"):
        for app in apps:
            report.apps[app].check = check_app(app, report.apps[app].host_port)
            steps.line(6, f"{app}: {report.apps[app].check}")

    first = apps[0]
    with steps.step(7, f"exec into {first}: must be blocked by the policy") as result:
        done = run_coffer(["exec", f"{SANDBOX_PREFIX}{first}", "--", "/bin/sh", "-c", "id"], env=env,
                          check=False, timeout=60)
        if done.returncode != 1 or "blocked by policy" not in done.stderr:
            raise QuickstartError(f"coffer exec was not blocked (exit {done.returncode}): "
                                  f"{done.stderr[-500:]}")
        report.refusals["exec"] = done.stderr.strip()
        result.detail = _short_reason(done.stderr)

    with steps.step(8, f"a tampered {first} image: must be refused") as result:
        tampered = work / "tampered"
        shutil.rmtree(tampered, ignore_errors=True)
        shutil.copytree(protected / first, tampered / first)
        layer = tamper_layer(tampered / first, image_reference(first))
        steps.line(8, f"flipped one byte of layer {layer[:19]}…")
        name = f"{SANDBOX_PREFIX}{first}-tampered"
        done = run_coffer(["run", "-d", "--name", name, "--kbs", kbs.url, "--image-layouts", str(tampered),
                           "--policy", str(policies[first]), pinned[first]], env=env, check=False)
        _expect_refused(done, name, env, "tampered image")
        report.refusals["tampered_image"] = done.stderr.strip()
        result.detail = _short_reason(done.stderr)

    with steps.step(9, "a changed policy (initdata replaced by the host after launch): must be refused") \
            as result:
        permissive = run_policy(f"{SANDBOX_PREFIX}{first}", image_reference(first), protected / first,
                                public_key=public_pem, allow_exec=(("/bin/sh",),))
        swapped_env = trust.env(swap_initdata=swapped_initdata(work, policy_initdata(permissive)))
        name = f"{SANDBOX_PREFIX}{first}-changed"
        done = run_coffer(["run", "-d", "--name", name, "--kbs", kbs.url, "--image-layouts", str(protected),
                           "--policy", str(policies[first]), pinned[first]], env=swapped_env, check=False)
        _expect_refused(done, name, env, "changed policy")
        report.refusals["changed_policy"] = done.stderr.strip()
        result.detail = _short_reason(done.stderr)

    with steps.step(10, "attestation claims") as result:
        report.claims = _claims(first, env, trust)
        for line in _claims_lines(report.claims):
            steps.line(10, line)
        result.detail = f"ear.status {report.claims.get('ear_status')}"


def _expect_refused(done: subprocess.CompletedProcess[str], name: str, env: dict[str, str],
                    what: str) -> None:
    if done.returncode == 0:
        raise QuickstartError(f"the {what} was not refused: coffer run succeeded")
    if name in sandbox_names(env):
        raise QuickstartError(f"the {what} left the sandbox {name} behind")


def _short_reason(stderr: str, limit: int = 160) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    interesting = [line for line in lines if any(word in line for word in (
        "blocked by policy", "digest", "refusing", "verification failed", "mismatch"))]
    text = (interesting or lines or [""])[-1]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _claims(app: str, env: dict[str, str], trust: DevTrust) -> dict[str, Any]:
    inspected = json.loads(run_coffer(["inspect", f"{SANDBOX_PREFIX}{app}", "--json"], env=env,
                                      timeout=60).stdout)
    guest = inspected.get("guest") or {}
    token = guest.get("claims") or {}
    cpu0 = (token.get("submods") or {}).get("cpu0") or {}
    evidence = cpu0.get("ear.veraison.annotated-evidence") or {}
    tpm = evidence.get("tpm") or {}
    releases = trust.kbs.audit(action="release")
    return {
        "sandbox": inspected.get("name"),
        "tee": guest.get("tee"),
        "development": inspected.get("development"),
        "initdata_digest": guest.get("initdata_digest"),
        "register": guest.get("register"),
        "event_log": [{"operation": e.get("operation"), "content": e.get("content")}
                      for e in guest.get("event_log") or []],
        "ear_status": cpu0.get("ear.status"),
        "trustworthiness": cpu0.get("ear.trustworthiness-vector"),
        "ak_trusted": tpm.get("ak_trusted"),
        "pcr8": ((tpm.get("pcrs") or {}).get("sha256") or {}).get("8"),
        "token_claims": token,
        "kbs_releases": [{"resource": e.get("subject"),
                          "ear_status": (e.get("claims") or {}).get("ear.status")} for e in releases],
    }


def _claims_lines(claims: dict[str, Any]) -> list[str]:
    lines = [f"sandbox {claims.get('sandbox')}: tee {claims.get('tee')} (development), "
             f"ear.status {claims.get('ear_status')}, AK trusted {claims.get('ak_trusted')}",
             f"initdata digest {claims.get('initdata_digest')}",
             f"PCR 8 (launch measurement of initdata) {claims.get('pcr8')}",
             f"trustworthiness {json.dumps(claims.get('trustworthiness'))}"]
    register = claims.get("register") or {}
    if register:
        lines.append(f"runtime register {register.get('kind')} {register.get('index')} = "
                     f"{register.get('value')}")
    for entry in claims.get("event_log") or []:
        content = entry.get("content") or {}
        summary = ", ".join(f"{k}={str(v)[:40]}" for k, v in content.items())
        lines.append(f"event {entry.get('operation')}: {summary}")
    for release in claims.get("kbs_releases") or []:
        lines.append(f"KBS released {release.get('resource')} (ear.status {release.get('ear_status')})")
    return lines


def _cleanup(report: DemoReport, steps: _Steps, env: dict[str, str], trust: DevTrust | None, *,
             keep: bool) -> None:
    with contextlib.suppress(BaseException), steps.step(11, "stopping and removing everything" if not keep
                                                        else "keeping the sandboxes running") as result:
        if keep:
            report.kept = True
            result.detail = f"COFFER_STATE_DIR={report.state_dir} coffer ps"
        else:
            names = sandbox_names(env) if (report.state_dir / "sandboxes").exists() else []
            if names:
                run_coffer(["rm", "-f", *names], env=env, timeout=120)
            result.detail = f"{len(names)} sandboxes removed"
        if trust is not None:
            trust.stop()
        if not keep:
            left = sandbox_names(env) if (report.state_dir / "sandboxes").exists() else []
            if left:
                raise QuickstartError(f"sandboxes left behind: {', '.join(left)}")
            shutil.rmtree(report.state_dir, ignore_errors=True)


def format_report(report: DemoReport) -> str:
    """The closing summary printed after the progress lines."""
    lines = []
    if report.ok:
        lines.append(f"quickstart finished in {report.seconds:.1f} s")
    else:
        lines.append(f"quickstart FAILED after {report.seconds:.1f} s: {report.error}")
    for app in report.apps.values():
        if app.check:
            lines.append(f"  {app.app:<10} {app.image}@{app.manifest_digest[:19]}…  {app.check}")
    for what, message in report.refusals.items():
        lines.append(f"  refused ({what}): {_short_reason(message)}")
    lines.append("  development sandboxes: the host kernel can read their memory (no memory confidentiality)")
    if report.kept:
        lines.append(f"  kept: work dir {report.work_dir}; "
                     f"sandboxes: COFFER_STATE_DIR={report.state_dir} coffer ps")
    return "\n".join(lines)


__all__ = ["APPS", "AppResult", "DemoReport", "QuickstartError", "StepResult", "check_app", "format_report",
           "http_check", "image_reference", "key_uri", "memcached_check", "policy_initdata", "preflight",
           "protect_command", "redis_check", "run_coffer", "run_policy", "run_quickstart", "sandbox_names",
           "swapped_initdata", "tamper_layer", "write_signing_key"]
