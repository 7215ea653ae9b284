"""Desired state through a real Nova (`vmha lab up --nova`, 3 hosts, 3 VMs, io_timeout 1, stand-in
guests, prefix vnd; managers on the nova driver with the default restart_after of 20 s):
- a server whose guest ends behind Nova's back (its lab VM process killed) is seen SHUTOFF by
  nova-compute's power-state sync, stopped by Nova itself (a stop action with no user), and started
  again on its own host by the manager, on a lease-taken proof, restart_after and an inventory later;
- a server its owner stops (`openstack server stop`: a stop action with the user's id) stays stopped;
- verify finds no split-brain and nothing is left behind.
Without scripts/setup-nova.sh the module is skipped with that instruction.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from labcheck import assert_nothing_left, echo, wait_for

from vmha.core.settings import RecoverySettings
from vmha.lab import cluster, etcdq, novalab, scenario
from vmha.lab.cluster import KEYS
from vmha.lab.nova.rig import SYNC_POWER_STATE_INTERVAL, VENV
from vmha.lab.procs import vm_processes
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState
from vmha.manager.daemon import INVENTORY_INTERVAL

pytestmark = [pytest.mark.e2e, pytest.mark.nova]

PREFIX = "vnd"
RESTART_AFTER = RecoverySettings().restart_after  # the lab's managers run with the default
OWNER = "alice:admin"  # a member of the servers' project (the rig's token: user:project)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    if not (VENV / "bin" / "nova-manage").exists():
        pytest.skip(f"the Nova rig is not installed in {VENV}: run `bash scripts/setup-nova.sh`")
    lab_dir = tmp_path_factory.mktemp("novalab-desired")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=3, io_timeout=1, prefix=PREFIX, echo=echo, nova=True)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def events_since(lab: LabState, t0: float) -> list[str]:
    raw, _ = etcdq.get_json_prefix(lab, KEYS.events_prefix)
    return [str(e["text"]) for _, e in sorted(raw.items()) if isinstance(e, dict) and float(e.get("t") or 0) >= t0]


def stops(lab: LabState, sid: str) -> list[dict[str, Any]]:
    """The server's stop actions in Nova's history, oldest first."""
    actions = novalab.rig(lab).api("GET", f"/servers/{sid}/os-instance-actions")["instanceActions"]
    return sorted((a for a in actions if a["action"] == "stop"), key=lambda a: str(a["start_time"]))


def test_a_server_whose_guest_ended_is_started_again_on_its_host(lab: LabState) -> None:
    vm, (host,) = sorted(scenario.running_on(lab).items())[0]
    sid = novalab.servers(lab)[vm]["id"]
    t0 = time.time()
    for p in vm_processes(lab.prefix):
        if p.vm == vm:
            os.kill(p.pid, signal.SIGKILL)
    echo(f"{vm} killed on {host}, behind Nova's back")
    # Nova's periodic tasks first run up to periodic_fuzzy_delay (60 s) after a compute starts.
    took = wait_for(f"Nova sees {vm} SHUTOFF", lambda: novalab.servers(lab)[vm]["status"] == "SHUTOFF",
                    60 + 2 * SYNC_POWER_STATE_INTERVAL)
    echo(f"Nova shows {vm} SHUTOFF {took:.1f} s after the kill")
    assert stops(lab, sid)[-1]["user_id"] is None, "Nova's own stop carries no user"
    took = wait_for(f"{vm} running again", lambda: scenario.running_on(lab).get(vm) == [host],
                    RESTART_AFTER + 2 * INVENTORY_INTERVAL + 60)
    echo(f"{vm} running again on {host} {took:.1f} s after Nova showed it SHUTOFF, {time.time() - t0:.1f} s "
         "after the kill")
    assert took >= RESTART_AFTER - 1, "restarted on a single inventory"
    wait_for(f"Nova shows {vm} ACTIVE on {host}", lambda: (novalab.servers(lab)[vm]["status"],
             novalab.servers(lab)[vm]["host"], novalab.servers(lab)[vm]["task"]) == ("ACTIVE", host, None), 30)
    done = f"vm '{vm}' on host '{host}': evacuating -> done (running on '{host}')"
    wait_for("the task logged done", lambda: any(t.startswith(done) for t in events_since(lab, t0)), 30)
    texts = events_since(lab, t0)
    assert any(t.startswith(f"vm '{vm}' on host '{host}': queued -> proving (desired state: runs nowhere since")
               and "restart in place, methods lease-taken," in t for t in texts), texts


def test_a_server_its_owner_stopped_stays_stopped(lab: LabState) -> None:
    vm, (host,) = sorted(scenario.running_on(lab).items())[-1]
    sid = novalab.servers(lab)[vm]["id"]
    rig = novalab.rig(lab)
    t0 = time.time()
    rig.api("POST", f"/servers/{sid}/action", {"os-stop": None}, token=OWNER)
    took = wait_for(f"{vm} stopped by its owner", lambda: novalab.servers(lab)[vm]["status"] == "SHUTOFF"
                    and vm not in scenario.running_on(lab), 60)
    echo(f"{vm} stopped by its owner in {took:.1f} s; waiting restart_after and two inventories")
    assert stops(lab, sid)[-1]["user_id"] == OWNER.split(":")[0]
    time.sleep(RESTART_AFTER + 2 * INVENTORY_INTERVAL + 5)
    assert vm not in scenario.running_on(lab)
    assert novalab.servers(lab)[vm]["status"] == "SHUTOFF"
    texts = events_since(lab, t0)
    assert not [t for t in texts if t.startswith(f"vm '{vm}' ")], texts
    # The owner starts it again: the lab ends as it began.
    rig.api("POST", f"/servers/{sid}/action", {"os-start": None}, token=OWNER)
    wait_for(f"{vm} started by its owner", lambda: scenario.running_on(lab).get(vm) == [host], 60)


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    time.sleep(1)
    report = verify_lab(lab)
    assert report["split_brain"] == []
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]
