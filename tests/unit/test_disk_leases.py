"""Where libvirt's automatic disk lease of a VM is (vmha.locks.disk_leases): the names libvirt's sanlock
plugin uses (lock_driver_sanlock.c), checked against a real libvirtd in
tests/integration/locks/test_libvirt_disk_leases.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmha.config import LocksConfig
from vmha.locks import LockSpace
from vmha.locks.disk_leases import LOCKSPACE, DiskLeaseSpace, disk_lease_name
from vmha.locks.space import LockError

UUID = "3f1c2a9e-0000-4000-8000-000000000001"


def test_a_vms_disk_lease_is_named_after_its_disk_path() -> None:
    # `printf %s PATH | md5sum`: libvirt hashes the path exactly as the domain XML gives it
    assert disk_lease_name(f"/var/lib/nova/instances/{UUID}/disk") == "44dfb12395de5e6921c9aa2061a6d021"
    space = LockSpace.from_config(LocksConfig(path=Path("/shared/leases"), io_timeout=1, leases="libvirt-disk",
                                              vm_disk="/var/lib/nova/instances/{vm}/disk"))
    assert isinstance(space, DiskLeaseSpace)
    assert (space.name, space.io_timeout) == (LOCKSPACE, 1) == ("__LIBVIRT__DISKS__", 1)
    assert space.ids_path == Path("/shared/leases/__LIBVIRT__DISKS__")
    assert space.resource(UUID) == "44dfb12395de5e6921c9aa2061a6d021"
    assert space.lease_path(UUID) == Path("/shared/leases/44dfb12395de5e6921c9aa2061a6d021")
    assert space.disks(UUID) == [("/shared/leases/44dfb12395de5e6921c9aa2061a6d021", 0)]


def test_vmha_leases_keep_their_names() -> None:
    space = LockSpace.from_config(LocksConfig(path=Path("/shared/leases")))
    assert type(space) is LockSpace
    assert (space.resource("vm1"), space.lease_path("vm1"), space.ids_path) == (
        "vm1", Path("/shared/leases/vm1.lease"), Path("/shared/leases/vmha.ids"))


def test_a_vm_name_that_is_no_sanlock_name_is_refused() -> None:
    space = DiskLeaseSpace(Path("/l"), "/i/{vm}/disk")
    with pytest.raises(LockError, match=r"VM name '\.\./x'"):
        space.resource("../x")
    with pytest.raises(LockError, match="lockspace __LIBVIRT__DISKS__, not 'vmha'"):
        DiskLeaseSpace._check_lockspace("vmha")
