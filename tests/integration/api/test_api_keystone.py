"""Keystone tokens on the REST API against a real Keystone (keystone 30 from the rig's venv, sqlite,
fernet tokens) and a real etcd: roles, project scope, invalid / expired / revoked tokens, the
cache, and Keystone stopped (503 for its tokens, file tokens unaffected)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vmha import config
from vmha.api import server
from vmha.api.auth import load_tokens
from vmha.api.keystone import KeystoneTokens
from vmha.core.planes import PLANES
from vmha.lab.nova.keystone import Keystone
from vmha.lab.nova.rig import VENV
from vmha.testing.etcd import EtcdProcess, free_ports
from vmha.testing.hosts import config_text

pytestmark = pytest.mark.integration

FILE_ADMIN = "file-admin-token-0123456789"
EXPIRATION = 15  # seconds a Keystone token lives here: the expiry test waits it out
CACHE_TTL = 2.0


@pytest.fixture(scope="module")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystone]:
    if not (VENV / "bin" / "keystone-manage").exists():
        pytest.skip(f"Keystone is not installed in {VENV}: run `bash scripts/setup-nova.sh`")
    with Keystone(tmp_path_factory.mktemp("keystone"), token_expiration=EXPIRATION) as ks:
        ks.create_project("service")
        ks.create_user("vmha", "vmha-pw", "service", project="service")  # what vmha validates with
        ks.create_user("op-admin", "admin-pw", "admin")
        ks.create_user("op-reader", "reader-pw", "reader")
        # A role outside Keystone's admin > member > reader chain: member would imply reader, read-only here.
        ks.create_role("auditor")
        ks.create_user("op-auditor", "auditor-pw", "auditor")
        ks.create_project("other")
        ks.create_user("other-admin", "other-pw", "admin", project="other")
        yield ks


@dataclass
class Api:
    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, headers=headers, json=body) as r:
            return r.status, await r.json(content_type=None)  # every answer used here is JSON


def ks(token: str) -> dict[str, str]:
    return {"X-Auth-Token": token}


@pytest.fixture
async def api(etcd: EtcdProcess, keystone: Keystone, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:  # fmt: skip
    assert etcd.pki is not None
    tls = etcd.pki.issue("vmha-api", ips=["127.0.0.1"])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{FILE_ADMIN} admin\n")
    tokens.chmod(0o600)
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(json.dumps({"clouds": {"vmha-keystone": {
        "auth": {"auth_url": keystone.url, "username": "vmha", "password": "vmha-pw", "project_name": "service",
                 "user_domain_name": "Default", "project_domain_name": "Default"},
        "region_name": "RegionOne", "identity_api_version": 3}}}))  # fmt: skip
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    port = free_ports(1)[0]
    url = etcd.client_urls[0]
    cfg = config.parse(tomllib.loads(config_text("vks", None, "", {p: [url] for p in PLANES}, etcd=etcd.toml(), extra=(
        f'[manager]\nname = "m1"\nendpoints = ["{url}"]\ndriver = "lab"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\ntokens_file = "{tokens}"\n'
        f'[api.keystone]\ncloud = "vmha-keystone"\nproject = "admin"\ncache_ttl = {CACHE_TTL}\n'))))
    assert cfg.api is not None and cfg.api.keystone is not None
    validator = KeystoneTokens.connect(cfg.api.keystone, "vmha-keystone")
    runner = await server.start(cfg, cfg.api, server.tls_context(cfg.api), load_tokens(tokens), None, validator)
    trust = ssl.create_default_context(cafile=str(tls.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        try:
            yield Api(f"https://127.0.0.1:{port}", session)
        finally:
            await runner.cleanup()


async def _token(keystone: Keystone, user: str, password: str, project: str | None = "admin") -> str:
    return await asyncio.to_thread(keystone.token, user, password, project)


async def test_roles_and_scope(api: Api, keystone: Keystone) -> None:
    admin = await _token(keystone, "op-admin", "admin-pw")
    status, body = await api.call("POST", "/v1/pause", ks(admin), {"on": True, "why": "keystone test"})
    assert status == 200 and body["paused"] is True, body
    assert (await api.call("POST", "/v1/pause", ks(admin), {"on": False}))[0] == 200

    reader = await _token(keystone, "op-reader", "reader-pw")
    assert (await api.call("GET", "/v1/hosts", ks(reader)))[0] == 200
    status, body = await api.call("POST", "/v1/pause", ks(reader), {"on": True})
    assert status == 403 and "read-only" in body["error"], body

    # Valid tokens without a vmha role here: another role only, admin of another project, unscoped.
    for token, why in ((await _token(keystone, "op-auditor", "auditor-pw"), "none of the roles"),
                       (await _token(keystone, "other-admin", "other-pw", "other"), "scoped to project other"),
                       (await _token(keystone, "op-admin", "admin-pw", None), "not scoped to a project")):  # fmt: skip
        status, body = await api.call("GET", "/v1/hosts", ks(token))
        assert status == 403 and why in body["error"], body

    # A Keystone token is not a bearer token (those are the file's), and a file token is no Keystone one.
    assert (await api.call("GET", "/v1/hosts", {"Authorization": f"Bearer {admin}"}))[0] == 401
    assert (await api.call("GET", "/v1/hosts", ks(FILE_ADMIN)))[0] == 401


async def test_invalid_and_revoked_tokens(api: Api, keystone: Keystone) -> None:
    for bad in ("gAAAAABnot-a-real-fernet-token", "x" * 5000, "tab\tinside"):
        status, body = await api.call("GET", "/v1/hosts", ks(bad))
        assert status == 401, (bad[:20], body)

    never_used = await _token(keystone, "op-admin", "admin-pw")
    await asyncio.to_thread(keystone.revoke, never_used)
    assert (await api.call("GET", "/v1/hosts", ks(never_used)))[0] == 401

    # A token already validated is trusted for cache_ttl: its revocation bites after that.
    cached = await _token(keystone, "op-reader", "reader-pw")
    assert (await api.call("GET", "/v1/hosts", ks(cached)))[0] == 200
    await asyncio.to_thread(keystone.revoke, cached)
    assert (await api.call("GET", "/v1/hosts", ks(cached)))[0] == 200
    await asyncio.sleep(CACHE_TTL + 0.5)
    status, body = await api.call("GET", "/v1/hosts", ks(cached))
    assert status == 401 and "revoked" in body["error"], body


async def test_expired_token(api: Api, keystone: Keystone) -> None:
    token = await _token(keystone, "op-reader", "reader-pw")
    t0 = time.time()
    assert (await api.call("GET", "/v1/hosts", ks(token)))[0] == 200
    await asyncio.sleep(max(0.0, t0 + EXPIRATION + 1.5 - time.time()))
    assert (await api.call("GET", "/v1/hosts", ks(token)))[0] == 401


async def test_keystone_stopped(api: Api, keystone: Keystone, caplog: pytest.LogCaptureFixture) -> None:
    token = await _token(keystone, "op-admin", "admin-pw")  # valid, never seen by vmha
    await asyncio.to_thread(keystone.stop_server)
    try:
        with caplog.at_level(logging.INFO, logger="vmha.api"):
            for _ in range(3):
                status, body = await api.call("GET", "/v1/hosts", ks(token))
                assert status == 503 and body["error"].startswith("keystone: "), body
            assert (await api.call("POST", "/v1/pause", {"Authorization": f"Bearer {FILE_ADMIN}"},
                                   {"on": False}))[0] == 200  # fmt: skip
            # An invalid file token is still a plain 401, whatever Keystone's state.
            assert (await api.call("GET", "/v1/hosts", {"Authorization": "Bearer wrong-token-0123456789"}))[0] == 401
        outage = [r for r in caplog.records if r.levelno == logging.ERROR and "keystone" in r.getMessage()]
        assert len(outage) == 1, [r.getMessage() for r in outage]
    finally:
        await asyncio.to_thread(keystone.start_server)
    caplog.clear()
    token = await _token(keystone, "op-admin", "admin-pw")  # the first may have expired meanwhile
    with caplog.at_level(logging.INFO, logger="vmha.api"):
        assert (await api.call("GET", "/v1/hosts", ks(token)))[0] == 200
    assert any("answers again" in r.getMessage() for r in caplog.records)
