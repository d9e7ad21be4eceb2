"""Fixtures of the end-to-end tests: server processes that are always stopped, an admin key pair and
a master key file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coffer.kbs.open_store import sqlite_url
from coffer.kbs.resources import MasterKey
from tests.e2e.support import AdminKey, KbsProcess, write_config

KbsFactory = Callable[..., KbsProcess]


@pytest.fixture
def kbs_processes() -> Iterator[list[KbsProcess]]:
    """Every server a test registers here is stopped at the end, pass or fail."""
    started: list[KbsProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()
        assert not any(p.running for p in started)


@pytest.fixture
def start_kbs(kbs_processes: list[KbsProcess]) -> KbsFactory:
    """``start_kbs(config, port=None, db=None)`` → a ready server, stopped after the test."""
    def start(config: Path, **kwargs: Any) -> KbsProcess:
        process = KbsProcess(config, **kwargs)
        kbs_processes.append(process)
        return process.start().wait_ready()
    return start


@pytest.fixture
def admin_key(tmp_path: Path) -> AdminKey:
    return AdminKey.create(tmp_path / "admin")


@pytest.fixture
def master_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    MasterKey.generate().write(path)
    return path


@pytest.fixture
def sqlite_kbs(tmp_path: Path, admin_key: AdminKey, master_key_file: Path,
               start_kbs: KbsFactory) -> KbsProcess:
    """A ready KBS on SQLite under ``tmp_path/state`` with this test's master key and admin key."""
    return start_kbs(write_config(tmp_path / "kbs.toml", db=sqlite_url(tmp_path / "state" / "state.db"),
                                  master_key=master_key_file, admin=admin_key))
