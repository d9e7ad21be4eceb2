"""Sample application images (NGINX, Redis, Memcached, a Python web app) built from Debian packages.

No registry and no container engine is involved: the packages of each application and the closure
of their ``Depends``/``Pre-Depends`` are downloaded with ``apt-get download`` (so apt checks them
against the signed archive indexes, and each file is checked again against the index's SHA256),
their file trees are read with ``dpkg-deb --fsys-tarfile`` (no maintainer script runs) and written
as three gzip layers of an OCI image layout:

1. **base** -- the C library and the common runtime libraries (the closure of :data:`BASE_ROOTS`),
   plus a minimal ``/etc`` (``passwd``/``group`` with the users the apps run as, ``nsswitch.conf``,
   ``hosts``) and the usual empty directories. It is the same layer, byte for byte, in every image;
2. **packages** -- the application's own packages (its closure minus the base's);
3. **config** -- the application's configuration (foreground, logs to stdout/stderr, listens on
   all addresses) and the directories it writes to.

Dependencies that only maintainer scripts or init systems use (:data:`SKIPPED_PACKAGES`: debconf,
adduser, perl, dpkg, ...) are left out, and so are documentation, manual pages and translations
(copyright files stay). The binaries themselves are Debian's, unmodified.

Layers are reproducible: entries sorted, modification times fixed, owner and mode taken from the
packages, gzip without name or time stamp; the same package versions give the same digests.

**Caching.** Downloaded packages live in ``CACHE/debs`` (named as apt names them, checked against
the archive's SHA256 before use), built layers in ``CACHE/layers`` and finished layouts in
``CACHE/images``, keyed by :data:`BUILDER_VERSION`, the package versions and hashes, and the image
definition. Resolving dependencies is cached too, keyed by the apt index files' size and time, so
a build whose result is cached touches neither apt nor the packages and returns in milliseconds.

**Ports.** Every image listens on all addresses on its application's usual port
(:attr:`AppSpec.port`: 80, 6379, 11211, 8000), meant for a container with its own network
namespace (the sandbox forwards published ports into it). To use another port in a shared network
namespace: Redis and Memcached take it as arguments (``--port N``, ``-p N`` after the image's
Cmd), the Python app from the ``PORT`` environment variable, and NGINX from a configuration
rendered by :func:`nginx_config` (``nginx -c FILE``), since NGINX reads no port from its command
line or environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final

from coffer.errors import CofferError, ConfigError, FormatError, TransportError, UsageError
from coffer.image import media
from coffer.image.layout import OciLayout, staged_layout
from coffer.image.models import Descriptor, Manifest, Platform, dump_json, sha256_digest
from coffer.image.transport import Progress, no_progress

#: Part of every cache key: bump when the way images are put together changes.
BUILDER_VERSION: Final = "coffer-quickstart-images/1"
APT_LISTS: Final = Path("/var/lib/apt/lists")
#: The fixed modification time of every layer entry (the Unix epoch; nothing in the images uses it).
EPOCH: Final = 0
GZIP_LEVEL: Final = 6
CHUNK: Final = 1024 * 1024
MAX_DEB_MEMBER: Final = 512 * 1024 * 1024
DEFAULT_PATH: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The base layer: the C library and the libraries most of the applications link against.
BASE_ROOTS: Final = ("libc6", "libgcc-s1", "libcrypt1", "libssl3", "zlib1g")

#: Dependencies only maintainer scripts, init systems or administrators use; never needed to run.
SKIPPED_PACKAGES: Final = frozenset(
    {
        "adduser", "cdebconf", "debconf", "debconf-2.0", "dpkg", "init-system-helpers", "install-info",
        "iproute2",
        "libcap2-bin", "lsb-base", "passwd", "perl", "perl-base", "procps", "sensible-utils",
        "systemd", "systemd-sysv", "sysvinit-utils", "ucf", "usrmerge",
    }
)

# Trees the images do without (as Debian's "slim" images do); copyright files stay.
_DROPPED_TREES: Final = ("usr/share/man/", "usr/share/info/", "usr/share/locale/", "usr/share/lintian/",
                         "usr/share/bug/")
_DOC_TREE: Final = "usr/share/doc/"

_APPS_DIR: Final = Path(__file__).resolve().parent / "apps"


# --------------------------------------------------------------------------------------------------
# Image definitions


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """A file or directory the builder adds to a layer (``content`` None means a directory)."""

    path: str
    content: bytes | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    def key(self) -> dict[str, Any]:
        digest = None if self.content is None else sha256_digest(self.content)
        return {"path": self.path, "sha256": digest, "mode": self.mode, "uid": self.uid, "gid": self.gid}


def _dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> FileEntry:
    return FileEntry(path=path, mode=mode, uid=uid, gid=gid)


def _file(path: str, text: str, mode: int = 0o644) -> FileEntry:
    return FileEntry(path=path, content=text.encode(), mode=mode)


@dataclass(frozen=True, kw_only=True)
class AppSpec:
    """One sample image: which packages, which configuration, how it starts."""

    name: str
    description: str
    roots: tuple[str, ...]
    port: int
    cmd: tuple[str, ...]
    user: str
    files: tuple[FileEntry, ...] = ()
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    working_dir: str = "/"
    stop_signal: str = "SIGTERM"

    def config_key(self) -> dict[str, Any]:
        return {
            "name": self.name, "roots": list(self.roots), "port": self.port, "cmd": list(self.cmd),
            "user": self.user, "env": list(self.env), "entrypoint": list(self.entrypoint),
            "working_dir": self.working_dir, "stop_signal": self.stop_signal,
            "files": [f.key() for f in self.files], "description": self.description,
        }


UID_WWW_DATA: Final = 33
UID_REDIS: Final = 101
UID_MEMCACHE: Final = 102
UID_NOBODY: Final = 65534

_PASSWD: Final = f"""root:x:0:0:root:/root:/usr/sbin/nologin
www-data:x:{UID_WWW_DATA}:{UID_WWW_DATA}:www-data:/var/www:/usr/sbin/nologin
redis:x:{UID_REDIS}:{UID_REDIS}:redis:/var/lib/redis:/usr/sbin/nologin
memcache:x:{UID_MEMCACHE}:{UID_MEMCACHE}:memcached:/nonexistent:/usr/sbin/nologin
nobody:x:{UID_NOBODY}:{UID_NOBODY}:nobody:/nonexistent:/usr/sbin/nologin
"""
_GROUP: Final = f"""root:x:0:
www-data:x:{UID_WWW_DATA}:
redis:x:{UID_REDIS}:
memcache:x:{UID_MEMCACHE}:
nogroup:x:{UID_NOBODY}:
"""
_NSSWITCH: Final = """passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
"""
_HOSTS: Final = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
"""

#: What the base layer adds to the packages' files.
BASE_FILES: Final = (
    _dir("dev"), _dir("proc", 0o555), _dir("sys", 0o555), _dir("etc"), _dir("root", 0o700),
    _dir("run"), _dir("tmp", 0o1777), _dir("var"), _dir("var/tmp", 0o1777),
    _file("etc/passwd", _PASSWD), _file("etc/group", _GROUP), _file("etc/nsswitch.conf", _NSSWITCH),
    _file("etc/hosts", _HOSTS),
)

_NGINX_CONF: Final = """# Coffer quickstart: NGINX in the foreground, logging to stdout/stderr.
user www-data;
worker_processes 1;
daemon off;
pid /run/nginx.pid;
error_log stderr notice;

events {
    worker_connections 256;
}

http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    client_body_temp_path /tmp/nginx-client-body;
    proxy_temp_path /tmp/nginx-proxy;
    fastcgi_temp_path /tmp/nginx-fastcgi;
    uwsgi_temp_path /tmp/nginx-uwsgi;
    scgi_temp_path /tmp/nginx-scgi;

    server {
        listen @PORT@ default_server;
        root /var/www/html;
        index index.html;
        location / {
            try_files $uri $uri/ =404;
        }
    }
}
"""

NGINX_INDEX: Final = """<!DOCTYPE html>
<html><head><title>Coffer quickstart</title></head>
<body><h1>Hello from NGINX in a Coffer sandbox</h1></body></html>
"""


def nginx_config(port: int = 80) -> str:
    """The image's ``nginx.conf`` listening on ``port`` (the image carries it for port 80)."""
    if not 0 < port < 65536:
        raise UsageError(f"port {port} out of range")
    return _NGINX_CONF.replace("@PORT@", str(port))


_REDIS_CONF: Final = """# Coffer quickstart: Redis in the foreground, logging to stdout, on every address.
bind 0.0.0.0
protected-mode no
port 6379
daemonize no
supervised no
logfile ""
dir /var/lib/redis
save ""
appendonly no
"""

APPS: Final[Mapping[str, AppSpec]] = {
    "nginx": AppSpec(
        name="nginx",
        description="NGINX web server (Debian package nginx)",
        roots=("nginx",),
        port=80,
        cmd=("/usr/sbin/nginx", "-e", "stderr", "-c", "/etc/nginx/nginx.conf"),
        user="0:0",  # the master binds port 80, its workers run as www-data
        stop_signal="SIGQUIT",
        files=(
            _file("etc/nginx/nginx.conf", nginx_config(80)),
            _dir("var/log/nginx"), _dir("var/lib/nginx"), _dir("var/www"), _dir("var/www/html"),
            _file("var/www/html/index.html", NGINX_INDEX),
        ),
    ),
    "redis": AppSpec(
        name="redis",
        description="Redis key-value store (Debian package redis-server)",
        roots=("redis-server",),
        port=6379,
        cmd=("/usr/bin/redis-server", "/etc/redis/redis.conf"),
        user=f"{UID_REDIS}:{UID_REDIS}",
        files=(
            _dir("etc/redis"), _file("etc/redis/redis.conf", _REDIS_CONF),
            _dir("var/lib/redis", 0o750, UID_REDIS, UID_REDIS),
        ),
    ),
    "memcached": AppSpec(
        name="memcached",
        description="Memcached (Debian package memcached)",
        roots=("memcached",),
        port=11211,
        # All addresses of the container's own network namespace; UDP off (amplification attacks).
        cmd=("/usr/bin/memcached", "-l", "0.0.0.0", "-p", "11211", "-U", "0", "-m", "64", "-c", "1024"),  # noqa: S104
        user=f"{UID_MEMCACHE}:{UID_MEMCACHE}",
    ),
    "python": AppSpec(
        name="python",
        description="A small Python web app on Debian's python3.11 (standard library only)",
        roots=("python3-minimal", "libpython3.11-stdlib"),
        port=8000,
        cmd=("/usr/bin/python3", "/app/server.py"),
        user=f"{UID_NOBODY}:{UID_NOBODY}",
        env=("PORT=8000", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"),
        working_dir="/app",
        files=(_dir("app"), FileEntry(path="app/server.py",
                                      content=(_APPS_DIR / "webapp.py").read_bytes(), mode=0o644)),
    ),
}


def app_names() -> tuple[str, ...]:
    return tuple(APPS)


def default_cache() -> Path:
    """``$COFFER_CACHE``, else ``~/.cache/coffer``."""
    configured = os.environ.get("COFFER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "coffer"


# --------------------------------------------------------------------------------------------------
# apt: resolving and downloading


@dataclass(frozen=True, kw_only=True, order=True)
class Package:
    """One Debian package at the version the build uses."""

    name: str
    version: str
    architecture: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        """The name ``apt-get download`` gives the file (an epoch's colon is written ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "architecture": self.architecture,
                "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_obj(cls, obj: Any) -> Package:
        if not isinstance(obj, dict):
            raise FormatError("package record", "not an object")
        try:
            pkg = cls(name=str(obj["name"]), version=str(obj["version"]),
                      architecture=str(obj["architecture"]), sha256=str(obj["sha256"]), size=int(obj["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError("package record", f"missing or bad field: {exc}") from exc
        _check_package_fields(pkg)
        return pkg


def _check_package_fields(pkg: Package) -> None:
    # The fields end up in file names: refuse anything a path could be made of.
    for value in (pkg.name, pkg.version, pkg.architecture):
        if not value or "/" in value or value.startswith(".") or "\x00" in value:
            raise FormatError("package record", f"unusable name or version {value[:80]!r}")
    if len(pkg.sha256) != 64 or any(c not in "0123456789abcdef" for c in pkg.sha256):
        raise FormatError("package record", f"{pkg.name}: malformed SHA256")


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """The packages of one image: the base layer's and the application's own."""

    base: tuple[Package, ...]
    app: tuple[Package, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"base": [p.to_obj() for p in self.base], "app": [p.to_obj() for p in self.app]}

    @classmethod
    def from_obj(cls, obj: Any) -> Resolution:
        if not isinstance(obj, dict) or not isinstance(obj.get("base"), list) or not isinstance(
            obj.get("app"), list
        ):
            raise FormatError("package resolution", "not an object with base and app lists")
        return cls(base=tuple(Package.from_obj(p) for p in obj["base"]),
                   app=tuple(Package.from_obj(p) for p in obj["app"]))


def _run(args: Sequence[str], what: str, *, cwd: Path | None = None, timeout: float = 600) -> str:
    env = dict(os.environ, LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(list(args), cwd=cwd,  # noqa: S603 - fixed programs, no shell
                              env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: {args[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise TransportError(f"{what}: {args[0]} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise TransportError(f"{what}: {args[0]} failed ({done.returncode}): {' | '.join(tail)}")
    return done.stdout


def parse_apt_depends(text: str) -> dict[str, list[list[str]]]:
    """``apt-cache depends`` output -> package -> list of alternative groups of candidate names.

    A virtual package (``<name>``) is replaced by the real packages that provide it, listed below
    it; ``|Depends`` lines join the next line's group.
    """
    graph: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    group: list[str] = []
    continuing = False
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if not raw.startswith(" "):
            name = raw.strip()
            current = None if name.startswith("<") else graph.setdefault(name, [])
            continuing = False
            continue
        if current is None:
            continue
        stripped = raw.strip()
        if raw.startswith("    ") and not stripped.startswith(("|", "Depends:", "PreDepends:")):
            # A provider of the virtual package on the line above.
            if current and not stripped.startswith("<"):
                current[-1].append(stripped)
            continue
        alt = stripped.startswith("|")
        kind, _, target = stripped.lstrip("|").partition(":")
        if kind not in ("Depends", "PreDepends"):
            continuing = False
            continue
        target = target.strip()
        if not continuing:
            group = []
            current.append(group)
        if not target.startswith("<"):
            group.append(target)
        continuing = alt
    return graph


def closure(graph: Mapping[str, list[list[str]]], roots: Sequence[str],
            skipped: frozenset[str] = SKIPPED_PACKAGES) -> list[str]:
    """The packages ``roots`` need, leaving out ``skipped`` (and what only they would pull in).

    For each group of alternatives the first one already chosen wins, else the first real package
    that is not skipped; a group with only skipped choices is dropped.
    """
    chosen: list[str] = []
    seen: set[str] = set()
    queue = list(roots)
    for root in roots:
        if root not in graph:
            raise ConfigError(f"Debian package {root!r} is not known to apt (run apt-get update?)")
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        chosen.append(name)
        for group in graph.get(name, []):
            options = [p for p in group if p not in skipped and p in graph]
            if not options or any(p in seen or p in queue for p in options):
                continue
            queue.append(options[0])
    return sorted(chosen)


def parse_apt_show(text: str) -> dict[str, Package]:
    """``apt-cache show --no-all-versions`` output -> package name -> its candidate :class:`Package`."""
    found: dict[str, Package] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" not in fields:
            continue
        try:
            pkg = Package(name=fields["Package"], version=fields["Version"],
                          architecture=fields["Architecture"], sha256=fields["SHA256"].lower(),
                          size=int(fields["Size"]))
        except (KeyError, ValueError) as exc:
            raise FormatError("apt-cache show output", f"package {fields['Package']!r}: {exc}") from exc
        _check_package_fields(pkg)
        found.setdefault(pkg.name, pkg)
    return found


def resolve(spec: AppSpec) -> Resolution:
    """Ask apt for the packages (and their candidate versions) of ``spec``'s image."""
    depends = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                    "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                    *BASE_ROOTS, *spec.roots], "resolving dependencies")
    graph = parse_apt_depends(depends)
    base = closure(graph, BASE_ROOTS)
    app = [name for name in closure(graph, spec.roots) if name not in set(base)]
    shown = parse_apt_show(_run(["apt-cache", "show", "--no-all-versions", *base, *app],
                                "reading package versions"))
    missing = [name for name in (*base, *app) if name not in shown]
    if missing:
        raise ConfigError(f"apt has no installable version of {', '.join(missing)}")
    return Resolution(base=tuple(shown[n] for n in base), app=tuple(shown[n] for n in app))


def _apt_fingerprint() -> str:
    """Size and time of apt's index files: they decide every candidate version."""
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(APT_LISTS.iterdir()):
            if "Packages" in path.name or "Release" in path.name:
                st = path.stat()
                entries.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    if not entries:
        raise ConfigError(f"apt has no package indexes in {APT_LISTS} (run apt-get update)")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so parallel builds (pytest-xdist workers) share one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fetch_debs(packages: Sequence[Package], debs: Path, progress: Progress = no_progress) -> dict[str, Path]:
    """Make sure each package's ``.deb`` is in ``debs`` (downloading what is missing) and checked.

    A cached file whose SHA256 differs from the archive's is removed and downloaded again.
    """
    debs.mkdir(parents=True, exist_ok=True)
    paths = {p.name: debs / p.filename for p in packages}
    with _locked(debs / ".lock"):
        missing = []
        for pkg in packages:
            path = paths[pkg.name]
            if path.exists():
                if path.stat().st_size == pkg.size and _file_sha256(path) == pkg.sha256:
                    continue
                path.unlink()
            missing.append(pkg)
        if missing:
            progress(f"downloading {len(missing)} Debian packages", 0, len(missing))
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=debs))
            try:
                options = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
                _run(["apt-get", "download", "-q", *options,
                      *(f"{p.name}={p.version}" for p in missing)], "downloading packages", cwd=staging)
                for n, pkg in enumerate(missing):
                    got = staging / pkg.filename
                    if not got.exists():
                        raise TransportError(f"apt-get download produced no {pkg.filename}")
                    actual = _file_sha256(got)
                    if got.stat().st_size != pkg.size or actual != pkg.sha256:
                        raise TransportError(f"{pkg.filename}: SHA256 {actual} is not the archive's")
                    os.replace(got, paths[pkg.name])
                    progress(f"downloading {len(missing)} Debian packages", n + 1, len(missing))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------------------------------
# Layers


@dataclass
class _Entry:
    info: tarfile.TarInfo
    data: bytes = b""


@dataclass(frozen=True, kw_only=True)
class LayerBlob:
    """A built layer in the cache: its gzip blob and the digest of its uncompressed tar."""

    path: Path
    digest: str
    size: int
    diff_id: str
    comment: str = ""

    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=media.OCI_LAYER_GZIP, digest=self.digest, size=self.size)


def _keep(name: str) -> bool:
    if name.startswith(_DROPPED_TREES):
        return False
    if name.startswith(_DOC_TREE) and name.count("/") >= 3:
        return name.endswith("/copyright")
    return True


def _normal_name(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError("Debian package", f"entry {name[:200]!r} has a '..' component")
    return "/".join(parts)


def _read_deb(path: Path, entries: dict[str, _Entry]) -> None:
    """Add the file tree of one ``.deb`` to ``entries`` (its data archive, read by dpkg-deb)."""
    what = f"Debian package {path.name}"
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(path)],  # noqa: S603, S607 - no shell
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                for member in archive:
                    name = _normal_name(member.name)
                    if not name or (not member.isdir() and not _keep(name)):
                        continue
                    info = tarfile.TarInfo(name)
                    info.mode, info.uid, info.gid = member.mode & 0o7777, member.uid, member.gid
                    data = b""
                    if member.islnk():
                        # A hard link becomes a copy: sorting may put a link before its target.
                        target = entries.get(_normal_name(member.linkname))
                        if target is None or not target.info.isreg():
                            raise FormatError(what, f"hard link {name!r} to a missing file")
                        info.type, data = tarfile.REGTYPE, target.data
                    elif member.issym():
                        info.type, info.linkname = tarfile.SYMTYPE, member.linkname
                    elif member.isdir():
                        info.type = tarfile.DIRTYPE
                    elif member.isreg():
                        if member.size > MAX_DEB_MEMBER:
                            raise FormatError(what, f"{name!r} is {member.size} bytes")
                        source = archive.extractfile(member)
                        data = source.read() if source is not None else b""
                    else:
                        raise FormatError(what, f"{name!r} is neither file, directory nor link")
                    info.size = len(data)
                    if info.isdir() and name in entries:
                        continue
                    entries[name] = _Entry(info, data)
            proc.stdout.read()  # the end-of-archive padding, so that dpkg-deb can finish
        except (tarfile.TarError, EOFError) as exc:
            proc.kill()
            raise FormatError(what, f"unreadable data archive: {exc}") from exc
        except BaseException:
            proc.kill()
            raise
        finally:
            stderr = proc.stderr.read() if proc.stderr is not None else b""
        if proc.wait() != 0:
            raise FormatError(what, f"dpkg-deb failed: {stderr.decode(errors='replace').strip()[-300:]}")


def _add_files(entries: dict[str, _Entry], files: Sequence[FileEntry]) -> None:
    for item in files:
        name = _normal_name(item.path)
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in entries:
                directory = tarfile.TarInfo(parent)
                directory.type, directory.mode = tarfile.DIRTYPE, 0o755
                entries[parent] = _Entry(directory)
        info = tarfile.TarInfo(name)
        info.mode, info.uid, info.gid = item.mode, item.uid, item.gid
        if item.content is None:
            info.type = tarfile.DIRTYPE
            entries[name] = _Entry(info)
        else:
            info.size = len(item.content)
            entries[name] = _Entry(info, item.content)


class _HashingWriter(io.RawIOBase):
    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hasher = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.inner.write(view)
        self.size += len(view)
        return len(view)


def write_layer(entries: Mapping[str, _Entry], destination: Path) -> tuple[str, int, str]:
    """Write ``entries`` as a reproducible gzip tar at ``destination``: (digest, size, diff_id)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)
            with gzip.GzipFile(filename="", fileobj=compressed, mode="wb", compresslevel=GZIP_LEVEL,
                               mtime=0) as zipped:
                plain = _HashingWriter(zipped)  # type: ignore[arg-type]
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                    for name in sorted(entries):
                        entry = entries[name]
                        info = entry.info
                        info.mtime = EPOCH
                        info.uname = info.gname = ""
                        archive.addfile(info, io.BytesIO(entry.data) if info.isreg() else None)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return ("sha256:" + compressed.hasher.hexdigest(), compressed.size,
            "sha256:" + plain.hasher.hexdigest())


def _key(obj: Any) -> str:
    return hashlib.sha256(dump_json({"builder": BUILDER_VERSION, **obj})).hexdigest()


def build_layer(kind: str, packages: Sequence[Package], files: Sequence[FileEntry], *, cache: Path,
                progress: Progress = no_progress) -> LayerBlob:
    """The layer of ``packages`` and ``files``, from the cache or built (and cached)."""
    key = _key({"kind": kind, "packages": [p.to_obj() for p in packages],
                "files": [f.key() for f in files]})
    layers = cache / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    blob, meta = layers / f"{key}.tar.gz", layers / f"{key}.json"
    comment = f"{kind}: " + (" ".join(f"{p.name}={p.version}" for p in packages) or "configuration")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        # A missing or unreadable record just means building the layer again.
        info = json.loads(meta.read_text())
        # Checked in full: a damaged cache entry must be rebuilt, not copied into an image.
        if blob.stat().st_size == info["size"] and "sha256:" + _file_sha256(blob) == info["digest"]:
            return LayerBlob(path=blob, digest=str(info["digest"]), size=int(info["size"]),
                             diff_id=str(info["diff_id"]), comment=comment)
    debs = fetch_debs(packages, cache / "debs", progress) if packages else {}
    entries: dict[str, _Entry] = {}
    for n, pkg in enumerate(sorted(packages)):
        progress(f"unpacking {kind} packages", n, len(packages))
        _read_deb(debs[pkg.name], entries)
    _add_files(entries, files)
    progress(f"writing {kind} layer ({len(entries)} entries)", 0, None)
    digest, size, diff_id = write_layer(entries, blob)
    meta_tmp = meta.with_suffix(".tmp")
    meta_tmp.write_text(json.dumps({"digest": digest, "size": size, "diff_id": diff_id}))
    os.replace(meta_tmp, meta)
    return LayerBlob(path=blob, digest=digest, size=size, diff_id=diff_id, comment=comment)


# --------------------------------------------------------------------------------------------------
# Images


_OCI_ARCH: Final = {"amd64": "amd64", "arm64": "arm64", "i386": "386", "armhf": "arm", "ppc64el": "ppc64le",
                    "s390x": "s390x", "riscv64": "riscv64"}


def _platform() -> Platform:
    arch = _run(["dpkg", "--print-architecture"], "reading the architecture").strip()
    if arch not in _OCI_ARCH:
        raise UsageError(f"no OCI name for the Debian architecture {arch!r}")
    return Platform(architecture=_OCI_ARCH[arch], os="linux", variant="v7" if arch == "armhf" else None)


def image_config(spec: AppSpec, layers: Sequence[LayerBlob], platform: Platform,
                 packages: Sequence[Package]) -> bytes:
    """The OCI image config document of ``spec`` over ``layers``."""
    run: dict[str, Any] = {
        "User": spec.user,
        "ExposedPorts": {f"{spec.port}/tcp": {}},
        "Env": [DEFAULT_PATH, *spec.env],
        "Cmd": list(spec.cmd),
        "WorkingDir": spec.working_dir,
        "StopSignal": spec.stop_signal,
        "Labels": {
            "org.opencontainers.image.title": f"coffer-quickstart-{spec.name}",
            "org.opencontainers.image.description": spec.description,
            "org.opencontainers.image.base.name": "debian:bookworm (packages)",
            "dev.coffer.quickstart.app": spec.name,
            "dev.coffer.quickstart.port": str(spec.port),
            "dev.coffer.quickstart.packages": " ".join(f"{p.name}={p.version}" for p in packages),
        },
    }
    if spec.entrypoint:
        run["Entrypoint"] = list(spec.entrypoint)
    doc: dict[str, Any] = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": platform.architecture,
        "os": platform.os,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": BUILDER_VERSION,
                     "comment": layer.comment[:2000]} for layer in layers],
    }
    if platform.variant:
        doc["variant"] = platform.variant
    return dump_json(doc)


def _write_layout(root: Path, spec: AppSpec, layers: Sequence[LayerBlob], config: bytes,
                  platform: Platform) -> str:
    """Write a new layout at ``root`` (appearing only when complete); returns the manifest digest."""
    with staged_layout(root) as layout:
        for layer in layers:
            with layer.path.open("rb") as handle:
                layout.write_blob(iter(lambda: handle.read(CHUNK), b""), media.OCI_LAYER_GZIP,
                                  expected=layer.descriptor())
        config_desc = layout.write_bytes(config, media.OCI_CONFIG)
        manifest = Manifest(media_type=media.OCI_MANIFEST, config=config_desc,
                            layers=tuple(layer.descriptor() for layer in layers),
                            annotations={"org.opencontainers.image.title": f"coffer-quickstart-{spec.name}",
                                         "org.opencontainers.image.ref.name": spec.name})
        entry = layout.write_manifest(manifest)
        layout.set_ref(replace(entry, platform=platform), spec.name)
    return entry.digest


def _copy_layout(source: Path, tag: str, destination: Path) -> None:
    """Copy the image ``tag`` of the layout at ``source`` into a new layout at ``destination``.

    Copies, not hard links: a caller that tampers with its copy (negative tests do) must not
    change the cache. Every blob is digest-checked on the way.
    """
    src = OciLayout.open(source)
    entry = src.resolve(tag)
    manifest = src.read_manifest(entry)
    with staged_layout(destination) as layout:
        for desc in (*manifest.layers, manifest.config):
            layout.write_blob(src.iter_blob(desc), desc.media_type, expected=desc)
        layout.write_blob(src.iter_blob(entry), entry.media_type, expected=entry)
        layout.set_ref(entry, tag)


def _tagged_digest(root: Path, tag: str) -> str | None:
    try:
        return OciLayout.open(root).resolve(tag).digest
    except CofferError:
        return None


def _replace_dir(staged: Path, destination: Path) -> None:
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(destination, old)
    os.rename(staged, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    """What :func:`build_image_detailed` did."""

    layout: Path
    tag: str
    manifest_digest: str
    cached: bool
    seconds: float
    layers: tuple[LayerBlob, ...] = field(default=())


def _resolution(spec: AppSpec, cache: Path, progress: Progress) -> Resolution:
    fingerprint = _apt_fingerprint()
    key = _key({"app": spec.config_key(), "apt": fingerprint, "base_roots": list(BASE_ROOTS),
                "skipped": sorted(SKIPPED_PACKAGES)})
    path = cache / "resolved" / f"{spec.name}-{key}.json"
    if path.exists():
        with contextlib.suppress(CofferError, ValueError, OSError):
            return Resolution.from_obj(json.loads(path.read_text()))
    progress(f"{spec.name}: resolving Debian packages", 0, None)
    resolution = resolve(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(resolution.to_obj()))
    os.replace(tmp, path)
    return resolution


def build_image_detailed(app: str, dest_root: Path, *, cache: Path | None = None,
                         progress: Progress = no_progress) -> BuildResult:
    """Like :func:`build_image`, and says whether the cache served it and how long it took."""
    started = time.monotonic()
    spec = APPS.get(app)
    if spec is None:
        raise UsageError(f"unknown sample app {app!r}; choose one of {', '.join(APPS)}")
    cache = default_cache() if cache is None else cache
    destination = dest_root / app
    resolution = _resolution(spec, cache, progress)
    image_key = _key({"app": spec.config_key(), "packages": resolution.to_obj(), "base": [
        f.key() for f in BASE_FILES]})
    cached_layout = cache / "images" / image_key
    cached = True
    layers: tuple[LayerBlob, ...] = ()
    expected = _tagged_digest(cached_layout, app)
    if expected is None:
        cached = False
        with _locked(cache / ".build.lock"):
            expected = _tagged_digest(cached_layout, app)
            if expected is None:
                layers = (
                    build_layer("base", resolution.base, BASE_FILES, cache=cache, progress=progress),
                    build_layer(f"{app} packages", resolution.app, (), cache=cache, progress=progress),
                    build_layer(f"{app} configuration", (), spec.files, cache=cache, progress=progress),
                )
                platform = _platform()
                config = image_config(spec, layers, platform, (*resolution.base, *resolution.app))
                if cached_layout.exists():
                    shutil.rmtree(cached_layout)  # an unusable leftover: no index entry for app
                expected = _write_layout(cached_layout, spec, layers, config, platform)
    if _tagged_digest(destination, app) != expected:
        progress(f"{app}: writing {destination}", 0, None)
        dest_root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{app}.", dir=dest_root))
        try:
            target = staged / "layout"
            _copy_layout(cached_layout, app, target)
            _replace_dir(target, destination)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return BuildResult(layout=destination, tag=app, manifest_digest=expected, cached=cached,
                       seconds=time.monotonic() - started, layers=layers)


def build_image(app: str, dest_root: Path, *, cache: Path | None = None,
                progress: Progress = no_progress) -> Path:
    """Build (or take from the cache) the sample image ``app`` as the OCI layout ``dest_root/app``.

    The image is tagged ``app`` in that layout (``oci:DEST_ROOT/APP:APP``). ``cache`` defaults to
    :func:`default_cache`. Raises :class:`~coffer.errors.ConfigError` when apt knows no such
    package (no indexes: run ``apt-get update``) and :class:`~coffer.errors.TransportError` when a
    download fails.
    """
    return build_image_detailed(app, dest_root, cache=cache, progress=progress).layout


def build_all(dest_root: Path, *, cache: Path | None = None,
              progress: Progress = no_progress) -> dict[str, Path]:
    """Every sample image, by app name."""
    return {app: build_image(app, dest_root, cache=cache, progress=progress) for app in APPS}


# --------------------------------------------------------------------------------------------------
# Clients that check an app answers


def exchange(address: tuple[str, int], request: bytes, timeout: float, enough: bytes, *,
             min_wait: float = 0.1) -> bytes:
    """Send ``request`` to ``address`` and read until the reply holds ``enough`` (or the peer closes),
    retrying refused connections until ``timeout`` (the application may still be starting); each
    connection waits at least ``min_wait`` seconds. TransportError when nothing answered."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            wait = max(min_wait, deadline - time.monotonic())
            with socket.create_connection(address, timeout=wait) as sock:
                sock.sendall(request)
                reply = b""
                while enough not in reply and len(reply) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                if reply:
                    return reply
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TransportError(f"no answer from {address[0]}:{address[1]} within {timeout:.1f} s: {last}")


def probe(app: str, host: str, port: int, *, timeout: float = 10.0) -> str:
    """Check that the sample ``app`` answers at ``host:port`` with its own protocol; the answer line.

    HTTP GET for nginx and python (status 200), ``PING`` for Redis (``+PONG``), ``version`` for
    Memcached (``VERSION ...``). Retries connection errors until ``timeout``.
    """
    address = (host, port)
    if app in ("nginx", "python"):
        reply = exchange(address, f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode(), timeout, b"\r\n\r\n")
        status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
        if not status.startswith("HTTP/1.") or status.split(" ")[1:2] != ["200"]:
            raise TransportError(f"{app}: unexpected HTTP status {status[:100]!r}")
        return status
    if app == "redis":
        line = exchange(address, b"*1\r\n$4\r\nPING\r\n", timeout, b"\r\n").split(b"\r\n", 1)[0]
        if line != b"+PONG":
            raise TransportError(f"redis: unexpected answer {line[:100]!r}")
        return line.decode()
    if app == "memcached":
        line = exchange(address, b"version\r\n", timeout, b"\r\n").split(b"\r\n", 1)[0]
        if not line.startswith(b"VERSION "):
            raise TransportError(f"memcached: unexpected answer {line[:100]!r}")
        return line.decode()
    raise UsageError(f"unknown sample app {app!r}")
