"""The fault matrix through a real Nova (`vmha lab up --nova`): 3 hosts, 4 VMs, io_timeout 1; the
Nova control plane in the controller's namespaces, one nova-compute per host namespace running the
lab VMs, the managers on the nova driver (namespace prefix vn3).

For storage, isolation and power-off: every HA server of the host ends ACTIVE on another host in
Nova's view, its lab VM writes there exactly once, the old copy is proven dead (a fence proof per
VM), verify finds no split-brain, and nothing is left behind. CI runs the storage fault; isolation
and power-off run when VMHA_NOVA_MATRIX=1 (the separate job in README: they add about 5 minutes).
Without scripts/setup-nova.sh the module is skipped with that instruction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, novalab, scenario
from vmha.lab.nova.rig import VENV
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState

pytestmark = [pytest.mark.e2e, pytest.mark.nova]

PREFIX = "vn3"
FULL_MATRIX = os.environ.get("VMHA_NOVA_MATRIX") == "1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    if not (VENV / "bin" / "nova-manage").exists():
        pytest.skip(f"the Nova rig is not installed in {VENV}: run `bash scripts/setup-nova.sh`")
    lab_dir = tmp_path_factory.mktemp("novalab")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=4, io_timeout=1, prefix=PREFIX, echo=echo, nova=True)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def test_vms_are_nova_servers(lab: LabState) -> None:
    """Every lab VM is an ACTIVE HA server, placed where its process runs."""
    servers = novalab.servers(lab)
    running = scenario.running_on(lab)
    for vm in lab.vms:
        assert servers[vm]["status"] == "ACTIVE", servers[vm]
        assert running[vm] == [servers[vm]["host"]], (vm, running.get(vm), servers[vm])
    meta = novalab.rig(lab).api("GET", f"/servers/{servers['vm1']['id']}/metadata")["metadata"]
    assert meta == novalab.HA_METADATA


@pytest.mark.parametrize(
    "kind",
    [
        "storage",
        pytest.param("isolation", marks=pytest.mark.skipif(not FULL_MATRIX, reason="VMHA_NOVA_MATRIX=1 runs it")),
        pytest.param("power-off", marks=pytest.mark.skipif(not FULL_MATRIX, reason="VMHA_NOVA_MATRIX=1 runs it")),
    ],
)
def test_host_failure_through_nova(lab: LabState, kind: str) -> None:
    host = scenario.busiest_host(lab)
    tl = scenario.run_fault(lab, kind, host, echo)
    print(tl.line(), flush=True)
    assert tl.vms, "the busiest host ran no VM"
    assert tl.ok, tl.problems
    assert tl.active is not None, "Nova never showed every server ACTIVE elsewhere"
    assert all(h not in (None, host) for h in tl.moved.values())
    assert set(tl.proofs) == set(tl.vms), f"restarts without a recorded fence proof: {tl.proofs}"
    # Nova's view after the repair: each server on the host its one running copy is on.
    servers = novalab.servers(lab)
    for vm in tl.vms:
        assert servers[vm]["host"] == tl.moved[vm], (vm, servers[vm], tl.moved[vm])


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    time.sleep(1)
    report = verify_lab(lab)
    assert report["split_brain"] == []
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]
