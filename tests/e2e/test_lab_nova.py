"""The fault matrix through a real Nova (`vmha lab up --nova`): 3 hosts, 4 VMs, io_timeout 1; the
Nova control plane in the controller's namespaces, one nova-compute per host namespace running the
lab VMs, the managers on the nova driver. Once with the stand-in VMs (`--guests process`, namespace
prefix vn3), once with real QEMU guests (`--guests qemu`, prefix vnq): the lab's virt driver starts
them through the host's libvirtd as Nova's libvirt driver defines them (disk at instances/<uuid>/disk,
no <lease>), so libvirt's automatic disk lease is what QEMU holds and what the managers prove with.

For storage, isolation and power-off: every HA server of the host ends ACTIVE on another host in
Nova's view, its lab VM writes there exactly once, the old copy is proven dead (a fence proof per
VM), verify finds no split-brain, and nothing is left behind. CI runs the storage fault (with QEMU
guests also isolation); the others run when VMHA_NOVA_MATRIX=1 (the separate job in README).
Without scripts/setup-nova.sh the module is skipped with that instruction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, novalab, scenario
from vmha.lab.guestxml import GUEST_DIR, KERNEL
from vmha.lab.nova.rig import VENV
from vmha.lab.report import verify_lab
from vmha.lab.state import DISKS_DIR, INSTANCES_DIR, LEASES_DIR, LabState
from vmha.lab.storage import MOUNT_POINT
from vmha.locks.disk_leases import disk_lease_name

pytestmark = [pytest.mark.e2e, pytest.mark.nova]

PREFIXES = {"process": "vn3", "qemu": "vnq"}
FULL_MATRIX = os.environ.get("VMHA_NOVA_MATRIX") == "1"
CI_FAULTS = {"process": {"storage"}, "qemu": {"storage", "isolation"}}  # the rest: VMHA_NOVA_MATRIX=1


@pytest.fixture(scope="module", params=["process", "qemu"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    guests, prefix = request.param, PREFIXES[request.param]
    if not (VENV / "bin" / "nova-manage").exists():
        pytest.skip(f"the Nova rig is not installed in {VENV}: run `bash scripts/setup-nova.sh`")
    if guests == "qemu" and not KERNEL.exists():
        pytest.skip(f"no lab guest in {GUEST_DIR}: run scripts/build-guest.sh")
    lab_dir = tmp_path_factory.mktemp(f"novalab-{guests}")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=4, io_timeout=1, prefix=prefix, echo=echo, nova=True, guests=guests)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, prefix)


def test_vms_are_nova_servers(lab: LabState) -> None:
    """Every lab VM is an ACTIVE HA server, placed where its process runs."""
    servers = novalab.servers(lab)
    running = scenario.running_on(lab)
    for vm in lab.vms:
        assert servers[vm]["status"] == "ACTIVE", servers[vm]
        assert running[vm] == [servers[vm]["host"]], (vm, running.get(vm), servers[vm])
    meta = novalab.rig(lab).api("GET", f"/servers/{servers['vm1']['id']}/metadata")["metadata"]
    assert meta == novalab.HA_METADATA


def test_guests_are_defined_the_nova_way(lab: LabState) -> None:
    """A QEMU guest's disk is in Nova's layout, its domain has no <lease>, and the lease QEMU holds is
    libvirt's disk lease, named after that disk's path (the name the managers' prover takes)."""
    if lab.guests != "qemu":
        pytest.skip("QEMU guests only")
    for vm, s in novalab.servers(lab).items():
        base = lab.export / INSTANCES_DIR / s["id"]
        assert (base / "disk").is_file(), vm
        assert (lab.export / DISKS_DIR / f"{vm}.disk").resolve() == (base / "disk").resolve()
        xml = (base / "libvirt.xml").read_text()
        assert "<lease" not in xml and f"<name>{vm}</name>" in xml, xml
        lease = disk_lease_name(str(MOUNT_POINT / INSTANCES_DIR / s["id"] / "disk"))
        assert (lab.export / LEASES_DIR / lease).is_file(), f"{vm}: libvirt created no disk lease {lease}"
    # The managers' VM names are the server ids: the disk path, and so the lease name, carries them.
    assert "vm_names = \"id\"" in (lab.configs / "manager-m1.toml").read_text()


@pytest.mark.parametrize("kind", ["storage", "isolation", "power-off"])
def test_host_failure_through_nova(lab: LabState, kind: str) -> None:
    if kind not in CI_FAULTS[lab.guests] and not FULL_MATRIX:
        pytest.skip("VMHA_NOVA_MATRIX=1 runs it")
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
