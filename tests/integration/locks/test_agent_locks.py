"""The agent's lockspace membership (vmha.agent.locks.AgentLocks) against a real etcd and a real
sanlock daemon: at start it takes a host_id from etcd and joins; at a clean stop it leaves, but only
when no local process holds a lease (leaving makes sanlock kill the holders: an agent restart must
never kill VMs). This process plays the host: its daemon is the session's (named vt2mgr)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
from lockhelp import new_lockspace

from vmha import config
from vmha.agent.locks import AgentLocks
from vmha.etcd import hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.sanlockd import LabSanlock
from vmha.locks import acquire_for
from vmha.testing.etcd import EtcdProcess
from vmha.testing.wait import until

pytestmark = pytest.mark.integration


async def test_agent_joins_with_an_etcd_host_id_and_leaves_only_without_holders(
    manager_sanlock: LabSanlock, etcd: EtcdProcess, tmp_path: Path
) -> None:
    space = new_lockspace(tmp_path / "shared")
    space.init()
    space.create_lease("vm1")
    url = etcd.client_urls[0]
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(
        '[cluster]\nname = "vt2"\n[host]\nname = "vt2mgr"\n'
        + "".join(f'[planes.{p}]\nendpoints = ["{url}"]\n' for p in ("management", "storage", "service"))
        + f'[locks]\npath = "{space.path}"\nlockspace = "{space.name}"\nio_timeout = 1\n'
    )
    async with EtcdClient(etcd.client_urls, timeout=2.0) as client:
        await client.create(Keys("vt2").host_id(1), {"host": "someone-else"})  # id 1 is taken
        agent = AgentLocks(config.load(str(cfg_path)))
        run = asyncio.create_task(agent.run())
        child: subprocess.Popen[str] | None = None
        try:
            await until(lambda: agent.host_id is not None or run.done(), "the agent joining", timeout=30, interval=0.1)
            assert agent.host_id == 2, f"agent did not join: {run.exception() if run.done() else 'still joining'}"
            assert await hostids.lookup(client, Keys("vt2"), "vt2mgr") == 2
            assert space.joined(2) and space.local_state() == "joined"

            # A VM process of this host holds a lease: a clean stop keeps the lockspace (and the VM).
            child = subprocess.Popen(
                [sys.executable, "-c", "import signal; from vmha.locks import register_self as r\n"
                 "fd = r(); print('registered', flush=True); signal.pause()"],
                stdout=subprocess.PIPE, text=True,
            )
            assert child.stdout is not None and child.stdout.readline().strip() == "registered"
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
