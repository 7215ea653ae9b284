"""The REST API over real HTTPS against a real etcd: authentication and roles, the reads, the
actions (the same operations as the CLI), server-sent events, and untrusted values in etcd."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vmha import config
from vmha.api import server
from vmha.api.auth import Tokens, load_tokens
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.drivers.base import VmInfo
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.testing.etcd import EtcdProcess, free_ports

pytestmark = pytest.mark.integration

KEYS = Keys("vapi")
ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


@dataclass
class Api:
    url: str
    session: aiohttp.ClientSession
    client: EtcdClient

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.url + path, headers=headers, json=body) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


async def _vms() -> list[VmInfo]:
    return [VmInfo("vm1", "h1", True, 5, "running"), VmInfo("vm2", "h2", False)]


@pytest.fixture
async def api(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Api]:
    assert etcd.pki is not None
    tls = etcd.pki.issue("vmha-api", ips=["127.0.0.1"])  # the API's server certificate, from etcd's test CA
    cert, key = tls.cert, tls.key
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{READER} read-only\n")
    tokens.chmod(0o600)
    port = free_ports(1)[0]
    url = etcd.client_urls[0]
    planes = "".join(f'[planes.{p}]\nendpoints = ["{url}"]\n' for p in ("management", "storage", "service"))
    cfg = config.parse(tomllib.loads(
        f'[cluster]\nname = "vapi"\n{etcd.toml()}{planes}'
        f'[manager]\nname = "m1"\nendpoints = ["{url}"]\ndriver = "lab"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ncert = "{cert}"\nkey = "{key}"\ntokens_file = "{tokens}"\n'))
    assert cfg.api is not None
    runner = await server.start(cfg, cfg.api, server.tls_context(cfg.api), load_tokens(tokens), _vms)
    client = EtcdClient(etcd.client_urls, timeout=2.0, tls=etcd.tls())
    trust = ssl.create_default_context(cafile=str(tls.ca))  # the real certificate check, not ssl=False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        try:
            yield Api(f"https://127.0.0.1:{port}", session, client)
        finally:
            await runner.cleanup()
            await client.close()


async def _health(client: EtcdClient, host: str, down: Plane | None = None) -> None:
    planes = {p: PlaneStatus(PlaneState.DOWN if p == down else PlaneState.UP, 100.0, "test") for p in PLANES}
    await health_store.save_host(client, KEYS, HostHealth(host, "rack1", planes), time.time(), "m1")


async def test_no_token_is_401_and_the_page_and_document_are_public(api: Api) -> None:
    for path in ("/v1/hosts", "/v1/tasks", "/v1/stream", "/v1/pause"):
        status, body = await api.call("GET", path)
        assert status == 401 and body == {"error": "a bearer token is required"}, path
    assert (await api.call("GET", "/v1/hosts", token="not-a-token-of-the-file"))[0] == 401
    assert (await api.call("POST", "/v1/pause", body={"on": True}))[0] == 401
    status, page = await api.call("GET", "/")
    assert status == 200 and "<title>vmha</title>" in page
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200 and "/v1/hosts" in doc["paths"]
    assert (await api.call("GET", "/metrics"))[0] == 401


async def test_metrics_are_the_managers(api: Api) -> None:
    status, text = await api.call("GET", "/metrics", token=READER)
    assert status == 200 and "vmha_manager_leader " in text and "vmha_agent_isolated" not in text


async def test_reads(api: Api) -> None:
    await _health(api.client, "h1")
    await _health(api.client, "h2", down=Plane.STORAGE)
    await api.client.put_json(KEYS.maintenance("h1"), {"t": 123.0})
    status, hosts = await api.call("GET", "/v1/hosts", token=READER)
    assert status == 200, hosts
    assert [(h["host"], h["failed"], h["maintenance"]) for h in hosts["hosts"]] == [
        ("h1", [], True), ("h2", ["storage"], False)]
    assert hosts["hosts"][1]["planes"]["storage"]["state"] == "down"
    assert hosts["hosts"][0]["maintenance_since"] == 123.0
    assert hosts["pause"] == {"paused": False}
    status, vms = await api.call("GET", "/v1/vms", token=READER)
    assert vms["vms"][0] == {"name": "vm1", "host": "h1", "ha": True, "priority": 5, "state": "running"}
    status, policy = await api.call("GET", "/v1/policy", token=READER)
    assert {"failed": "storage", "action": "fence-evacuate"} in policy["rows"]
    assert (await api.call("GET", "/v1/tasks", token=READER))[1] == {"tasks": [], "unreadable": []}
    assert (await api.call("GET", "/v1/recoveries/vm1", token=READER))[1] == {"vm": "vm1", "recoveries": []}
    assert (await api.call("GET", "/v1/events?last=x", token=READER))[0] == 400


async def test_read_only_token_cannot_act(api: Api) -> None:
    await _health(api.client, "h1")
    for path, body in (("/v1/pause", {"on": True}), ("/v1/hosts/h1/maintenance", {"on": True}),
                       ("/v1/hosts/h1/enable", None)):
        status, answer = await api.call("POST", path, token=READER, body=body)
        assert status == 403 and "needs an admin token (this one is read-only)" in answer["error"], path
    assert await api.client.get(KEYS.pause) is None
    assert await api.client.get(KEYS.maintenance("h1")) is None


async def test_admin_actions_write_what_the_leader_watches(api: Api) -> None:
    await _health(api.client, "h1")
    await _health(api.client, "h2", down=Plane.STORAGE)
    status, answer = await api.call("POST", "/v1/pause", token=ADMIN, body={"on": True, "why": "upgrade"})
    assert status == 200 and answer == {"paused": True, "leader": "none"}
    status, pause = await api.call("GET", "/v1/pause", token=READER)
    assert pause["paused"] and pause["why"] == "upgrade" and pause["by"].startswith("api from 127.0.0.1")
    assert (await api.call("POST", "/v1/pause", token=ADMIN, body={"on": False}))[0] == 200
    assert await api.client.get(KEYS.pause) is None

    assert (await api.call("POST", "/v1/hosts/h1/maintenance", token=ADMIN, body={"on": True}))[0] == 200
    assert await api.client.get(KEYS.maintenance("h1")) is not None
    assert (await api.call("POST", "/v1/hosts/h1/maintenance", token=ADMIN, body={"on": False}))[0] == 200
    assert await api.client.get(KEYS.maintenance("h1")) is None
    status, answer = await api.call("POST", "/v1/hosts/h9/maintenance", token=ADMIN, body={"on": True})
    assert status == 404 and "host 'h9': not in the manager's health view" in answer["error"]
    # The cleanliness check of `vmha host enable`, the same code.
    status, answer = await api.call("POST", "/v1/hosts/h2/enable", token=ADMIN)
    assert status == 409 and answer["error"] == "host 'h2' is not clean: storage down; repair it first"
    for body in ({"on": "yes"}, {"on": True, "extra": 1}, [True]):
        assert (await api.call("POST", "/v1/pause", token=ADMIN, body=body))[0] == 400, body


async def test_untrusted_values_are_skipped_or_shown_as_unreadable(api: Api) -> None:
    await _health(api.client, "h1")
    await api.client.put(KEYS.health("h2"), b'{"host": "h2", "planes": 7}')
    await api.client.put(KEYS.pause, b"not json")
    await api.client.put(KEYS.tasks_prefix + "vm9", b'{"vm": "vm9", "state": "evacuating"}')
    status, hosts = await api.call("GET", "/v1/hosts", token=READER)
    assert status == 200 and [h["host"] for h in hosts["hosts"]] == ["h1"]
    assert hosts["pause"]["paused"] and hosts["pause"]["why"] == "unreadable pause record"  # in doubt, paused
    status, tasks = await api.call("GET", "/v1/tasks", token=READER)
    assert status == 200 and tasks == {"tasks": [], "unreadable": [KEYS.tasks_prefix + "vm9"]}


async def test_stream_tells_changes_as_they_happen(api: Api) -> None:
    async with api.session.get(api.url + "/v1/stream", headers={"Authorization": f"Bearer {READER}"}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert await asyncio.wait_for(r.content.readline(), 5) == b": vmha stream\n"
        await asyncio.sleep(0.5)  # the hub's watches are listing
        seen: list[str] = []

        async def until(what: str) -> float:
            t0 = time.monotonic()
            while True:
                line = (await r.content.readline()).decode()
                if line.startswith("data: ") and json.loads(line[6:]).get("what") == what:
                    seen.append(what)
                    return time.monotonic() - t0

        reader = asyncio.create_task(until("health"))
        await asyncio.sleep(0.1)
        await _health(api.client, "h3", down=Plane.MANAGEMENT)
        assert await asyncio.wait_for(reader, 5) < 2.0
        reader = asyncio.create_task(until("pause"))
        await api.call("POST", "/v1/pause", token=ADMIN, body={"on": True})
        await asyncio.wait_for(reader, 5)
    assert seen == ["health", "pause"]


async def test_a_taken_port_is_an_error_at_start(api: Api, etcd: EtcdProcess) -> None:
    host_port = api.url.removeprefix("https://")
    cfg_api = config.ApiConfig(listen=host_port, cert=Path("/x"), key=Path("/x"), tokens_file=Path("/x"))
    cfg = config.parse({"cluster": {"name": "vapi"},
                        "planes": {p: {"endpoints": etcd.client_urls} for p in ("management", "storage", "service")},
                        "manager": {"name": "m2", "endpoints": etcd.client_urls, "driver": "lab"},
                        "etcd": {f: str(getattr(etcd.tls(), f)) for f in ("ca", "cert", "key")}})  # fmt: skip
    with pytest.raises(OSError):
        await server.start(cfg, cfg_api, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), Tokens({}), None)


async def test_an_alerts_dashboard_link_opens_that_vms_timeline(api: Api, tmp_path: Path) -> None:
    # The webhook payload's "dashboard" link (vmha.manager.webhooks.evidence_links): /#vm=VM, here
    # with the token in the fragment too, in headless Chromium; the page opens vm1's timeline itself.
    for vm in ("vm1", "vm2"):
        await api.client.put_json(KEYS.task(vm), {
            "vm": vm, "source": "h1", "kind": "evacuate", "recovery": 1, "priority": 5, "row": "storage",
            "action": "fence-evacuate", "failed": {"storage": 100.0}, "created": 100.0, "state": "proving",
            "steps": [{"step": "prove", "started": 100.0, "finished": None, "result": "", "detail": ""}]})  # fmt: skip
    link = f"{api.url}/#token={ADMIN}&vm=vm1"
    cp = await asyncio.to_thread(
        subprocess.run, ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom",
                         link], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert 'data-task="vm1"' in cp.stdout and 'data-task="vm2"' in cp.stdout, cp.stdout[-3000:] + cp.stderr[-2000:]
    assert 'data-timeline="vm1"' in cp.stdout and 'data-timeline="vm2"' not in cp.stdout
