"""The agent's lockspace membership (vmha.agent.locks.AgentLocks) against a real etcd and a real
sanlock daemon: at start it takes a host_id from etcd and joins (after checking libvirt's lock
settings, if configured); at a clean stop it leaves, but only when no local process holds a lease
(leaving makes sanlock kill the holders: an agent restart must never kill VMs). This process plays
the host: its daemon is the session's (named vt2mgr)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sanlock
from lockhelp import new_lockspace

from vmha import config
from vmha.agent import locks as agent_locks
from vmha.agent.locks import REJOIN_CHECK, AgentLocks
from vmha.core.health import HealthTimings
from vmha.core.planes import PLANES
from vmha.etcd import hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.sanlockd import LabSanlock
from vmha.locks import LockSpace, acquire_for
from vmha.locks.lease import recorded_holders
from vmha.manager.detection import HealthMonitor, LocksRefused
from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import config_text
from vmha.testing.wait import until

pytestmark = pytest.mark.integration


MANAGER = "m1"  # the etcd user of the manager's part in these tests


async def auth_on(etcd: EtcdProcess, cluster: str) -> None:
    """`vmha etcd setup-auth` for host vt2mgr (its user and role, its host_id allocated) and the manager."""
    await etcd.setup_auth(cluster, ["vt2mgr"], [MANAGER])


def agent_config(tmp_path: Path, etcd: EtcdProcess, cluster: str, extra: str = "") -> tuple[LockSpace, Path]:
    """A fresh lockspace with a lease for vm1, and the config of an agent of host vt2mgr using it."""
    space = new_lockspace(tmp_path / "shared")
    space.init()
    space.create_lease("vm1")
    cfg_path = tmp_path / "agent.toml"
    locks = f'[locks]\npath = "{space.path}"\nlockspace = "{space.name}"\nio_timeout = 1\n'
    cfg_path.write_text(config_text(cluster, "vt2mgr", "default", {p: etcd.client_urls for p in PLANES},
                                    extra=locks + extra, etcd=etcd.toml("vt2mgr")))  # fmt: skip
    return space, cfg_path


def registered_child() -> subprocess.Popen[str]:
    """A process registered with this host's sanlock daemon, as a VM (QEMU) whose lease another
    process acquires for its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal; from vmha.locks import register_self as r\n"
         "fd = r(); print('registered', flush=True); signal.pause()"],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "registered"
    return child


async def test_agent_joins_with_the_host_id_a_manager_allocated_and_leaves_only_without_holders(
    manager_sanlock: LabSanlock, etcd: EtcdProcess, tmp_path: Path
) -> None:
    space, cfg_path = agent_config(tmp_path, etcd, "vt2")
    async with EtcdClient(etcd.client_urls, tls=etcd.tls(MANAGER), timeout=2.0) as client:
        await client.create(Keys("vt2").host_id(1), {"host": "someone-else"})  # id 1 is taken
        await auth_on(etcd, "vt2")
        # setup-auth allocated vt2mgr's id; removed (as for a host added later) to show that the
        # agent waits for a manager to allocate one rather than taking one itself.
        assert await client.delete(Keys("vt2").host_id(2))
        agent = AgentLocks(config.load(str(cfg_path)))
        run = asyncio.create_task(agent.run())
        child: subprocess.Popen[str] | None = None
        try:
            # The agent never allocates: it waits for a manager to.
            await asyncio.sleep(3)
            assert agent.host_id is None and not run.done() and space.local_state() == "absent"
            assert await hostids.host_ids(client, Keys("vt2")) == {1: "someone-else"}
            await hostids.allocate(client, Keys("vt2"), "vt2mgr")  # the leading manager's part
            await until(lambda: agent.host_id is not None or run.done(), "the agent joining", timeout=30, interval=0.1)
            assert agent.host_id == 2, f"agent did not join: {run.exception() if run.done() else 'still joining'}"
            assert await hostids.lookup(client, Keys("vt2"), "vt2mgr") == 2
            assert space.joined(2) and space.local_state() == "joined"

            # A VM process of this host holds a lease: a clean stop keeps the lockspace (and the VM).
            child = registered_child()
            acquire_for(space, "vm1", child.pid)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            await agent.stop()
            assert space.local_state() == "joined" and child.poll() is None

            # The VM has gone: the next clean stop leaves.
            child.kill()
            child.wait(timeout=5)
            await agent.stop()
            assert space.local_state() == "absent"
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(timeout=5)
            space.leave(2)


async def test_agent_records_holders_it_only_sees_through_sanlock(
    manager_sanlock: LabSanlock, etcd: EtcdProcess, tmp_path: Path
) -> None:
    """A lease acquired for a process by someone else (libvirt for QEMU) has no vmha record: the
    running agent records it within a REJOIN_CHECK, and forgets the record once the process is gone."""
    space, cfg_path = agent_config(tmp_path, etcd, "vt2r")
    await auth_on(etcd, "vt2r")
    agent = AgentLocks(config.load(str(cfg_path)))
    run = asyncio.create_task(agent.run())
    child = registered_child()

    async def until(check: Callable[[], bool], what: str) -> None:
        for _ in range(int((REJOIN_CHECK + 30) / 0.1)):
            if check() or run.done():
                break
            await asyncio.sleep(0.1)
        assert check(), f"{what}: {run.exception() if run.done() else 'not in time'}"

    try:
        await until(lambda: agent.host_id is not None, "agent joined")
        sanlock.acquire(space.bname, b"vm1", space.disks("vm1"), pid=child.pid)  # as libvirt does

        def records() -> list[int]:  # other tests of this session leave records of their own vm1 holders
            return [h.pid for h in recorded_holders("vm1") if h.pid == child.pid]

        assert records() == []
        await until(lambda: records() == [child.pid], "holder recorded")
        child.kill()
        child.wait(timeout=5)
        await until(lambda: records() == [], "record of the exited holder pruned")
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)
        await agent.stop()
        space.leave(agent.host_id or 0)


async def test_agent_refuses_a_host_whose_libvirt_lock_settings_are_wrong(
    manager_sanlock: LabSanlock, etcd: EtcdProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu.conf without lock_manager = "sanlock": the agent does not join the lockspace (so it holds
    nothing and attests nothing), marks its host record, which the manager's monitor reports, and
    protects the host once the setting is fixed."""
    monkeypatch.setattr(agent_locks, "REFUSED_RECHECK", 0.5)
    etc = tmp_path / "etc-libvirt"
    etc.mkdir()
    (etc / "qemu.conf").write_text('#lock_manager = "sanlock"\nuser = "libvirt-qemu"\n')
    space, cfg_path = agent_config(tmp_path, etcd, "vt2l", f'[libvirt]\nconfig_dir = "{etc}"\n')
    await auth_on(etcd, "vt2l")
    keys = Keys("vt2l")
    agent = AgentLocks(config.load(str(cfg_path)))
    async with EtcdClient(etcd.client_urls, tls=etcd.tls(MANAGER), timeout=2.0) as client:
        monitor = HealthMonitor(client, keys, HealthTimings(), persist=False)
        changes = monitor.subscribe()
        watching = asyncio.create_task(monitor.run())
        run = asyncio.create_task(agent.run())

        async def refused() -> LocksRefused:  # the next LocksRefused (health changes come too)
            async def first() -> LocksRefused:
                async for c in changes:
                    if isinstance(c, LocksRefused):
                        return c
                raise AssertionError("the monitor's changes ended")

            return await asyncio.wait_for(first(), 20)

        try:
            change = await refused()
            assert change.host == "vt2mgr"
            assert change.why is not None and change.why.startswith(
                f'{etc}/qemu.conf: lock_manager must be "sanlock", it is not set')
            assert monitor.locks_refused() == {"vt2mgr": change.why}
            await asyncio.sleep(2.0)  # several rechecks: still refused, never joined
            assert agent.host_id is None and space.local_state() == "absent" and not run.done()
            (etc / "qemu.conf").write_text('lock_manager = "sanlock"\n')  # explicit leases: nothing more needed
            change = await refused()
            assert change == LocksRefused("vt2mgr", None) and monitor.locks_refused() == {}
            for _ in range(300):
                if agent.host_id is not None:
                    break
                await asyncio.sleep(0.1)
            assert agent.host_id is not None and space.joined(agent.host_id)
        finally:
            for task in (run, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await agent.stop()
