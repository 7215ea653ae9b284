"""Host A loses power (its sanlock daemon and every process of it killed): the manager may take the
VM's lease only once sanlock reports A DEAD, about 8 x io_timeout + 60 s after A's last renewal.
The one slow test of the suite (~70 s)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from lockhelp import LockCluster

from vmha.core.fencing import ProofMethod
from vmha.lab.net import pid_alive as alive
from vmha.locks import HostState

pytestmark = pytest.mark.integration


async def test_lease_taken_only_after_host_dead(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1")
    for pid in (holder.pid, cluster.a.daemon.pid):  # everything of host A: a power loss
        os.kill(pid, signal.SIGKILL)
    holder.wait(timeout=5)
    t_kill = time.monotonic()
    prover = cluster.prover()
    task = asyncio.create_task(prover.prove(
        "vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN, ProofMethod.HOST_DEAD), timeout=120))
    # Past renewal failure (8 s) the lease still belongs to A, FAIL but not DEAD, and no proof exists.
    await asyncio.sleep(15)
    assert not task.done()
    owners = cluster.space.owners("vm1")
    assert [(o.host_id, o.state) for o in owners] == [(1, HostState.FAIL)]
    proof = await task
    took = time.monotonic() - t_kill
    print(f"host-dead proof {took:.1f} s after the power loss; host states {proof.details['host_states']}")
    assert not alive(holder.pid)
    assert proof.method is ProofMethod.HOST_DEAD
    # sanlock's host_dead at io_timeout 1 is 68 s after the last renewal (at most 2 s before the kill).
    assert took >= 60, f"lease taken {took:.1f} s after the power loss, before host_dead"
    assert proof.details["host_states"].split()[-1] == "dead"
    assert "lease-taken" in proof.details["failed_methods"]
