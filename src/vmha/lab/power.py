"""The lab's power fence: a host is "off" when no process of its network namespace is left.

It kills every process in the host's netns (`ip netns pids`: anchor, sshfs, sanlock, agent, VMs)
with SIGKILL, repeats until the list is empty, and only then reports the host off: a confirmed
power-off, as an IPMI/Redfish fence agent's "status: off" would be. Killing sanlock alone would not
do: without a watchdog its lease holders would keep running and writing.

Used by `vmha lab fault HOST power-off` and, through LabPowerFence, by the managers (the lab's
manager configs set manager.power_fence = true unless the lab was built with power_fence=False).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from vmha.lab.hosts import power_off
from vmha.lab.net import LabError
from vmha.lab.state import DEFAULT_DIR, LabState
from vmha.locks.power import PowerFenceError


def fence_host(lab_dir: Path, host: str, who: str) -> str:
    """Powers the host off and confirms it; returns the evidence text. Idempotent: an already-off
    host is confirmed again (its namespace must still hold no process)."""
    try:
        state = LabState.load(lab_dir)
    except LabError as e:
        raise PowerFenceError(f"power fence {host}: {e}") from None
    if host not in state.hosts:
        raise PowerFenceError(f"power fence: no lab host {host!r}")
    t0 = time.time()
    try:
        killed = power_off(state, host)
    except LabError as e:
        raise PowerFenceError(f"power fence {host}: {e}") from None
    left = state.node(host).pids()
    if left:
        raise PowerFenceError(f"power fence {host}: processes {left} still run after SIGKILL")
    state.save()
    return (f"host={host} killed={len(killed)} pids={','.join(map(str, killed)) or '-'} "
            f"confirmed_off_after={time.time() - t0:.3f}s by={who}")


class LabPowerFence:
    """The lab's out-of-band fence for the managers (vmha.locks.power.PowerFence)."""

    def __init__(self, lab_dir: Path | None = None, who: str = "manager") -> None:
        self.lab_dir = lab_dir or Path(os.environ.get("VMHA_LAB_DIR", str(DEFAULT_DIR)))
        self.who = who

    async def power_off(self, host: str, timeout: float) -> str:
        """Returns the evidence once the host is confirmed off; raises PowerFenceError otherwise."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fence_host, self.lab_dir, host, self.who), timeout)
        except TimeoutError:
            raise PowerFenceError(f"power fence {host}: not confirmed off within {timeout:.0f} s") from None
