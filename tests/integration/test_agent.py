"""The agent as a real `vmha agent` process (and in-process for the isolation hook) on a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmha import config
from vmha.agent.daemon import Agent
from vmha.core.events import AgentStopped
from vmha.core.health import HealthTimings
from vmha.core.planes import PLANES, Plane
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register
from vmha.manager.detection import HealthMonitor
from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import ProxiedHost, config_text
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

K = Keys("t")
VMHA = str(Path(sys.executable).with_name("vmha"))



async def status_cli(host: ProxiedHost) -> subprocess.CompletedProcess[str]:
    """`vmha agent --status`, in a thread: a blocking run here would stall this event loop, which
    carries the agent's etcd traffic (the proxies), for the seconds the CLI takes to start, and the
    agent would then report every plane unreachable (seen under load: all three, exit 1)."""
    args = [VMHA, "agent", "--config", str(host.config_path), "--status-file", str(host.status_path), "--status"]
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=30)


@pytest.fixture
async def host(tmp_path: Path, etcd: EtcdProcess) -> AsyncIterator[ProxiedHost]:
    h = await ProxiedHost.create(tmp_path, "t", "h1", "r1", etcd)
    try:
        yield h
    finally:
        await h.close()


async def test_agent_registers_beats_reports_and_stops_cleanly(
    host: ProxiedHost, client: EtcdClient
) -> None:
    proc = await host.start_agent()

    async def values() -> dict[Plane, int]:
        out = {}
        for p in PLANES:
            got = await client.get_json(K.heartbeat("h1", p))
            if got is not None:
                out[p] = got[0]["seq"]
        return out

    async def all_planes() -> dict[Plane, int] | None:
        got = await values()
        return got if len(got) == 3 else None

    seqs = await until(all_planes, "a heartbeat on every plane", interval=0.1)

    async def each_beat_again() -> bool:
        later = await values()
        return len(later) == 3 and all(later[p] > seqs[p] for p in PLANES)

    await until(each_beat_again, "every plane's value changing", timeout=5, interval=0.1)
    reg = await client.get_json(K.host("h1"))
    assert reg is not None and reg[0]["domain"] == "r1"

    await until(lambda: (s := host.status()) is not None and not s["unreachable"], "status file")
    out = await status_cli(host)
    assert out.returncode == 0, out.stderr
    assert '"unreachable": []' in out.stdout

    assert await host.stop_agent() == 0
    assert proc.returncode == 0
    assert not host.status_path.exists()
    reg = await client.get_json(K.host("h1"))  # membership outlives the agent, marked stopped
    assert reg is not None and isinstance(reg[0]["agent_stopped"], float), reg
    # Not revoked: the heartbeat keys stay until their leases run out (TTL 2 s).
    assert len(await values()) == 3

    async def expired() -> bool:
        return await values() == {}

    await until(expired, "the heartbeat keys expired", timeout=6, interval=0.1)


async def test_agent_restart_clears_its_stop_mark(host: ProxiedHost, client: EtcdClient) -> None:
    """The manager's view of the marks (its HealthMonitor) over a real agent's stop and restart."""
    await host.start_agent()
    await until(lambda: (s := host.status()) is not None and not s["unreachable"], "agent beating")
    monitor = HealthMonitor(client, K, HealthTimings(), persist=False)
    changes = monitor.subscribe()
    run = asyncio.create_task(monitor.run())
    try:

        async def next_mark() -> AgentStopped:
            async for c in changes:
                if isinstance(c, AgentStopped):
                    return c
            raise AssertionError("the monitor's changes ended")

        await asyncio.wait_for(monitor.ready.wait(), 10)
        assert monitor.agent_marks() == {}
        first = asyncio.create_task(next_mark())
        await asyncio.sleep(0.5)
        assert not first.done()  # no host marked: nothing published
        assert await host.stop_agent() == 0
        stopped = await asyncio.wait_for(first, 5)
        assert stopped.host == "h1" and stopped.since is not None and abs(stopped.since - time.time()) < 5
        assert monitor.agent_marks() == {"h1": stopped.since}
        await host.start_agent()
        assert await asyncio.wait_for(next_mark(), 10) == AgentStopped("h1", None)
        assert monitor.agent_marks() == {}
        reg = await client.get_json(K.host("h1"))
        assert reg is not None and reg[0]["agent_stopped"] is None and reg[0]["domain"] == "r1"
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def test_agent_regrants_after_lease_loss(host: ProxiedHost, client: EtcdClient) -> None:
    await host.start_agent()
    key = K.heartbeat("h1", Plane.SERVICE)
    first = await until(lambda: client.get_json(key), "a service heartbeat", interval=0.1)
    old = first[1].lease
    await client.revoke(old)  # etcd forgets the lease, as after a partition longer than the TTL

    async def regranted() -> bool:
        again = await client.get_json(key)
        return again is not None and again[1].lease not in (0, old)

    await until(regranted, "a heartbeat on a new lease", timeout=10, interval=0.1)
    assert "granting a new one" in host.log()


async def test_agent_status_shows_exactly_the_cut_plane(host: ProxiedHost) -> None:
    await host.start_agent()
    await until(lambda: (s := host.status()) is not None and not s["unreachable"], "all reachable")
    await host.cut(Plane.STORAGE, blackhole=True)
    s = await until(lambda: (s := host.status()) is not None and s["unreachable"] == ["storage"] and s, "storage cut")
    assert s["planes"]["storage"]["last_error"]  # the status file that showed the cut, not a later read
    host.restore(Plane.STORAGE)
    await until(lambda: (s := host.status()) is not None and not s["unreachable"], "storage back")
    out = await status_cli(host)
    assert out.returncode == 0


@contextlib.asynccontextmanager
async def isolation_agent(host: ProxiedHost, tmp_path: Path) -> AsyncIterator[tuple[Agent, list[float]]]:
    """An in-process agent (isolation_after 1 s) whose on_isolated, the lock layer's "stop local lease
    holders", records when it was called; running, every plane reachable."""
    cfg = config.load(host.config_path)
    cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"isolation_after": 1.0})})
    calls: list[float] = []

    async def on_isolated() -> None:
        calls.append(time.monotonic())

    agent = Agent(cfg, status_path=tmp_path / "iso.json", on_isolated=on_isolated)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: all(r.reachable for r in agent.reach().values()), "all reachable")
        yield agent, calls
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_isolation_hook_fires_once_when_management_and_service_are_lost(
    host: ProxiedHost, tmp_path: Path
) -> None:
    async with isolation_agent(host, tmp_path) as (agent, calls):
        await host.cut(Plane.MANAGEMENT)
        await asyncio.sleep(1.5)
        assert calls == []  # management alone is no isolation
        await host.cut(Plane.SERVICE)
        cut = time.monotonic()
        await until(lambda: calls, "isolation callback")
        assert calls[0] - cut >= 1.0  # not before isolation_after
        await asyncio.sleep(1.5)
        assert len(calls) == 1  # once per isolation
        assert agent.status()["isolated"] is True
        host.restore(Plane.MANAGEMENT)
        host.restore(Plane.SERVICE)
        await until(lambda: not agent.isolation_fired, "re-armed")


async def test_isolation_response_withheld_when_the_other_hosts_lost_the_same_planes(
    host: ProxiedHost, client: EtcdClient, tmp_path: Path
) -> None:
    """Three other hosts of the cluster (registered here, their management and service heartbeats on
    a lease this test holds). Only h1 cut: its isolation. All of them cut: a fabric outage, which the
    agent reads over storage; its VMs are left running."""
    lease = await client.grant(60)
    for h in ("h2", "h3", "h4"):
        await register(client, K, h, "r1")
        for p in (Plane.MANAGEMENT, Plane.SERVICE):
            await client.put_json(K.heartbeat(h, p), {"host": h, "plane": p.value, "seq": 1, "t": 0}, lease=lease)
    async with isolation_agent(host, tmp_path) as (agent, calls):
        await host.cut(Plane.MANAGEMENT)
        await host.cut(Plane.SERVICE)
        await until(lambda: calls, "isolation callback")  # the others beat: h1 is isolated
        assert agent.isolation_withheld == ""
        host.restore(Plane.MANAGEMENT)
        host.restore(Plane.SERVICE)
        await until(lambda: not agent.isolation_fired, "re-armed")

        await client.revoke(lease)  # the others' management and service heartbeats are gone too
        await host.cut(Plane.MANAGEMENT)
        await host.cut(Plane.SERVICE)
        await until(lambda: agent.isolation_withheld, "isolation response withheld")
        assert agent.isolation_withheld == "4 of the 4 hosts of the cluster lost them too"
        await asyncio.sleep(2.0)
        assert len(calls) == 1 and not agent.isolation_fired  # the VMs were left running


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    eps = {p: ["http://127.0.0.1:1"] for p in PLANES}
    plain = "[etcd]\ninsecure = true\n"  # these configs are refused before any etcd is reached
    bad.write_text(config_text("t", "h1", "r1", eps, {"lease_ttl": 2, "keepalive_interval": 1.5}, etcd=plain))
    out = subprocess.run([VMHA, "agent", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "timings" in out.stderr and "keepalive_interval" in out.stderr, out.stderr

    eps[Plane.STORAGE] = ["198.18.0.1:2379"]
    bad.write_text(config_text("t", "h1", "r1", eps, etcd=plain))
    out = subprocess.run([VMHA, "agent", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "planes.storage.endpoints" in out.stderr, out.stderr

    bad.write_text(config_text("t", None, "r1", {p: ["http://127.0.0.1:1"] for p in PLANES}, etcd=plain))
    out = subprocess.run([VMHA, "agent", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "[host]" in out.stderr, out.stderr
