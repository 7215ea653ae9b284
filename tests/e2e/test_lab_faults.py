"""The fault matrix on the full lab (4 hosts, 8 VMs, io_timeout 1; real etcd, sanlock, agents,
managers, network namespaces), once with the stand-in VMs (`--guests process`, prefix vt4) and once
with real QEMU guests under a libvirtd per host, holding their leases through libvirt's sanlock lock
manager, moved by the managers' libvirt driver (`--guests qemu`, prefix vq4):
- the published command line: `lab up` twice changes nothing, `lab status --json` and
  `lab verify --json` keep their shapes, `ps` finds each VM as `vmha-vm <vm-name>` (a guest: QEMU with
  `-name guest=<vm-name>`), the disks hold
  {"vm", "host", "seq", "t"} records (extended by "mono"), `lab kill manager` hands over to the standby;
- management only and fabric outage: no evacuation, no VM downtime;
- service only: live migration, no restart;
- storage, isolation, power-off: every HA VM of the host ends running exactly once elsewhere;
- verify finds no split-brain, and exits 1 once a disk shows one; nothing is left behind afterwards.
Each fault's timeline is printed (run with -s to see it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from labcheck import assert_nothing_left, echo

from vmha.core.planes import PLANES, Plane
from vmha.lab import cluster, scenario
from vmha.lab.net import pid_alive
from vmha.lab.procs import vm_processes
from vmha.lab.report import verify_lab
from vmha.lab.state import LabState
from vmha.lab.vm import disk_lines
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.e2e

PREFIXES = {"process": "vt4", "qemu": "vq4"}


def up_args(lab: LabState) -> tuple[str, ...]:
    return ("--hosts", "4", "--vms", "8", "--prefix", lab.prefix, "--guests", lab.guests)


@pytest.fixture(scope="module", params=["process", "qemu"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    guests, prefix = request.param, PREFIXES[request.param]
    lab_dir = tmp_path_factory.mktemp(f"lab-{guests}")
    try:
        yield cluster.up(lab_dir, hosts=4, vms=8, io_timeout=1, prefix=prefix, echo=echo, guests=guests)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, prefix)


def vmha(lab: LabState, *args: str) -> subprocess.CompletedProcess[str]:
    """The `vmha` command line, as a user runs it, on this module's lab."""
    return subprocess.run([sys.executable, "-m", "vmha.cli", *args, "--dir", str(lab.dir)],
                          capture_output=True, text=True, timeout=300, check=False)


def _pids(lab: LabState) -> dict[str, Any]:
    lab.reload()
    return {"controller": (lab.controller.anchor, dict(lab.controller.pids)),
            **{h: (ns.anchor, dict(ns.pids)) for h, ns in lab.hosts.items()},
            "vms": sorted((p.vm, p.pid) for p in vm_processes(lab.prefix))}


def test_lab_up_twice_changes_nothing(lab: LabState) -> None:
    before = _pids(lab)
    t = time.monotonic()
    cp = vmha(lab, "lab", "up", *up_args(lab))
    print(f"second `lab up`: {time.monotonic() - t:.1f} s", flush=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[0].split() == ["host", "power", "management", "storage", "service", "VMs"]
    assert _pids(lab) == before


def test_status_json_shape(lab: LabState) -> None:
    cp = vmha(lab, "lab", "status", "--json")
    assert cp.returncode == 0, cp.stderr
    st = json.loads(cp.stdout)
    assert set(st) == {"hosts", "vms", "tasks", "etcd", "metrics", "api"}  # issues 14, 15: extend only
    assert sorted(st["metrics"]) == ["h1", "h2", "h3", "h4", "m1", "m2"]
    assert st["api"]["url"].startswith("https://") and len(st["api"]["token"]) >= 16
    assert [h["name"] for h in st["hosts"]] == ["h1", "h2", "h3", "h4"]
    for h in st["hosts"]:
        assert set(h) == {"name", "planes", "power"}
        assert h["planes"] == {p.value: "up" for p in PLANES}
        assert h["power"] == "on"
    running = scenario.running_on(lab)
    assert [v["name"] for v in st["vms"]] == lab.vms
    for v in st["vms"]:
        assert set(v) == {"name", "host", "state"}
        assert v["state"] == "running"
        assert [v["host"]] == running[v["name"]]  # where its process runs
    # Placed round-robin: vm1 on h1, vm2 on h2, ... vm5 on h1 again.
    assert [v["host"] for v in st["vms"]] == [f"h{i % 4 + 1}" for i in range(8)]
    assert isinstance(st["tasks"], list)


def test_ps_finds_each_vm_by_name_on_its_host(lab: LabState) -> None:
    """`vmha-vm <vm-name> ...` (a guest: `qemu-system-x86_64 -name guest=<vm-name>,...`) in the process
    list, inside the host's network namespace."""
    found: dict[str, list[str]] = {}
    for host, ns in sorted(lab.hosts.items()):
        for vm in lab.vms:
            pattern = f"vmha-vm {vm} " if lab.guests == "process" else f"qemu-system-x86_64 -name guest={vm},"
            cp = subprocess.run(["pgrep", "-f", "--ns", str(ns.anchor), "--nslist", "net", pattern],
                                capture_output=True, text=True, check=False)
            if cp.stdout.split():
                found.setdefault(vm, []).extend([host] * len(cp.stdout.split()))
    assert found == scenario.running_on(lab)
    assert sorted(found) == sorted(lab.vms)


def test_disk_records_are_vm_host_seq_t(lab: LabState) -> None:
    """The published record, extended by "mono": the machine's monotonic clock, which verify measures
    silences by (a step of the wall clock is no downtime)."""
    for vm, hosts in scenario.running_on(lab).items():
        lines = disk_lines(lab.disk_on_controller(vm))
        recs = [json.loads(line) for line in lines[-20:-1]]  # the last line may be half written
        for rec in recs:
            assert set(rec) == {"vm", "host", "seq", "t", "mono"}
            assert (rec["vm"], rec["host"]) == (vm, hosts[0])
            assert isinstance(rec["seq"], int) and isinstance(rec["t"], float) and isinstance(rec["mono"], float)
        assert [r["seq"] for r in recs] == list(range(recs[0]["seq"], recs[0]["seq"] + len(recs)))
        assert abs(recs[-1]["t"] - time.time()) < 5
        assert abs(recs[-1]["mono"] - time.monotonic()) < 5


def test_kill_manager_hands_over_to_the_standby(lab: LabState) -> None:
    first = cluster.leader(lab)
    assert first is not None
    cp = vmha(lab, "lab", "kill", "manager")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout.splitlines()[0])["action"] == first
    t = time.monotonic()
    new = until_sync(lambda: (leader := cluster.leader(lab)) not in (None, first) and leader,
                     "the standby leading", timeout=60, interval=0.25)  # fmt: skip
    print(f"standby {new} leads {time.monotonic() - t:.1f} s after {first} was killed", flush=True)
    cp = vmha(lab, "lab", "up", *up_args(lab))  # starts the killed manager again, as a standby
    assert cp.returncode == 0, cp.stderr
    lab.reload()
    assert pid_alive(lab.controller.pids[f"manager-{first}"])
    assert cluster.leader(lab) == new


def test_fault_commands_cut_and_restore(lab: LabState) -> None:
    """`vmha lab fault` as published, each fault repaired at once (too short for any health change:
    verify holds these episodes to their policy too, which is to move nothing)."""
    net, h4 = lab.net(), lab.node("h4")
    logged = len(lab.faults())
    cp = vmha(lab, "lab", "fault", "h4", "management", "down")
    assert cp.returncode == 0, cp.stderr
    assert {k: v for k, v in json.loads(cp.stdout).items() if k != "t"} == {
        "target": "h4", "kind": "management", "action": "down"}
    assert not net.link_up(h4, Plane.MANAGEMENT) and net.link_up(h4, Plane.SERVICE)
    assert vmha(lab, "lab", "fault", "h4", "management", "up").returncode == 0
    assert net.link_up(h4, Plane.MANAGEMENT)
    assert vmha(lab, "lab", "fault", "fabric", "service", "down").returncode == 0
    assert not net.bridge_up(Plane.SERVICE) and net.bridge_up(Plane.STORAGE)
    assert vmha(lab, "lab", "fault", "fabric", "service", "up").returncode == 0
    assert net.bridge_up(Plane.SERVICE)
    for bad in (("h4", "power-off", "now"), ("fabric", "power-off"), ("h4", "disk", "down"), ("h9", "service", "up")):
        cp = vmha(lab, "lab", "fault", *bad)
        assert cp.returncode != 0 and cp.stderr, bad
    assert len(lab.faults()) == logged + 4  # the refused ones are not logged


def _run(lab: LabState, kind: str) -> scenario.Timeline:
    """One fault on the busiest host. `tl.ok` includes "no VM stopped where the policy keeps it
    running": a gap over 1 s, or for QEMU guests over the shortest restart (verify.restart_floor)."""
    tl = scenario.run_fault(lab, kind, scenario.busiest_host(lab), echo)
    print(tl.line(), flush=True)
    return tl


def test_management_only_moves_nothing(lab: LabState) -> None:
    tl = _run(lab, "management")
    assert tl.detected is not None
    assert tl.ok, tl.problems
    assert all(h == tl.host for h in tl.moved.values())


def test_service_only_live_migrates(lab: LabState) -> None:
    tl = _run(lab, "service")
    assert tl.vms, "the busiest host ran no VM"
    assert tl.ok, tl.problems
    assert all(h not in (None, tl.host) for h in tl.moved.values())
    assert not tl.proofs  # a live migration needs no fence proof


@pytest.mark.parametrize("kind", ["storage", "isolation", "power-off"])
def test_host_failures_restart_every_vm_once_elsewhere(lab: LabState, kind: str) -> None:
    host = scenario.busiest_host(lab)
    sanlock_log = lab.logs / f"sanlock-{host}.log"
    logged = sanlock_log.stat().st_size
    qemus = sorted(p.pid for p in vm_processes(lab.prefix) if p.host == host and lab.guests == "qemu")
    tl = scenario.run_fault(lab, kind, host, echo)
    print(tl.line(), flush=True)
    assert tl.vms, "the busiest host ran no VM"
    assert tl.ok, tl.problems
    assert all(h not in (None, tl.host) for h in tl.moved.values())
    assert set(tl.proofs) == set(tl.vms), f"restarts without a recorded fence proof: {tl.proofs}"
    if kind == "storage" and qemus:
        # <on_lockfailure>poweroff</on_lockfailure>: the host's sanlock ended each QEMU through libvirt's
        # helper, its killpath (sanlock logs it as signal 100), when the lockspace failed.
        with sanlock_log.open() as f:
            f.seek(logged)
            text = f.read()
        assert all(re.search(rf" kill {pid} sig 100 count 1\b", text) for pid in qemus), (qemus, text[-3000:])


@pytest.mark.parametrize("kind", ["fabric", "fabric-isolation"])
def test_fabric_outage_moves_nothing(lab: LabState, kind: str) -> None:
    """fabric-isolation: every host loses management and service at once; no agent may take it for its
    own isolation and stop its VMs (the manager, seeing FABRIC, would restart none)."""
    tl = _run(lab, kind)
    assert tl.detected is not None
    assert tl.ok, tl.problems


def test_verify_finds_no_split_brain(lab: LabState) -> None:
    time.sleep(1)
    cp = vmha(lab, "lab", "verify", "--json")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr
    report = json.loads(cp.stdout)
    assert report["split_brain"] == []
    assert set(report["downtime"]) == set(lab.vms)
    assert [f["fault"] for f in report["faults"]] == [
        "management", "fabric service",  # test_fault_commands_cut_and_restore
        "management", "service", "storage", "management+service", "power-off", "fabric service",
        "fabric management+service"]
    assert report["ok"], [f for f in report["faults"] if not f["ok"]]


def test_verify_exits_1_on_a_split_brain(lab: LabState) -> None:
    """Last: a second writer's record amid the running copy's makes the disk split. It is forged in
    place, 200 records back (a guest writes at an offset of its own and rewrites the page it appends
    to: a line there would be overwritten), with another host's name of the same length."""
    disk = lab.disk_on_controller("vm1")
    data = disk.read_bytes()[: 1 << 26]
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
    offset = sum(len(line) for line in lines[:-200])
    rec = json.loads(lines[-200])
    other = next(h for h in sorted(lab.hosts) if h != rec["host"] and len(h) == len(rec["host"]))
    forged = lines[-200].replace(f'"host": "{rec["host"]}"'.encode(), f'"host": "{other}"'.encode())
    assert forged != lines[-200]
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(forged)
    cp = vmha(lab, "lab", "verify", "--json")
    assert cp.returncode == 1, cp.stderr
    assert json.loads(cp.stdout)["split_brain"] == ["vm1"]
    assert verify_lab(lab)["split_brain"] == ["vm1"]
