"""The manager daemon: leader election, then the recovery core fed and executed against the world.

    await Manager(config).run(stop)       # `vmha manager --config FILE`

Standby: campaign (etcd/election.py) and wait. Leader, for one "term" at a time:
  - load the persisted tasks (etcd/tasks.py) and hand them to a fresh RecoveryCore (TasksLoaded);
  - run the HealthMonitor (manager/detection.py) and feed its HealthChange / FabricChange;
  - take an inventory snapshot from the compute driver at start, every INVENTORY_INTERVAL, and
    at once when a plane goes DOWN or FABRIC;
  - watch keys.disabled_prefix: a deleted key is `vmha host enable HOST` (HostEnabled, and a fresh
    inventory); read it at start: what earlier leaders did to the hosts (HostOut), for their rejoin;
  - watch keys.maintenance_prefix: `vmha host maintenance HOST on|off` (Maintenance);
  - call core.step(event, now) for each event (and Tick at core.next_deadline()); the events that
    arrived together are stepped one after another, and their outputs applied together:
      1. log each line (logger "vmha.manager") and append it to the decision stream,
      2. persist the tasks it changed, with CAS guarded by the leadership, and the evidence records
         in the same transactions - BEFORE any other action of that output runs (persist, then act: a leader that
         dies in between leaves a task naming the step in flight, which the next one repeats),
      3. start the other actions concurrently (the core bounds how many), each feeding its result
         back as an event.
A refused task write (StaleTasks) ends the term: in-flight work is cancelled and the term starts
over from what etcd holds. Losing the leadership (lease lost, keepalives failing past the TTL, a
write refused by the leader check) cancels everything at once and releases the proof leases this
manager holds (the proofs themselves are persisted in the tasks); the manager campaigns again.

The manager takes its parts (compute driver, fencer) from its caller: `vmha manager` gives it
`production_parts` (the driver manager.driver names, see DRIVERS, and the lock manager's Prover,
vmha.locks). The lab (vmha.lab.manager) and the tests start managers through entry points of their
own that build other parts; nothing in the environment changes what a production manager runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from aetcd import transactions as tx

from vmha.config import Config, ConfigError
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import FabricChange, HealthChange
from vmha.core.log import Level, LogLine
from vmha.core.planes import PlaneState
from vmha.core.queue import Step
from vmha.core.recovery import (
    AgentStopped,
    Alert,
    Attempt,
    CancelProof,
    CheckRejoin,
    DisableHost,
    DropProof,
    EnableHost,
    Evacuate,
    FabricUpdate,
    HealthUpdate,
    HostEnabled,
    HostOp,
    HostOpDone,
    HostOpFailed,
    HostOut,
    Inventory,
    LiveMigrate,
    Maintenance,
    MarkHostDown,
    PersistTask,
    ProofObtained,
    ProofRefused,
    Prove,
    QuarantineHost,
    RecordEvidence,
    RecoveryAction,
    RecoveryCore,
    RecoveryEvent,
    RecoveryOutput,
    RejoinChecked,
    ReleaseProof,
    StepDone,
    StepFailed,
    TasksLoaded,
    Tick,
)
from vmha.drivers.base import ComputeDriver, DriverError
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdUnavailable, encode_json
from vmha.etcd.election import Election, Leadership, NotLeader, leader_txn
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog
from vmha.etcd.tasks import StaleTasks, TaskStore
from vmha.etcd.watch import Delete, Snapshot, watch_prefix
from vmha.manager.detection import HealthMonitor, LocksRefused, unix_monotonic

if TYPE_CHECKING:
    from vmha.locks import PowerFence

log = logging.getLogger("vmha.manager")

INVENTORY_INTERVAL = 10.0  # seconds between inventory snapshots (plus one at each DOWN/FABRIC)
STOP_TIMEOUT = 5.0  # a term's loops and actions get this long to stop once cancelled

T = TypeVar("T")

_LEVELS = {Level.INFO: logging.INFO, Level.WARN: logging.WARNING, Level.ERROR: logging.ERROR}


class Fencer(Protocol):
    """What the manager needs from the lock manager (vmha.locks Prover)."""

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        """A proof that the VM's copy on `host` can no longer write; raises if none was obtained
        (the exception's text is the reason; a `retryable` attribute False gives up at once; an `alert`
        attribute names a cause the operator must fix, alerted once per proof)."""
        ...

    async def release(self, vm: str) -> None:
        """Release the VM's lease a proof took, so the restarted copy can acquire it."""
        ...


@dataclass(slots=True)
class Parts:
    driver: ComputeDriver
    fencer: Fencer
    # Release every proof lease held: when the leadership is lost (the next leader resumes from the
    # proofs persisted in the tasks, and the restarted VMs need their leases free) and at exit.
    release_all: Callable[[], Awaitable[None]] | None = None
    # The rejoin check of a fenced host (vmha.manager.rejoin.check_rejoin): its evidence, or an
    # exception saying why not. None: fenced hosts never rejoin by themselves (`vmha host enable`).
    rejoin_check: Callable[[str, Sequence[str]], Awaitable[str]] | None = None


def proof_timeout(cfg: Config) -> float:
    """How long one Prove may take: host-dead is the method of last resort, and sanlock declares a
    host dead 8*io + 60 s after its last renewal, seen up to 2*io late by the polling; with a margin."""
    io = cfg.locks.io_timeout if cfg.locks is not None else 10
    return 8 * io + 60 + 4 * io + 30


async def production_parts(cfg: Config, client: EtcdClient, *, power: PowerFence | None = None) -> Parts:
    """The driver of manager.driver and the lock manager's Prover, powering hosts off with the fence
    agents of [power.HOST] (or with `power`: the lab passes its own)."""
    fencer, release_all, rejoin_check = await _fencer(cfg, client, power)
    return Parts(compute_driver(cfg, client), fencer, release_all, rejoin_check)


def _nova(cfg: Config, client: EtcdClient) -> ComputeDriver:
    from vmha.drivers.nova import NovaDriver

    return NovaDriver(cfg.nova)


def _lab(cfg: Config, client: EtcdClient) -> ComputeDriver:
    from vmha.drivers.lab import LabDriver

    return LabDriver(client, Keys(cfg.cluster.name))


def _libvirt(cfg: Config, client: EtcdClient) -> ComputeDriver:
    from vmha.drivers.libvirt import LibvirtDriver

    if cfg.libvirt is None or not cfg.libvirt.hosts:
        raise ConfigError('manager.driver = "libvirt" needs [libvirt.hosts]: each host\'s libvirtd URI')
    return LibvirtDriver(client, Keys(cfg.cluster.name), cfg.libvirt.hosts, migrate_unsafe=cfg.libvirt.migrate_unsafe)


# manager.driver -> its factory (imported on use: the lab's and Nova's code are big). The keys are
# the closed set config.ManagerConfig.driver accepts.
DRIVERS: dict[str, Callable[[Config, EtcdClient], ComputeDriver]] = {"nova": _nova, "libvirt": _libvirt, "lab": _lab}


def compute_driver(cfg: Config, client: EtcdClient) -> ComputeDriver:
    """The ComputeDriver manager.driver names."""
    return DRIVERS[cfg.require_manager().driver](cfg, client)


async def _fencer(cfg: Config, client: EtcdClient, power: PowerFence | None) -> tuple[
        Fencer, Callable[[], Awaitable[None]], Callable[[str, Sequence[str]], Awaitable[str]]]:
    """The lock manager's Prover on this manager's own lock host, its clean-up, and the rejoin check
    on the same lockspace.

    The manager joins the lockspace at start, before campaigning, so a standby that takes over can
    prove at once (joining takes 3 to 21 s depending on io_timeout). Its sanlock host name is the
    manager's name, with a host_id allocated in etcd like any host's.
    """
    from vmha.etcd import hostids
    from vmha.etcd.attest import AttestResponse, request_attestation
    from vmha.locks import FenceAgentPower, LockError, LockSpace, PowerFenceError, Prover, fence_agents

    locks, m = cfg.require_locks(), cfg.require_manager()
    keys = Keys(cfg.cluster.name)
    if not m.power_fence:
        power = None
    elif power is None:
        if cfg.power:
            try:
                power = FenceAgentPower(fence_agents(cfg.power))
            except PowerFenceError as e:
                raise ConfigError(str(e)) from None
        else:
            raise ConfigError("manager.power_fence = true needs a [power] table: a fence agent per host "
                              '([power.HOST] agent = "fence_ipmilan" or "fence_redfish", and its options)')
    space = LockSpace.from_config(locks)
    while True:
        try:
            host_id = await hostids.allocate(client, keys, m.name, locks.max_hosts)
            break
        except EtcdUnavailable as e:
            log.warning("manager %s: allocating a sanlock host_id: %s; retrying", m.name, e)
            await client.wait_backoff()
        except hostids.HostIdError as e:
            raise ConfigError(str(e)) from None
    try:
        await asyncio.to_thread(space.join, host_id, m.name)
    except LockError as e:
        raise ConfigError(f"manager {m.name}: cannot join lockspace {locks.lockspace} at {locks.path}: {e}") from None
    log.info("manager %s: joined lockspace %s as host_id %d", m.name, locks.lockspace, host_id)

    async def host_id_of(host: str) -> int | None:
        return await hostids.lookup(client, keys, host)

    async def attest(host: str, vm: str, timeout: float) -> AttestResponse:
        return await request_attestation(client, keys, host, vm, timeout)

    async def rejoin_check(host: str, vms: Sequence[str]) -> str:
        from vmha.manager.rejoin import check_rejoin

        return await check_rejoin(space, host_id_of, host, vms)

    prover = Prover(space, host_id_of=host_id_of, attest=attest, power=power)
    # The lockspace is left joined at exit: it belongs to this machine's lock host, and a restarted
    # manager would otherwise wait for the join again.
    return prover, prover.release_all, rejoin_check


class Inbox:
    """The decision loop's input: events are taken all at once, so that a burst is decided together."""

    def __init__(self) -> None:
        self._items: list[RecoveryEvent] = []
        self._ready = asyncio.Event()

    def put(self, event: RecoveryEvent) -> None:
        self._items.append(event)
        self._ready.set()

    async def take(self, timeout: float | None) -> list[RecoveryEvent]:
        """Every pending event; waits up to `timeout` for one (an empty list: timed out)."""
        if not self._items:
            self._ready.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        items, self._items = self._items, []
        return items


def coalesce(events: list[RecoveryEvent]) -> list[RecoveryEvent]:
    """Drop a host's HealthUpdate when a later one of the same host follows in the batch: each is the
    host's whole view, and the planes of a dead host go DOWN one change at a time within one
    detection step; deciding on the first of them would act on a row that never really held."""
    last = {e.health.host: i for i, e in enumerate(events) if isinstance(e, HealthUpdate)}
    return [e for i, e in enumerate(events) if not isinstance(e, HealthUpdate) or last[e.health.host] == i]


class _TermOver(Exception):
    """The leadership ended: leave the term."""


class Manager:
    def __init__(
        self,
        cfg: Config,
        *,
        parts: Callable[[Config, EtcdClient], Awaitable[Parts]] = production_parts,
        clock: Callable[[], float] | None = None,
        rpc_timeout: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.m = cfg.require_manager()
        self.keys = Keys(cfg.cluster.name)
        self.client = EtcdClient(self.m.endpoints, timeout=rpc_timeout, name=f"manager {self.m.name}",
                                 tls=cfg.etcd.tls())
        self.make_parts = parts
        self.clock = clock or unix_monotonic()
        self.election = Election(self.client, self.keys.leader, self.m.name, self.m.election_ttl)
        self.leadership: Leadership | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, and campaign again after a lost leadership, until `stop` is set."""
        parts = await self.make_parts(self.cfg, self.client)
        try:
            while not stop.is_set():
                campaign = asyncio.create_task(self.election.campaign())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({campaign, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not campaign.done():
                    campaign.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await campaign
                    break
                lead = campaign.result()
                self.leadership = lead
                try:
                    await self._lead(lead, parts, stop)
                finally:
                    self.leadership = None
                    await self.election.resign()
                    if parts.release_all is not None:
                        await parts.release_all()
        finally:
            if parts.release_all is not None:
                await parts.release_all()
            await self.client.close()

    async def _lead(self, lead: Leadership, parts: Parts, stop: asyncio.Event) -> None:
        while lead.active and not stop.is_set():
            term = Term(self, lead, parts)
            try:
                await term.run(stop)
            except StaleTasks as e:
                log.warning("manager %s: %s; reloading the tasks", self.m.name, e)
            except (NotLeader, _TermOver):
                return


class Term:
    """One leadership term's state: a fresh core, monitor and in-flight actions."""

    def __init__(self, mgr: Manager, lead: Leadership, parts: Parts) -> None:
        self.mgr = mgr
        self.lead = lead
        self.driver = parts.driver
        self.fencer = parts.fencer
        self.rejoin_check = parts.rejoin_check
        self.client = mgr.client
        self.keys = mgr.keys
        self.clock = mgr.clock
        self.core = RecoveryCore(mgr.cfg.policy_table, mgr.m.recovery_settings())
        self.store = TaskStore(self.client, self.keys)
        self.events = EventLog(self.client, self.keys)
        self.monitor = HealthMonitor(self.client, self.keys, mgr.cfg.timings.health(), name=mgr.m.name,
                                     clock=self.clock)  # fmt: skip
        self.inbox = Inbox()
        self.inventory_now = asyncio.Event()
        self.pending_events: list[tuple[str, str, str, str]] = []  # health lines for the stream
        self.inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.over = False  # the term ended: nothing more is decided or started
        self.proof_timeout = proof_timeout(mgr.cfg)

    async def run(self, stop: asyncio.Event) -> None:
        """Lead until the leadership ends (_TermOver, NotLeader), `stop` is set (_TermOver), or a
        task write is refused (StaleTasks); anything else is a bug and ends the manager."""
        tasks = await self._durable(self.store.load)
        await self._durable(self.events.start)
        log.info("manager %s: leading; %d task(s) in etcd", self.mgr.m.name, len(tasks))
        self.inbox.put(TasksLoaded(tuple(tasks)))
        for out in await self._durable(lambda: hosts_out(self.client, self.keys)):
            self.inbox.put(out)
        loops = [
            asyncio.create_task(self._until_lost(stop), name="lost"),
            asyncio.create_task(self.monitor.run(), name="health monitor"),
            asyncio.create_task(self._health_feed(), name="health feed"),
            asyncio.create_task(self._inventory(), name="inventory"),
            asyncio.create_task(self._enabled_hosts(), name="enabled hosts"),
            asyncio.create_task(self._maintenance(), name="maintenance"),
            asyncio.create_task(self._decide(), name="decide"),
        ]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    raise exc
            raise _TermOver()
        finally:
            # `over` first: a loop that misses its cancellation still starts nothing afterwards.
            self.over = True
            for t in loops:
                t.cancel()
            await self._cancel_inflight()
            _, stuck = await asyncio.wait(loops, timeout=STOP_TIMEOUT)
            if stuck:
                log.error(
                    "manager %s: %s did not stop in %g s (abandoned; they start nothing more)",
                    self.mgr.m.name,
                    ", ".join(t.get_name() for t in stuck),
                    STOP_TIMEOUT,
                )

    async def _until_lost(self, stop: asyncio.Event) -> None:
        lost = asyncio.create_task(self.lead.lost.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            stopping.cancel()
        raise _TermOver()

    async def _cancel_inflight(self) -> None:
        tasks = list(self.inflight.values())
        self.inflight.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            log.warning("manager %s: %d action(s) in flight cancelled", self.mgr.m.name, len(tasks))
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            if stuck:
                log.error(
                    "manager %s: %d action(s) still finishing a call after %g s (abandoned)",
                    self.mgr.m.name,
                    len(stuck),
                    STOP_TIMEOUT,
                )

    async def _durable(self, op: Callable[[], Awaitable[T]]) -> T:
        """Retry an etcd operation while etcd is unreachable; the keepalive ends the leadership
        (and so the term) if that lasts past the TTL."""
        while True:
            if not self.lead.active or self.over:
                raise _TermOver()
            try:
                return await op()
            except EtcdUnavailable as e:
                log.warning("manager %s: etcd unavailable (%s); retrying", self.mgr.m.name, e)
                await self.client.wait_backoff()

    # -- inputs -----------------------------------------------------------------------------------

    async def _health_feed(self) -> None:
        changes = self.monitor.subscribe()
        await self.monitor.ready.wait()
        for health in self.monitor.view().values():
            self.inbox.put(HealthUpdate(health))
        for host, since in sorted(self.monitor.agent_marks().items()):
            self._agent_mark(AgentStopped(host, since))
        for host, why in sorted(self.monitor.locks_refused().items()):
            await self._locks_refused(LocksRefused(host, why))
        async for change in changes:
            if isinstance(change, AgentStopped):
                self._agent_mark(change)
            elif isinstance(change, LocksRefused):
                await self._locks_refused(change)
            elif isinstance(change, HealthChange):
                status = change.health.planes[change.plane]
                self.pending_events.append(
                    (
                        Level.WARN.value if change.new != PlaneState.UP else Level.INFO.value,
                        "health",
                        f"host '{change.host}' plane {change.plane.value}: {change.old.value} -> "
                        f"{change.new.value} ({status.evidence})",
                        "log",
                    )
                )
                if change.new in (PlaneState.DOWN, PlaneState.FABRIC):
                    self.inventory_now.set()
                self.inbox.put(HealthUpdate(change.health))
            elif isinstance(change, FabricChange):
                self.inbox.put(FabricUpdate(change))

    def _agent_mark(self, change: AgentStopped) -> None:
        if change.since is None:
            log.info("manager %s: host %s: the agent runs again (stop mark cleared)", self.mgr.m.name, change.host)
        else:
            log.warning("manager %s: host %s: agent stopped cleanly at %.1f: alert only, no recovery from it "
                        "until it runs again", self.mgr.m.name, change.host, change.since)  # fmt: skip
        self.inbox.put(change)

    async def _locks_refused(self, change: LocksRefused) -> None:
        if change.why is None:
            text, kind = f"host '{change.host}': its agent protects it again (lock settings right)", "log"
            log.info("manager %s: %s", self.mgr.m.name, text)
        else:
            text, kind = f"host '{change.host}' is NOT protected: its agent refuses: {change.why}", "alert"
            log.error("manager %s: ALERT %s", self.mgr.m.name, text)
        level = Level.ERROR if change.why else Level.INFO
        await self._durable(lambda: self.events.append(self.lead, [(level.value, "manager", text, kind)], time.time()))

    async def _enabled_hosts(self) -> None:
        """Tell the core (HostEnabled) and take a fresh inventory, in which the driver shows the
        host enabled again."""
        async for hosts in enabled_hosts(self.client, self.keys):
            for host in hosts:
                self.inbox.put(HostEnabled(host))
            self.inventory_now.set()

    async def _maintenance(self) -> None:
        """`vmha host maintenance HOST on|off` as it happens; the first listing tells a new leader
        which hosts are in maintenance."""
        async for host, on in maintenance_marks(self.client, self.keys):
            self.inbox.put(Maintenance(host, on))

    async def _inventory(self) -> None:
        while not self.over:
            try:
                hosts = await self.driver.hosts()
                vms = await self.driver.vms()
            except DriverError as e:
                log.warning("manager %s: inventory failed: %s", self.mgr.m.name, e)
            except Exception:  # a driver bug must not stop the recoveries: the next round retries
                log.exception("manager %s: inventory failed", self.mgr.m.name)
            else:
                self.inbox.put(Inventory(tuple(hosts), tuple(vms)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INVENTORY_INTERVAL):
                    await self.inventory_now.wait()
            self.inventory_now.clear()

    # -- the decision loop ------------------------------------------------------------------------

    async def _decide(self) -> None:
        ticked: float | None = None
        while not self.over:
            deadline = self.core.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            if timeout is not None and deadline == ticked:
                timeout = max(timeout, 0.2)  # a deadline a Tick did not clear: never spin on it
            batch = await self.inbox.take(timeout)
            if not batch:
                batch, ticked = [Tick()], deadline
            # Every event that arrived meanwhile is stepped, then their outputs are applied at once:
            # one etcd write for many transitions, and still no action before its persist.
            merged = RecoveryOutput()
            for event in coalesce(batch):
                out = self.core.step(event, self.clock())
                merged.actions += out.actions
                merged.log += out.log
            await self._apply(merged)

    async def _apply(self, out: RecoveryOutput) -> None:
        for line in out.log:
            log.log(_LEVELS.get(line.level, logging.INFO), line.render())
        # 1. what must be durable before anything acts
        persist: dict[str, dict[str, object]] = {}
        records: list[RecordEvidence] = []
        for a in out.actions:
            if isinstance(a, PersistTask):
                persist[a.vm] = a.data  # the last state of a VM in this output includes the earlier ones
            elif isinstance(a, RecordEvidence):
                records.append(a)
        if persist or records:
            batch = [(r.vm, r.recovery, r.data) for r in records]
            await self._durable(lambda: self.store.write(self.lead, persist, batch))
        entries = self.pending_events + [_entry(line) for line in out.log]
        entries += [(a.level.value, "manager", a.text, "alert") for a in out.actions if isinstance(a, Alert)]
        self.pending_events = []
        if entries:
            await self._durable(lambda: self.events.append(self.lead, entries, time.time()))
        # 2. the actions, concurrently; each result comes back through the inbox
        if self.over:
            raise _TermOver()
        for a in out.actions:
            self._start(a)

    def _start(self, a: RecoveryAction) -> None:
        match a:
            case PersistTask() | RecordEvidence():
                return
            case Alert(level, _host, _vm, text):
                log.log(_LEVELS.get(level, logging.WARNING), "ALERT %s", text)
                return
            case CancelProof(vm, host, attempt):
                task = self.inflight.pop(("prove", vm), None)
                if task is not None:
                    task.cancel()
                    # The core waits for the end of the cancelled proof: tell it.
                    self.inbox.put(ProofRefused(vm, host, attempt, "cancelled: the host came back"))
                return
            case Prove(vm, host, methods, attempt, timeout):
                self._spawn(("prove", vm), self._prove(vm, host, methods, attempt, timeout or self.proof_timeout))
            case ReleaseProof(vm, _host, _proof):
                self._spawn(("vm", vm), self._vm_step(vm, Step.RELEASE, self._release(vm)))
            case DropProof(vm, _host):
                self._spawn(("drop", vm), self._drop(vm))
            case Evacuate(vm, source, dest, _proof):
                self._spawn(("vm", vm), self._vm_step(vm, Step.EVACUATE, self.driver.evacuate(vm, source, dest)))
            case LiveMigrate(vm, source, dest):
                self._spawn(("vm", vm), self._vm_step(vm, Step.MIGRATE, self.driver.live_migrate(vm, source, dest)))
            case DisableHost(host, reason):
                self._spawn(
                    ("disable", host), self._host_op(host, HostOp.DISABLE, self.driver.disable_host(host, reason))
                )
            case MarkHostDown(host):
                self._spawn(
                    ("mark-down", host), self._host_op(host, HostOp.MARK_DOWN, self.driver.mark_host_down(host))
                )
            case EnableHost(host, _reason):
                self._spawn(("enable", host), self._host_op(host, HostOp.ENABLE, self.driver.enable_host(host)))
            case CheckRejoin(host, vms):
                self._spawn(("rejoin", host), self._check_rejoin(host, vms))
            case QuarantineHost(host, reason):
                record = {"reason": reason, "t": time.time(), "manager": self.mgr.m.name}
                put = tx.Put(self.keys.quarantined(host).encode(), encode_json(record))
                self._spawn(("quarantine", host), self._durable_quiet(
                    lambda: leader_txn(self.client, self.lead, [], [put])))

    def _spawn(self, key: tuple[str, str], coro: Awaitable[None]) -> None:
        old = self.inflight.get(key)
        if old is not None and not old.done():
            # The core never asks twice for a step in flight; if it does, the newest request wins.
            log.warning("manager %s: %s %s still in flight; superseded", self.mgr.m.name, *key)
            old.cancel()

        async def run() -> None:
            try:
                await coro
            finally:
                if self.inflight.get(key) is task:
                    del self.inflight[key]

        task = asyncio.create_task(run(), name=f"{key[0]} {key[1]}")
        self.inflight[key] = task

    # -- action bodies: run the call, feed the result back ----------------------------------------

    async def _prove(
        self, vm: str, host: str, methods: Sequence[ProofMethod], attempt: Attempt, timeout: float
    ) -> None:
        try:
            proof = await self.fencer.prove(vm, host, methods, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure to prove is a refusal; the text is the evidence
            self.inbox.put(ProofRefused(vm, host, attempt, _reason(e), bool(getattr(e, "retryable", True)),
                                        str(getattr(e, "alert", ""))))
            return
        self.inbox.put(ProofObtained(proof, attempt))

    async def _release(self, vm: str) -> str:
        await self.fencer.release(vm)
        return ""

    async def _drop(self, vm: str) -> None:
        try:
            await self.fencer.release(vm)
        except asyncio.CancelledError:
            raise
        except Exception:  # the term's end releases every proof lease again
            log.exception("manager %s: releasing the proof lease of vm %s failed", self.mgr.m.name, vm)

    async def _vm_step(self, vm: str, step: Step, call: Awaitable[str]) -> None:
        try:
            where = await call
        except asyncio.CancelledError:
            raise
        except DriverError as e:
            self.inbox.put(StepFailed(vm, step, _reason(e), e.retryable))
            return
        except Exception as e:  # an unexpected driver bug must not kill the manager: retry it
            log.exception("manager: %s of vm %s failed", step.value, vm)
            self.inbox.put(StepFailed(vm, step, _reason(e), True))
            return
        self.inbox.put(StepDone(vm, step, running_on=where or None))

    async def _durable_quiet(self, op: Callable[[], Awaitable[object]]) -> None:
        """A write no result depends on; a term that ends first leaves it to the next leader."""
        with contextlib.suppress(NotLeader, _TermOver):
            await self._durable(op)

    async def _check_rejoin(self, host: str, vms: Sequence[str]) -> None:
        if self.rejoin_check is None:
            self.inbox.put(RejoinChecked(host, False, "no rejoin check available: `vmha host enable` it"))
            return
        try:
            evidence = await self.rejoin_check(host, vms)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed or refused check keeps the host out; the core retries later
            self.inbox.put(RejoinChecked(host, False, _reason(e)))
            return
        self.inbox.put(RejoinChecked(host, True, evidence))

    async def _host_op(self, host: str, op: HostOp, call: Awaitable[None]) -> None:
        try:
            await call
            # Remember what vmha did to the host, for `vmha host enable` and the operator; a rejoin
            # undoes it as the operator's enable does (the watch reports it back as HostEnabled).
            key = self.keys.disabled(host).encode()
            record = {"op": op.value, "t": time.time(), "manager": self.mgr.m.name}
            write = tx.Delete(key) if op == HostOp.ENABLE else tx.Put(key, encode_json(record))
            await self._durable(lambda: leader_txn(self.client, self.lead, [], [write]))
        except asyncio.CancelledError:
            raise
        except (NotLeader, _TermOver):
            return
        except DriverError as e:
            self.inbox.put(HostOpFailed(host, op, _reason(e), e.retryable))
            return
        except Exception as e:  # an unexpected driver bug must not kill the manager: retry it
            log.exception("manager: %s of host %s failed", op.value, host)
            self.inbox.put(HostOpFailed(host, op, _reason(e), True))
            return
        self.inbox.put(HostOpDone(host, op))


async def enabled_hosts(client: EtcdClient, keys: Keys) -> AsyncIterator[list[str]]:
    """The hosts re-enabled by `vmha host enable HOST`, which deletes keys.disabled(HOST), as they
    happen (a non-empty list at a time; sorted)."""
    prefix = keys.disabled_prefix
    known: set[str] = set()
    async for item in watch_prefix(client, prefix):
        enabled: list[str] = []
        match item:
            case Snapshot(items):
                listed = {kv.key.removeprefix(prefix) for kv, _ in items}
                # The first listing, or again after a compaction: keys gone meanwhile were deleted.
                enabled, known = sorted(known - listed), listed
            case Delete(key):
                known.discard(key.removeprefix(prefix))
                enabled = [key.removeprefix(prefix)]
            case _:
                known.add(item.key.removeprefix(prefix))
        if enabled:
            yield enabled


async def maintenance_marks(client: EtcdClient, keys: Keys) -> AsyncIterator[tuple[str, bool]]:
    """(host, in maintenance) for every keys.maintenance(HOST) written or deleted, as it happens; the
    hosts of the first listing (and of a listing after a compaction) first."""
    prefix = keys.maintenance_prefix
    known: set[str] = set()
    async for item in watch_prefix(client, prefix):
        match item:
            case Snapshot(items):
                listed = {kv.key.removeprefix(prefix) for kv, _ in items}
                for host in sorted(known - listed):
                    yield host, False
                for host in sorted(listed - known):
                    yield host, True
                known = listed
            case Delete(key):
                known.discard(key.removeprefix(prefix))
                yield key.removeprefix(prefix), False
            case _:
                known.add(item.key.removeprefix(prefix))
                yield item.key.removeprefix(prefix), True


async def hosts_out(client: EtcdClient, keys: Keys) -> list[HostOut]:
    """The hosts an earlier leader disabled or marked down and no one enabled since (keys.disabled
    records, sorted), and whether it quarantined them (keys.quarantined); an unreadable record is
    logged and left out (that host waits for the operator)."""
    kvs, _ = await client.get_prefix(keys.disabled_prefix)
    quarantined, _ = await client.get_prefix(keys.quarantined_prefix)
    why = {kv.key.removeprefix(keys.quarantined_prefix): _quarantine_reason(kv) for kv in quarantined}
    out: list[HostOut] = []
    for kv in kvs:
        host = kv.key.removeprefix(keys.disabled_prefix)
        try:
            value = kv.json()
        except BadValue as e:
            log.warning("%s: host %s left to the operator", e, host)
            continue
        op = value.get("op") if isinstance(value, dict) else None
        if op not in (HostOp.DISABLE.value, HostOp.MARK_DOWN.value):
            log.warning("etcd key %s: op %r is neither disable nor mark-down: host %s left to the operator",
                        kv.key, op, host)
            continue
        out.append(HostOut(host, HostOp(op), why.get(host, "")))
    return out


def _quarantine_reason(kv: KV) -> str:
    """The reason a quarantine record gives; an unreadable one still quarantines (in doubt, out)."""
    try:
        value = kv.json()
    except BadValue:
        return "unreadable quarantine record"
    reason = value.get("reason") if isinstance(value, dict) else None
    return reason[:500] if isinstance(reason, str) and reason else "quarantine record without a reason"


def _entry(line: LogLine) -> tuple[str, str, str, str]:
    return (line.level.value, line.actor, line.text, "log")


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


__all__ = [
    "DRIVERS",
    "INVENTORY_INTERVAL",
    "Fencer",
    "Manager",
    "Parts",
    "compute_driver",
    "enabled_hosts",
    "hosts_out",
    "maintenance_marks",
    "production_parts",
]
