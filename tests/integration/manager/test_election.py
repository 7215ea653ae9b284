"""Leader election and leader-guarded writes against a real etcd (the `etcd` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import pytest

from vmha.etcd.client import EtcdClient
from vmha.etcd.election import Election, NotLeader, leader_name
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog, RecordStore
from vmha.etcd.tasks import StaleTasks, TaskStore
from vmha.testing.etcd import EtcdProcess
from vmha.testing.proxy import TcpProxy

pytestmark = pytest.mark.integration

KEYS = Keys("vt5")
TTL = 2


def _task(vm: str, state: str = "queued") -> dict[str, object]:
    return {
        "vm": vm, "source": "h1", "kind": "evacuate", "recovery": 1, "priority": 0, "row": "storage",
        "action": "fence-evacuate", "failed": {"storage": 1.0}, "created": 1.0, "state": state,
    }  # fmt: skip


@contextlib.asynccontextmanager
async def clients(etcd: EtcdProcess, n: int) -> AsyncIterator[list[EtcdClient]]:
    cs = [EtcdClient(etcd.client_urls, tls=etcd.tls(), timeout=1.0, name=f"c{i}") for i in range(n)]
    try:
        yield cs
    finally:
        for c in cs:
            await c.close()


async def test_one_leader_then_takeover_after_crash(etcd: EtcdProcess) -> None:
    async with clients(etcd, 3) as (a, b, probe):
        ea, eb = Election(a, KEYS.leader, "mgr-a", TTL), Election(b, KEYS.leader, "mgr-b", TTL)
        lead_a = await asyncio.wait_for(ea.campaign(), 10)
        standby = asyncio.create_task(eb.campaign())
        await asyncio.sleep(TTL * 1.5)  # several keepalives: b must still be waiting
        assert not standby.done()
        assert leader_name(await probe.get(KEYS.leader)) == "mgr-a"

        # a crashes: its keepalive stops, its lease is never revoked.
        assert ea._keepalive is not None
        ea._keepalive.cancel()
        t0 = time.monotonic()
        lead_b = await asyncio.wait_for(standby, 10)
        print(f"\ntakeover after the leader's last keepalive: {time.monotonic() - t0:.2f} s (ttl {TTL})")
        assert lead_b.active and leader_name(await probe.get(KEYS.leader)) == "mgr-b"

        # The old leader's token no longer opens leader-only writes.
        with pytest.raises(NotLeader):
            await TaskStore(a, KEYS).write(lead_a, {"vm1": _task("vm1")})
        assert not lead_a.active
        assert await probe.get(KEYS.task("vm1")) is None
        await eb.resign()
        assert await probe.get(KEYS.leader) is None


async def test_leader_cut_off_from_etcd_stops_before_another_is_elected(etcd: EtcdProcess) -> None:
    proxy = await TcpProxy.to(etcd.client_urls[0])
    a = EtcdClient([proxy.url], tls=etcd.tls(), timeout=0.5, name="a")
    b = EtcdClient(etcd.client_urls, tls=etcd.tls(), timeout=1.0, name="b")
    lost_at: list[float] = []
    try:
        ea = Election(a, KEYS.leader, "mgr-a", TTL, on_lost=lambda _: lost_at.append(time.monotonic()))
        eb = Election(b, KEYS.leader, "mgr-b", TTL)
        await asyncio.wait_for(ea.campaign(), 10)
        standby = asyncio.create_task(eb.campaign())
        await asyncio.sleep(0.5)
        await proxy.cut(blackhole=True)  # a's packets vanish; etcd and b are fine
        cut = time.monotonic()
        lead_b = await asyncio.wait_for(standby, 15)
        # Safety: a had stopped acting before b even began the campaign it won.
        assert lost_at and lost_at[0] < lead_b.since, "the cut-off leader acted while another was elected"
        print(f"\ncut -> old leader stops: {lost_at[0] - cut:.2f} s; new leader: {lead_b.since - cut:.2f} s")
        await eb.resign()
        await ea.resign()
    finally:
        await a.close()
        await b.close()
        await proxy.close()


async def test_leader_key_without_lease_is_removed(etcd: EtcdProcess) -> None:
    async with clients(etcd, 1) as (a,):
        await a.put(KEYS.leader, b'{"name": "by-hand"}')  # no lease: it would never expire
        election = Election(a, KEYS.leader, "mgr-a", TTL)
        lead = await asyncio.wait_for(election.campaign(), 5)
        assert leader_name(await a.get(KEYS.leader)) == "mgr-a"
        await election.resign()
        assert not lead.active


async def test_frozen_etcd_ends_leadership(etcd: EtcdProcess) -> None:
    async with clients(etcd, 1) as (a,):
        ea = Election(a, KEYS.leader, "mgr-a", TTL)
        lead = await asyncio.wait_for(ea.campaign(), 10)
        etcd.signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(lead.lost.wait(), TTL + 2)
        finally:
            etcd.signal(signal.SIGCONT)
        assert "keepalive" in lead.reason
        await ea.resign()


async def test_task_store_cas(etcd: EtcdProcess) -> None:
    async with clients(etcd, 3) as (a, b, raw):
        ea = Election(a, KEYS.leader, "mgr-a", TTL)
        lead = await ea.campaign()
        store = TaskStore(a, KEYS)
        assert await store.load() == []
        await store.write(lead, {"vm1": _task("vm1"), "vm2": _task("vm2")})
        await store.write(lead, {"vm1": _task("vm1", "proving")})

        # Another writer changes vm2 behind our back: our next write of vm2 is refused, vm1 is not touched.
        kv = await raw.get(KEYS.task("vm2"))
        assert kv is not None
        assert await raw.cas(KEYS.task("vm2"), _task("vm2", "cancelled"), kv.mod_revision)
        with pytest.raises(StaleTasks) as e:
            await store.write(lead, {"vm1": _task("vm1", "marking-down"), "vm2": _task("vm2", "proving")})
        assert e.value.vms == ["vm2"]
        assert (await raw.get_json(KEYS.task("vm1")) or ({}, None))[0]["state"] == "proving"
        assert lead.active  # a stale task is no loss of leadership

        # A broken value is skipped on load, and a new task for that VM replaces it.
        await raw.put(KEYS.task("vm3"), b"{not json")
        await raw.put_json(KEYS.task("vm4"), {"vm": "vm4"})
        loaded = await store.load()
        assert [t.vm for t in loaded] == ["vm1", "vm2"]
        assert loaded[1].state.value == "cancelled"
        await store.write(lead, {"vm3": _task("vm3")})
        assert (await raw.get_json(KEYS.task("vm3")) or ({}, None))[0]["vm"] == "vm3"

        # A new leader: the old one's store refuses, even before its keepalive notices.
        await raw.delete(KEYS.leader)  # as if its lease had expired
        lead_b = await Election(b, KEYS.leader, "mgr-b", TTL).campaign()
        with pytest.raises(NotLeader):
            await store.write(lead, {"vm1": _task("vm1", "ready")})
        assert not lead.active
        store_b = TaskStore(b, KEYS)
        await store_b.load()
        await store_b.write(lead_b, {"vm1": _task("vm1", "marking-down")})
        lead_b.end("test over")


async def test_large_batch_with_records_crosses_transactions(etcd: EtcdProcess) -> None:
    """150 finished tasks and their records need several transactions (etcd's 128-operation cap):
    each lands whole, every task with its own record."""
    async with clients(etcd, 1) as (a,):
        lead = await Election(a, KEYS.leader, "mgr-a", TTL).campaign()
        vms = [f"big{i:03d}" for i in range(150)]
        done = {vm: _task(vm, "done") for vm in vms}
        store = TaskStore(a, KEYS)
        await store.write(lead, done, [(vm, 1, d) for vm, d in done.items()])
        loaded = {t.vm: t.state.value for t in await TaskStore(a, KEYS).load()}
        assert {vm: loaded.get(vm) for vm in vms} == dict.fromkeys(vms, "done")
        records = RecordStore(a, KEYS)
        for vm in (vms[0], vms[99], vms[149]):
            assert [(t.recovery, t.state.value) for t in await records.records(vm)] == [(1, "done")]
        lead.end("test over")


async def test_records_and_events(etcd: EtcdProcess) -> None:
    async with clients(etcd, 2) as (a, b):
        ea = Election(a, KEYS.leader, "mgr-a", TTL)
        lead = await ea.campaign()
        records = RecordStore(a, KEYS)
        failed = _task("vm1", "failed") | {"recovery": 2}
        store = TaskStore(a, KEYS)
        await store.write(lead, {"vm1": failed}, [("vm1", 1, _task("vm1", "done")), ("vm1", 2, failed)])
        assert (await store.load())[0].state.value == "failed"  # the task and its records, one transaction
        await a.put(KEYS.record("vm1", 3), b"garbage")
        assert [(t.recovery, t.state.value) for t in await records.records("vm1")] == [(1, "done"), (2, "failed")]

        events = EventLog(a, KEYS, keep=5)
        await events.start()
        await events.append(lead, [("info", "manager", f"line {i}", "log") for i in range(3)], 10.0)
        follower = EventLog(b, KEYS)
        shown, rev = await follower.tail(10)
        assert [e.seq for e in shown] == [1, 2, 3]
        stream = follower.follow(rev)
        await events.append(lead, [("warn", "manager", f"line {i}", "alert") for i in range(3, 8)], 11.0)
        got = [await asyncio.wait_for(anext(stream), 5) for _ in range(5)]
        await stream.aclose()
        assert [e.text for e in got] == [f"line {i}" for i in range(3, 8)]
        shown, _ = await follower.tail(100)
        assert [e.seq for e in shown] == [4, 5, 6, 7, 8]  # bounded: the oldest were pruned

        # A new leader continues the sequence.
        events2 = EventLog(a, KEYS, keep=5)
        await events2.start()
        await events2.append(lead, [("info", "manager", "after takeover", "log")], 12.0)
        shown, _ = await follower.tail(1)
        assert shown[0].seq == 9
        await ea.resign()
