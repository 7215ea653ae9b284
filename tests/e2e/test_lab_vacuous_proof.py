"""No vacuous proof, with real QEMU guests (issue 10): a running guest whose lease was never acquired
(its host's libvirt runs it without the lease, as a host without `lock_manager = "sanlock"` would)
gets no fence proof when its host is isolated, no second copy starts, and the manager alerts the
cause. Beside it, a guest that held its lease is stopped by the isolation response and restarted on
the other host as usual: a lease released by its holder still proves.

Lab: 2 hosts, QEMU guests (prefix vqg); vm1 (with its lease) and vmx (without) on h1.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, faults, libvirtd, scenario
from vmha.lab.state import LabState

pytestmark = pytest.mark.e2e

PREFIX = "vqg"
WATCH = 45.0  # longer than lease-taken + request-force (2 + 13 s) and the power check, at io_timeout 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab-guard")
    try:
        yield cluster.up(lab_dir, hosts=2, vms=1, io_timeout=1, prefix=PREFIX, echo=echo, guests="qemu")
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def _copies(lab: LabState, vm: str) -> list[str | None]:
    return scenario.running_on(lab).get(vm, [])


def _manager_logs(lab: LabState) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(lab.logs.glob("manager-*.log")))


def test_guest_without_its_lease_gets_no_proof_and_no_second_copy(lab: LabState) -> None:
    assert _copies(lab, "vm1") == ["h1"]
    cluster.init_leases(lab, ["vmx"])  # the lease exists, as `vmha locks init --vm` makes it...
    xml = libvirtd.domain_xml(lab, "vmx")
    no_lease = re.sub(r"\s*<lease>.*?</lease>", "", xml, flags=re.S)  # ...but the guest runs without it
    assert "<lease>" not in no_lease and "vmha:protect" in no_lease
    libvirtd.create_disk(lab, "vmx")
    path = lab.dir / "libvirt" / "vmx.xml"
    path.write_text(no_lease)
    libvirtd.virsh(lab.node("h1"), "create", str(path), timeout=60)
    deadline = time.monotonic() + 60
    while not scenario.writes_elsewhere(lab, "vmx", "none", time.time() - 5):
        assert time.monotonic() < deadline, "vmx never wrote its disk"
        time.sleep(0.5)
    time.sleep(12)  # the manager's inventory (every 10 s) records vmx as protected, on h1

    t0 = time.time()
    echo("isolating h1: management and service down")
    for plane in ("management", "service"):
        faults.host_plane(lab, "h1", plane, "down")
    try:
        deadline = time.monotonic() + WATCH
        while time.monotonic() < deadline:
            assert _copies(lab, "vmx") == ["h1"], f"vmx copies: {_copies(lab, 'vmx')}"
            time.sleep(0.5)
        # The guest that held its lease was stopped by the isolation response and proved: it moved.
        assert _copies(lab, "vm1") == ["h2"]
        assert scenario.writes_elsewhere(lab, "vm1", "h1", t0)
        logs = _manager_logs(lab)
        alerts = [line for line in logs.splitlines() if "vmx" in line and "no evidence that the VM stopped" in line]
        assert alerts, "no alert naming vmx and the never-held lease"
        assert "lock_manager" in alerts[0]
        assert not re.search(r"proof vm=vmx host=\S+ method=\S+ in ", logs)  # vmx never proved
    finally:
        for plane in ("management", "service"):
            faults.host_plane(lab, "h1", plane, "up")
