"""The app on a real uvicorn server on 127.0.0.1, driven by the guest client over HTTP; and
``coffer kbs serve`` as a separate process over SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn

from coffer._internal.net import free_port
from coffer.errors import ProtocolError
from coffer.guest.attesters import attester_for
from coffer.kbs.client import KbsClient
from coffer.kbs.jwe import TeeKeyPair
from coffer.kbs.open_store import open_store, sqlite_url
from coffer.kbs.resource_policy import ALLOW_ALL_RESOURCE_POLICY
from coffer.kbs.resources import MasterKey, ResourceStore
from tests.kbs.kbs_app_support import RESOURCE, SECRET, Kbs, handshake, make_kbs


@pytest.fixture
def kbs() -> Kbs:
    return make_kbs(allow_all=True)


@pytest.fixture
def server_url(kbs: Kbs) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(kbs.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_guest_client_attests_and_fetches_over_http(kbs: Kbs, server_url: str) -> None:
    anyio.run(_handshake_in_this_thread, kbs)
    with KbsClient(server_url, attester_for("sample")) as client:
        token = client.attest()
        assert token.count(".") == 2
        assert client.get_resource(RESOURCE) == SECRET
        assert client.get_resource(RESOURCE, bearer=True) == SECRET
        with pytest.raises(ProtocolError):
            client.get_resource("default/key/absent")


async def _handshake_in_this_thread(kbs: Kbs) -> None:
    async with kbs.client() as client:
        await handshake(client, TeeKeyPair.generate())


def test_error_bodies_over_http(server_url: str) -> None:
    with httpx.Client(base_url=server_url) as http:
        unknown = http.get("/kbs/v0/unknown-plugin/x")
        no_token = http.get(f"/kbs/v0/resource/{RESOURCE}")
    assert unknown.status_code == 404
    assert unknown.json()["type"].endswith("/PluginNotFound")
    assert no_token.status_code == 401
    assert no_token.json()["type"].endswith("/TokenNotFound")


def _serve_command(config: Path) -> list[str]:
    code = ("import argparse, sys\n"
            "from coffer.cli import _kbs\n"
            "from coffer.cli._output import Output\n"
            "parser = argparse.ArgumentParser()\n"
            "groups = parser.add_subparsers(dest='group')\n"
            "_kbs.register(groups)\n"
            "args = parser.parse_args(sys.argv[1:])\n"
            "sys.exit(args.handler(args, Output(json_mode=False)))\n")
    return [sys.executable, "-c", code, "kbs", "serve", "--config", str(config), "--log-level", "warning"]


@pytest.mark.slow
def test_kbs_serve_process_over_sqlite(tmp_path: Path) -> None:
    key = MasterKey.generate()
    key_file = tmp_path / "master.key"
    key.write(key_file)
    db = sqlite_url(tmp_path / "state" / "state.db")
    store = open_store(db)
    try:
        ResourceStore(store, key).put(RESOURCE, SECRET)
    finally:
        store.close()
    (tmp_path / "allow.rego").write_text(ALLOW_ALL_RESOURCE_POLICY)
    port = free_port()
    config = tmp_path / "kbs.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\ndb = "{db}"\n'
                      f'[master_key]\nfile = "master.key"\n[policy]\nresource = "allow.rego"\n')
    env = {k: v for k, v in os.environ.items() if k != "COFFER_KBS_MASTER_KEY"}
    process = subprocess.Popen(_serve_command(config), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kbs serve did not become ready"
            time.sleep(0.1)
        with KbsClient(url, attester_for("sample")) as client:
            assert client.get_resource(RESOURCE) == SECRET
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert SECRET.decode("latin-1") not in stderr.decode("latin-1")
    assert key.hex() not in stderr.decode("latin-1")
