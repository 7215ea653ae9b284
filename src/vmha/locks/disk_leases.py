"""libvirt's automatic disk leases as vmha's lockspace (locks.leases = "libvirt-disk").

A cloud's compute service (Nova's libvirt driver) defines domains without <lease> elements. With
qemu-sanlock.conf `auto_disk_leases = 1`, libvirt's sanlock plugin then takes, before the guest's CPUs
run, one lease per writable disk (libvirt src/locking/lock_driver_sanlock.c):
  lockspace   __LIBVIRT__DISKS__, its delta leases in <disk_lease_dir>/__LIBVIRT__DISKS__, joined
              by libvirtd with qemu-sanlock.conf's host_id (and io_timeout) at its start;
  resource    the MD5 of the disk's path as the domain XML gives it, 32 lowercase hex digits;
  lease file  <disk_lease_dir>/<that name>, created (and initialised) by libvirt at the first start.
vmha then uses that lockspace as its own: the agent joins it with the host_id vmha allocated (the
agent's settings check refuses a host whose libvirt would use another, or another directory or
io_timeout), so host states, REQ_FORCE, the exit attestation and the isolation response all act on
the leases QEMU holds, and the prover takes exactly the lease libvirt took for the VM's disk. The
lease's location still follows from the VM's name alone (locks.vm_disk names the disk path), so the
manager needs no etcd lookup to find it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vmha.locks.space import LockError, LockSpace, check_name

LOCKSPACE = "__LIBVIRT__DISKS__"  # libvirt's VIR_LOCK_MANAGER_SANLOCK_AUTO_DISK_LOCKSPACE


def disk_lease_name(disk_path: str) -> str:
    """The resource name libvirt's sanlock plugin gives the lease of the disk at `disk_path`."""
    return hashlib.md5(disk_path.encode(), usedforsecurity=False).hexdigest()


class DiskLeaseSpace(LockSpace):
    """libvirt's __LIBVIRT__DISKS__ lockspace in disk_lease_dir (`path`); a VM's lease is its disk's."""

    def __init__(self, path: Path, vm_disk: str, io_timeout: int = 10, max_hosts: int = 2000) -> None:
        super().__init__(path, LOCKSPACE, io_timeout, max_hosts)
        if vm_disk.count("{vm}") != 1:
            raise LockError(f"vm_disk {vm_disk!r} must name the VM's disk path with {{vm}} once")
        self.vm_disk = vm_disk

    @staticmethod
    def _check_lockspace(name: str) -> str:
        if name != LOCKSPACE:
            raise LockError(f"libvirt's disk leases live in lockspace {LOCKSPACE}, not {name!r}")
        return name

    @property
    def ids_path(self) -> Path:
        return self.path / LOCKSPACE  # libvirt's file name: no .ids suffix

    def disk_path(self, vm: str) -> str:
        return self.vm_disk.replace("{vm}", check_name("VM", vm))

    def resource(self, vm: str) -> str:
        return disk_lease_name(self.disk_path(vm))

    def lease_path(self, vm: str) -> Path:
        return self.path / self.resource(vm)

    def leases(self) -> list[str]:
        """[]: libvirt names a lease after its disk's path hash, so which VM a lease file belongs to
        cannot be read back from the directory."""
        self._require_dir()
        return []
