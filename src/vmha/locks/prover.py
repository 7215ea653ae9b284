"""Manager side: prove that a VM's old copy can no longer write, by taking its lease.

    prover = Prover(space, host_id_of=..., attest=..., power=...)
    proof = await prover.prove(vm, host, methods, timeout)   # FenceProof, or raises ProofRefused
    ...                                                      # the manager's sanlock host holds the lease
    await prover.release(vm)                                 # right before the VM starts elsewhere

Every proof ends with this process holding the VM's lease through its own sanlock registration:
sanlock grants it only when the holder released it (its process exited) or the holder's host is
DEAD. Two methods first make the lease free by rewriting it (reset), and only after evidence that
nothing on the old host can write: exit-attested (the host's agent saw every holder leave the process
table and the host's lockspace fail, and this daemon no longer sees the host renew) and power (a
fence agent confirmed the host off; never used on a host that still renews its lockspace, which is
alive on the shared storage: vSphere's datastore heartbeat, telling an isolated host from a dead one).
So prove() never returns while the old copy can still write; when no method succeeds in time it
raises ProofRefused with what each method saw.

A free lease is evidence only of what held it. The methods that prove by a lease being (or becoming)
free, lease-taken, request-force and exit-attested, prove only when the lease's leader record names
the VM's host as its last owner (lver > 0, owner_id = its host_id): a process there held the lease and
released it (exited, was stopped). So does host-dead: a DEAD host_id means its lease holders exited
or the watchdog reset the host, and says nothing about a copy that held no lease (a host cut from the
storage removes its failed lockspace without a reset when nothing holds a lease, and that copy writes
again when the storage returns: found by the model, vmha/model/fencing.pml). A lease nobody ever
acquired (a VM started without the lock manager, e.g. libvirt without lock_manager = "sanlock"), or
one last held on another host, says nothing about the copy on this host: those methods refuse it, and
the proof carries an alert naming the likely cause (ProofRefused.alert, or the proof's
details["alert"] when power, which is evidence about the host itself, proved anyway).

The manager's process must talk to a sanlock daemon joined to the lockspace (its own host_id).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from vmha import metrics
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.etcd.attest import AttestResponse, AttestTimeout
from vmha.etcd.client import EtcdError
from vmha.locks.binding import sanlock
from vmha.locks.lease import LeaseHold
from vmha.locks.power import PowerFence, PowerFenceError
from vmha.locks.space import HostInfo, HostState, LeaseBusy, LockError, LockSpace, why

log = logging.getLogger("vmha.locks.prover")

HostIdOf = Callable[[str], Awaitable[int | None]]
Attest = Callable[[str, str, float], Awaitable[AttestResponse]]  # (host, vm, timeout)


class ProofRefused(LockError):
    """No proof: the old copy may still be able to write. `attempts` says what each method saw."""

    def __init__(self, vm: str, host: str, reason: str, attempts: Sequence[str] = (), alert: str = "") -> None:
        super().__init__(f"no fence proof for VM {vm} on host {host}: {reason}"
                         + (f" [{'; '.join(attempts)}]" if attempts else ""))
        self.vm = vm
        self.host = host
        self.reason = reason
        self.attempts = list(attempts)
        self.alert = alert  # a cause the operator must fix, beyond "no proof yet" ('' if none)


class _Failed(Exception):
    """One method did not give a proof (the next one is tried)."""


class _NeverHeld(_Failed):
    """The lease was never held on the VM's host: no evidence about its copy there (alert-worthy)."""


class _Trail:
    """What the proof saw, with times relative to its start: becomes the proof's details."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.states: list[str] = []
        self.alert = ""  # the first never-held refusal of this proof: one alert per proof, not per method

    def add(self, text: str) -> None:
        self.lines.append(f"+{time.monotonic() - self.t0:.2f}s {text}")

    def state(self, info: HostInfo | None) -> None:
        text = "not seen" if info is None else info.state.value
        if not self.states or not self.states[-1].endswith(f" {text}"):
            self.states.append(f"+{time.monotonic() - self.t0:.2f}s {text}")


class _Grant:
    """Hands a lease sanlock grants in a worker thread over to the proof that asked for it.

    A proof can be cancelled while sanlock is granting (the manager's term ended, the step was
    superseded, the process is stopping): this manager must then not keep a lease nobody knows of,
    since the VM could start nowhere. Whichever side comes second gives the lease back: the thread,
    when the grant arrives after the cancellation; or the cancelled proof, when the grant had arrived
    but the proof had not resumed to take it. The thread decides alone in the first case, so the
    lease is released even when the event loop is gone by then.
    """

    def __init__(self, space: LockSpace, vm: str) -> None:
        self.space = space
        self.vm = vm
        self.lock = threading.Lock()
        self.abandoned = False
        self.granted: LeaseHold | None = None

    def take(self) -> LeaseHold | None:
        """Runs in a worker thread: the lease, or None if the proof was cancelled meanwhile."""
        hold = LeaseHold(self.space, self.vm)
        with self.lock:
            if not self.abandoned:
                self.granted = hold
                return hold
        _give_back(hold, "granted after its proof was cancelled")
        return None

    def abandon(self) -> LeaseHold | None:
        """The proof is cancelled: the lease it must give back, if the grant came first."""
        with self.lock:
            self.abandoned = True
            hold, self.granted = self.granted, None
        return hold


def _give_back(hold: LeaseHold, why: str) -> None:
    try:
        hold.release()
    except LockError as e:  # the registration is closed all the same: the daemon drops the lease
        log.error("vm=%s: releasing the lease %s failed: %s", hold.vm, why, e)
        return
    log.warning("vm=%s: lease released: %s", hold.vm, why)


def _owners_text(owners: Sequence[HostInfo]) -> str:
    return " ".join(o.text() for o in owners) or "none"


class Prover:
    def __init__(
        self,
        space: LockSpace,
        *,
        host_id_of: HostIdOf,
        attest: Attest | None = None,
        power: PowerFence | None = None,
        poll: float = 0.25,
    ) -> None:
        self.space = space
        self.host_id_of = host_id_of
        self.attest = attest
        self.power = power
        self.poll = poll
        self._held: dict[str, LeaseHold] = {}
        self._giving_back: set[asyncio.Future[None]] = set()  # releases of leases of cancelled proofs
        self._powering: dict[str, asyncio.Future[str]] = {}  # host -> its power-off in flight

    def held(self) -> list[str]:
        """VMs whose lease this prover holds (proved, not yet released)."""
        return sorted(self._held)

    def budget(self, method: ProofMethod) -> float:
        """Seconds a method may take before the next one is tried (the last gets all that remains)."""
        io = self.space.io_timeout
        return {
            ProofMethod.LEASE_TAKEN: 2.0,
            # The owner sees the request at its next renewal (every 2 io), kills and releases. But it
            # takes no new request from the same host within 6 io of the last one (sanlock's
            # request_finish_seconds), noticed at a renewal after that: the VMs of one host proved
            # one after the other need up to 8 io.
            ProofMethod.REQUEST_FORCE: 8.0 * io + 5.0,
            # The owner's lockspace fails 8 io after its last renewal; its agent then attests.
            ProofMethod.EXIT_ATTESTED: self.space.renewal_fail + 4.0 * io + 10.0,
            ProofMethod.POWER: 60.0,
            ProofMethod.HOST_DEAD: self.space.host_dead + 4.0 * io + 10.0,
        }[method]

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        started = time.time()
        if vm in self._held:
            return FenceProof(vm, host, ProofMethod.LEASE_TAKEN, started, time.time(),
                              {"trail": "lease already held by this manager"})
        deadline = time.monotonic() + timeout
        trail = _Trail()
        try:
            await asyncio.to_thread(self.space.check_lease, vm)
            owners = await asyncio.to_thread(self.space.owners, vm)
        except LockError as e:
            raise ProofRefused(vm, host, str(e)) from None
        try:
            host_id = await self.host_id_of(host)
        except EtcdError as e:  # the methods that need no host_id can still prove
            host_id = None
            trail.add(f"host_id of {host} unknown: {e}")
        trail.add(f"owners {_owners_text(owners)}; {host} is host_id {host_id}")
        attempts: list[str] = []
        for i, method in enumerate(methods):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempts.append(f"{method.value}: not tried, timeout {timeout:.0f} s used up")
                continue
            budget = remaining if i == len(methods) - 1 else min(remaining, self.budget(method))
            trail.add(f"{method.value}: trying for up to {budget:.1f} s")
            try:
                hold = await self._method(method, vm, host, host_id, budget, trail)
            except (_Failed, LockError) as e:  # LockError: storage or the local daemon failed meanwhile
                attempts.append(f"{method.value}: {e}")
                trail.add(f"{method.value}: failed: {e}")
                if isinstance(e, _NeverHeld) and not trail.alert:
                    trail.alert = str(e)
                    log.error("proof vm=%s host=%s method=%s refused: %s", vm, host, method.value, e)
                continue
            self._held[vm] = hold
            try:
                after = _owners_text(await asyncio.to_thread(self.space.owners, vm))
            except LockError as e:
                after = f"unreadable ({e})"
            proof = FenceProof(vm, host, method, started, time.time(), {
                "owners_before": _owners_text(owners),
                "owners_after": after,
                "host_id": str(host_id),
                "host_states": " ".join(trail.states) or "not checked",
                "failed_methods": "; ".join(attempts) or "none",
                "trail": " | ".join(trail.lines),
            } | ({"alert": trail.alert} if trail.alert else {}))
            log.info("proof vm=%s host=%s method=%s in %.1fs owners_before=[%s] states=[%s]", vm, host,
                     method.value, proof.proved - started, proof.details["owners_before"],
                     proof.details["host_states"])
            return proof
        refused = ProofRefused(vm, host, "every method failed" if methods else "no method allowed", attempts,
                               trail.alert)
        log.warning("proof vm=%s host=%s refused: %s", vm, host, refused)
        raise refused

    async def release(self, vm: str) -> None:
        """Releases the lease a proof took (right before the VM is started elsewhere)."""
        hold = self._held.pop(vm, None)
        if hold is not None:
            await asyncio.to_thread(hold.release)

    async def release_all(self) -> None:
        """Releases every lease this prover holds, and waits for those of cancelled proofs."""
        for vm in self.held():
            await self.release(vm)
        if self._giving_back:
            await asyncio.gather(*self._giving_back)

    # --- methods ------------------------------------------------------------------------------------
    async def _method(
        self, method: ProofMethod, vm: str, host: str, host_id: int | None, budget: float, trail: _Trail
    ) -> LeaseHold:
        end = time.monotonic() + budget
        if host_id is None:
            raise _Failed(f"host {host} has no sanlock host_id in etcd: cannot check its lease state")
        if not 1 <= host_id <= self.space.max_hosts:
            raise _Failed(f"host {host}: host_id {host_id} is outside sanlock's 1..{self.space.max_hosts}")
        if method is ProofMethod.LEASE_TAKEN:
            await self._held_there(vm, host, host_id, trail)
            return await self._take_or_fail(vm, trail)
        if method is ProofMethod.REQUEST_FORCE:
            return await self._request_force(vm, host, host_id, end, trail)
        if method is ProofMethod.HOST_DEAD:
            return await self._host_dead(vm, host, host_id, end, trail)
        if method is ProofMethod.EXIT_ATTESTED:
            return await self._exit_attested(vm, host, host_id, end, trail)
        return await self._power(vm, host, host_id, end, trail)

    async def _held_there(self, vm: str, host: str, host_id: int, trail: _Trail) -> None:
        """_NeverHeld unless the lease's leader record names host_id as its last owner. Read before
        the lease is taken (the manager's acquire makes itself the owner) or reset (which zeroes it)."""
        leader = await asyncio.to_thread(self.space.leader, vm)
        trail.add(f"leader record {leader.text()}")
        if leader.lver > 0 and leader.owner_id == host_id:
            return
        if leader.lver == 0:
            seen = "was never acquired since it was initialised or reset (lver 0)"
        else:
            seen = (f"was last held by host_id {leader.owner_id} (gen {leader.owner_generation}, lver "
                    f"{leader.lver}), not by {host}'s host_id {host_id}")
        raise _NeverHeld(
            f"VM {vm}: its lease {self.space.lease_path(vm)} {seen}: no process on host {host} holds or "
            f"released it, so a free lease is no evidence that the VM stopped there. Is libvirt's "
            f'lock_manager = "sanlock" configured on {host} (or does the VM run without its lease)?'
        )

    async def _take(self, vm: str, *, dead_ok: bool = False) -> LeaseHold | None:
        """The lease, or None while another host may hold it. sanlock's acquire returns at once when
        the owner renews, but blocks until host_dead when it has stopped renewing, and this daemon's
        view of the owner lags by up to 2 io (a host that just lost storage still shows LIVE): so
        acquire only a lease nobody holds, or (dead_ok) one whose holders are all DEAD, or a method
        would overrun its budget by a minute."""
        try:
            owners = await asyncio.to_thread(self.space.owners, vm)
            holding = [o for o in owners if o.state is not HostState.FREE]
            if holding and not (dead_ok and all(o.state is HostState.DEAD for o in holding)):
                return None
            grant = _Grant(self.space, vm)
            try:
                return await asyncio.to_thread(grant.take)
            except asyncio.CancelledError:
                stray = grant.abandon()
                if stray is not None:  # the release writes to storage: in a thread, not in the loop
                    done = asyncio.get_running_loop().run_in_executor(
                        None, _give_back, stray, "granted, but its proof was cancelled before taking it")
                    self._giving_back.add(done)
                    done.add_done_callback(self._giving_back.discard)
                raise
        except LeaseBusy:
            return None
        except LockError as e:
            raise _Failed(str(e)) from None

    async def _take_or_fail(self, vm: str, trail: _Trail) -> LeaseHold:
        hold = await self._take(vm)
        if hold is None:
            owners = await asyncio.to_thread(self.space.owners, vm)
            raise _Failed(f"lease held by another host ({_owners_text(owners)})")
        trail.add("lease acquired")
        return hold

    async def _take_until(
        self, vm: str, end: float, trail: _Trail, why: str, fail: str, *, dead_ok: bool = False
    ) -> LeaseHold:
        """Retries taking the lease until `end`: `why` says what made it free, `fail` what it means if not."""
        while True:
            hold = await self._take(vm, dead_ok=dead_ok)
            if hold is not None:
                trail.add(f"lease acquired ({why})")
                return hold
            if time.monotonic() >= end:
                owners = await asyncio.to_thread(self.space.owners, vm)
                raise _Failed(f"{fail}: lease still held ({_owners_text(owners)})")
            await asyncio.sleep(self.poll)

    async def _request_force(self, vm: str, host: str, host_id: int, end: float, trail: _Trail) -> LeaseHold:
        # Held or released, the lease must be host_id's: REQ_FORCE against another host's holder, or
        # a free lease nobody on the VM's host held, proves nothing about the copy there.
        await self._held_there(vm, host, host_id, trail)
        hold = await self._take(vm)
        if hold is not None:
            trail.add("lease was free")
            return hold
        # This daemon flags a request to the owner for only 6 io after the last request() call, and
        # the owner takes no new request from this host within 6 io of the previous one: a request
        # made just after the owner handled another (the next VM of the same host) would be lost.
        # Repeating it every renewal period keeps it flagged until the owner takes it.
        requests = 0
        requested = -math.inf
        while True:
            if time.monotonic() - requested >= 2 * self.space.io_timeout:
                try:
                    await asyncio.to_thread(sanlock.request, self.space.bname, self.space.resource(vm).encode(),
                                            self.space.disks(vm),
                                            action=sanlock.REQ_FORCE)
                except sanlock.SanlockException as e:
                    if not requests:
                        raise _Failed(f"REQ_FORCE could not be written: {why(e)}") from None
                    trail.add(f"REQ_FORCE not repeated: {why(e)}")
                else:
                    if not requests:
                        trail.add("REQ_FORCE written")
                    requests += 1
                requested = time.monotonic()
            hold = await self._take(vm)
            if hold is not None:
                trail.add(f"lease acquired (owner released after REQ_FORCE, written {requests} time(s))")
                return hold
            if time.monotonic() >= end:
                owners = await asyncio.to_thread(self.space.owners, vm)
                raise _Failed(f"owner did not release after REQ_FORCE (storage plane cut?): lease still held "
                              f"({_owners_text(owners)})")
            await asyncio.sleep(self.poll)

    async def _wait_state(self, host_id: int, end: float, trail: _Trail, ok: Callable[[HostInfo | None], bool]) -> bool:
        while True:
            info = await asyncio.to_thread(self.space.host, host_id)
            trail.state(info)
            if ok(info):
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(self.poll)

    async def _host_dead(self, vm: str, host: str, host_id: int, end: float, trail: _Trail) -> LeaseHold:
        # DEAD vouches only for lease holders: the copy on the host must have held this lease.
        await self._held_there(vm, host, host_id, trail)
        if not await self._wait_state(host_id, end, trail, lambda i: i is not None and i.state is HostState.DEAD):
            raise _Failed(f"host_id {host_id} not DEAD (states seen: {' '.join(trail.states)})")
        return await self._take_until(vm, end, trail, f"host_id {host_id} DEAD",
                                      f"host_id {host_id} DEAD but sanlock still refuses the lease", dead_ok=True)

    async def _reset_and_take(self, vm: str, host_id: int, trail: _Trail, why: str) -> LeaseHold:
        """After evidence that nothing on host_id can write: reset the lease if host_id owns it, take it."""
        owners = await asyncio.to_thread(self.space.owners, vm)
        others = [o for o in owners if o.host_id != host_id and o.state is not HostState.FREE]
        if others:
            raise _Failed(f"lease is held by another host than {host_id}: {_owners_text(others)}")
        if owners:
            await asyncio.to_thread(self.space.reset_lease, vm)
            trail.add(f"lease reset (owners were {_owners_text(owners)}; {why})")
        hold = await self._take(vm)
        if hold is None:
            raise _Failed("lease taken by someone else right after the reset")
        trail.add("lease acquired after reset")
        return hold

    async def _exit_attested(self, vm: str, host: str, host_id: int, end: float, trail: _Trail) -> LeaseHold:
        if self.attest is None:
            raise _Failed("no attestation channel configured")
        # Free or held, the lease must be host_id's: attested "no holders left" on a host where no
        # process ever held it (a VM run without its lease) is no evidence, nor is a reset of it.
        await self._held_there(vm, host, host_id, trail)
        hold = await self._take(vm)
        if hold is not None:
            trail.add("lease was free")
            return hold
        try:
            resp = await self.attest(host, vm, max(1.0, end - time.monotonic() - 1.0))
        except AttestTimeout as e:
            raise _Failed(str(e)) from None
        evidence = " ".join(f"{k}={v}" for k, v in resp.evidence.items())
        trail.add(f"agent answered ok={resp.ok}: {resp.reason} ({evidence})")
        if not resp.ok:
            raise _Failed(f"agent of {host} did not attest: {resp.reason}")
        # Independent check: this daemon must see the host stop renewing its lockspace (a host that
        # rejoined, or an agent that is wrong, shows LIVE here; UNKNOWN or unseen: not yet known).
        stopped = (HostState.FAIL, HostState.DEAD, HostState.FREE)
        if not await self._wait_state(host_id, end, trail, lambda i: i is not None and i.state in stopped):
            raise _Failed(f"agent attested but this daemon does not see host_id {host_id} stop renewing "
                          f"(states seen: {' '.join(trail.states)})")
        return await self._reset_and_take(vm, host_id, trail, "exit attested")

    async def _power_off(self, host: str, timeout: float) -> str:
        """One power-off per host at a time, its evidence shared: the VMs of a host are proved
        together, a BMC takes few sessions at once, and one host is switched off once, not once per
        VM (the lab's fence, run three times at once, broke its own state file)."""
        assert self.power is not None
        running = self._powering.get(host)
        if running is None:
            running = self._powering[host] = asyncio.ensure_future(self.power.power_off(host, timeout))

            def done(f: asyncio.Future[str]) -> None:
                if self._powering.get(host) is f:
                    del self._powering[host]
                metrics.power_fenced(not f.cancelled() and f.exception() is None)

            running.add_done_callback(done)
        try:
            # Shielded: a caller cancelled (its proof no longer wanted) does not abort the others'.
            return await asyncio.wait_for(asyncio.shield(running), timeout)
        except TimeoutError:
            raise PowerFenceError(f"power fence {host}: not confirmed off within {timeout:.0f} s") from None

    async def _power(self, vm: str, host: str, host_id: int, end: float, trail: _Trail) -> LeaseHold:
        if self.power is None:
            raise _Failed("no power fence configured")
        # A host that still renews its lockspace is alive on the shared storage, whatever etcd says
        # (its agent died, or etcd is unreachable from it): never power it off. Its VMs hold their
        # leases; they move only when released (isolation response) or through sanlock (REQ_FORCE).
        # Seeing a dead host not renew costs one renewal period (2 io + 1 s) before the power-off.
        # "Does not renew" is evidence only from sanlock's own record of that host_id naming the host:
        # a missing sector, or another daemon's, says nothing about this host (etcd's host_id for it is
        # wrong, e.g. a forged hostid/ key), and powering off on it could switch off a live host.
        delta = await asyncio.to_thread(self.space.delta, host_id)
        if delta is None:
            raise _Failed(f"host_id {host_id} has no delta lease in {self.space.ids_path}: no evidence that "
                          f"{host} ever joined the lockspace as it; not powering it off")
        if delta.name != host:
            raise _Failed(f"host_id {host_id}'s delta lease names {delta.name!r}, not {host}: etcd's host_id "
                          f"for {host} disagrees with sanlock's record; not powering it off")
        moved = await asyncio.to_thread(self.space.renews, host_id, delta)
        if moved is not None:
            raise _Failed(f"host_id {host_id} still renews its lockspace (alive on the shared storage): "
                          "not powering it off")
        trail.add(f"host_id {host_id} no longer renews its lockspace")
        try:
            evidence = await self._power_off(host, max(1.0, end - time.monotonic()))
        except PowerFenceError as e:
            raise _Failed(str(e)) from None
        trail.add(f"power off confirmed: {evidence}")
        return await self._reset_and_take(vm, host_id, trail, "power off confirmed")
