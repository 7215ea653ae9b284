"""libvirt's automatic disk leases against a real libvirtd and QEMU (locks.leases = "libvirt-disk").

A domain defined as a cloud's compute service defines it (Nova: no <lease>, its disk at
instances/<uuid>/disk) is started by a real libvirtd whose sanlock plugin has auto_disk_leases = 1 in
the directory vmha uses as its lockspace. Checked: libvirt takes exactly the lease vmha's
DiskLeaseSpace names for the VM (libvirt creates the lease file, vmha reads it as the VM's lease with
QEMU's host as owner); the agent's settings check accepts that libvirt; host A's agent finds the QEMU
pid as the VM's holder; the manager's prover gets no proof while QEMU runs and a lease-taken proof once
the domain is destroyed; a disk lease nobody ever held gives no proof and an alert (no vacuous proof):
libvirt starts a paused domain without its leases (it takes them when the CPUs are resumed), so a
guest started paused is such a lease, created by libvirt itself.

Host A: its own sanlock daemon (host_id 1) and a libvirtd in a private mount namespace (its own
/etc/libvirt, /run/libvirt...: vmha.lab.libvirtd's mounts and configs); the manager is this process
(host_id 2). io_timeout 1.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lockhelp import A_HOST_ID, IO, MGR_HOST_ID, SimHost, assert_never_held_refused

from vmha.agent.libvirt_locks import check_lock_settings
from vmha.config import LibvirtConfig, LocksConfig
from vmha.core.fencing import ProofMethod
from vmha.lab import guestxml, libvirtd
from vmha.lab.net import kill_pids, pid_alive
from vmha.lab.sanlockd import LabSanlock, start_sanlock, stop_sanlock
from vmha.locks import LockSpace, ProofRefused, Prover
from vmha.locks.disk_leases import DiskLeaseSpace
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.integration

NAME = "vt2lv"


@dataclass
class Rig:
    locks: LocksConfig
    space: DiskLeaseSpace  # the manager's view
    a: SimHost
    etc: Path
    libvirtd_pid: int
    instances: Path

    def virsh(self, *args: str) -> str:
        cp = subprocess.run(["nsenter", "-t", str(self.libvirtd_pid), "-m", "virsh", "-q", "-c", "qemu:///system",
                             *args], capture_output=True, text=True, timeout=60, check=False)
        assert cp.returncode == 0, f"virsh {' '.join(args)}: {cp.stderr}"
        return cp.stdout

    def start_guest(self, vm: str) -> None:
        """A Nova-like domain: no <lease>, its disk at instances/<uuid>/disk; started paused (no lease yet)."""
        disk = self.instances / vm / "disk"
        disk.parent.mkdir(parents=True)
        with disk.open("wb") as f:
            f.truncate(1 << 20)
        xml = disk.parent / "domain.xml"
        xml.write_text(f"""<domain type='qemu'>
  <name>{NAME}-{vm[:8]}</name>
  <uuid>{vm}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guestxml.KERNEL}</kernel>
    <initrd>{guestxml.INITRD}</initrd>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
""")
        self.virsh("create", "--paused", str(xml))

    def qemu_pid(self, vm: str) -> int:
        cp = subprocess.run(["nsenter", "-t", str(self.libvirtd_pid), "-m", "cat",
                             f"/run/libvirt/qemu/{NAME}-{vm[:8]}.pid"], capture_output=True, text=True, check=True)
        return int(cp.stdout.strip())

    def prover(self) -> Prover:
        async def host_id_of(host: str) -> int | None:
            return {self.a.name: A_HOST_ID}.get(host)

        return Prover(self.space, host_id_of=host_id_of, poll=0.1)


@pytest.fixture
def rig(manager_sanlock: LabSanlock, tmp_path: Path) -> Iterator[Rig]:
    if not guestxml.KERNEL.exists():
        pytest.skip(f"no lab guest in {guestxml.GUEST_DIR}: run scripts/build-guest.sh")
    shared = tmp_path / "shared"
    shared.mkdir()
    instances = tmp_path / "instances"
    locks = LocksConfig(path=shared, io_timeout=IO, leases="libvirt-disk", vm_disk=f"{instances}/{{vm}}/disk")
    space = LockSpace.from_config(locks)
    assert isinstance(space, DiskLeaseSpace)
    space.init()  # `vmha locks init`: libvirt finds the lockspace there and joins it
    d = start_sanlock(f"{NAME}a", run_dir=tmp_path / "a-run", kill_grace=5, log_path=tmp_path / "a-sanlock.log")
    a = SimHost(f"{NAME}a", d, {"path": str(shared), "vm_disk": locks.vm_disk, "io": IO}, tmp_path / "a-vmha")
    base = tmp_path / "libvirt"
    for sub in libvirtd.BIND_DIRS.values():
        (base / sub).mkdir(parents=True)
    (base / "etc" / "qemu.conf").write_text(libvirtd.qemu_conf(None))
    (base / "etc" / "qemu-sanlock.conf").write_text(libvirtd.sanlock_conf((shared, A_HOST_ID, IO)))
    (base / "etc" / "libvirtd.conf").write_text('log_outputs = "3:stderr"\n')
    with (tmp_path / "libvirtd.log").open("wb") as log:
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"{libvirtd.mount_script(base)} && exec libvirtd --pid-file /run/libvirt/libvirtd.pid"],
            env=d.env(), stdout=log, stderr=log)  # fmt: skip
    rig = Rig(locks, space, a, base / "etc", proc.pid, instances)
    try:
        until_sync(lambda: proc.poll() is not None or subprocess.run(
            ["nsenter", "-t", str(proc.pid), "-m", "virsh", "-c", "qemu:///system", "version"],
            capture_output=True, check=False).returncode == 0, "libvirtd answering", timeout=30)
        assert proc.poll() is None, (tmp_path / "libvirtd.log").read_text()[-2000:]
        space.join(MGR_HOST_ID, f"{NAME}mgr", timeout=30)
        until_sync(lambda: {h.host_id for h in space.hosts()} >= {A_HOST_ID, MGR_HOST_ID},
                   "the manager's daemon seeing libvirt's host_id", timeout=10 * IO + 15, interval=0.2)
        yield rig
    finally:
        for line in subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "virsh", "-q", "-c", "qemu:///system",
                                    "list", "--name"], capture_output=True, text=True, check=False).stdout.split():
            subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "virsh", "-c", "qemu:///system", "destroy", line],
                           capture_output=True, check=False)
        if pid_alive(proc.pid):
            kill_pids([proc.pid], grace=5)
        proc.wait(timeout=10)
        stop_sanlock(d)
        space.leave(MGR_HOST_ID)


async def test_the_prover_takes_exactly_the_disk_lease_libvirt_took(rig: Rig) -> None:
    found = check_lock_settings(LibvirtConfig(config_dir=rig.etc), rig.locks, A_HOST_ID)
    assert found is not None and found.auto_disk_leases, found
    vm = str(uuid.uuid4())
    assert not rig.space.lease_path(vm).exists()
    rig.start_guest(vm)
    # libvirt created the lease vmha names for this VM (same file, lockspace and resource name), and
    # takes it only when the CPUs run: a paused guest's lease was never held, it proves nothing.
    rig.space.check_lease(vm)
    assert rig.space.leader(vm).lver == 0
    prover = rig.prover()
    refused = await assert_never_held_refused(prover, vm, rig.a.name, r"was never acquired since it was "
                                              r"initialised or reset \(lver 0\)", methods=(ProofMethod.LEASE_TAKEN,))
    assert refused.alert
    rig.virsh("resume", f"{NAME}-{vm[:8]}")
    leader = rig.space.leader(vm)
    assert (leader.owner_id, leader.lver) == (A_HOST_ID, 1) and leader.timestamp != 0, leader
    assert [o.host_id for o in rig.space.owners(vm)] == [A_HOST_ID]
    # Host A's agent sees QEMU as the VM's holder (sanlock names the disk lease, the attestation the VM).
    qemu = rig.qemu_pid(vm)
    assert rig.a.run("sweep").strip() == f"{rig.space.resource(vm)}:{qemu}"
    attested = json.loads(rig.a.run("attest", vm=vm))
    assert not attested["ok"] and attested["reason"].startswith(f"holders still alive: pid={qemu}"), attested
    with pytest.raises(ProofRefused, match=r"lease held by another host \(host_id=1 "):
        await prover.prove(vm, rig.a.name, (ProofMethod.LEASE_TAKEN,), timeout=5)
    rig.virsh("destroy", f"{NAME}-{vm[:8]}")  # QEMU exits: libvirt's lease is released
    proof = await prover.prove(vm, rig.a.name, (ProofMethod.LEASE_TAKEN,), timeout=10)
    assert proof.method is ProofMethod.LEASE_TAKEN and "alert" not in proof.details
    assert f"leader record owner_id={A_HOST_ID} " in proof.details["trail"]
    await prover.release_all()

