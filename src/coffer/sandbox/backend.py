"""The sandbox backend interface: what the host CLI needs from any place an agent can run.

A backend starts an isolated environment holding the guest agent (``coffer-agent``) and hands back
the socket the host talks to it over. :class:`coffer.sandbox.process.ProcessBackend` runs the agent
in Linux namespaces (a development sandbox: no memory confidentiality); VM, SEV-SNP and TDX backends
implement the same methods with a guest kernel, a vsock/virtio-serial agent channel and the TEE's
launch measurement of the initdata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coffer.sandbox.state import SandboxRecord

DEVELOPMENT_LABEL = "development sandbox: no memory confidentiality"


@dataclass(frozen=True, kw_only=True)
class PortMapping:
    """``-p HOST:CTR``: the host listens on 127.0.0.1:``host``, forwarded to the sandbox's ``container``."""

    host: int
    container: int


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """What to start. ``initdata`` is the exact document whose digest the TEE measures at launch."""

    name: str
    initdata: bytes
    image: str = ""
    tee: str = "auto"  # "tpm", "sample" or "auto" (tpm when the backend can, else sample)
    ports: tuple[PortMapping, ...] = ()
    kbs: str | None = None
    registry_insecure: bool = False
    image_layouts: Path | None = None
    #: Extra backend-specific options (e.g. storage size).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sandbox:
    """A started sandbox: its record and where its agent listens."""

    record: SandboxRecord
    agent_socket: Path
    directory: Path


class SandboxBackend(ABC):
    """Where sandboxes run. ``development`` is True when the sandbox gives no memory confidentiality
    (the CLI shows :data:`DEVELOPMENT_LABEL` wherever such a sandbox appears)."""

    name: str = ""
    development: bool = False

    @abstractmethod
    def create(self, spec: SandboxSpec) -> Sandbox:
        """Start a sandbox; on failure nothing is left running and the record is removed."""

    @abstractmethod
    def stop(self, record: SandboxRecord, *, timeout: float = 10.0) -> SandboxRecord:
        """Stop everything the sandbox runs (agent, containers, TPM, forwarders). Idempotent."""

    @abstractmethod
    def remove(self, record: SandboxRecord, *, force: bool = False) -> None:
        """Delete a stopped sandbox's state (``force`` stops it first). Leaves no mounts or processes."""

    @abstractmethod
    def agent_socket(self, record: SandboxRecord) -> Path:
        """The unix socket the agent serves (what :class:`coffer.guest.protocol.AgentClient` opens)."""

    @abstractmethod
    def is_alive(self, record: SandboxRecord) -> bool:
        """Whether the sandbox's agent is still running."""

    @abstractmethod
    def describe(self, record: SandboxRecord) -> dict[str, Any]:
        """Host-side facts for ``coffer inspect`` (backend, isolation, TEE, processes, paths)."""
