"""Finding the lab VMs' processes: where each VM really runs is where its `vmha-vm` process is.

The host of a process is the netns it sits in (<prefix>-<host>), not what its arguments claim.
Standard library only: the lab's Nova virt driver (vmha.lab.nova.virt) uses it inside nova-compute.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from vmha.procstat import proc_stat

NETNS_DIR = Path("/run/netns")
EXIT_LEASE_REFUSED = 3  # vmha-vm's exit status when the lease cannot be taken (held elsewhere, no lockspace)


@dataclass(frozen=True, slots=True)
class VmProcess:
    vm: str
    pid: int
    host: str  # the lab host (netns <prefix>-<host>) it runs in
    active: bool  # has its disk open: it holds the lease (a starting or incoming copy does not yet)


def vm_binary() -> str:
    """The vmha-vm console script next to this interpreter (so `ps` shows `vmha-vm <name>`)."""
    local = Path(sys.executable).parent / "vmha-vm"
    if local.exists():
        return str(local)
    found = shutil.which("vmha-vm")
    if found is None:
        raise FileNotFoundError("vmha-vm is not installed: run scripts/setup.sh (pip install -e .)")
    return found


def netns_names(prefix: str) -> dict[int, str]:
    """inode of each <prefix>- network namespace -> its name without the prefix."""
    out: dict[int, str] = {}
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return out
    for name in entries:
        if name.startswith(f"{prefix}-"):
            try:
                out[os.stat(NETNS_DIR / name).st_ino] = name[len(prefix) + 1 :]
            except OSError:
                continue
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = proc_stat(pid)[0]
    except OSError:
        return []
    return [] if state == "Z" else [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _disk_open(pid: int) -> bool:
    """Whether the process has a .disk file open (vmha-vm opens its disk only after taking the lease)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".disk"):
                return True
        except OSError:
            continue
    return False


def vm_processes(prefix: str) -> list[VmProcess]:
    """Every vmha-vm process running in one of this lab's host namespaces; sorted by VM then pid."""
    return _scan(netns_names(prefix))


def copies_here(vm: str, host: str) -> list[VmProcess]:
    """The VM's vmha-vm processes in the caller's own network namespace (for a host's nova-compute:
    the copies on its host), reported as running on `host`."""
    try:
        ino = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return []
    return [p for p in _scan({ino: host}) if p.vm == vm]


def qemu_guest(argv: list[str]) -> str | None:
    """The VM name of a QEMU process (`-name guest=NAME,...`, libvirt's default), else None."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return None
    for i, a in enumerate(argv[:-1]):
        if a == "-name":
            for part in argv[i + 1].split(","):
                if part.startswith("guest="):
                    return part[len("guest="):]
    return None


def _started(pid: int) -> int:
    try:
        return proc_stat(pid)[1]
    except (OSError, IndexError, ValueError):
        return 0


def _scan(names: dict[int, str]) -> list[VmProcess]:
    """VM processes (vmha-vm, or QEMU guests) whose netns inode is one of `names` (inode -> host name).

    A QEMU copy is active (holds the lease, runs the guest) unless it is a live migration's destination
    (`-incoming`) while an older copy of the VM still runs: libvirt hands the lease over at the end."""
    out: list[VmProcess] = []
    incoming: list[tuple[str, int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        # python .../vmha-vm NAME ...: the script path is argv[1] (argv[0] when exec'd directly).
        stand_in = next((argv[i + 1] for i, a in enumerate(argv[:2])
                         if os.path.basename(a) == "vmha-vm" and len(argv) > i + 1), None)
        guest = qemu_guest(argv)
        if stand_in is None and guest is None:
            continue
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if ino not in names:
            continue  # another lab's VM (another prefix), or one started by hand outside any lab host
        if stand_in is not None:
            out.append(VmProcess(stand_in, pid, names[ino], _disk_open(pid)))
        elif guest is not None and "-incoming" in argv:
            incoming.append((guest, pid, names[ino]))
        elif guest is not None:
            out.append(VmProcess(guest, pid, names[ino], True))
    for guest, pid, host in incoming:
        older = any(p.vm == guest and _started(p.pid) <= _started(pid) for p in out) or any(
            g == guest and _started(q) < _started(pid) for g, q, _ in incoming)
        out.append(VmProcess(guest, pid, host, not older))
    return sorted(out, key=lambda p: (p.vm, p.pid))
