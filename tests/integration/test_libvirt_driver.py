"""The libvirt driver against real libvirtd and QEMU: a lab of 2 hosts with QEMU guests (prefix vqd),
its managers stopped so that only this test drives the guests. The driver runs in the controller's
network namespace, where the hosts' libvirtd (TCP, management plane) and etcd are reachable.

Checked: protection and priority from the domain's metadata (an unprotected domain is ignored), the
inventory's definitions, live migration of a running guest (its records name the new host at once,
seq going on), evacuation refused while the VM runs on the source and idempotent once done, a start
from the recorded definition on another host, libvirt refusing a second copy while the lease is
held, host flags, a host whose libvirtd cannot be reached (its recorded VMs unknown, never stopped),
a guest whose QEMU was killed (stopped, then restarted in place), and a domain whose protection its
operator removed (forgotten, so its stop is not restarted).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmha.core.desired import STOPPED
from vmha.core.planes import Plane
from vmha.drivers.base import DriverError
from vmha.drivers.libvirt import METADATA_NS
from vmha.lab import cluster, faults, libvirtd, scenario
from vmha.lab.configs import libvirt_uri
from vmha.lab.net import pid_alive, run
from vmha.lab.state import CLUSTER, LabState
from vmha.lab.vm import disk_lines
from vmha.lab.vms import writing_on
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.integration

PREFIX = "vqd"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab-libvirt")
    try:
        state = cluster.up(lab_dir, hosts=2, vms=1, io_timeout=1, prefix=PREFIX, guests="qemu")
        for role, pid in sorted(state.controller.pids.items()):
            if role.startswith("manager-"):  # this test alone drives the guests
                os.kill(pid, signal.SIGTERM)
                until_sync(lambda p=pid: not pid_alive(p), f"{role} stopped", timeout=30)
        yield state
    finally:
        cluster.down(lab_dir)


def in_controller(lab: LabState, *calls: tuple[str, tuple[Any, ...]]) -> list[tuple[Any, float]]:
    """(result, seconds) of driver calls (method, args), made in order by a driver in the controller's
    network namespace (libvirt_calls.py); the first call that fails raises its exception here."""
    uris = {h: libvirt_uri(lab.node(h)) for h in sorted(lab.hosts)}
    arg = base64.b64encode(pickle.dumps((uris, lab.etcd_url(Plane.MANAGEMENT), CLUSTER, list(calls)))).decode()
    cp = subprocess.run(["ip", "netns", "exec", lab.node("controller").netns, sys.executable,
                         str(Path(__file__).with_name("libvirt_calls.py")), arg],
                        capture_output=True, text=True, timeout=300, check=False)
    assert cp.returncode == 0, cp.stderr[-2000:]
    results = pickle.loads(base64.b64decode(cp.stdout))
    for kind, value, _ in results:
        if kind == "err":
            raise value
    return [(value, seconds) for _, value, seconds in results]


def call(lab: LabState, method: str, *args: Any) -> Any:
    return in_controller(lab, (method, args))[0][0]


def _copies(lab: LabState, vm: str) -> list[str | None]:
    return scenario.running_on(lab).get(vm, [])


def test_discovery_reads_protection_from_metadata(lab: LabState) -> None:
    plain = re.sub(r"\s*<metadata>.*?</metadata>", "", libvirtd.domain_xml(lab, "plain"), flags=re.S)
    plain = re.sub(r"\s*<lease>.*?</lease>", "", plain, flags=re.S)
    libvirtd.create_disk(lab, "plain")
    path = lab.dir / "libvirt" / "plain.xml"
    path.write_text(plain)
    libvirtd.virsh(lab.node("h2"), "create", str(path), timeout=60)

    vms = call(lab, "vms")
    assert [(v.name, v.host, v.ha, v.state) for v in vms] == [("vm1", "h1", True, "running")]
    on_h1 = call(lab, "vms", "h1")
    assert [v.name for v in on_h1] == ["vm1"]
    libvirtd.virsh(lab.node("h2"), "destroy", "plain")


def test_live_migration_moves_the_running_guest(lab: LabState) -> None:
    t0 = time.time()
    dest = call(lab, "live_migrate", "vm1", "h1", None)
    assert dest == "h2"
    assert _copies(lab, "vm1") == ["h2"]
    until_sync(lambda: writing_on(lab, "vm1", "h2", t0), "vm1 writing on h2", timeout=60)
    recs = [json.loads(line) for line in disk_lines(lab.disk_on_controller("vm1")) if line.strip()]
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must go on across the migration"
    around = [r for r in recs if r["t"] >= t0 - 1]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(around)]
    print(f"live migration: longest gap between writes {max(gaps):.2f} s", flush=True)
    assert {r["host"] for r in around} == {"h1", "h2"}


def test_evacuate_refuses_while_the_vm_runs_on_the_source_and_is_idempotent(lab: LabState) -> None:
    with pytest.raises(DriverError, match="still runs on h2"):
        call(lab, "evacuate", "vm1", "h2", None)
    assert call(lab, "evacuate", "vm1", "h1", None) == "h2"  # done already
    assert _copies(lab, "vm1") == ["h2"]


def test_libvirt_refuses_a_second_copy_while_the_lease_is_held(lab: LabState) -> None:
    path = lab.dir / "libvirt" / "vm1-second.xml"
    path.write_text(libvirtd.domain_xml(lab, "vm1"))
    cp = libvirtd.virsh(lab.node("h1"), "create", str(path), check=False, timeout=60)
    assert cp.returncode != 0
    assert "lock" in cp.stderr.lower(), cp.stderr
    assert _copies(lab, "vm1") == ["h2"]


def test_evacuation_starts_the_recorded_definition_elsewhere(lab: LabState) -> None:
    libvirtd.virsh(lab.node("h2"), "destroy", "vm1")  # the guest is gone; its lease released by QEMU's exit
    t0 = time.time()
    assert call(lab, "evacuate", "vm1", "h2", "h1") == "h1"
    until_sync(lambda: writing_on(lab, "vm1", "h1", t0), "vm1 writing on h1", timeout=60)
    held = libvirtd.virsh(lab.node("h1"), "list", "--name").stdout.split()
    assert held == ["vm1"]
    status = run([*lab.node("h1").enter(), "sanlock", "client", "status"]).stdout
    assert re.search(r"^r vmha:vm1:\S+ p \d+", status, re.M), status  # QEMU holds the lease


def test_host_flags(lab: LabState) -> None:
    got = in_controller(lab, ("disable_host", ("h1", "test")), ("hosts", ()), ("mark_host_down", ("h2",)),
                        ("hosts", ()), ("enable_host", ("h1",)), ("enable_host", ("h2",)), ("hosts", ()))
    flags = [[(h.name, h.enabled, h.forced_down) for h in got[i][0]] for i in (1, 3, 6)]
    assert flags == [[("h1", False, False), ("h2", True, False)],
                     [("h1", False, False), ("h2", False, True)],
                     [("h1", True, False), ("h2", True, False)]]


def test_unreachable_host_is_down_and_keeps_its_recorded_vms(lab: LabState) -> None:
    faults.host_plane(lab, "h1", "management", "down")
    try:
        (hosts, took), (vms, _) = in_controller(lab, ("hosts", ()), ("vms", ()))
        print(f"hosts() with h1 unreachable: {took:.1f} s", flush=True)
        assert [(h.name, h.up) for h in hosts] == [("h1", False), ("h2", True)]
        assert [(v.name, v.host, v.state) for v in vms] == [("vm1", "h1", "unknown")]
    finally:
        faults.host_plane(lab, "h1", "management", "up")


def test_a_guest_killed_outside_vmha_is_stopped_and_restarts_in_place(lab: LabState) -> None:
    h1 = lab.node("h1")
    pid = int(run([*h1.enter(), "cat", "/run/libvirt/qemu/vm1.pid"]).stdout)
    os.kill(pid, signal.SIGKILL)  # a crash: libvirt sees QEMU end, the transient domain is gone
    until_sync(lambda: libvirtd.virsh(h1, "list", "--name").stdout.split() == [], "vm1 gone from h1", timeout=30)
    vms = call(lab, "vms")
    assert [(v.name, v.host, v.ha, v.state) for v in vms] == [("vm1", "h1", True, STOPPED)]
    t0 = time.time()
    assert call(lab, "evacuate", "vm1", "h1", "h1") == "h1"  # the manager's restart in place
    until_sync(lambda: writing_on(lab, "vm1", "h1", t0), "vm1 writing on h1 again", timeout=60)
    assert [(v.name, v.host, v.state) for v in call(lab, "vms")] == [("vm1", "h1", "running")]


def test_removing_the_metadata_unprotects_so_a_stop_is_not_restarted(lab: LabState) -> None:
    h1 = lab.node("h1")
    libvirtd.virsh(h1, "metadata", "vm1", METADATA_NS, "--remove", "--live")
    assert call(lab, "vms") == []  # the inventory forgot it
    libvirtd.virsh(h1, "destroy", "vm1")
    assert call(lab, "vms") == []  # stopped by its operator: not for vmha to restart
