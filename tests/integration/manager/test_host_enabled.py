"""The manager learns of `vmha host enable HOST` (keys.disabled(HOST) deleted) from a real etcd,
also when the deletion happened while its watch was cut and the revision was compacted away."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import pytest

from vmha.bench.grpc_raw import client_context
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.manager.daemon import enabled_hosts
from vmha.testing.etcd import EtcdProcess
from vmha.testing.proxy import TcpProxy
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

KEYS = Keys("vt7")


async def _collect(client: EtcdClient, into: asyncio.Queue[list[str]]) -> None:
    async for hosts in enabled_hosts(client, KEYS):
        await into.put(hosts)


async def _watching(etcd: EtcdProcess, timeout: float = 10.0) -> None:
    """Until etcd counts a watcher (etcd's own metric): the listing is done, the watch is open."""
    tls = etcd.tls()
    assert tls is not None
    context = client_context(tls)  # etcd serves /metrics on its client port: TLS, certificate required
    context.set_alpn_protocols(["http/1.1"])  # urllib speaks HTTP/1.1, not gRPC's h2

    def watchers() -> float:
        with urllib.request.urlopen(f"{etcd.client_urls[0]}/metrics", timeout=2, context=context) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return float(line.split()[1])
        raise AssertionError("etcd /metrics has no etcd_debugging_mvcc_watcher_total")

    async def watching() -> bool:
        return await asyncio.to_thread(watchers) >= 1

    await until(watching, "a watch opened on etcd", timeout=timeout, interval=0.1)


async def _next(q: asyncio.Queue[list[str]], timeout: float = 10.0) -> list[str]:
    async with asyncio.timeout(timeout):
        return await q.get()


async def test_deleted_disabled_keys_are_reported_once_each(etcd: EtcdProcess) -> None:
    proxy = await TcpProxy.to(etcd.client_urls[0])
    writer = EtcdClient(etcd.client_urls, tls=etcd.tls())
    watcher = EtcdClient([proxy.url], tls=etcd.tls(), timeout=1.0)
    got: asyncio.Queue[list[str]] = asyncio.Queue()
    for h in ("h1", "h2", "h4"):
        await writer.put_json(KEYS.disabled(h), {"op": "mark-down"})
    task = asyncio.create_task(_collect(watcher, got))
    try:
        # the hosts disabled at start are not "enabled"; a new disable is not either
        await _watching(etcd)
        await writer.put_json(KEYS.disabled("h3"), {"op": "disable"})
        await writer.delete(KEYS.disabled("h1"))
        assert await _next(got) == ["h1"]
        await writer.delete(KEYS.disabled("h3"))
        assert await _next(got) == ["h3"]
        # cut the watch, enable h2 and h4 meanwhile, compact: the re-listing finds them gone
        await proxy.cut()
        await writer.delete(KEYS.disabled("h2"))
        await writer.delete(KEYS.disabled("h4"))
        await writer.put_json(KEYS.disabled("h5"), {"op": "disable"})
        await writer.compact(await writer.revision())
        proxy.restore()
        assert await _next(got) == ["h2", "h4"]
        assert got.empty()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.close()
        await watcher.close()
        await proxy.close()
