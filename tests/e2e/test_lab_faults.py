"""The fault matrix on the full lab (4 hosts, 8 VMs, io_timeout 1; real etcd, sanlock, agents,
managers, network namespaces with the vt4 prefix):
- management only and fabric outage: no evacuation, no VM downtime;
- service only: live migration, no restart;
- storage, isolation, power-off: every HA VM of the host ends running exactly once elsewhere;
- verify finds no split-brain; nothing is left behind afterwards.
Each fault's timeline is printed (run with -s to see it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, scenario
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState

pytestmark = pytest.mark.e2e

PREFIX = "vt4"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab")
    try:
        yield cluster.up(lab_dir, hosts=4, vms=8, io_timeout=1, prefix=PREFIX, echo=echo)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def _run(lab: LabState, kind: str) -> scenario.Timeline:
    tl = scenario.run_fault(lab, kind, scenario.busiest_host(lab), echo)
    print(tl.line(), flush=True)
    return tl


def test_management_only_moves_nothing(lab: LabState) -> None:
    tl = _run(lab, "management")
    assert tl.detected is not None
    assert tl.ok, tl.problems
    assert all(h == tl.host for h in tl.moved.values())
    assert all(d == 0 for d in tl.downtime.values())


def test_service_only_live_migrates(lab: LabState) -> None:
    tl = _run(lab, "service")
    assert tl.vms, "the busiest host ran no VM"
    assert tl.ok, tl.problems
    assert all(h not in (None, tl.host) for h in tl.moved.values())
    assert all(d == 0 for d in tl.downtime.values()), tl.downtime
    assert not tl.proofs  # a live migration needs no fence proof


@pytest.mark.parametrize("kind", ["storage", "isolation", "power-off"])
def test_host_failures_restart_every_vm_once_elsewhere(lab: LabState, kind: str) -> None:
    tl = _run(lab, kind)
    assert tl.vms, "the busiest host ran no VM"
    assert tl.ok, tl.problems
    assert all(h not in (None, tl.host) for h in tl.moved.values())
    assert set(tl.proofs) == set(tl.vms), f"restarts without a recorded fence proof: {tl.proofs}"


def test_fabric_outage_moves_nothing(lab: LabState) -> None:
    tl = _run(lab, "fabric")
    assert tl.detected is not None
    assert tl.ok, tl.problems
    assert all(d == 0 for d in tl.downtime.values())


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    time.sleep(1)
    report = verify_lab(lab)
    assert report["split_brain"] == []
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]
