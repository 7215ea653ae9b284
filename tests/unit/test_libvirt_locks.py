"""libvirt's configuration format and the agent's check of libvirt's lock settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmha.agent.libvirt_locks import (
    LibvirtConfError,
    LockSettingsError,
    check_lock_settings,
    parse_conf,
)
from vmha.config import LibvirtConfig, LocksConfig

P = Path("/etc/libvirt/qemu.conf")


def test_parses_libvirt_conf_syntax() -> None:
    text = """# a comment
lock_manager = "sanlock"   # trailing comment
   host_id=7
neg = -3
single = 'it''s'
empty_list = []
cgroup_device_acl = [
    "/dev/null", "/dev/full",   # a comment inside a list
    "/dev/zero",
]
semi = 1;
"""
    with pytest.raises(LibvirtConfError, match=r"qemu.conf:5: unexpected \"'s'\" after the value of single"):
        parse_conf(text, P)
    conf = parse_conf(text.replace("'it''s'", "'it \"is\" # not a comment'"), P)
    assert conf == {"lock_manager": "sanlock", "host_id": 7, "neg": -3, "single": 'it "is" # not a comment',
                    "empty_list": [], "cgroup_device_acl": ["/dev/null", "/dev/full", "/dev/zero"], "semi": 1}


@pytest.mark.parametrize(("text", "error"), [
    ('lock_manager "sanlock"\n', r"qemu.conf:1: expected '=' after lock_manager"),
    ("lock_manager = sanlock\n", r"qemu.conf:1: lock_manager: expected a quoted string, an integer or a list"),
    ('x = 1\nlock_manager = "sanlock\n', r"qemu.conf:2: lock_manager: string not closed on its line"),
    ('x = [ "a" "b" ]\n', r"qemu.conf:1: x: expected ',' or '\]' in the list"),
    ("x = [ [1] ]\n", r"qemu.conf:1: x: expected a quoted string"),
    ("x = 1 2\n", r"qemu.conf:1: unexpected '2' after the value of x"),
    ("x = 1\nx = 2\n", r"qemu.conf:2: x is set twice"),
    ("= 1\n", r"qemu.conf:1: expected a setting name"),
    ("x = [ 1,\n", r"qemu.conf:2: x: expected a quoted string"),
])
def test_malformed_conf_is_an_error_naming_file_and_line(text: str, error: str) -> None:
    with pytest.raises(LibvirtConfError, match=error):
        parse_conf(text, P)


def libvirt_dir(tmp_path: Path, qemu: str | None, sanlock: str | None = None) -> LibvirtConfig:
    d = tmp_path / "etc-libvirt"
    d.mkdir()
    if qemu is not None:
        (d / "qemu.conf").write_text(qemu)
    if sanlock is not None:
        (d / "qemu-sanlock.conf").write_text(sanlock)
    return LibvirtConfig(config_dir=d)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    (tmp_path / "shared" / "leases").mkdir(parents=True)
    return tmp_path / "shared" / "leases"


def test_explicit_leases_need_only_the_sanlock_lock_manager(tmp_path: Path, shared: Path) -> None:
    cfg = libvirt_dir(tmp_path, '#lock_manager = "lockd"\nlock_manager = "sanlock"\n', "auto_disk_leases = 0\n")
    found = check_lock_settings(cfg, LocksConfig(path=shared), 3)
    assert found is not None and not found.auto_disk_leases
    (cfg.config_dir / "qemu-sanlock.conf").unlink()  # libvirt's default: no automatic leases
    assert check_lock_settings(cfg, LocksConfig(path=shared), 3) is not None


@pytest.mark.parametrize(("qemu", "error"), [
    ("", r"qemu.conf: lock_manager must be \"sanlock\", it is not set \(libvirt's default: no lock manager\)"),
    ('lock_manager = "lockd"\n', r"qemu.conf: lock_manager must be \"sanlock\", it is 'lockd'"),
    ("lock_manager = 1\n", r"qemu.conf: lock_manager must be a quoted string, got 1"),
    ('lock_manager = "sanlock"\nlock_manager = "sanlock"\n', r"qemu.conf:2: lock_manager is set twice"),
])
def test_a_wrong_lock_manager_is_refused(tmp_path: Path, shared: Path, qemu: str, error: str) -> None:
    with pytest.raises((LockSettingsError, LibvirtConfError), match=error):
        check_lock_settings(libvirt_dir(tmp_path, qemu), LocksConfig(path=shared), 3)


def test_automatic_disk_leases_need_the_shared_storage_and_vmhas_host_id(tmp_path: Path, shared: Path) -> None:
    on_shared = shared.parent / "libvirt-sanlock"
    on_shared.mkdir()
    cfg = libvirt_dir(tmp_path, 'lock_manager = "sanlock"\n',
                      f'auto_disk_leases = 1\ndisk_lease_dir = "{on_shared}"\nhost_id = 3\n')
    found = check_lock_settings(cfg, LocksConfig(path=shared), 3)
    assert found is not None and found.auto_disk_leases and "host_id=3" in found.text
    sanlock_conf = cfg.config_dir / "qemu-sanlock.conf"
    with pytest.raises(LockSettingsError, match=rf"{sanlock_conf}: host_id is 3, vmha allocated host_id 4 to "
                       r"this host: set host_id = 4"):
        check_lock_settings(cfg, LocksConfig(path=shared), 4)
    sanlock_conf.write_text(f'auto_disk_leases = 1\ndisk_lease_dir = "{on_shared}"\n')
    with pytest.raises(LockSettingsError, match=r"host_id is not set, vmha allocated host_id 3"):
        check_lock_settings(cfg, LocksConfig(path=shared), 3)
    sanlock_conf.write_text('auto_disk_leases = "1"\n')
    with pytest.raises(LockSettingsError, match=r"auto_disk_leases must be an integer, got '1'"):
        check_lock_settings(cfg, LocksConfig(path=shared), 3)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second filesystem (/dev/shm)")
def test_automatic_disk_leases_off_the_shared_storage_are_refused(tmp_path: Path, shared: Path) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(shared).st_dev:
        pytest.skip("/dev/shm is on the test's filesystem")
    cfg = libvirt_dir(tmp_path, 'lock_manager = "sanlock"\n', 'auto_disk_leases = 1\ndisk_lease_dir = "/dev/shm"\n'
                      "host_id = 3\n")
    with pytest.raises(LockSettingsError, match=rf"disk_lease_dir /dev/shm is not on the shared storage of "
                       rf"locks.path {shared} \(another filesystem\)"):
        check_lock_settings(cfg, LocksConfig(path=shared), 3)
    (cfg.config_dir / "qemu-sanlock.conf").write_text("auto_disk_leases = 1\nhost_id = 3\n")  # libvirt's default dir
    with pytest.raises(LockSettingsError, match=r"disk_lease_dir /var/lib/libvirt/sanlock "):
        check_lock_settings(cfg, LocksConfig(path=shared), 3)


def test_a_host_without_libvirt(tmp_path: Path, shared: Path) -> None:
    cfg = libvirt_dir(tmp_path, None)
    with pytest.raises(LockSettingsError, match=r"qemu.conf does not exist: .*required = true"):
        check_lock_settings(cfg, LocksConfig(path=shared), 3)
    optional = LibvirtConfig(config_dir=cfg.config_dir, required=False)
    assert check_lock_settings(optional, LocksConfig(path=shared), 3) is None


def test_libvirt_disk_leases_mode_needs_libvirts_lockspace_to_be_vmhas(tmp_path: Path, shared: Path) -> None:
    """locks.leases = "libvirt-disk": vmha proves with the leases libvirt takes for the disks, so libvirt
    must take them (auto_disk_leases = 1) in the very lockspace the agent joins, with vmha's timings."""
    locks = LocksConfig(path=shared, io_timeout=1, leases="libvirt-disk", vm_disk="/nova/instances/{vm}/disk")
    cfg = libvirt_dir(tmp_path, 'lock_manager = "sanlock"\n',
                      f'auto_disk_leases = 1\ndisk_lease_dir = "{shared}"\nhost_id = 3\nio_timeout = 1\n')
    found = check_lock_settings(cfg, locks, 3)
    assert found is not None and found.auto_disk_leases and "io_timeout=1, vmha's lockspace" in found.text
    sanlock_conf = cfg.config_dir / "qemu-sanlock.conf"
    for text, error in [
        ("auto_disk_leases = 0\n", r"auto_disk_leases must be 1 with vmha's locks.leases = \"libvirt-disk\""),
        ("", r"auto_disk_leases must be 1"),  # libvirt's default: no automatic leases
        (f'auto_disk_leases = 1\ndisk_lease_dir = "{shared.parent}"\nhost_id = 3\nio_timeout = 1\n',
         rf"disk_lease_dir is {shared.parent}, with locks.leases = \"libvirt-disk\" it must be locks.path {shared}"),
        (f'auto_disk_leases = 1\ndisk_lease_dir = "{shared}"\nhost_id = 3\n',
         r"io_timeout is not set \(sanlock's default\), vmha's locks.io_timeout is 1: set io_timeout = 1"),
        (f'auto_disk_leases = 1\ndisk_lease_dir = "{shared}"\nhost_id = 3\nio_timeout = 10\n',
         r"io_timeout is 10, vmha's locks.io_timeout is 1"),
        (f'auto_disk_leases = 1\ndisk_lease_dir = "{shared}"\nhost_id = 4\nio_timeout = 1\n',
         r"host_id is 4, vmha allocated host_id 3 to this host"),
        (f'auto_disk_leases = 1\ndisk_lease_dir = "{tmp_path}/nowhere"\nhost_id = 3\nio_timeout = 1\n',
         r"disk_lease_dir \S+/nowhere cannot be checked against locks.path"),
    ]:
        sanlock_conf.write_text(text)
        with pytest.raises(LockSettingsError, match=rf"{sanlock_conf}: {error}"):
            check_lock_settings(cfg, locks, 3)
