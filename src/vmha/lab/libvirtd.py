"""LAB ONLY: a libvirtd per lab host, running the lab's QEMU guests (`vmha lab up --guests qemu`).

Each host's libvirtd runs in the host's namespaces (its anchor's mount namespace and netns), with
its own /etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt (bind mounts of
<lab dir>/libvirt/<host>/...) and a tmpfs on /run/libvirt, so several run on one machine and all
die with the host's processes (a power-off). Guests are QEMU TCG (this machine kind runs no KVM
guest) booting the kernel and initramfs scripts/build-guest.sh builds.

Lab-only choices, unsafe in production and said so: libvirtd listens on TCP without authentication
on the host's management address (production: TLS or SSH transports), QEMU runs as root with no
security driver, cgroups and per-domain namespaces off (no systemd here).
What is production's: `lock_manager = "sanlock"` with explicit `<lease>` elements (the VM's lease in
vmha's lockspace) or, in the Nova lab with QEMU guests, libvirt's automatic disk leases (Nova's domains
carry no <lease>; vmha.locks.disk_leases), so QEMU holds the lease before the guest's CPUs run, and a
lockspace failure makes sanlock end QEMU (`<on_lockfailure>poweroff</on_lockfailure>`: through libvirt).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

from vmha.core.planes import Plane
from vmha.drivers.libvirt import METADATA_NS
from vmha.lab import guestxml
from vmha.lab.guestxml import CLOCK_SOCKET, DISK_SIZE
from vmha.lab.net import LabError, Node, pid_alive, run, spawn
from vmha.lab.state import DISKS_DIR, LEASES_DIR, LabState
from vmha.lab.storage import MOUNT_POINT
from vmha.lab.vm import INTERVAL
from vmha.locks.space import LEASE_SUFFIX

TCP_PORT = 16509
# Host directory -> the part of <lab dir>/libvirt/<host> bind-mounted on it.
BIND_DIRS = {"/etc/libvirt": "etc", "/var/lib/libvirt": "lib", "/var/log/libvirt": "log",
             "/var/cache/libvirt": "cache"}
READY_TIMEOUT = 30.0
LOCKSPACE = "vmha"  # the lab's [locks] lockspace (vmha.lab.configs: the default)


def root(state: LabState, host: str) -> Path:
    return state.dir / "libvirt" / host


def _write_configs(state: LabState, node: Node) -> None:
    base = root(state, node.name)
    for sub in BIND_DIRS.values():
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "log" / "qemu").mkdir(exist_ok=True)  # QEMU's logs and the guests' consoles
    etc = base / "etc"
    addr = node.address(Plane.MANAGEMENT)
    host_uuid = etc / "host-uuid"
    if not host_uuid.exists():  # libvirt refuses a migration between hosts of one UUID
        host_uuid.write_text(str(uuid.uuid4()))
    (etc / "libvirtd.conf").write_text(
        "# LAB ONLY: unauthenticated TCP on the management plane (production: TLS or SSH).\n"
        f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{addr}"\nauth_tcp = "none"\nauth_unix_rw = "none"\n'
        f'host_uuid = "{host_uuid.read_text().strip()}"\nlog_outputs = "3:stderr"\n')
    (etc / "qemu.conf").write_text(qemu_conf(addr))
    disk_leases = (MOUNT_POINT / LEASES_DIR, host_id(node.name), state.io_timeout) if state.disk_leases else None
    (etc / "qemu-sanlock.conf").write_text(sanlock_conf(disk_leases))


def host_id(host: str) -> int:
    """The sanlock host_id the lab reserves for host hN in etcd (N) and writes in its qemu-sanlock.conf."""
    return int(host[1:])


def qemu_conf(migration_addr: str | None) -> str:
    """qemu.conf of a lab libvirtd (migrations on `migration_addr`, if any)."""
    return ("# vmha: QEMU holds each protected VM's sanlock lease.\n"
            'lock_manager = "sanlock"\n'
            "# LAB ONLY: no systemd, no cgroups, one machine for every host.\n"
            'stdio_handler = "file"\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\nnamespaces = []\ncgroup_controllers = []\n'
            + (f'migration_address = "{migration_addr}"\nmigration_host = "{migration_addr}"\n'
               if migration_addr else ""))


def sanlock_conf(disk_leases: tuple[Path, int, int] | None) -> str:
    """qemu-sanlock.conf: explicit leases only, or (disk_leases = (disk_lease_dir, host_id, io_timeout))
    libvirt's automatic disk leases in that directory, as vmha's locks.leases = "libvirt-disk" needs."""
    if disk_leases is None:
        return ("# Explicit leases in vmha's lockspace, joined by the vmha agent: no automatic disk leases.\n"
                "auto_disk_leases = 0\nrequire_lease_for_disks = 0\n")
    lease_dir, host_id, io_timeout = disk_leases
    return ("# libvirt's disk leases, in the lockspace vmha joins (locks.leases = \"libvirt-disk\").\n"
            f'auto_disk_leases = 1\ndisk_lease_dir = "{lease_dir}"\nhost_id = {host_id}\nio_timeout = {io_timeout}\n')


def mount_script(base: Path) -> str:
    """Shell commands that mount libvirt's directories from `base` (<base>/etc on /etc/libvirt...) and a
    tmpfs on /run/libvirt, in the mount namespace they run in (each step skipped if already done)."""
    mounts = [f"mkdir -p {d} /run/libvirt && (mountpoint -q {d} || mount --bind {shlex.quote(str(base / s))} {d})"
              for d, s in BIND_DIRS.items()]
    mounts.append("(mountpoint -q /run/libvirt || mount -t tmpfs -o mode=0755 vmha-lab /run/libvirt)")
    return " && ".join(mounts)


def prepare(state: LabState, node: Node) -> None:
    """The host's libvirt configuration, mounted where libvirtd and the agent (which checks the lock
    settings at start) read it: before either starts."""
    _write_configs(state, node)
    run([*node.enter(), "sh", "-c", mount_script(root(state, node.name))])


def start(state: LabState, node: Node) -> dict[str, int]:
    """Starts the host's guest clock service and libvirtd (each unless running); returns their pids."""
    ns = state.hosts[node.name]
    pids: dict[str, int] = {}
    if not pid_alive(ns.pids.get("guestclock", 0)):
        proc = spawn([*node.enter(), sys.executable, "-m", "vmha.lab.guestclock",
                      node.name, str(CLOCK_SOCKET)], state.logs / f"guestclock-{node.name}.log")
        pids["guestclock"] = proc.pid
    if not pid_alive(ns.pids.get("libvirtd", 0)):
        prepare(state, node)
        proc = spawn([*node.enter(), "libvirtd", "--listen", "--pid-file", "/run/libvirt/libvirtd.pid"],
                     state.logs / f"libvirtd-{node.name}.log")
        pids["libvirtd"] = proc.pid
        _wait_ready(state, node, proc.pid)
    return pids


def _wait_ready(state: LabState, node: Node, pid: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise LabError(f"{node.name}: libvirtd exited at start (log: {state.logs}/libvirtd-{node.name}.log)")
        if virsh(node, "version", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise LabError(f"{node.name}: libvirtd did not answer within {READY_TIMEOUT:.0f} s")


def virsh(node: Node, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run([*node.enter(), "virsh", "-q", "-c", "qemu:///system", *args], check=check, timeout=timeout)


def domain_xml(state: LabState, vm: str, priority: int = 0) -> str:
    """The lab guest's domain: protected (vmha metadata), its lease explicit in vmha's lockspace, its
    disk and lease on the shared storage at the same path on every host (migration, evacuation)."""
    lease = MOUNT_POINT / LEASES_DIR / f"{vm}{LEASE_SUFFIX}"
    return guestxml.domain_xml(
        vm, MOUNT_POINT / DISKS_DIR / f"{vm}.disk", INTERVAL,
        lease=f"<lease><lockspace>{LOCKSPACE}</lockspace><key>{vm}</key><target path='{lease}' offset='0'/></lease>",
        metadata=f"<vmha:protect xmlns:vmha='{METADATA_NS}' priority='{priority}'/>",
    )  # fmt: skip


def create_disk(state: LabState, vm: str) -> None:
    """The guest's raw disk on the shared storage (kept when present: its records go on)."""
    path = state.disk_on_controller(vm)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(DISK_SIZE)


def start_guest(state: LabState, vm: str, host: str, priority: int = 0) -> None:
    """Starts the VM's guest on `host` (a transient domain: its definition lives in the libvirt
    driver's inventory in etcd, not on any one host). libvirt takes the lease before the CPUs run."""
    create_disk(state, vm)
    xml = state.dir / "libvirt" / f"{vm}.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text(domain_xml(state, vm, priority))
    virsh(state.node(host), "create", str(xml), timeout=60)
