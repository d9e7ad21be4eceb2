"""``coffer kbs serve`` and ``coffer kbs rotate-master-key``.

The ``kbs`` command group is shared with :mod:`coffer.cli._kbs_admin` (``kbs admin``, ``kbs audit``):
both call :func:`kbs_commands` to get (or create) the group's sub-command table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from coffer._internal.clock import utc_now
from coffer.cli._output import Output
from coffer.errors import ConfigError, UsageError
from coffer.kbs.config import KbsConfig, load_config
from coffer.kbs.resources import MasterKey, ResourceStore

_SERVE_EPILOG = """\
Serves the KBS (Trustee protocol 0.4.0), the attestation service, the admin API, /healthz,
/readyz, /openapi.json and /.well-known/jwks.json. The store defaults to SQLite in the state
directory; with --db postgresql://... several replicas share one database (sessions included).
The master key sealing resources comes from [master_key] file or $COFFER_KBS_MASTER_KEY.
"""

_ROTATE_EPILOG = """\
Re-seals every resource under a new master key. With a master key file F, the new key is written
to F.new first, every resource is re-sealed, then F.new replaces F; an interrupted rotation resumes
from F.new when run again (servers read both keys meanwhile). With the key in an environment
variable, --new-key-file names where the new key is written; set the variable to it afterwards.
"""


def kbs_commands(groups: Any) -> Any:
    """The sub-command table of ``coffer kbs``, created on first use."""
    existing = getattr(groups, "choices", {}).get("kbs")
    if existing is None:
        existing = groups.add_parser("kbs", help="run and administer the key broker service",
                                     description="Key broker service (KBS) and attestation service.")
        existing.set_defaults(_kbs_commands=existing.add_subparsers(dest="kbs_command",
                                                                    metavar="SUBCOMMAND"))
    return existing.get_default("_kbs_commands")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="KBS configuration (TOML)")
    parser.add_argument("--db", metavar="URL",
                        help="store URL: sqlite:///PATH or postgresql://... (overrides the file)")


def register(groups: Any) -> None:
    commands = kbs_commands(groups)

    serve = commands.add_parser("serve", help="run the KBS and attestation service over HTTP",
                                description="Run the KBS, the attestation service and the admin API.",
                                epilog=_SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the listening socket and the store (default 1)")
    serve.set_defaults(handler=run_serve)

    rotate = commands.add_parser("rotate-master-key", help="re-seal every resource under a new master key",
                                 description="Re-seal every resource under a new master key.",
                                 epilog=_ROTATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(rotate)
    rotate.add_argument("--new-key-file", type=Path, metavar="FILE",
                        help="where to write the new key (required when the key is not in a file; an "
                             "existing file is used as the new key)")
    rotate.add_argument("--json", action="store_true", help="machine-readable output")
    rotate.set_defaults(handler=run_rotate)


def _config(args: argparse.Namespace) -> KbsConfig:
    config = load_config(args.config)
    return config.with_overrides(db=args.db, listen=getattr(args, "listen", None))


def _build_server_app(config: KbsConfig, store: Any, *, install_policies: bool) -> Any:
    """The ASGI app over ``store``; with ``install_policies`` the configured policy files are stored
    first (done once, by the parent process, when there are several workers)."""
    from coffer.attestation.service import AttestationService  # noqa: PLC0415
    from coffer.evidence.sources import CollateralSettings, build_collateral_source  # noqa: PLC0415
    from coffer.kbs.app import build_app, resource_store_from_config  # noqa: PLC0415
    from coffer.kbs.resource_policy import ResourcePolicy  # noqa: PLC0415

    resources = resource_store_from_config(config, store)
    if install_policies and not resources.check_master_key():
        raise ConfigError("the configured master key does not open the stored resources "
                          "(wrong key, or an unfinished rotation whose new key file is missing)")
    collateral = build_collateral_source(CollateralSettings(
        endorsements=config.collateral.endorsements, collateral_dir=config.collateral.collateral_dir,
        fetch=config.collateral.fetch, cache_dir=config.collateral.cache_dir))
    attestation = AttestationService(store, collateral=collateral, token_ttl=config.token_ttl)
    policy = ResourcePolicy(store)
    if install_policies:
        if config.resource_policy_file is not None:
            policy.set(_read_text(config.resource_policy_file, "resource policy"))
        for policy_id, path in config.attestation_policy_files.items():
            attestation.set_policy(policy_id, _read_text(path, f"attestation policy {policy_id}"))
    return build_app(config, store=store, attestation=attestation, clock=utc_now, resources=resources,
                     resource_policy=policy)


# With --workers N, uvicorn starts N processes that import :func:`worker_app`; the parent passes them
# the configuration through this environment variable.
_WORKER_ENV = "COFFER_KBS_WORKER_ARGS"


def worker_app() -> Any:
    """The app of one ``--workers`` process (a uvicorn factory)."""
    from coffer.kbs.open_store import open_store  # noqa: PLC0415

    raw = json.loads(os.environ[_WORKER_ENV])
    config = load_config(Path(raw["config"]) if raw["config"] else None)
    config = config.with_overrides(db=raw["db"], listen=raw["listen"])
    logging.basicConfig(level=raw["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return _build_server_app(config, open_store(config.db_url), install_policies=False)


def run_serve(args: argparse.Namespace, out: Output) -> int:
    import uvicorn  # noqa: PLC0415  (only the server needs it)

    from coffer.kbs.open_store import open_store  # noqa: PLC0415

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    config = _config(args)
    host, port = config.host_port
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {"host": host, "port": port, "log_level": args.log_level,
                               "server_header": False, "proxy_headers": False,
                               "timeout_graceful_shutdown": 10}
    store = open_store(config.db_url)
    try:
        app = _build_server_app(config, store, install_policies=True)
        if args.workers == 1:
            uvicorn.run(app, **options)
            return 0
    finally:
        store.close()
    # Several processes: the parent has checked the key and installed the policies; each worker
    # builds its own app over its own store connection (sessions are in the store, so any worker
    # can serve any step of a handshake).
    os.environ[_WORKER_ENV] = json.dumps({
        "config": str(args.config.resolve()) if args.config else None, "db": args.db,
        "listen": getattr(args, "listen", None), "log_level": args.log_level})
    uvicorn.run("coffer.cli._kbs:worker_app", factory=True, workers=args.workers, **options)
    return 0


def run_rotate(args: argparse.Namespace, out: Output) -> int:
    from coffer.kbs.open_store import open_store  # noqa: PLC0415

    config = _config(args)
    key_file = config.master_key_path()
    old = MasterKey.load(key_file, config.master_key_env)
    in_place = key_file is not None and args.new_key_file is None
    if args.new_key_file is not None:
        target: Path = args.new_key_file
    elif key_file is not None:
        target = key_file.with_name(key_file.name + ".new")
    else:
        raise UsageError(f"the master key comes from ${config.master_key_env}: give --new-key-file FILE")
    if target.exists():
        new = MasterKey.load(target)  # resume an interrupted rotation
        resumed = True
    else:
        new = MasterKey.generate()
        new.write(target)
        resumed = False
    if new == old:
        raise UsageError("the new master key equals the current one")
    store = open_store(config.db_url)
    try:
        count = ResourceStore(store, old).rotate(new)
    finally:
        store.close()
    if in_place and key_file is not None:
        os.replace(target, key_file)
        _fsync_dir(key_file.parent)
        key_location = str(key_file)
    else:
        key_location = str(target)
    out.result({"resealed": count, "new_key_id": new.key_id.hex(), "old_key_id": old.key_id.hex(),
                "key_file": key_location, "resumed": resumed},
               title="master key rotated")
    return 0


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
