"""The container runtime interface the guest agent dispatches to after the policy gate.

The agent (:mod:`coffer.guest.agent`) validates a request, has the policy decide it, and only then
calls the method of :class:`ContainerRuntime` named after it. Parameters and results are the plain
JSON objects of the agent wire protocol (``/work/notes/run-contract.md``): the runtime receives the
request's ``params`` unchanged and returns the response's ``result``.

Errors are :mod:`coffer.errors` types; the agent maps them to wire codes:

* :class:`~coffer.errors.UsageError` (a malformed parameter, a process in the wrong state):
  ``INVALID_ARGUMENT``;
* :class:`NotFoundError` (no such container or process): ``NOT_FOUND``;
* :class:`~coffer.errors.TransportError` (registry or KBS unreachable): ``UNAVAILABLE``;
* :class:`~coffer.errors.VerificationError`, :class:`~coffer.errors.FormatError`,
  :class:`~coffer.errors.ProtocolError` and the other refusals of an image or a key release:
  ``FAILED_PRECONDITION``, with the message, which therefore must never carry a secret;
* anything else: ``INTERNAL``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from coffer.errors import CofferError


class NotFoundError(CofferError):
    """The container or process a request names does not exist (any more)."""


class ContainerRuntime(ABC):
    """The guest's containers. Every method is called only after the policy allowed the request."""

    @abstractmethod
    def create_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """CreateContainerRequest: pull, verify, decrypt and unpack ``params["image"]``, build the
        bundle from ``params["OCI"]``, deliver secrets; do not start. Returns ``{"container_id"}``."""

    @abstractmethod
    def start_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """StartContainerRequest ``{"container_id"}`` -> ``{"pid"}``."""

    @abstractmethod
    def exec_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """ExecProcessRequest ``{"container_id", "exec_id", "process"}`` -> ``{"exec_id"}``."""

    @abstractmethod
    def read_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """ReadStreamRequest ``{"container_id", "exec_id", "stream", "max_bytes"}`` ->
        ``{"data": base64, "eof": bool}``."""

    @abstractmethod
    def write_stream(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """WriteStreamRequest ``{"container_id", "exec_id", "data": base64}``."""

    @abstractmethod
    def close_stdin(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """CloseStdinRequest ``{"container_id", "exec_id"}``."""

    @abstractmethod
    def wait_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """WaitProcessRequest ``{"container_id", "exec_id", "timeout_s"}`` ->
        ``{"exited": bool, "status": int | None}``. May block up to ``timeout_s``, so it must be safe
        to call concurrently with the other methods."""

    @abstractmethod
    def signal_process(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """SignalProcessRequest ``{"container_id", "exec_id", "signal": int}``."""

    @abstractmethod
    def remove_container(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """RemoveContainerRequest ``{"container_id"}`` -> ``{}``."""

    @abstractmethod
    def list_containers(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """ListContainersRequest -> ``{"containers": [{"container_id", "name", "image", "status",
        "pid"}]}``."""

    @abstractmethod
    def destroy(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """DestroySandboxRequest (and agent shutdown): remove every container. Returns ``{}``."""
