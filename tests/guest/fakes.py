"""Simulated TEE interfaces for the attester tests: a configfs-tsm tree in a temporary directory
that answers like the kernel, and device fakes serving recorded reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coffer.guest.attesters.tsm import ConfigFsOps

Responder = Callable[[bytes], tuple[bytes, bytes | None]]


class SimulatedTsm(ConfigFsOps):
    """configfs-tsm semantics on a plain directory: ``mkdir`` of an entry creates its attributes,
    writing ``inblob`` bumps ``generation`` and produces ``outblob``/``auxblob`` from ``respond``.
    ``interfere`` makes that many reads of ``outblob`` race with another writer (generation moves)."""

    def __init__(self, root: Path, provider: str, respond: Responder, *, interfere: int = 0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.respond = respond
        self.interfere = interfere
        self.inblobs: list[bytes] = []
        self.privlevels: list[bytes] = []

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        for name in ("inblob", "outblob"):
            (path / name).write_bytes(b"")

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()

    def _bump(self, entry: Path) -> None:
        generation = int((entry / "generation").read_text()) + 1
        (entry / "generation").write_text(f"{generation}\n")

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "privlevel":
            self.privlevels.append(data)
            self._bump(path.parent)
        if path.name == "inblob":
            self.inblobs.append(data)
            self._bump(path.parent)
            out, aux = self.respond(data)
            (path.parent / "outblob").write_bytes(out)
            if aux is not None:
                (path.parent / "auxblob").write_bytes(aux)

    def read(self, path: Path) -> bytes:
        data = super().read(path)
        if path.name == "outblob" and self.interfere > 0:
            self.interfere -= 1
            self._bump(path.parent)
        return data
