"""The libvirt driver against real libvirtd and QEMU: a lab of 2 hosts with QEMU guests (prefix vqd),
its managers stopped so that only this test drives the guests. The driver runs in the controller's
network namespace, where the hosts' libvirtd (TCP, management plane) and etcd are reachable.

Checked: protection and priority from the domain's metadata (an unprotected domain is ignored), the
inventory's definitions, live migration of a running guest (its records name the new host at once,
seq going on), evacuation refused while the VM runs on the source and idempotent once done, a start
from the recorded definition on another host, libvirt refusing a second copy while the lease is
held, host flags, and a host whose libvirtd cannot be reached.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from vmha.core.planes import Plane
from vmha.drivers.base import DriverError
from vmha.drivers.libvirt import LibvirtDriver
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab import cluster, faults, libvirtd, scenario
from vmha.lab.configs import libvirt_uri
from vmha.lab.net import LabError, pid_alive, run
from vmha.lab.state import CLUSTER, LabState
from vmha.lab.vm import disk_lines
from vmha.lab.vms import writing_on
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.integration

PREFIX = "vqd"
T = TypeVar("T")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab-libvirt")
    try:
        state = cluster.up(lab_dir, hosts=2, vms=1, io_timeout=1, prefix=PREFIX, guests="qemu")
        for role, pid in sorted(state.controller.pids.items()):
            if role.startswith("manager-"):  # this test alone drives the guests
                os.kill(pid, signal.SIGTERM)
                until_sync(lambda p=pid: not pid_alive(p), f"{role} stopped", timeout=30, interval=0.1)
        yield state
    finally:
        cluster.down(lab_dir)


def in_controller(lab: LabState, fn: Callable[[LibvirtDriver], Awaitable[T]]) -> T:
    """Runs fn(driver) in a thread of its own moved into the controller's network namespace: the
    threads it starts (the driver's pool, gRPC's) are created there too."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{lab.node('controller').netns}", "rb") as ns:
            if libc.setns(ns.fileno(), 0x40000000) != 0:
                raise LabError("setns into the controller's netns failed")

        async def main() -> T:
            uris = {h: libvirt_uri(lab.node(h)) for h in sorted(lab.hosts)}
            async with EtcdClient([lab.etcd_url(Plane.MANAGEMENT)], name="test") as client:
                return await fn(LibvirtDriver(client, Keys(CLUSTER), uris, migrate_unsafe=True))

        try:
            result.append(asyncio.run(main()))
        except BaseException as e:  # re-raised in the test's thread
            error.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(300)
    if error:
        raise error[0]
    return result[0]


def _copies(lab: LabState, vm: str) -> list[str | None]:
    return scenario.running_on(lab).get(vm, [])


def _wait_writes(lab: LabState, vm: str, host: str, since: float, timeout: float = 60) -> float:
    until_sync(lambda: writing_on(lab, vm, host, since), f"{vm} writing on {host}", timeout=timeout, interval=0.1)
    return time.time()


def test_discovery_reads_protection_from_metadata(lab: LabState) -> None:
    plain = re.sub(r"\s*<metadata>.*?</metadata>", "", libvirtd.domain_xml(lab, "plain"), flags=re.S)
    plain = re.sub(r"\s*<lease>.*?</lease>", "", plain, flags=re.S)
    libvirtd.create_disk(lab, "plain")
    path = lab.dir / "libvirt" / "plain.xml"
    path.write_text(plain)
    libvirtd.virsh(lab.node("h2"), "create", str(path), timeout=60)

    vms = in_controller(lab, lambda d: d.vms())
    assert [(v.name, v.host, v.ha, v.state) for v in vms] == [("vm1", "h1", True, "running")]
    on_h1 = in_controller(lab, lambda d: d.vms("h1"))
    assert [v.name for v in on_h1] == ["vm1"]
    libvirtd.virsh(lab.node("h2"), "destroy", "plain")


def test_live_migration_moves_the_running_guest(lab: LabState) -> None:
    t0 = time.time()
    dest = in_controller(lab, lambda d: d.live_migrate("vm1", "h1", None))
    assert dest == "h2"
    assert _copies(lab, "vm1") == ["h2"]
    _wait_writes(lab, "vm1", "h2", t0)
    recs = [json.loads(line) for line in disk_lines(lab.disk_on_controller("vm1")) if line.strip()]
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must go on across the migration"
    around = [r for r in recs if r["t"] >= t0 - 1]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(around)]
    print(f"live migration: longest gap between writes {max(gaps):.2f} s", flush=True)
    assert {r["host"] for r in around} == {"h1", "h2"}


def test_evacuate_refuses_while_the_vm_runs_on_the_source_and_is_idempotent(lab: LabState) -> None:
    with pytest.raises(DriverError, match="still runs on h2"):
        in_controller(lab, lambda d: d.evacuate("vm1", "h2", None))
    assert in_controller(lab, lambda d: d.evacuate("vm1", "h1", None)) == "h2"  # done already
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
    assert in_controller(lab, lambda d: d.evacuate("vm1", "h2", "h1")) == "h1"
    _wait_writes(lab, "vm1", "h1", t0)
    held = libvirtd.virsh(lab.node("h1"), "list", "--name").stdout.split()
    assert held == ["vm1"]
    status = run([*lab.node("h1").enter(), "sanlock", "client", "status"]).stdout
    assert re.search(r"^r vmha:vm1:\S+ p \d+", status, re.M), status  # QEMU holds the lease


def test_host_flags(lab: LabState) -> None:
    async def flags(d: LibvirtDriver) -> list[tuple[str, bool, bool]]:
        await d.disable_host("h1", "test")
        a = [(h.name, h.enabled, h.forced_down) for h in await d.hosts()]
        await d.mark_host_down("h2")
        b = [(h.name, h.enabled, h.forced_down) for h in await d.hosts()]
        await d.enable_host("h1")
        await d.enable_host("h2")
        c = [(h.name, h.enabled, h.forced_down) for h in await d.hosts()]
        return [*a, *b, *c]

    assert in_controller(lab, flags) == [("h1", False, False), ("h2", True, False),
                                          ("h1", False, False), ("h2", False, True),
                                          ("h1", True, False), ("h2", True, False)]


def test_unreachable_host_is_down_and_keeps_its_recorded_vms(lab: LabState) -> None:
    faults.host_plane(lab, "h1", "management", "down")
    try:
        t = time.monotonic()
        hosts, vms = in_controller(lab, lambda d: asyncio.gather(d.hosts(), d.vms()))
        took = time.monotonic() - t
        print(f"hosts() and vms() with h1 unreachable: {took:.1f} s", flush=True)
        assert [(h.name, h.up) for h in hosts] == [("h1", False), ("h2", True)]
        assert [(v.name, v.host, v.state) for v in vms] == [("vm1", "h1", "unknown")]
    finally:
        faults.host_plane(lab, "h1", "management", "up")
