"""A client for the KBS admin API (resources, policies, reference values), for tools built on Coffer.

The admin API authenticates with a bearer token minted from the operator's admin key
(:func:`coffer.kbs.admin.mint_admin_token`). Resource contents pass through this client but are never
part of its errors or reprs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import httpx

from coffer.errors import ProtocolError, TransportError, UsageError

RESOURCE_PREFIX: Final = "kbs:///"


def resource_path(text: str) -> str:
    """``kbs:///REPO/TYPE/TAG`` or ``REPO/TYPE/TAG`` → ``REPO/TYPE/TAG`` (UsageError otherwise)."""
    path = text.removeprefix(RESOURCE_PREFIX).strip("/")
    if path.count("/") != 2 or not all(path.split("/")):
        raise UsageError(f"resource path must be REPO/TYPE/TAG, got {text!r}")
    return path


def failure(response: httpx.Response) -> ProtocolError:
    """The typed error for a non-success answer (the KBS's ErrorInformation body when there is one)."""
    kind, detail = "HTTPFailed", response.reason_phrase or "request failed"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        kind = body["type"].rsplit("/", 1)[-1] or kind
        if isinstance(body.get("detail"), str):
            detail = body["detail"]
    return ProtocolError(kind, f"KBS answered {response.status_code}: {detail}")


class AdminClient:
    """Admin API calls against one KBS. ``client`` (an ``httpx.Client`` with its ``base_url`` set)
    lets tests talk to an in-process app; otherwise one is made from ``base_url``."""

    def __init__(self, token: str, *, base_url: str | None = None, ca_file: Path | None = None,
                 timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        if client is None:
            if not base_url or not base_url.startswith(("http://", "https://")):
                raise UsageError(f"the KBS URL must be http:// or https://, got {base_url!r}")
            client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  verify=str(ca_file) if ca_file is not None else True)
        self._client = client
        self._token = token

    def __repr__(self) -> str:
        return f"AdminClient(base_url={str(self._client.base_url)!r})"

    def request(self, method: str, path: str, *, content: bytes | None = None,
                json_body: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None, accept_missing: bool = False) -> httpx.Response:
        """One call; a non-2xx answer is a :class:`ProtocolError` (404 passes with ``accept_missing``)."""
        all_headers = {"Authorization": f"Bearer {self._token}", **(headers or {})}
        try:
            response = self._client.request(
                method, path, content=content, json=json_body,
                params={k: v for k, v in (params or {}).items() if v is not None}, headers=all_headers)
        except httpx.HTTPError as exc:
            raise TransportError(
                f"KBS request {method} {path} failed: {exc.__class__.__name__}: {exc}") from exc
        if accept_missing and response.status_code == 404:
            return response
        if response.status_code >= 300:
            raise failure(response)
        return response

    def put_resource(self, path: str, data: bytes) -> None:
        """Store (or replace) the resource at ``REPO/TYPE/TAG``."""
        self.request("POST", f"/kbs/v0/resource/{resource_path(path)}", content=data,
                     headers={"Content-Type": "application/octet-stream"})

    def get_resource(self, path: str) -> bytes | None:
        """The resource's plaintext (admin role), or None when there is none at that path."""
        response = self.request("GET", f"/kbs/v0/resources/{resource_path(path)}", accept_missing=True)
        return None if response.status_code == 404 else response.content

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
