"""Lease holders that vmha did not start: a QEMU under libvirt registers with the host's sanlock and
libvirt's lock manager acquires the VM's lease for its pid, writing no vmha holder record. The agent
records such holders from sanlock's inquire while the daemon knows them, so that once the lockspace
has failed (the daemon forgets every holder) the exit attestation still checks them and the
isolation response still stops them. Real sanlock daemons, io_timeout 1; a plain registered process
stands in for QEMU (the lead's QEMU tests cover the real one)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from lockhelp import LockCluster

from vmha.lab.net import pid_alive as alive
from vmha.lab.sanlockd import stop_sanlock

pytestmark = pytest.mark.integration


def qemu_like(cluster: LockCluster, vm: str) -> int:
    """A registered process of host A whose lease another process acquires for its pid; its pid."""
    p = cluster.a.start("register", "registered", ignore_term=False)
    assert cluster.a.run("acquire-for", vm=vm, pid=p.pid).strip() == "acquired"
    return p.pid


def test_holders_seen_through_sanlock_are_recorded_then_checked_and_stopped_after_the_daemon_forgot(
    cluster: LockCluster,
) -> None:
    cluster.space.create_lease("vm2")
    recorded = qemu_like(cluster, "vm1")
    assert cluster.a.run("sweep").strip() == f"vm1:{recorded}"
    assert cluster.a.run("sweep").strip() == "-"  # recorded once
    unrecorded = qemu_like(cluster, "vm2")  # acquired after the last sweep: only sanlock knows it
    # Host A's sanlock is gone (as after a failed lockspace): it can no longer name any holder.
    stop_sanlock(cluster.a.daemon)
    r = json.loads(cluster.a.run("attest", vm="vm1"))
    assert not r["ok"] and r["reason"] == f"holders still alive: pid={recorded}"
    out = cluster.a.run("isolate", grace=2.0)
    assert f"terminated=vm1:{recorded}" in out and "survivors=-" in out
    assert not alive(recorded)
    # What the recording is for: the holder that no sweep saw is found by nothing any more.
    assert alive(unrecorded) and str(unrecorded) not in out
    os.kill(unrecorded, signal.SIGKILL)
