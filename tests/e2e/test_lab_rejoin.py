"""Repaired hosts come back by themselves, on the full lab (3 hosts, 6 VMs, io_timeout 1; real etcd,
sanlock, agents, managers with the default rejoin_after of 60 s; the vr3 prefix):
- management only: the host is disabled, its VMs left running; repaired, it is enabled again by the
  manager (nobody runs `vmha host enable`) rejoin_after later, a decision logged with its evidence;
- storage: the host's VMs are proved dead and restarted elsewhere, the host marked down; repaired, it
  rejoins rejoin_after later, once the manager saw its lockspace renewed on the shared storage;
- desired state: a VM process killed on a healthy host (no host fault) is started again there, on a
  lease-taken proof, restart_after (20 s) and an inventory later;
- maintenance (`vmha host maintenance HOST on|off`): the host's 2 HA VMs live-migrate away with no
  downtime, and off returns the host to placement at once;
- a storage fabric outage (issue 11): sanlock ends every guest, the manager only alerts (FABRIC);
  after the repair every VM is started again, in place, by the desired state;
- quarantine: a host that failed 3 times (management only, repaired each time) stays out after
  rejoin_after, until `vmha host enable`;
- verify finds no split-brain and every VM runs exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from labcheck import POLL, assert_nothing_left, echo, wait_for

from vmha.core.settings import RecoverySettings
from vmha.lab import cluster, etcdq, faults, scenario
from vmha.lab.cluster import KEYS, health_view
from vmha.lab.configs import manager_config
from vmha.lab.hosts import vmha_command
from vmha.lab.net import run
from vmha.lab.procs import vm_processes
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState
from vmha.lab.verify import check_disk, downtime_between

pytestmark = pytest.mark.e2e

PREFIX = "vr3"
REJOIN_AFTER = RecoverySettings().rejoin_after  # the lab's managers run with the default
RESTART_AFTER = RecoverySettings().restart_after
INVENTORY = 10.0  # manager.daemon.INVENTORY_INTERVAL


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=6, io_timeout=1, prefix=PREFIX, echo=echo)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def events_about(lab: LabState, host: str, since: float) -> list[str]:
    """The manager's decision stream (etcd events) about `host` since `since`."""
    raw, _ = etcdq.get_json_prefix(lab, KEYS.events_prefix)
    return [str(e["text"]) for _, e in sorted(raw.items()) if isinstance(e, dict)
            and float(e.get("t") or 0) >= since and f"host '{host}'" in str(e.get("text"))]


def all_up(lab: LabState, host: str) -> bool:
    return all(v == "up" for v in health_view(lab).get(host, {}).values())


def disabled(lab: LabState, host: str) -> bool:
    return scenario._disabled(lab, host)


def fault_then_rejoin(lab: LabState, kind: str) -> tuple[str, list[str]]:
    """Inject `kind` on the busiest host, wait until vmha took it out, repair it, and wait until the
    manager enables it again by itself; returns the host and the manager's events about it."""
    host = scenario.busiest_host(lab)
    vms = sorted(vm for vm, hs in scenario.running_on(lab).items() if host in hs)
    t0 = time.time()
    echo(f"{kind} down on {host} (VMs {', '.join(vms)})")
    scenario.inject(lab, kind, host, up=False)
    try:
        took = wait_for(f"{host} taken out", lambda: disabled(lab, host), 60)
        echo(f"{host} taken out after {took:.1f} s")
        if kind == "storage":
            wait_for("its VMs running elsewhere", lambda: all(
                len(hs := scenario.running_on(lab).get(vm, [])) == 1 and hs[0] != host for vm in vms), 120)
    finally:
        scenario.inject(lab, kind, host, up=True)
    repaired = time.monotonic()
    wait_for(f"{host} up on every plane", lambda: all_up(lab, host), 60)
    healthy = time.monotonic()
    wait_for(f"{host} enabled again by the manager", lambda: not disabled(lab, host), REJOIN_AFTER + 45)
    back = time.monotonic()
    echo(f"{host}: up {healthy - repaired:.1f} s after the repair, enabled {back - healthy:.1f} s after that")
    assert back - healthy >= REJOIN_AFTER - 2, "enabled before rejoin_after had passed"
    return host, events_about(lab, host, t0)


def test_management_only_host_is_enabled_again_after_repair(lab: LabState) -> None:
    host, events = fault_then_rejoin(lab, "management")
    assert any(t.startswith(f"host '{host}': rejoins (nothing was fenced there (disabled for row management)")
               for t in events), events
    assert f"host '{host}': rejoined, a destination again" in events


def test_fenced_host_rejoins_after_its_lockspace_check(lab: LabState) -> None:
    host, events = fault_then_rejoin(lab, "storage")
    rejoin = [t for t in events if t.startswith(f"host '{host}': rejoins (fenced for row storage")]
    assert rejoin and "lockspace renewed (host_id" in rejoin[0], events
    assert f"host '{host}': rejoined, a destination again" in events
    running = scenario.running_on(lab)
    assert all(len(hs) == 1 for hs in running.values()), running


def test_a_killed_vm_is_started_again_in_place(lab: LabState) -> None:
    host = scenario.busiest_host(lab)
    vm = sorted(vm for vm, hs in scenario.running_on(lab).items() if host in hs)[0]
    t0 = time.time()
    for p in vm_processes(lab.prefix):
        if p.vm == vm:
            os.kill(p.pid, signal.SIGKILL)
    echo(f"{vm} killed on {host}")
    took = wait_for(f"{vm} running again", lambda: scenario.running_on(lab).get(vm) == [host],
                    RESTART_AFTER + 2 * INVENTORY + 30)
    echo(f"{vm} running again on {host} {took:.1f} s after the kill")
    assert took >= RESTART_AFTER - 1, "restarted on a single inventory"

    def events() -> list[str]:
        raw, _ = etcdq.get_json_prefix(lab, KEYS.events_prefix)
        return [str(e["text"]) for _, e in sorted(raw.items())
                if isinstance(e, dict) and float(e.get("t") or 0) >= t0]

    # The guest writes before the manager hears the start succeed and logs the task done.
    done = f"vm '{vm}' on host '{host}': evacuating -> done (running on '{host}')"
    wait_for("the task logged done", lambda: any(t.startswith(done) for t in events()), 30)
    texts = events()
    assert any(t.startswith(f"vm '{vm}' on host '{host}': queued -> proving (desired state: runs nowhere since")
               and "restart in place, methods lease-taken," in t for t in texts), texts


def host_command(lab: LabState, *args: str) -> None:
    """`vmha host ARGS`, run on the controller as an operator would."""
    cmd = vmha_command("host", args[0], "--config", str(manager_config(lab, "m1")), *args[1:])
    cp = run([*lab.node("controller").enter(), *cmd], check=False, timeout=30)
    assert cp.returncode == 0, cp.stderr


def test_maintenance_drains_with_no_downtime_and_off_returns_the_host(lab: LabState) -> None:
    host = scenario.busiest_host(lab)
    vms = sorted(vm for vm, hs in scenario.running_on(lab).items() if host in hs)
    assert len(vms) >= 2, f"the busiest host runs {vms}"
    t0 = time.time()
    host_command(lab, "maintenance", host, "on")
    took = wait_for(f"{', '.join(vms)} live-migrated off {host}", lambda: all(
        len(hs := scenario.running_on(lab).get(vm, [])) == 1 and hs[0] != host for vm in vms), 90)
    echo(f"maintenance on {host}: {', '.join(vms)} drained in {took:.1f} s")
    assert disabled(lab, host)
    host_command(lab, "maintenance", host, "off")
    wait_for(f"{host} back in placement", lambda: not disabled(lab, host), 30)
    for vm in vms:
        report = check_disk(vm, lab.disk_on_controller(vm).read_text(errors="replace").splitlines())
        assert downtime_between(report, t0, time.time()) == 0, f"{vm}: downtime while drained"
    events = events_about(lab, host, t0)
    assert any(t.startswith(f"host '{host}': maintenance on (by the operator): draining {len(vms)} HA VM(s)")
               for t in events), events


def test_guests_ended_by_a_storage_fabric_outage_start_again_after_the_repair(lab: LabState) -> None:
    before = scenario.running_on(lab)
    assert all(len(hs) == 1 for hs in before.values()), before
    t0 = time.time()
    faults.fabric(lab, "storage", "down")
    try:
        took = wait_for("every guest ended by sanlock", lambda: not scenario.running_on(lab), 60)
        echo(f"storage fabric down: every guest ended after {took:.1f} s")
        time.sleep(5)
    finally:
        faults.fabric(lab, "storage", "up")
    took = wait_for("every VM running again where it ran", lambda: scenario.running_on(lab) == before,
                    RESTART_AFTER + 2 * INVENTORY + 60)
    echo(f"storage fabric repaired: every VM running again, in place, {took:.1f} s later")
    raw, _ = etcdq.get_json_prefix(lab, KEYS.events_prefix)
    texts = [str(e["text"]) for _, e in sorted(raw.items()) if isinstance(e, dict) and float(e.get("t") or 0) >= t0]
    assert any(t.startswith("fabric outage of plane storage in cluster") for t in texts), texts
    for vm, (host,) in sorted(before.items()):
        assert any(t.startswith(f"vm '{vm}' on host '{host}': queued -> proving (desired state: runs nowhere")
                   for t in texts), (vm, texts)


def test_a_host_failed_three_times_stays_out_until_enabled(lab: LabState) -> None:
    host = scenario.busiest_host(lab)
    t0 = time.time()
    quarantined: list[str] = []
    for n in range(1, 4):
        scenario.inject(lab, "management", host, up=False)
        try:
            wait_for(f"{host} disabled (failure {n})", lambda since=t0: disabled(lab, host)
                     and any("row management -> disable" in t for t in events_about(lab, host, since)), 60)
            time.sleep(3)  # the row is acted upon (and counted) decide_after (1 s) after it is seen
        finally:
            scenario.inject(lab, "management", host, up=True)
        wait_for(f"{host} up on every plane", lambda: all_up(lab, host), 60)
        quarantined = [t for t in events_about(lab, host, t0) if t.startswith(f"host '{host}': quarantined after")]
        if quarantined:
            break
        t0 = time.time()  # the next failure's own "row management" line
    echo(f"{host}: {quarantined}")
    assert quarantined and quarantined[0].startswith(f"host '{host}': quarantined after 3 failures within 3600s"), (
        quarantined)
    healthy = time.monotonic()
    while time.monotonic() - healthy < REJOIN_AFTER + 15:
        assert disabled(lab, host), "a quarantined host rejoined by itself"
        time.sleep(POLL)
    host_command(lab, "enable", host)
    wait_for(f"{host} enabled by the operator", lambda: not disabled(lab, host), 30)


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    report = verify_lab(lab)
    assert report["split_brain"] == []
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]
