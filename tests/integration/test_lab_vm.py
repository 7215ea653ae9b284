"""The lab VM against real sanlock daemons on real shared storage (sshfs over the storage plane):
it writes only with the lease, a second copy is refused, a live migration hands the lease over
without a gap and without two writers, a storage cut stops it. Namespaces use the vt4 prefix."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha.core.planes import Plane
from vmha.drivers.base import DriverError
from vmha.drivers.lab import LabDriver
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab import cluster, controller
from vmha.lab.configs import agent_config
from vmha.lab.hosts import boot_host, lockspace_joined
from vmha.lab.net import run
from vmha.lab.procs import EXIT_LEASE_REFUSED, vm_processes
from vmha.lab.state import LEASES_DIR, LabState, NodeState
from vmha.lab.storage import MOUNT_POINT
from vmha.lab.verify import check_disk, downtime_between
from vmha.lab.vm import incoming_marker
from vmha.lab.vms import start_copy, writing_on
from vmha.testing.etcd import EtcdProcess
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.integration

LOCKS = f"from vmha.locks.space import LockSpace; s = LockSpace('{MOUNT_POINT / LEASES_DIR}', io_timeout=1); "


@pytest.fixture
def mini_lab(tmp_path: Path) -> Iterator[LabState]:
    """Controller (storage, etcd, the managers' sanlock daemons) and two hosts with their daemons and
    agents, lockspace and vm1's lease initialised, both hosts joined. No managers."""
    state = LabState(dir=tmp_path / "lab", prefix="vt4", io_timeout=1, created=time.time())
    state.hosts = {f"h{i}": NodeState(f"h{i}", 10 + i) for i in (1, 2)}
    state.vms = ["vm1"]
    state.save()
    try:
        controller.boot_network(state)
        controller.start_services(state)
        (state.export / LEASES_DIR).mkdir(parents=True)
        (state.export / "disks").mkdir()
        ctl = state.node("controller")
        run([*ctl.enter(), "env", f"SANLOCK_RUN_DIR={controller.sanlock_run_dir(state, 'm1')}",
             sys.executable, "-c", LOCKS + "s.init(); s.create_lease('vm1')"], timeout=60)
        for name in sorted(state.hosts):
            boot_host(state, state.hosts[name])  # its agent joins the lockspace (host_id from etcd)
        state.save()
        for name in sorted(state.hosts):
            until_sync(lambda n=name: lockspace_joined(state.node(n)), f"{name} joining the lockspace", timeout=60)
        yield state
    finally:
        cluster.down(state.dir)


def test_lease_guards_the_disk_and_migration_hands_it_over(mini_lab: LabState) -> None:
    state = mini_lab
    agent_config(state, "h1")  # the VM reads [locks] from its host's config
    t = time.time()
    first = start_copy(state, "vm1", "h1")
    until_sync(lambda: writing_on(state, "vm1", "h1", t), "vm1 writing on h1", timeout=30)

    # A second copy elsewhere must be refused and never write.
    second = start_copy(state, "vm1", "h2")
    assert second.wait(30) == EXIT_LEASE_REFUSED
    assert all('"h2"' not in line for line in state.disk_on_controller("vm1").read_text().splitlines())

    # Live migration: destination waits for the lease, source stops and releases.
    t = time.time()
    dest = start_copy(state, "vm1", "h2", incoming=30)
    marker = Path(f"/proc/{dest.pid}/root") / incoming_marker("vm1").relative_to("/")
    until_sync(marker.exists, "the incoming copy waiting for the lease", timeout=30)
    assert not writing_on(state, "vm1", "h2", t)  # waiting, not writing
    first.send_signal(signal.SIGUSR1)
    assert first.wait(10) == 0
    until_sync(lambda: writing_on(state, "vm1", "h2", t), "vm1 writing on h2 after the handover", timeout=30)
    dest.send_signal(signal.SIGTERM)
    assert dest.wait(10) == 0

    report = check_disk("vm1", state.disk_on_controller("vm1").read_text().splitlines())
    assert not report.split_brain
    assert [i.host for i in report.intervals] == ["h1", "h2"]
    assert report.intervals[1].first_seq == report.intervals[0].last_seq + 1  # continued the disk
    handover = report.intervals[1].start - report.intervals[0].end
    print(f"live migration handover pause: {handover:.3f} s")
    assert report.downtime == 0  # the pause is the lease handover alone, below the 0.5 s gap threshold


def test_storage_cut_stops_the_vm_before_another_host_could_take_it(mini_lab: LabState) -> None:
    state = mini_lab
    t = time.time()
    copy = start_copy(state, "vm1", "h1")
    until_sync(lambda: writing_on(state, "vm1", "h1", t), "vm1 writing on h1", timeout=30)
    state.net().set_link(state.node("h1"), Plane.STORAGE, up=False)
    cut = time.monotonic()
    try:
        code = copy.wait(30)  # sanlock SIGTERMs the holder of a failed lockspace (~7 s at io 1)
    except subprocess.TimeoutExpired:
        pytest.fail("the VM kept running 30 s after its storage was cut")
    finally:
        state.net().set_link(state.node("h1"), Plane.STORAGE, up=True)
    print(f"storage cut to VM exit: {time.monotonic() - cut:.1f} s (exit {code})")
    report = check_disk("vm1", state.disk_on_controller("vm1").read_text().splitlines())
    assert not report.split_brain


async def test_lab_driver_places_evacuates_and_migrates(mini_lab: LabState, etcd: EtcdProcess) -> None:
    """The lab compute driver (placement records in a real etcd, copies in the lab's namespaces)."""
    state = mini_lab
    for h in state.hosts:
        agent_config(state, h)
    async with EtcdClient(etcd.client_urls, tls=etcd.tls()) as client:
        keys = Keys("lab")
        driver = LabDriver(client, keys, state.dir)
        await client.put_json(keys.lab("vms", "vm1"), {"vm": "vm1", "host": "h1", "ha": True, "priority": 0})
        assert [(v.name, v.host, v.state) for v in await driver.vms()] == [("vm1", "h1", "stopped")]

        # Nothing runs: evacuating from h1 starts it on the least-loaded other host.
        assert await driver.evacuate("vm1", "h1", None) == "h2"
        assert [(v.host, v.state) for v in await driver.vms("h2")] == [("h2", "running")]
        assert await driver.evacuate("vm1", "h1", None) == "h2"  # repeated by a new leader: no-op

        # Live migration back to h1 hands the lease over.
        t = time.time()
        assert await driver.live_migrate("vm1", "h2", "h1") == "h1"
        assert writing_on(state, "vm1", "h1", t)
        mig = check_disk("vm1", state.disk_on_controller("vm1").read_text().splitlines())
        print(f"driver live migration pause: {mig.intervals[-1].start - mig.intervals[-2].end:.3f} s")
        assert downtime_between(mig, t, time.time()) == 0
        assert [(p.host, p.active) for p in vm_processes("vt4") if p.vm == "vm1"] == [("h1", True)]

        # A copy still running on the source: evacuation refuses to start a second one.
        with pytest.raises(DriverError, match="still runs on h1"):
            await driver.evacuate("vm1", "h1", "h2")

        await driver.disable_host("h2", "test")
        with pytest.raises(DriverError, match="no enabled"):
            await driver.live_migrate("vm1", "h1", None)
        await driver.enable_host("h2")
        assert {h.name: (h.enabled, h.up) for h in await driver.hosts()} == {"h1": (True, True), "h2": (True, True)}

    report = check_disk("vm1", state.disk_on_controller("vm1").read_text().splitlines())
    assert not report.split_brain
