"""The lockspace and the per-VM lease files on shared storage, and this host's membership in it.

Layout under locks.path (a directory on the shared storage that also holds the VM disks):
  <lockspace>.ids     sanlock lockspace: one delta lease (512-byte sector) per host_id
  <vm>.lease          one sanlock resource (paxos lease) per protected VM, 1 MiB (sanlock's alignment)

Why a lease file per VM rather than slots in one file with a slot map in etcd: the lease's location
follows from the VM name alone, so the VM process, its host's agent and the manager agree on it
without etcd (a proof must work while etcd is unreachable from the old host). A slot map would add
a second source of truth whose reuse after a VM's removal could alias a new VM's lease with an old
copy that still holds the slot. Creating a lease is an O_EXCL file creation (no allocation race),
and `ls` shows what is protected. The cost, 1 MiB per VM, is the same as a slot in a shared file.

sanlock facts this module relies on (sanlock 3.8.5):
- The binding talks to ONE daemon per process: the one SANLOCK_RUN_DIR (or /run/sanlock) names
  at the process's first call; it does not re-read the variable later.
- write_lockspace / write_resource go through the local daemon, so initialisation needs one.
- add_lockspace accepts an io_timeout that differs from the one the lockspace was written with,
  silently; join() compares them and refuses.
- A host_id held by a live host of another name makes add_lockspace fail only after about
  host_dead seconds (69 s at io_timeout 1); join() detects that case in seconds first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from vmha.config import LocksConfig
from vmha.locks.binding import sanlock

NAME_MAX = 48  # sanlock's SANLK_NAME_LEN: lockspace, resource and host names
log = logging.getLogger("vmha.locks")
T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SECTOR = 512  # sanlock's default sector size, used for every lease vmha writes
LEASE_SUFFIX = ".lease"
LEASE_HELD = -243  # SANLK_ACQUIRE_IDLIVE: "Lease is held by another host"
AREA = 1 << 20  # sanlock's default alignment: the size of the lockspace and of each lease


class LockError(Exception):
    """A lock-manager failure; str() names the file, VM or host and the fix."""


class LeaseAreaError(LockError):
    """The lockspace or the lease directory is missing, unreadable or not a vmha lockspace."""


class IoTimeoutMismatch(LockError):
    """The lockspace on storage was initialised with another io_timeout than configured."""


class HostIdCollision(LockError):
    """Another live host uses this host's sanlock host_id."""


class LeaseMissing(LockError):
    """A protected VM has no lease file (or the file is not a lease of this lockspace)."""


class LeaseBusy(LockError):
    """The VM's lease is held by another live host: the VM must not run here."""


class SanlockUnavailable(LockError):
    """The local sanlock daemon does not answer."""


class HostState(StrEnum):
    FREE = "free"
    LIVE = "live"
    FAIL = "fail"
    DEAD = "dead"
    UNKNOWN = "unknown"


def _flag_state(flags: int) -> HostState:
    """sanlock's host flags as a HostState (read at call time: the binding may be missing, see binding.py)."""
    states = {
        sanlock.HOST_FREE: HostState.FREE,
        sanlock.HOST_LIVE: HostState.LIVE,
        sanlock.HOST_FAIL: HostState.FAIL,
        sanlock.HOST_DEAD: HostState.DEAD,
        sanlock.HOST_UNKNOWN: HostState.UNKNOWN,
    }
    return states.get(flags, HostState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class HostInfo:
    """A host_id as the local sanlock daemon sees it (get_hosts), or as an owner of a lease."""

    host_id: int
    generation: int
    timestamp: int
    state: HostState

    def text(self) -> str:
        return f"host_id={self.host_id} gen={self.generation} state={self.state.value}"


@dataclass(frozen=True, slots=True)
class PaxosLeader:
    """A VM lease's leader record as stored (sanlock's struct leader_record). A release zeroes only
    the timestamp: owner_id, owner_generation and lver keep naming the last holder's host. An init or
    a reset writes all of them 0. lver counts the acquisitions since then."""

    owner_id: int
    owner_generation: int
    lver: int
    timestamp: int  # 0: free

    def text(self) -> str:
        held = "free" if self.timestamp == 0 else f"held, timestamp {self.timestamp}"
        return f"owner_id={self.owner_id} gen={self.owner_generation} lver={self.lver} {held}"


@dataclass(frozen=True, slots=True)
class DeltaLease:
    """One host_id's sector of the lockspace as stored: the daemon name (-e) and its last renewal."""

    host_id: int
    name: str
    timestamp: int
    generation: int


def check_name(kind: str, name: str) -> str:
    if not (0 < len(name.encode()) <= NAME_MAX) or not _NAME.match(name):
        raise LockError(
            f"{kind} name {name!r}: sanlock names are 1 to {NAME_MAX} bytes of letters, digits, '_', '.', '-' "
            "starting with a letter or digit: rename it"
        )
    return name


def _err(e: sanlock.SanlockException) -> int:
    return int(e.errno)


def why(e: sanlock.SanlockException) -> str:
    """The reason text of a sanlock error: its args are (errno, operation, reason)."""
    return str(e.args[-1]) if e.args else repr(e)


def is_unavailable(e: sanlock.SanlockException) -> bool:
    # The client library reports a missing or refusing socket with these.
    return _err(e) in (errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)


class LockSpace:
    """The vmha lockspace on shared storage as seen from this host (paths are this host's)."""

    def __init__(self, path: Path, name: str = "vmha", io_timeout: int = 10, max_hosts: int = 2000) -> None:
        self.path = Path(path)
        self.name = self._check_lockspace(name)
        self.bname = name.encode()
        self.io_timeout = io_timeout
        self.max_hosts = max_hosts

    @classmethod
    def from_config(cls, cfg: LocksConfig) -> LockSpace:
        if cfg.leases == "libvirt-disk":
            from vmha.locks.disk_leases import DiskLeaseSpace  # that module subclasses this one

            return DiskLeaseSpace(cfg.path, cfg.vm_disk, cfg.io_timeout, cfg.max_hosts)
        return cls(cfg.path, cfg.lockspace, cfg.io_timeout, cfg.max_hosts)

    @staticmethod
    def _check_lockspace(name: str) -> str:
        return check_name("lockspace", name)

    # --- timings (sanlock 3.8.5, per lockspace) -------------------------------------------------------
    @property
    def renewal_fail(self) -> float:
        """Seconds without renewal after which a host's lockspace fails and its holders are killed."""
        return 8.0 * self.io_timeout

    @property
    def host_dead(self) -> float:
        """Seconds without renewal after which other hosts may take the host's leases."""
        return 8.0 * self.io_timeout + 60.0

    # --- paths ------------------------------------------------------------------------------------
    @property
    def ids_path(self) -> Path:
        return self.path / f"{self.name}.ids"

    def resource(self, vm: str) -> str:
        """The sanlock resource name of the VM's lease (the VM's name)."""
        return check_name("VM", vm)

    def lease_path(self, vm: str) -> Path:
        return self.path / f"{self.resource(vm)}{LEASE_SUFFIX}"

    def disks(self, vm: str) -> list[tuple[str, int]]:
        return [(str(self.lease_path(vm)), 0)]

    def leases(self) -> list[str]:
        """The VMs that have a lease file, sorted."""
        self._require_dir()
        return sorted(p.name[: -len(LEASE_SUFFIX)] for p in self.path.glob(f"*{LEASE_SUFFIX}"))

    def _require_dir(self) -> None:
        if not self.path.is_dir():
            raise LeaseAreaError(
                f"lease area {self.path} is missing or not a directory: mount the shared storage there "
                "(locks.path in the config) and run `vmha locks init`"
            )

    # --- initialisation (through the local daemon) ------------------------------------------------------
    def init(self, *, force: bool = False) -> None:
        """Writes the lockspace file. An existing lockspace of this name is kept if its io_timeout is
        the configured one, and is an error otherwise unless `force` (safe only while no host has
        joined). A file that is no lockspace at all (an interrupted init) is written over."""
        self._require_dir()
        if self.ids_path.exists() and not force:
            try:
                info = sanlock.read_lockspace(str(self.ids_path))
            except sanlock.SanlockException:
                info = None  # not a lockspace: nobody can have joined it
            if info is not None:
                if info.get("lockspace") != self.bname:
                    raise LeaseAreaError(
                        f"{self.ids_path} holds lockspace {info.get('lockspace')!r}, not {self.name!r}: check "
                        "locks.lockspace, or remove the file if that lockspace is no longer used"
                    )
                if int(info["iotimeout"]) == self.io_timeout:
                    return
                raise IoTimeoutMismatch(
                    f"{self.ids_path} was initialised with io_timeout {info['iotimeout']}, the config says "
                    f"{self.io_timeout}: set locks.io_timeout = {info['iotimeout']}, or re-initialise with "
                    "`vmha locks init --force` while every host has left the lockspace"
                )
        with open(self.ids_path, "ab") as f:
            if f.tell() < AREA:
                f.truncate(AREA)
        self._call(lambda: sanlock.write_lockspace(
            self.bname, str(self.ids_path), max_hosts=self.max_hosts, iotimeout=self.io_timeout))

    def create_lease(self, vm: str) -> Path:
        """The VM's lease file, created and initialised if absent (an existing lease is kept: it may be held)."""
        self._require_dir()
        p = self.lease_path(vm)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        except FileExistsError:
            self.check_lease(vm)
            return p
        try:
            os.ftruncate(fd, AREA)
        finally:
            os.close(fd)
        try:
            self._call(lambda: sanlock.write_resource(self.bname, self.resource(vm).encode(), self.disks(vm)))
        except BaseException:
            p.unlink(missing_ok=True)  # a half-initialised lease would make check_lease fail forever
            raise
        return p

    def reset_lease(self, vm: str) -> None:
        """Rewrites the VM's lease as free. ONLY after proof that no holder of it can write any more."""
        self.check_lease(vm)
        self._call(lambda: sanlock.write_resource(self.bname, self.resource(vm).encode(), self.disks(vm)))

    # --- checks (read storage directly) ---------------------------------------------------------------
    def stored_io_timeout(self) -> int:
        try:
            info = sanlock.read_lockspace(str(self.ids_path))
        except sanlock.SanlockException as e:
            raise LeaseAreaError(
                f"lockspace {self.ids_path} is missing or unreadable ({why(e)}): run `vmha locks init` "
                "on one host, or fix the mount of locks.path"
            ) from None
        if info.get("lockspace") != self.bname:
            raise LeaseAreaError(
                f"{self.ids_path} holds lockspace {info.get('lockspace')!r}, not {self.name!r}: "
                "check locks.lockspace in the config"
            )
        return int(info["iotimeout"])

    def check(self) -> None:
        """The lockspace exists, is readable and was written with the configured io_timeout."""
        self._require_dir()
        stored = self.stored_io_timeout()
        if stored != self.io_timeout:
            raise IoTimeoutMismatch(
                f"lockspace {self.ids_path} was initialised with io_timeout {stored}, the config says "
                f"{self.io_timeout}: every host must use the same value; set locks.io_timeout = {stored}, or "
                "re-initialise with `vmha locks init --force` while every host has left the lockspace"
            )

    def check_lease(self, vm: str) -> None:
        """The VM's lease file exists and is a lease of this lockspace for this VM (LeaseMissing if not)."""
        p = self.lease_path(vm)
        try:
            info = sanlock.read_resource(str(p))
        except sanlock.SanlockException as e:
            raise LeaseMissing(
                f"VM {vm} is protected but has no usable lease {p} ({why(e)}): create it with "
                f"`vmha locks init --vm {vm}`; the VM must not start without it"
            ) from None
        if info.get("lockspace") != self.bname or info.get("resource") != self.resource(vm).encode():
            raise LeaseMissing(
                f"{p} is a lease of {info.get('lockspace')!r}/{info.get('resource')!r}, not "
                f"{self.name}/{self.resource(vm)}: "
                f"remove it and run `vmha locks init --vm {vm}`"
            )

    def _dump(self, path: Path, size: int) -> list[list[str]]:
        """The records of `sanlock direct dump PATH:0:SIZE` as fields, read from storage itself
        (direct I/O, no daemon): offset lockspace resource timestamp own gen [lver]. The binding
        reads neither a delta lease's owner name nor a released lease's last owner."""
        try:
            cp = subprocess.run(
                ["sanlock", "direct", "dump", f"{path}:0:{size}"],
                capture_output=True, text=True, timeout=10 + 2 * self.io_timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise LeaseAreaError(f"reading {path} timed out: is the shared storage reachable?") from None
        if cp.returncode != 0:
            raise LeaseAreaError(f"reading {path} failed: {cp.stderr.strip() or cp.stdout.strip()}")
        rows = [line.split() for line in cp.stdout.splitlines()[1:]]
        return [f for f in rows if len(f) >= 6 and f[0].isdigit() and f[3].isdigit() and f[4].isdigit()
                and f[5].isdigit()]

    def delta_leases(self) -> list[DeltaLease]:
        """Every used host_id sector of the lockspace as stored (with each daemon's name, -e)."""
        self._require_dir()
        return [DeltaLease(host_id=int(f[4]), name=f[2], timestamp=int(f[3]), generation=int(f[5]))
                for f in self._dump(self.ids_path, self.max_hosts * SECTOR)]

    def leader(self, vm: str) -> PaxosLeader:
        """The VM lease's leader record as stored: who held it last, even after a release."""
        p = self.lease_path(vm)
        rows = [f for f in self._dump(p, SECTOR) if len(f) >= 7 and f[6].isdigit()]
        if not rows or rows[0][1] != self.name or rows[0][2] != self.resource(vm):
            got = f"{rows[0][1]}/{rows[0][2]}" if rows else "no leader record"
            raise LeaseMissing(f"{p} is not a lease of {self.name}/{vm} ({got}): remove it and run "
                               f"`vmha locks init --vm {vm}`")
        f = rows[0]
        return PaxosLeader(owner_id=int(f[4]), owner_generation=int(f[5]), lver=int(f[6]), timestamp=int(f[3]))

    # --- membership (local daemon) --------------------------------------------------------------------
    def check_host_id(self, host_id: int, host: str) -> None:
        """Refuses a host_id whose delta lease another host name is still renewing (HostIdCollision).

        A different name with a timestamp that does not move is an old owner (the id was reassigned):
        allowed; sanlock itself then waits until that owner is dead.
        """
        first = self.delta(host_id)
        if first is None or first.name == host or first.timestamp == 0:
            return
        second = self.renews(host_id, first)
        if second is not None and second.name == first.name:
            raise HostIdCollision(
                f"sanlock host_id {host_id} in {self.ids_path} is in use by live host {first.name!r}, not {host!r}: "
                f"two hosts were given the same host_id; let etcd allocate it (hostid/ keys) or fix the pinned id"
            )

    def delta(self, host_id: int) -> DeltaLease | None:
        """host_id's delta lease as stored, None if its sector was never written."""
        return next((d for d in self.delta_leases() if d.host_id == host_id), None)

    def renews(self, host_id: int, first: DeltaLease | None = None) -> DeltaLease | None:
        """host_id's delta lease as soon as its stored timestamp moves (a live host renews it every
        2 io), or None if it does not move within one renewal period and a margin (2 io + 1 s): read
        from the shared storage itself, not from the local daemon's view, which lags."""
        first = first or self.delta(host_id)
        if first is None or first.timestamp == 0:
            return None
        deadline = time.monotonic() + 2 * self.io_timeout + 1
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            now = self.delta(host_id)
            if now is not None and (now.timestamp, now.generation) != (first.timestamp, first.generation):
                return now
        return None

    def join(self, host_id: int, host: str, *, timeout: float | None = None) -> None:
        """Adds the lockspace to the local daemon with this host's host_id; blocks until joined.

        Checks first: lockspace readable, same io_timeout, host_id not used by another live host.
        """
        if not 1 <= host_id <= self.max_hosts:
            raise LockError(f"host {host}: sanlock host_id {host_id} is outside 1..{self.max_hosts}")
        self.check()
        if self.joined(host_id):
            return
        self.check_host_id(host_id, host)
        self._call(lambda: sanlock.add_lockspace(
            self.bname, host_id, str(self.ids_path), iotimeout=self.io_timeout, wait=False))
        limit = timeout if timeout is not None else self.host_dead + 30
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            state = self._call(lambda: sanlock.inq_lockspace(self.bname, host_id, str(self.ids_path)))
            if state:
                log.info(
                    "host %s: joined lockspace %s as host_id %d (io_timeout %d, %s)",
                    host,
                    self.name,
                    host_id,
                    self.io_timeout,
                    self.ids_path,
                )
                return
            if state is False:  # the daemon gave up the join
                raise LockError(f"host {host}: sanlock could not join lockspace {self.name} with host_id "
                                f"{host_id} (see the sanlock log)")
            time.sleep(0.1)
        raise LockError(f"host {host}: joining lockspace {self.name} took longer than {limit:.0f} s")

    def leave(self, host_id: int) -> None:
        """Removes the lockspace from the local daemon (clean stop). sanlock kills the processes that
        still hold leases in it: release them first."""
        with contextlib.suppress(sanlock.SanlockException):  # already gone is fine
            sanlock.rem_lockspace(self.bname, host_id, str(self.ids_path))
            log.info("left lockspace %s (host_id %d)", self.name, host_id)

    def joined(self, host_id: int) -> bool | None:
        """True when joined, None while joining/leaving, False when not."""
        try:
            return sanlock.inq_lockspace(self.bname, host_id, str(self.ids_path))  # type: ignore[no-any-return]
        except sanlock.SanlockException as e:
            if is_unavailable(e):
                raise SanlockUnavailable(f"local sanlock daemon does not answer: {why(e)}") from None
            return False

    def local_state(self) -> str:
        """This host's view of its own lockspace: 'joined', 'adding', 'removing', 'absent' or 'no-daemon'."""
        try:
            spaces = sanlock.get_lockspaces()
        except sanlock.SanlockException as e:
            if is_unavailable(e):
                return "no-daemon"
            raise
        for s in spaces:
            if s["lockspace"] == self.bname:
                flags = int(s["flags"])
                if flags & sanlock.LSFLAG_ADD:
                    return "adding"
                return "removing" if flags & sanlock.LSFLAG_REM else "joined"
        return "absent"

    def hosts(self) -> list[HostInfo]:
        """Every host_id the local daemon has seen, with its state ([] until the daemon knows them)."""
        try:
            raw = sanlock.get_hosts(self.bname)
        except sanlock.SanlockException as e:
            if _err(e) == errno.EAGAIN:  # just joined: states not collected yet
                return []
            if is_unavailable(e):
                raise SanlockUnavailable(f"local sanlock daemon does not answer: {why(e)}") from None
            raise LockError(f"get_hosts({self.name}): {why(e)}") from None
        return [_host_info(h) for h in raw]

    def host(self, host_id: int) -> HostInfo | None:
        return next((h for h in self.hosts() if h.host_id == host_id), None)

    def owners(self, vm: str) -> list[HostInfo]:
        """The owners of the VM's lease as stored (state is the local daemon's view, UNKNOWN if not joined)."""
        self.check_lease(vm)
        try:
            raw = sanlock.read_resource_owners(self.bname, self.resource(vm).encode(), self.disks(vm))
        except sanlock.SanlockException as e:
            raise LeaseAreaError(f"VM {vm}: reading the owners of {self.lease_path(vm)} failed: {why(e)}") from None
        try:
            hosts = {h.host_id: h for h in self.hosts()}
        except LockError:
            hosts = {}
        out = []
        for o in raw:
            host_id, gen = int(o["host_id"]), int(o["generation"])
            now = hosts.get(host_id)
            # An owner from an older generation of its host_id is a finished instance: its lease is free.
            state = HostState.UNKNOWN if now is None else HostState.FREE if now.generation > gen else now.state
            out.append(HostInfo(host_id, gen, int(o["timestamp"]), state))
        return out

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sanlock.SanlockException as e:
            if is_unavailable(e):
                raise SanlockUnavailable(
                    "local sanlock daemon does not answer: start it (production: the system sanlock service "
                    "with its watchdog) before using the lockspace"
                ) from None
            raise LockError(f"lockspace {self.name} ({self.path}): sanlock: {why(e)} ({_err(e)})") from None


def _host_info(h: dict[str, int]) -> HostInfo:
    return HostInfo(int(h["host_id"]), int(h["generation"]), int(h["timestamp"]),
                    _flag_state(int(h["flags"])))
