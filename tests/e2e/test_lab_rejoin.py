"""Repaired hosts come back by themselves, on the full lab (3 hosts, 6 VMs, io_timeout 1; real etcd,
sanlock, agents, managers with the default rejoin_after of 60 s; the vr3 prefix):
- management only: the host is disabled, its VMs left running; repaired, it is enabled again by the
  manager (nobody runs `vmha host enable`) rejoin_after later, a decision logged with its evidence;
- storage: the host's VMs are proved dead and restarted elsewhere, the host marked down; repaired, it
  rejoins rejoin_after later, once the manager saw its lockspace renewed on the shared storage;
- verify finds no split-brain and every VM runs exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.core.recovery import RecoverySettings
from vmha.lab import cluster, etcdq, scenario
from vmha.lab.cluster import KEYS, health_view
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState

pytestmark = pytest.mark.e2e

PREFIX = "vr3"
REJOIN_AFTER = RecoverySettings().rejoin_after  # the lab's managers run with the default
POLL = 0.5


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


def wait_for(what: str, ok: Callable[[], bool], timeout: float) -> float:
    """Seconds until ok() holds; fails the test after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ok():
            return time.monotonic() - t0
        time.sleep(POLL)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


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


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    report = verify_lab(lab)
    assert report["split_brain"] == []
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]
