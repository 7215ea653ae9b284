"""Per-VM leases held by processes: acquire for the calling process or on behalf of a pid, release,
inquire, and the host-local record of who holds what.

Every holder is also recorded in holders_dir() (/run/vmha/lease-holders, a tmpfs: a reboot clears it
with the processes): by vmha when it acquires, and by the agent for holders it only sees through
sanlock (record_seen_holders: a QEMU whose lease libvirt's lock manager acquired). The record
outlives the sanlock daemon's knowledge: once a lockspace has failed or the daemon has died,
sanlock can no longer say which processes held the VM's lease, and the exit attestation must still
check that each of them has left the process table. The record names the pid and its start in
clock ticks after boot, so a reused pid is not mistaken for the holder. Not its start in Unix time
(psutil's create_time): that adds the kernel's boot time, which moves with every step of the wall
clock (CI saw one of 7 s), and every live holder would then look gone: pruned, not stopped by the
isolation response, and attested as exited.

sanlock keeps at most 8 leases per registered client; every LeaseHold registers its own client, so
one process (the manager) can hold any number of leases, bounded by its file descriptors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from vmha.locks.binding import sanlock
from vmha.locks.space import LEASE_HELD, LeaseBusy, LockError, LockSpace, SanlockUnavailable, is_unavailable, why
from vmha.procstat import proc_stat

STATUS_TIMEOUT = 10.0  # seconds for `sanlock client status`: a daemon that answers at all does in milliseconds


def holders_dir() -> Path:
    """/run/vmha/lease-holders, or under $VMHA_RUN_DIR (tests run several hosts in one mount namespace)."""
    return Path(os.environ.get("VMHA_RUN_DIR", "/run/vmha")) / "lease-holders"


@dataclass(frozen=True, slots=True)
class Holder:
    """A process that holds (or held) a VM's lease on this host."""

    vm: str  # the lease's resource name (LockSpace.resource): the VM's name, or libvirt's disk-lease name
    pid: int
    # Its start in clock ticks after boot, against pid reuse; None in a record written before vmha kept
    # it (such a holder counts as alive while its pid exists: never a proof from a guess).
    start_ticks: int | None

    def alive(self) -> bool:
        """Still in the process table as the same process and not a zombie (a zombie cannot write:
        its memory and files are gone and its in-flight I/O was completed by exit)."""
        try:
            state, start = proc_stat(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state not in ("Z", "X") and self.start_ticks in (None, start)

    def text(self) -> str:
        return f"pid={self.pid}"


def holder_of(vm: str, pid: int) -> Holder:
    try:
        return Holder(vm, pid, proc_stat(pid)[1])
    except (FileNotFoundError, ProcessLookupError):
        raise LockError(f"VM {vm}: process {pid} does not exist, it cannot hold the lease") from None


def _record_path(h: Holder) -> Path:
    return holders_dir() / f"{h.vm}.{h.pid}"


def record(h: Holder) -> None:
    holders_dir().mkdir(parents=True, exist_ok=True)
    tmp = _record_path(h).with_suffix(".tmp")
    tmp.write_text(json.dumps({"vm": h.vm, "pid": h.pid, "start_ticks": h.start_ticks}))
    tmp.rename(_record_path(h))


def forget(h: Holder) -> None:
    _record_path(h).unlink(missing_ok=True)


def recorded_holders(vm: str | None = None) -> list[Holder]:
    """Holders recorded on this host (alive or not), for one VM or all; unreadable records skipped."""
    out: list[Holder] = []
    if not holders_dir().is_dir():
        return out
    for p in sorted(holders_dir().iterdir()):
        try:
            d = json.loads(p.read_text())
            ticks = d.get("start_ticks")
            h = Holder(str(d["vm"]), int(d["pid"]), None if ticks is None else int(ticks))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file: the live sanlock scan still covers its holder
        if vm is None or h.vm == vm:
            out.append(h)
    return out


def prune_records() -> int:
    """Removes the records of holders that have exited (the agent calls it at start); returns how many."""
    gone = [h for h in recorded_holders() if not h.alive()]
    for h in gone:
        forget(h)
    return len(gone)


def _busy(space: LockSpace, vm: str, e: sanlock.SanlockException) -> LockError:
    if is_unavailable(e):
        return SanlockUnavailable(f"VM {vm}: local sanlock daemon does not answer ({why(e)}): the VM must not run")
    if int(e.errno) == LEASE_HELD:
        try:
            owners = ", ".join(o.text() for o in space.owners(vm)) or "none recorded"
        except (LockError, sanlock.SanlockException):
            owners = "unreadable"
        return LeaseBusy(f"VM {vm}: its lease {space.lease_path(vm)} is held by another live host ({owners}): "
                         "the VM must not run here")
    return LockError(f"VM {vm}: acquiring {space.lease_path(vm)} failed: {why(e)} ({e.errno})")


def _unrecorded(vm: str, e: OSError) -> LockError:
    # An unrecorded holder would escape the exit attestation once sanlock forgets it: the caller
    # gives the lease back and refuses, rather than run unseen.
    return LockError(f"VM {vm}: cannot record its lease holder in {holders_dir()} ({e}): lease released; "
                     "make that directory writable (VMHA_RUN_DIR, default /run/vmha)")


class LeaseHold:
    """A VM's lease held by this process through its own sanlock registration.

    Closing the registration (release(), or the process dying) makes sanlock release the lease.
    """

    def __init__(self, space: LockSpace, vm: str) -> None:
        space.check_lease(vm)
        self.space = space
        self.vm = vm
        self.holder = holder_of(space.resource(vm), os.getpid())
        try:
            self.fd: int | None = sanlock.register()
        except sanlock.SanlockException as e:
            raise _busy(space, vm, e) from None
        try:
            sanlock.acquire(space.bname, space.resource(vm).encode(), space.disks(vm), slkfd=self.fd)
        except sanlock.SanlockException as e:
            os.close(self.fd)
            self.fd = None
            raise _busy(space, vm, e) from None
        try:
            record(self.holder)
        except OSError as e:
            self.release()
            raise _unrecorded(vm, e) from None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Releases the lease (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            sanlock.release(self.space.bname, self.holder.vm.encode(), self.space.disks(self.vm), slkfd=fd)
        except sanlock.SanlockException as e:
            if not is_unavailable(e):
                raise LockError(f"VM {self.vm}: releasing its lease failed: {why(e)}") from None
        finally:
            os.close(fd)  # also releases whatever the daemon still holds for this registration
            forget(self.holder)

    def __enter__(self) -> LeaseHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_self(space: LockSpace, vm: str) -> LeaseHold:
    """The calling process takes the VM's lease (the lab VM process does this before writing).

    LeaseMissing if the VM has no lease, LeaseBusy if another live host holds it."""
    return LeaseHold(space, vm)


def acquire_for(space: LockSpace, vm: str, pid: int) -> Holder:
    """Takes the VM's lease on behalf of process `pid`, which must have called sanlock.register()
    (vmha.locks.register_self) and kept that connection open; the lease lives as long as the pid."""
    space.check_lease(vm)
    h = holder_of(space.resource(vm), pid)
    try:
        sanlock.acquire(space.bname, space.resource(vm).encode(), space.disks(vm), pid=pid)
    except sanlock.SanlockException as e:
        raise _busy(space, vm, e) from None
    try:
        record(h)
    except OSError as e:
        release_for(space, vm, pid)
        raise _unrecorded(vm, e) from None
    return h


def release_for(space: LockSpace, vm: str, pid: int) -> None:
    """Releases the lease that `pid` holds (clean stop of the VM)."""
    try:
        sanlock.release(space.bname, space.resource(vm).encode(), space.disks(vm), pid=pid)
    except sanlock.SanlockException as e:
        # A holder that has exited was released by sanlock already.
        if psutil.pid_exists(pid) and not is_unavailable(e):
            raise LockError(f"VM {vm}: releasing the lease of pid {pid} failed: {why(e)}") from None
    for h in recorded_holders(space.resource(vm)):
        if h.pid == pid:
            forget(h)


def register_self() -> int:
    """Registers the calling process with the local sanlock daemon (for acquire_for by a parent);
    keep the returned fd open for as long as the process may write."""
    try:
        return int(sanlock.register())
    except sanlock.SanlockException as e:
        raise SanlockUnavailable(f"local sanlock daemon does not answer: {why(e)}") from None


def inquire(space: LockSpace, pid: int) -> list[str]:
    """The leases (resource names, LockSpace.resource) `pid` holds in this lockspace, per the local
    daemon ([] if none)."""
    try:
        res = sanlock.inquire(pid=pid)
    except sanlock.SanlockException as e:
        if is_unavailable(e):
            raise SanlockUnavailable(f"local sanlock daemon does not answer: {why(e)}") from None
        return []  # not a client of the daemon (ESRCH)
    return sorted(r["resource"].decode() for r in res if r["lockspace"] == space.bname)


def client_pids() -> list[int] | None:
    """The pids of the local daemon's registered clients, the only processes that can hold a lease
    (`sanlock client status`: "p PID NAME" lines; its own threads are "p -1"). None when the command
    fails: the caller then asks the daemon about every pid, as before, and slower."""
    try:
        cp = subprocess.run(["sanlock", "client", "status"], capture_output=True, text=True, timeout=STATUS_TIMEOUT,
                            check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if cp.returncode != 0:
        return None
    parts = (line.split() for line in cp.stdout.splitlines())
    return [int(f[1]) for f in parts if len(f) >= 2 and f[0] == "p" and f[1].isdigit()]


def live_holders(space: LockSpace) -> list[Holder]:
    """Every process on this host holding a lease of the lockspace: the daemon's view of its clients,
    plus recorded holders still alive (covers a daemon that lost the lockspace or died). Only the
    clients are asked about: asking about every pid of the host (hundreds, every 2 s from the agent)
    cost the daemon a thread round and an error line in its log for each."""
    found: dict[tuple[str, int], Holder] = {}
    with contextlib.suppress(SanlockUnavailable):
        clients = client_pids()
        for pid in psutil.pids() if clients is None else clients:
            if pid == os.getpid():  # the caller (agent) is never a VM
                continue
            for vm in inquire(space, pid):
                with contextlib.suppress(LockError):
                    found[(vm, pid)] = holder_of(vm, pid)
    for h in recorded_holders():
        if (h.vm, h.pid) not in found and h.alive():
            found[(h.vm, h.pid)] = h
    return sorted(found.values(), key=lambda h: (h.vm, h.pid))


def record_seen_holders(space: LockSpace) -> list[Holder]:
    """Records every lease holder the local daemon reports that has no record yet, and returns them:
    a QEMU whose lease libvirt acquired for it is known only to sanlock, which forgets it when the
    lockspace fails, and the exit attestation and the isolation response must still find it then.
    The agent calls it periodically; a record stays until its process is gone (prune_records)."""
    known = {(h.vm, h.pid) for h in recorded_holders()}
    new = [h for h in live_holders(space) if (h.vm, h.pid) not in known]
    for h in new:
        record(h)
    return new
