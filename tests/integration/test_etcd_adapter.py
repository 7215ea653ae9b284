"""The etcd adapter against a real etcd: client helpers, watch resume, heartbeats, registry, store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from vmha.core.health import FabricChange, HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd import health_store, heartbeat
from vmha.etcd.client import BadValue, EtcdClient, EtcdUnavailable
from vmha.etcd.heartbeat import PlaneHeartbeat
from vmha.etcd.keys import Keys
from vmha.etcd.registry import list_hosts, register
from vmha.etcd.watch import Delete, Put, Snapshot, WatchItem, watch_prefix
from vmha.testing.etcd import EtcdProcess, free_ports
from vmha.testing.proxy import TcpProxy
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

K = Keys("t")



async def test_json_create_cas_and_delete(client: EtcdClient) -> None:
    assert await client.get_json("/x") is None
    assert await client.create("/x", {"a": 1})
    assert not await client.create("/x", {"a": 2})  # exists: left alone
    value, kv = await client.get_json("/x") or (None, None)
    assert value == {"a": 1} and kv is not None
    assert await client.cas("/x", {"a": 3}, kv.mod_revision)
    assert not await client.cas("/x", {"a": 4}, kv.mod_revision)  # stale revision loses
    got = await client.get_json("/x")
    assert got is not None and got[0] == {"a": 3}
    assert not await client.delete_cas("/x", kv.mod_revision)
    assert await client.delete_cas("/x", got[1].mod_revision)
    assert await client.get("/x") is None


async def test_broken_value_names_the_key(client: EtcdClient) -> None:
    await client.put("/bad", b"{not json")
    with pytest.raises(BadValue, match="/bad"):
        await client.get_json("/bad")


async def test_lease_keeps_and_revoke_deletes(client: EtcdClient) -> None:
    lease = await client.grant(2)
    await client.put_json("/l", 1, lease=lease)
    assert await client.refresh(lease) == 2
    await client.revoke(lease)
    assert await client.get("/l") is None
    assert await client.refresh(lease) <= 0  # gone: the heartbeat re-grants on this
    await client.revoke(lease)  # revoking a lease already gone is not an error


async def test_unavailable_is_fast_and_the_next_endpoint_is_used(etcd: EtcdProcess) -> None:
    dead = f"https://127.0.0.1:{free_ports(1)[0]}"
    c = EtcdClient([dead, etcd.client_urls[0]], timeout=2.0, tls=etcd.tls())
    try:
        t = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=dead):
            await c.get("/x")
        assert time.monotonic() - t < 2.0  # refused, not timed out
        assert c.last_error is not None and dead in c.last_error
        await c.put_json("/x", 1)  # rotated to the live endpoint
        assert c.endpoint == etcd.client_urls[0] and c.last_error is None
    finally:
        await c.close()


async def test_silent_path_times_out_within_the_call_timeout(etcd: EtcdProcess) -> None:
    proxy = await TcpProxy.to(etcd.client_urls[0])
    c = EtcdClient([proxy.url], tls=etcd.tls(), timeout=0.5)
    try:
        await c.put_json("/x", 1)
        await proxy.cut(blackhole=True)
        t = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await c.get("/x")
        assert time.monotonic() - t < 1.5
        proxy.restore()
        await c.put_json("/x", 2)
    finally:
        await c.close()
        await proxy.close()


async def _collect(it: AsyncIterator[WatchItem], out: list[WatchItem]) -> None:
    async for ev in it:
        out.append(ev)


def _puts(events: list[WatchItem]) -> list[tuple[str, object]]:
    return [(e.key, e.value) for e in events if isinstance(e, Put)]


async def test_watch_snapshot_then_events_and_broken_values_skipped(client: EtcdClient) -> None:
    await client.put_json("/w/a", 1)
    await client.put("/w/broken0", b"\xff")
    events: list[WatchItem] = []
    task = asyncio.create_task(_collect(watch_prefix(client, "/w/"), events))
    try:
        await until(lambda: events, "the snapshot")
        snap = events[0]
        assert isinstance(snap, Snapshot)
        assert [(kv.key, v) for kv, v in snap.items] == [("/w/a", 1)]  # the broken one left out
        await client.put_json("/w/b", 2)
        await client.put("/w/broken", b"nope")
        await client.put_json("/w/c", 3)
        await client.delete("/w/a")
        await until(lambda: any(isinstance(e, Delete) for e in events), "the delete (the last event)")
        assert _puts(events) == [("/w/b", 2), ("/w/c", 3)]
        assert [e.key for e in events if isinstance(e, Delete)] == ["/w/a"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watch_resumes_after_a_broken_stream_without_loss_or_repeat(etcd: EtcdProcess) -> None:
    proxy = await TcpProxy.to(etcd.client_urls[0])
    writer = EtcdClient(etcd.client_urls, tls=etcd.tls())
    watcher = EtcdClient([proxy.url], tls=etcd.tls(), timeout=1.0)
    errors: list[str] = []
    events: list[WatchItem] = []
    task = asyncio.create_task(
        _collect(watch_prefix(watcher, "/r/", on_error=lambda e: errors.append(str(e))), events)
    )
    try:
        await until(lambda: events, "the snapshot")
        await writer.put_json("/r/1", 1)
        await until(lambda: len(_puts(events)) == 1, "/r/1")
        await proxy.cut()  # the watch stream is reset
        await writer.put_json("/r/2", 2)
        await writer.put_json("/r/3", 3)
        await until(lambda: errors, "the broken stream reported")
        proxy.restore()
        await until(lambda: len(_puts(events)) == 3, "/r/2 and /r/3 after the resume")
        await writer.put_json("/r/4", 4)
        await until(lambda: len(_puts(events)) == 4, "/r/4")
        assert _puts(events) == [("/r/1", 1), ("/r/2", 2), ("/r/3", 3), ("/r/4", 4)]
        assert sum(isinstance(e, Snapshot) for e in events) == 1  # resumed, not re-listed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.close()
        await watcher.close()
        await proxy.close()


async def test_watches_cancelled_as_they_open_end(etcd: EtcdProcess) -> None:
    """Eight watches on a fresh client, cancelled while aetcd creates them (as the API's stop does):
    every one ends. aetcd's creation can swallow the cancellation (Python 3.11's wait_for); before
    watch_prefix checked for it, 6 stops in 8 left a watch waiting for events forever."""
    for round_ in range(12):
        client = EtcdClient(etcd.client_urls, tls=etcd.tls(), timeout=2.0)

        async def watch(c: EtcdClient, prefix: str) -> None:
            async for _ in watch_prefix(c, prefix):
                pass

        tasks = [asyncio.create_task(watch(client, f"/w{i}/")) for i in range(8)]
        await asyncio.sleep(0.005 * round_)  # from before the first request to after the creations
        for t in tasks:
            t.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=3)
        await client.close()
        assert not stuck, f"round {round_}: {len(stuck)} of 8 watches did not end"


async def test_watch_relists_after_compaction(etcd: EtcdProcess) -> None:
    proxy = await TcpProxy.to(etcd.client_urls[0])
    writer = EtcdClient(etcd.client_urls, tls=etcd.tls())
    watcher = EtcdClient([proxy.url], tls=etcd.tls(), timeout=1.0)
    events: list[WatchItem] = []
    task = asyncio.create_task(_collect(watch_prefix(watcher, "/c/"), events))
    try:
        await until(lambda: events, "the snapshot")
        await writer.put_json("/c/keep", 1)
        await writer.put_json("/c/gone", 1)
        await until(lambda: len(_puts(events)) == 2, "both puts")
        await proxy.cut()
        await writer.delete("/c/gone")
        await writer.put_json("/c/new", 2)
        await writer.put_json("/c/other", 0)
        await writer.compact(await writer.revision())  # the missed events are compacted away
        proxy.restore()
        await until(lambda: sum(isinstance(e, Snapshot) for e in events) == 2, "a second snapshot")
        last = [e for e in events if isinstance(e, Snapshot)][-1]
        assert sorted(kv.key for kv, _ in last.items) == ["/c/keep", "/c/new", "/c/other"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.close()
        await watcher.close()
        await proxy.close()


async def test_heartbeat_value_changes_and_lease_is_regranted(client: EtcdClient, etcd: EtcdProcess) -> None:
    hb = PlaneHeartbeat(K, "h1", Plane.STORAGE, etcd.client_urls, ttl=2, interval=0.2, tls=etcd.tls())
    hb.start()
    try:
        await until(lambda: hb.seq >= 2, "the first put done (seq counts before the put)")
        first = await client.get_json(K.heartbeat("h1", Plane.STORAGE))
        assert first is not None
        value, kv = first
        assert value["host"] == "h1" and value["plane"] == "storage" and kv.lease == hb.lease
        await until(lambda: hb.seq >= value["seq"] + 2, "the next put done")
        second = await client.get_json(K.heartbeat("h1", Plane.STORAGE))
        assert second is not None and second[0]["seq"] > value["seq"]
        old_lease = kv.lease
        await client.revoke(old_lease)  # the lease is lost (as after a long partition)
        await until(lambda: hb.lease not in (None, old_lease), "a new lease granted")

        # Waited for in etcd, where it is asserted: hb.lease changes before the put on it lands.
        async def key_on_new_lease() -> bool:
            again = await client.get_json(K.heartbeat("h1", Plane.STORAGE))
            return again is not None and again[1].lease == hb.lease

        await until(key_on_new_lease, "the heartbeat key on the new lease")
        await until(lambda: hb.reach().reachable, "reachable (marked after the put returns)")
    finally:
        await hb.stop()
    assert await client.get(K.heartbeat("h1", Plane.STORAGE)) is None  # revoked on stop


async def test_one_plane_cut_does_not_delay_the_others(client: EtcdClient, etcd: EtcdProcess) -> None:
    proxies = {p: await TcpProxy.to(etcd.client_urls[0]) for p in PLANES}
    hbs = {p: PlaneHeartbeat(K, "h1", p, [proxies[p].url], ttl=2, interval=0.2, tls=etcd.tls()) for p in PLANES}
    for hb in hbs.values():
        hb.start()
    try:
        await until(lambda: all(hb.reach().reachable for hb in hbs.values()), "every plane reachable")
        await proxies[Plane.STORAGE].cut(blackhole=True)  # calls on it hang until their timeout
        await until(lambda: not hbs[Plane.STORAGE].reach().reachable, "storage unreachable")
        seqs = {p: hbs[p].seq for p in PLANES}
        # Three beats (interval 0.2 s) of the others within 1 s: not held up by the hanging storage calls.
        await until(lambda: all(hbs[p].seq >= seqs[p] + 3 for p in (Plane.MANAGEMENT, Plane.SERVICE)),
                    "management and service beating on", timeout=1.0)  # fmt: skip
        assert hbs[Plane.STORAGE].seq == seqs[Plane.STORAGE]
        assert hbs[Plane.MANAGEMENT].reach().reachable and hbs[Plane.SERVICE].reach().reachable
        proxies[Plane.STORAGE].restore()
        await until(lambda: hbs[Plane.STORAGE].reach().reachable, "storage reachable again")
    finally:
        await asyncio.gather(*(hb.stop() for hb in hbs.values()))
        for px in proxies.values():
            await px.close()


async def test_heartbeat_returns_to_its_first_member_once_it_answers(
        etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Two paths to etcd, as two members: cut from its first, the heartbeat moves to the other and
    stays there while the first is cut; once the first answers again it returns within HOME_EVERY."""
    monkeypatch.setattr(heartbeat, "HOME_EVERY", 0.5)
    proxies = [await TcpProxy.to(etcd.client_urls[0]) for _ in range(2)]
    hb = PlaneHeartbeat(K, "h1", Plane.STORAGE, [px.url for px in proxies], ttl=2, interval=0.2, tls=etcd.tls())
    first, other = proxies[hb.client.first], proxies[1 - hb.client.first]
    hb.start()
    try:
        await until(lambda: hb.seq >= 2, "beating through its first member")
        assert hb.client.endpoint == first.url
        await first.cut()
        await until(lambda: hb.client.endpoint == other.url and hb.reach().reachable, "moved to the other")
        await asyncio.sleep(1.5)  # three checks of the first, refused: it stays
        assert hb.client.endpoint == other.url and hb.reach().reachable
        first.restore()
        await until(lambda: hb.client.endpoint == first.url, "back on its first member", timeout=5.0)
        seq = hb.seq
        await until(lambda: hb.seq >= seq + 2 and hb.reach().reachable, "beating through it again")
    finally:
        await hb.stop()
        for px in proxies:
            await px.close()


async def test_register_merges_and_keeps_foreign_fields(client: EtcdClient) -> None:
    await client.put_json(K.host("h1"), {"host": "h1", "domain": "r1", "host_id": 7})
    await register(client, K, "h1", "r2")
    got = await client.get_json(K.host("h1"))
    assert got is not None and got[0] == {"host": "h1", "domain": "r2", "host_id": 7}
    await client.put(K.host("broken"), b"[")
    await client.put_json(K.host("nodomain"), {"host": "nodomain"})
    hosts = await list_hosts(client, K)
    assert sorted(hosts) == ["h1"]  # broken records logged and left out


async def test_health_store_round_trip(client: EtcdClient) -> None:
    h = HostHealth("h1", "r1", {p: PlaneStatus(PlaneState.UP, 100.0, "x") for p in PLANES})
    await health_store.save_host(client, K, h, 101.0, "m1")
    f = FabricChange(Plane.SERVICE, "r1", True, ("h1", "h2", "h3"), 100.0)
    await health_store.save_fabric(client, K, f)
    await client.put(K.health("junk"), b"{}")
    view = await health_store.load(client, K)
    assert list(view.hosts) == ["h1"] and view.hosts["h1"].health == h and view.hosts["h1"].manager == "m1"
    assert view.fabric == [f]
    await health_store.save_fabric(client, K, FabricChange(Plane.SERVICE, "r1", False, (), 100.0))
    assert (await health_store.load(client, K)).fabric == []
