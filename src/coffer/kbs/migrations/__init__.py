"""SQL migrations of the trust-services store, one directory per dialect.

Each file is ``NNNN_name.sql``; ``NNNN`` is the schema version it brings the database to. A store applies,
on open and inside one exclusive transaction, every migration newer than the highest version recorded in
its ``coffer_schema_version`` table, and refuses a database whose version is newer than the newest file
here (written by a later Coffer). Files are never edited once released: a change is a new file.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from coffer.errors import StorageError

Dialect = Literal["sqlite", "postgresql"]

VERSION_TABLE = "coffer_schema_version"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, kw_only=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file split into single statements (comments kept, blank remainders dropped)."""
        return split_statements(self.sql)


def load(dialect: Dialect) -> list[Migration]:
    """The migrations of ``dialect`` in version order; versions must be 1, 2, 3... without gaps."""
    folder = resources.files(__name__).joinpath(dialect)
    found: list[Migration] = []
    for item in folder.iterdir():
        match = _NAME.match(item.name)
        if match is None:
            continue
        found.append(Migration(version=int(match.group(1)), name=match.group(2),
                               sql=item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise StorageError(f"{dialect} migrations are not numbered 1..n: {[m.version for m in found]}")
    return found


def latest_version(dialect: Dialect) -> int:
    return len(load(dialect))


def split_statements(script: str) -> list[str]:
    """Split an SQL script on the semicolons that end statements (not those inside strings, quoted
    names or comments). Uses SQLite's own completeness test, which also fits the plain DDL we write for
    PostgreSQL (no dollar-quoted bodies)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if ";" in line and sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if _has_code(buffer):
        raise StorageError("migration script ends with an unterminated statement")
    return [s for s in statements if _has_code(s)]


def _has_code(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("--"):
            return True
    return False
