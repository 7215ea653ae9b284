"""The manager daemon: leader election, then the recovery core fed and executed against the world.

    await Manager(config).run(stop)       # `vmha manager --config FILE`

Standby: campaign (etcd/election.py) and wait. Leader, for one "term" at a time:
  - load the persisted tasks (etcd/tasks.py) and hand them to a fresh RecoveryCore (TasksLoaded);
  - run the HealthMonitor (manager/detection.py) and put the recovery events of its health feed
    (vmha.runtime.health: HealthUpdate, FabricUpdate) in the runtime loop's inbox;
  - take an inventory snapshot from the compute driver at start, every INVENTORY_INTERVAL, and
    at once when a plane goes DOWN or FABRIC;
  - watch keys.disabled_prefix: a deleted key is `vmha host enable HOST` (HostEnabled, and a fresh
    inventory); read it at start: what earlier leaders did to the hosts (HostOut), for their rejoin;
  - watch keys.maintenance_prefix: `vmha host maintenance HOST on|off` (Maintenance);
  - watch keys.pause: `vmha pause on|off`, the cluster-wide pause of recoveries (Paused);
  - step the core through the runtime loop (vmha.runtime.loop: the simulator and the core bench run
    the same one), with this term as its environment: the decisions logged (logger "vmha.manager")
    and appended to the decision stream, the tasks and evidence persisted with CAS guarded by the
    leadership BEFORE any other action of that output runs, then the proofs (the fencer), the
    driver calls and the host records (keys.disabled, keys.quarantined) started concurrently.
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
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aetcd import transactions as tx

from vmha import metrics
from vmha.config import Config, ConfigError
from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import (
    AgentStopped,
    FabricUpdate,
    HealthUpdate,
    HostEnabled,
    HostOp,
    HostOut,
    Inventory,
    Maintenance,
    Paused,
    RecoveryEvent,
    TasksLoaded,
)
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HealthChange
from vmha.core.log import Level, LogLine
from vmha.core.planes import Plane, PlaneState
from vmha.core.queue import Task
from vmha.core.recovery import RecoveryCore
from vmha.drivers.base import ComputeDriver, DriverError, VmInfo
from vmha.etcd import hostids
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdUnavailable, encode_json
from vmha.etcd.election import Election, Leadership, NotLeader, leader_txn
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog
from vmha.etcd.tasks import StaleTasks, TaskStore
from vmha.etcd.values import PauseValue, read, refused
from vmha.etcd.watch import Delete, Snapshot, watch_prefix
from vmha.manager.detection import HealthMonitor, LocksRefused, unix_monotonic
from vmha.manager.notifications import BusNotifier
from vmha.manager.webhooks import Webhooks, evidence_links
from vmha.runtime.env import TermOver
from vmha.runtime.loop import Inbox, Loop

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
    from vmha.etcd.attest import AttestResponse, request_attestation
    from vmha.locks import FenceAgentPower, LockError, LockSpace, PowerFenceError, Prover, fence_agents

    locks, m = cfg.require_locks(), cfg.require_manager()
    keys = Keys(cfg.cluster.name)
    if not m.power_fence:
        power = None
    elif power is None:
        if cfg.power:
            if cfg.power_uncovered():
                raise ConfigError(cfg.power_uncovered())
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


class _TermOver(TermOver):
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
        self.webhooks: Webhooks | None = None  # [alerts] webhooks: created in run(), in its event loop
        self.bus: BusNotifier | None = None  # [notifications]: created in run(), in its event loop
        self.public_url = cfg.api.public_url if cfg.api is not None else None  # the alerts' evidence links
        self.parts: Parts | None = None

    async def vms(self) -> Sequence[VmInfo]:
        """The compute driver's VMs (for the REST API), once the parts are built."""
        if self.parts is None:
            raise DriverError("the manager is starting: no compute driver yet")
        return await self.parts.driver.vms()

    def readiness(self) -> str | None:
        """For systemd (vmha.sdnotify): None until a campaign round got etcd's answer, then a one-line
        status (leading or standing by)."""
        if not self.election.reached:
            return None
        return f"manager {self.m.name}: " + ("leading" if self.leadership is not None else "campaigning (standby)")

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, and campaign again after a lost leadership, until `stop` is set."""
        parts = await self.make_parts(self.cfg, self.client)
        hooks: asyncio.Task[None] | None = None
        if self.cfg.alerts.webhooks:
            self.webhooks = Webhooks(self.cfg.alerts, {"cluster": self.cfg.cluster.name, "manager": self.m.name},
                                     public_url=self.public_url)
            hooks = asyncio.create_task(self.webhooks.run(), name="webhooks")
        bus: asyncio.Task[None] | None = None
        if self.cfg.notifications is not None:
            self.bus = BusNotifier(self.cfg.notifications, self.cfg.cluster.name, self.m.name, self.public_url)
            bus = asyncio.create_task(self.bus.run(), name="notifications")
        self.parts = parts
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
                metrics.LEADER.set(1)
                try:
                    await self._lead(lead, parts, stop)
                finally:
                    self.leadership = None
                    metrics.LEADER.set(0)
                    metrics.forget_planes()
                    await self.election.resign()
                    if parts.release_all is not None:
                        await parts.release_all()
        finally:
            for sender in (hooks, bus):
                if sender is not None:
                    sender.cancel()  # what is still queued goes to the undelivered log
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
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
            except (NotLeader, TermOver):
                return


class Term:
    """One leadership term's state: a fresh core in its runtime loop, a monitor, the inputs; and the
    loop's environment (vmha.runtime.env.Env): etcd, the fencer and the compute driver."""

    def __init__(self, mgr: Manager, lead: Leadership, parts: Parts) -> None:
        self.mgr = mgr
        self.lead = lead
        self.driver = parts.driver
        self.fencer = parts.fencer
        self.rejoin_check = parts.rejoin_check
        self.client = mgr.client
        self.keys = mgr.keys
        self.clock = mgr.clock
        self.store = TaskStore(self.client, self.keys)
        self.events = EventLog(self.client, self.keys)
        self.monitor = HealthMonitor(self.client, self.keys, mgr.cfg.timings.health(), name=mgr.m.name,
                                     clock=self.clock)  # fmt: skip
        self.inbox = Inbox()
        self.inventory_now = asyncio.Event()
        self.host_seen = asyncio.Event()  # a HealthUpdate came: a newly registered host may need a host_id
        self.pending_events: list[tuple[str, str, str, str]] = []  # health lines for the stream
        self.started = self.clock()
        self.recovering: set[tuple[str, int]] = set()  # (vm, recovery) started in this term, for metrics
        self.loop = Loop(RecoveryCore(mgr.cfg.policy_table, mgr.m.recovery_settings()), self,
                         proof_timeout=proof_timeout(mgr.cfg))

    @property
    def over(self) -> bool:
        """The term ended: nothing more is decided or started."""
        return self.loop.over

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
            asyncio.create_task(self._pause(), name="pause"),
            asyncio.create_task(self.loop.run(self.inbox), name="decide"),
        ]
        if self.mgr.cfg.locks is not None:
            loops.append(asyncio.create_task(self._host_ids(self.mgr.cfg.locks.max_hosts), name="host ids"))
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    raise exc
            raise _TermOver()
        finally:
            # `over` first: a loop that misses its cancellation still starts nothing afterwards.
            self.loop.over = True
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
        tasks = [t for t in self.loop.cancel_all() if isinstance(t, asyncio.Task)]  # what spawn() made
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
        self.inbox.put_all(self.monitor.feed.whole_view())
        self.host_seen.set()
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
            elif isinstance(change, HealthUpdate | FabricUpdate):
                # The health output's events for the recovery core (vmha.runtime.health), after its changes.
                self.inbox.put(change)
                self.host_seen.set()

    async def _host_ids(self, max_hosts: int) -> None:
        """Only managers allocate sanlock host_ids (an agent reads its own and writes no hostid/ key):
        the leader gives one to each registered host that has none."""
        await self.monitor.ready.wait()
        known: set[str] = set()
        while True:
            for host in sorted(set(self.monitor.view()) - known):
                try:
                    host_id = await self._durable(functools.partial(hostids.allocate, self.client, self.keys,
                                                                    host, max_hosts))
                except hostids.HostIdError as e:
                    log.error("manager %s: host %s: no sanlock host_id: %s", self.mgr.m.name, host, e)
                else:
                    log.info("manager %s: host %s has sanlock host_id %d", self.mgr.m.name, host, host_id)
                known.add(host)
            await self.host_seen.wait()
            self.host_seen.clear()

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
            self.alert(Alert(Level.ERROR, change.host, None, text))  # logged, counted, sent
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

    async def _pause(self) -> None:
        """`vmha pause on|off` as it happens; the first listing tells a new leader about a pause."""
        async for paused in pause_marks(self.client, self.keys):
            log.warning("manager %s: recoveries %s", self.mgr.m.name,
                        f"PAUSED cluster-wide ({paused})" if paused else "resumed")  # fmt: skip
            self.inbox.put(Paused(paused is not None, paused or "by the operator"))

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

    # -- the runtime loop's environment (vmha.runtime.env.Env) ---------------------------------------

    def now(self) -> float:
        return self.clock()

    def log(self, lines: Sequence[LogLine]) -> None:
        for line in lines:
            log.log(_LEVELS.get(line.level, logging.INFO), line.render())

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        if tasks or records:
            batch = [(r.vm, r.recovery, r.data) for r in records]
            await self._durable(lambda: self.store.write(self.lead, dict(tasks), batch))
        self._observe(tasks, records)
        entries = self.pending_events + [_entry(line) for line in lines]
        entries += [(a.level.value, "manager", a.text, "alert") for a in alerts]
        self.pending_events = []
        if entries:
            await self._durable(lambda: self.events.append(self.lead, entries, time.time()))

    def _observe(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence]) -> None:
        """The metrics of this output: queue depth, the phases of the recoveries begun and ended; and
        their notifications on the message bus (once persisted)."""
        queue = self.loop.core.queue
        metrics.tasks_by_state(queue.count)
        for data in tasks.values():
            task = Task.from_dict(data)  # the core's own to_dict, of this step
            key = (task.vm, task.recovery)
            if task.created >= self.started and key not in self.recovering:
                self.recovering.add(key)
                last = {p: self.monitor.core.last_seen(task.source, Plane(p)) for p in task.failed}
                metrics.recovery_started(task, {p: t for p, t in last.items() if t is not None})
                if self.mgr.bus is not None:
                    self.mgr.bus.recovery(task, time.time())
        for r in records:
            self.recovering.discard((r.vm, r.recovery))
            ended = Task.from_dict(r.data)
            metrics.recovery_finished(ended)
            if self.mgr.bus is not None:
                self.mgr.bus.recovery(ended, time.time())

    def alert(self, alert: Alert) -> None:
        links = evidence_links(self.mgr.public_url, alert.vm, alert.host)
        log.log(_LEVELS.get(alert.level, logging.WARNING), "ALERT %s%s", alert.text,
                f" (evidence: {links['evidence']})" if links else "")  # fmt: skip
        metrics.alert(alert.level.value)
        if self.mgr.webhooks is not None:
            self.mgr.webhooks.send({"level": alert.level.value, "host": alert.host, "vm": alert.vm,
                                    "text": alert.text, "t": round(time.time(), 3)})  # fmt: skip
        if self.mgr.bus is not None:
            self.mgr.bus.alert(alert.level, alert.host, alert.vm, alert.text, time.time())

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        try:
            proof = await self.fencer.prove(vm, host, methods, timeout)
        except (asyncio.CancelledError, TermOver):
            raise
        except Exception:
            metrics.proof_refused()
            raise
        metrics.proof(proof)
        return proof

    async def release(self, vm: str) -> None:
        await self.fencer.release(vm)

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        return await self.driver.evacuate(vm, source, dest)

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        return await self.driver.live_migrate(vm, source, dest)

    async def disable(self, host: str, reason: str) -> None:
        await self.driver.disable_host(host, reason)
        await self._host_record(host, HostOp.DISABLE)

    async def mark_down(self, host: str) -> None:
        await self.driver.mark_host_down(host)
        await self._host_record(host, HostOp.MARK_DOWN)

    async def enable(self, host: str) -> None:
        await self.driver.enable_host(host)
        await self._host_record(host, HostOp.ENABLE)

    async def _host_record(self, host: str, op: HostOp) -> None:
        """Remember what vmha did to the host, for `vmha host enable` and the operator; a rejoin
        undoes it as the operator's enable does (the watch reports it back as HostEnabled)."""
        key = self.keys.disabled(host).encode()
        record = {"op": op.value, "t": time.time(), "manager": self.mgr.m.name}
        write = tx.Delete(key) if op == HostOp.ENABLE else tx.Put(key, encode_json(record))
        try:
            await self._durable(lambda: leader_txn(self.client, self.lead, [], [write]))
        except NotLeader:
            raise _TermOver() from None

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        if self.rejoin_check is None:
            raise LookupError("no rejoin check available: `vmha host enable` it")
        return await self.rejoin_check(host, vms)

    async def quarantine(self, host: str, reason: str) -> None:
        record = {"reason": reason, "t": time.time(), "manager": self.mgr.m.name}
        put = tx.Put(self.keys.quarantined(host).encode(), encode_json(record))
        try:
            await self._durable(lambda: leader_txn(self.client, self.lead, [], [put]))
        except NotLeader:
            raise _TermOver() from None

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=name)

    def result(self, event: RecoveryEvent) -> None:
        self.inbox.put(event)


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


async def pause_marks(client: EtcdClient, keys: Keys) -> AsyncIterator[str | None]:
    """keys.pause as it changes: why recoveries are paused (a text), or None once resumed. The first
    listing comes first. An unreadable value still pauses (someone wrote the key: in doubt, wait)."""
    paused: str | None = None
    async for item in watch_prefix(client, keys.pause):
        match item:
            case Snapshot(items, _, broken):
                kv = next((kv for kv, _ in items if kv.key == keys.pause), None)
                now: str | None = None
                if kv is not None:
                    now = _pause_reason(kv)
                elif any(b.key == keys.pause for b in broken):
                    now = "unreadable pause record"
            case Delete(key):
                if key != keys.pause:
                    continue
                now = None
            case _:
                if item.key != keys.pause:
                    continue
                now = _pause_reason(item.kv)
        if now != paused:
            paused = now
            yield paused


def _pause_reason(kv: KV) -> str:
    """Who paused and why, as the pause record tells; an unreadable one still pauses."""
    try:
        value = read(PauseValue, kv)
    except BadValue as e:
        refused(e, kv, "recoveries stay paused while the key exists")
        return "unreadable pause record"
    return f"by {value.by or 'the operator'}: {value.why or 'no reason given'}"


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
    "pause_marks",
    "production_parts",
]
