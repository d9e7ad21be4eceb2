"""Open the trust-services store named by a URL (``coffer kbs serve --db URL``).

* ``sqlite:///relative/path/state.db`` and ``sqlite:////absolute/path/state.db`` — as in SQLAlchemy,
  the path is everything after ``sqlite:///`` (so an absolute path shows four slashes); ``~`` is
  expanded. Missing directories are created ``0700``, the file ``0600``.
* ``postgresql://user:password@host:port/dbname?sslmode=...`` (or ``postgres://``) — any libpq URL;
  several replicas may share the database.
* ``memory://`` — the non-persistent in-process store (tests, dry runs).

Migrations are applied on open; a database written by a newer Coffer is refused.
"""

from __future__ import annotations

from pathlib import Path

from coffer.errors import ConfigError
from coffer.kbs.store import MemoryStore, Store

SQLITE_PREFIX = "sqlite:///"


def open_store(url: str) -> Store:
    """The :class:`~coffer.kbs.store.Store` for ``url``; raises :class:`ConfigError` for a URL of an
    unknown kind and :class:`~coffer.errors.StorageError` when the backend cannot be opened."""
    text = url.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "sqlite":
        from coffer.kbs.store_sqlite import SqliteStore  # noqa: PLC0415 - only the backend in use

        return SqliteStore(sqlite_path(text))
    if scheme in ("postgresql", "postgres"):
        from coffer.kbs.store_postgres import PostgresStore  # noqa: PLC0415 - psycopg only when used

        return PostgresStore(text)
    if scheme == "memory":
        return MemoryStore()
    # Never echo the URL itself: a database URL may carry a password.
    raise ConfigError(f"unsupported store URL scheme {scheme or '(none)'!r}: "
                      "use sqlite:///PATH, postgresql://... or memory://")


def sqlite_path(url: str) -> Path:
    """The file path of a ``sqlite:///`` URL (query strings are not supported)."""
    if not url.lower().startswith(SQLITE_PREFIX):
        raise ConfigError("a SQLite store URL has the form sqlite:///relative/path or sqlite:////absolute/path")
    rest = url[len(SQLITE_PREFIX):]
    if not rest or "?" in rest or "#" in rest:
        raise ConfigError("a SQLite store URL needs a file path and takes no query string")
    if rest == ":memory:":
        raise ConfigError("use memory:// for a non-persistent store")
    return Path(rest).expanduser()


def sqlite_url(path: str | Path) -> str:
    """The ``sqlite:///`` URL of a database file (the inverse of :func:`sqlite_path`)."""
    return SQLITE_PREFIX + str(Path(path).expanduser())
