"""The simulated environment: a fake clock, hosts whose agents heartbeat per plane, etcd lease
expiry, a scripted world (sanlock leases, VM copies, Nova) and the real cores.

Model, in the sim's seconds:
- Every `keepalive_interval` each powered host writes a heartbeat on every plane it still reaches
  (a new value and a lease keepalive). A plane cut at t has its key deleted at the last keepalive
  + lease_ttl + `lease_slack` (etcd's leader checks expiries every 500 ms).
- An etcd leader change: for `election` seconds nobody writes and the manager sees etcd down; the
  new etcd leader then extends every lease to TTL + 1 s.
- sanlock: a host that loses its storage plane (or power) stops renewing; its VM copies are killed
  `storage_kill` s later (powered hosts only; a powered-off host's copies are gone at once) but
  their leases stay held until the proof or host-dead (`host_dead` s after renewals stopped).
- Proof methods, tried in the order given: lease-taken (no copy runs and the host released the
  lease), request-force (host renews over storage), exit-attested (host's management plane up;
  waits for sanlock's kill if storage is lost), power (if configured), host-dead. Each ends by
  taking the VM's lease: none proves while another host holds it (a copy running there).
- Nova: evacuation needs the source marked down (unless it restarts the VM on its rejoined source),
  the VM lease free (released by the manager) and no copy running elsewhere (then it reports where
  it runs: idempotent); a copy still running on the source at restart is logged as SPLIT BRAIN, the
  error every scenario checks for.
- The manager takes an inventory every `inventory` seconds (as manager.daemon does) and after each
  change of the world; a VM with no copy running is "stopped" in it (desired state).
- A manager failover drops the old manager's pending results (their effects on the world still
  happen) and starts new cores that load the persisted tasks.
The manager is the daemon's own runtime loop (vmha.runtime.loop) with the sim as its environment
(_Manager): the same batching, persist-before-act and action dispatch as in production; the actions
are coroutines that wait on the virtual clock (_Action), so a run stays deterministic.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import (
    AgentStopped,
    HostEnabled,
    HostOp,
    HostOut,
    Inventory,
    Maintenance,
    RecoveryEvent,
    TasksLoaded,
)
from vmha.core.events import Tick as RecoveryTick
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import (
    EtcdStatus,
    HealthEvent,
    HealthOutput,
    HealthTimings,
    Heartbeat,
    HostSeen,
    LeaseGone,
)
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import PolicyTable
from vmha.core.queue import Step, Task, TaskKind, TaskState
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import DriverError, HostInfo, VmInfo
from vmha.etcd.values import TaskValue
from vmha.runtime.env import Running
from vmha.runtime.health import HealthFeed
from vmha.runtime.loop import Loop, run_now

WORLD = "world"
SIM = "sim"
MANAGER_HOLDS = "manager"  # lease_holder value: the manager's runtime holds the lease as a proof

# Same-time ordering: commands, then world results, then heartbeats, then timers.
_CMD, _WORLD, _BEAT, _TICK = 0, 1, 2, 3
# Timers fire this much after a core's deadline: `now - seen >= after` can miss by one float ulp when
# now == seen + after exactly (10.7 - 9.5 < 1.2); invisible at the log's 0.1 s precision.
_TICK_SLACK = 1e-6


@dataclass(frozen=True, slots=True)
class SimTimings:
    duration: float = 120.0
    lease_slack: float = 0.3
    election: float = 1.5
    host_dead: float = 70.0
    storage_kill: float = 7.0
    proof_delay: Mapping[ProofMethod, float] = field(
        default_factory=lambda: {
            ProofMethod.LEASE_TAKEN: 0.5,
            ProofMethod.REQUEST_FORCE: 2.0,
            ProofMethod.EXIT_ATTESTED: 1.0,
            ProofMethod.POWER: 5.0,
            ProofMethod.HOST_DEAD: 0.5,
        }
    )
    refuse_after: float = 1.0
    evacuate: float = 2.0
    migrate: float = 3.0
    mark_down: float = 0.2
    disable: float = 0.2
    release: float = 0.1
    rejoin_check: float = 2.0  # a lockspace renewal seen on the shared storage, the leases' owners read
    inventory: float = 10.0  # the manager's periodic inventory (manager.daemon.INVENTORY_INTERVAL)


@dataclass(slots=True)
class SimHost:
    name: str
    domain: str
    powered: bool = True
    cut: set[Plane] = field(default_factory=set)
    disabled: bool = False
    forced_down: bool = False
    agent: bool = True  # the agent runs (heartbeats, attestations)
    agent_stopped: float | None = None  # when the agent marked its host record (a clean stop)
    maintenance: bool = False  # keys.maintenance(host) present
    quarantined: str = ""  # keys.quarantined(host): why
    renew_lost_at: float | None = None  # sanlock renewals stopped (storage lost or power off)
    seq: dict[Plane, int] = field(default_factory=dict)
    sent: dict[Plane, float] = field(default_factory=dict)
    rev: dict[Plane, int] = field(default_factory=dict)
    lease: dict[Plane, int] = field(default_factory=dict)
    lease_deadline: dict[Plane, float] = field(default_factory=dict)
    key_present: dict[Plane, bool] = field(default_factory=dict)


@dataclass(slots=True)
class SimVm:
    name: str
    host: str | None
    ha: bool = True
    priority: int = 0
    copies: set[str] = field(default_factory=set)  # hosts where a copy of the VM runs
    lease_holder: str | None = None  # host name, MANAGER_HOLDS, or None (free)


class Sim:
    def __init__(
        self,
        hosts: Mapping[str, str],  # host -> failure domain
        vms: list[VmInfo],
        policy: PolicyTable,
        settings: RecoverySettings,
        timings: HealthTimings,
        sim: SimTimings | None = None,
        *,
        log_health: bool = True,
    ) -> None:
        self.policy, self.settings, self.timings = policy, settings, timings
        self.st = sim or SimTimings()
        self.log_health = log_health
        self.now = 0.0
        self.lines: list[LogLine] = []
        self.hosts = {h: SimHost(h, d) for h, d in sorted(hosts.items())}
        self.vms = {
            v.name: SimVm(v.name, v.host, v.ha, v.priority, {v.host} if v.host else set(), v.host)
            for v in sorted(vms, key=lambda v: v.name)
        }
        self.store: dict[str, dict[str, object]] = {}  # tasks/<vm>, as the runtime persists it
        self.records: dict[tuple[str, int], dict[str, object]] = {}
        self.fabric_cuts: set[tuple[Plane, str | None]] = set()
        self.failures: dict[tuple[str, str], list[bool]] = {}  # (kind, name) -> [retryable, ...]
        self.etcd_down_until = 0.0
        self.split_brain = 0
        # (vm, recovery) -> copies started by evacuation, each counted for the recovery persisted when it
        # began: a deposed leader's evacuation finishing after the failover is its task's restart.
        self.restarts: dict[tuple[str, int], int] = {}
        self.evacuated: list[tuple[float, str, str]] = []  # (time, vm, source) of every restart
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = 0
        self._revision = 0
        self._lease_ids = 0
        self._ticks: set[tuple[str, float]] = set()
        self._inventory_at: float | None = None
        self.health = self._health_feed()
        self.manager = _Manager(self)
        self._start()

    # -- clock --------------------------------------------------------------------------------

    def at(self, t: float, phase: int, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, phase, self._seq, fn))

    def run(self, until: float, check: Callable[[], None] | None = None) -> None:
        """Run the clock to `until`; `check` (invariants) after every event."""
        while self._heap and self._heap[0][0] <= until:
            t, _, _, fn = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            fn()
            if check is not None:
                check()
        self.now = max(self.now, until)

    def log(self, level: Level, actor: str, text: str) -> None:
        self.lines.append(LogLine(level, self.now, actor, text))

    # -- cores ------------------------------------------------------------------------------

    def _start(self) -> None:
        for h in self.hosts.values():
            self._health(HostSeen(h.name, h.domain))
        self._recover(self._inventory())
        self.at(0.0, _BEAT, lambda: self._beat(0))
        self.at(self.st.inventory, _WORLD, self._periodic_inventory)

    def _periodic_inventory(self) -> None:
        self._recover(self._inventory())
        if self.now + self.st.inventory <= self.st.duration:
            self.at(self.now + self.st.inventory, _WORLD, self._periodic_inventory)

    def _health_feed(self) -> HealthFeed:
        """The leading manager's health core (a new one at each failover), feeding its runtime loop."""

        def observe(out: HealthOutput) -> None:
            if self.log_health:
                self.lines.extend(out.log)

        return HealthFeed(self.timings, lambda events: self.manager.feed(events), observe)

    def _health(self, ev: HealthEvent) -> None:
        self.health.step([ev], self.now)
        self._schedule_tick("health", self.health.next_deadline())

    def _recover(self, ev: RecoveryEvent) -> None:
        self.manager.feed([ev])

    def _schedule_tick(self, which: str, deadline: float | None) -> None:
        if deadline is None or deadline <= self.now or (which, deadline) in self._ticks:
            return
        self._ticks.add((which, deadline))
        manager = self.manager

        def fire() -> None:
            self._ticks.discard((which, deadline))
            if manager is not self.manager:
                return
            if which == "health":
                self.health.tick(self.now)
                self._schedule_tick("health", self.health.next_deadline())
            else:
                self._recover(RecoveryTick())

        self.at(deadline + _TICK_SLACK, _TICK, fire)

    def sleep(self, seconds: float) -> _Wake:
        """An action's wait on the virtual clock (`await sim.sleep(2.0)`)."""
        return _Wake(self.now + seconds)

    # -- agents and etcd ----------------------------------------------------------------------

    def reaches(self, h: SimHost, plane: Plane) -> bool:
        return (
            h.powered
            and plane not in h.cut
            and (plane, None) not in self.fabric_cuts
            and (plane, h.domain) not in self.fabric_cuts
        )

    def beats(self, h: SimHost, plane: Plane) -> bool:
        """The host's agent runs and reaches etcd through the plane."""
        return h.agent and self.reaches(h, plane)

    def _beat(self, k: int) -> None:
        if self.now >= self.etcd_down_until:
            for h in self.hosts.values():
                for plane in PLANES:
                    if self.beats(h, plane):
                        self._write_heartbeat(h, plane)
                if h.agent_stopped is not None and h.agent:
                    # The restarted agent clears its mark once it beats again.
                    h.agent_stopped = None
                    self._recover(AgentStopped(h.name, None))
        nxt = (k + 1) * self.timings.keepalive_interval
        if nxt <= self.st.duration:
            self.at(nxt, _BEAT, lambda: self._beat(k + 1))

    def _write_heartbeat(self, h: SimHost, plane: Plane) -> None:
        if not h.key_present.get(plane, False):
            self._lease_ids += 1
            h.lease[plane] = self._lease_ids
            h.key_present[plane] = True
        self._revision += 1
        h.seq[plane] = h.seq.get(plane, 0) + 1
        h.sent[plane] = self.now
        h.rev[plane] = self._revision
        h.lease_deadline[plane] = self.now + self.timings.lease_ttl
        self._health(Heartbeat(h.name, plane, h.seq[plane], self.now, self._revision, h.lease[plane]))

    def _watch_expiry(self, h: SimHost, plane: Plane) -> None:
        if not h.key_present.get(plane, False):
            return
        when = h.lease_deadline[plane] + self.st.lease_slack

        def expire() -> None:
            if not h.key_present.get(plane, False) or self.beats(h, plane):
                return
            if self.now + 1e-9 < h.lease_deadline[plane] + self.st.lease_slack:
                return  # extended meanwhile (etcd leader change): a later check is scheduled
            h.key_present[plane] = False
            self._revision += 1
            self._health(LeaseGone(h.name, plane, self._revision))

        self.at(max(when, self.now), _WORLD, expire)

    # -- world changes (commands) -------------------------------------------------------------

    def _planes_changed(self, h: SimHost) -> None:
        for plane in PLANES:
            if not self.beats(h, plane):
                self._watch_expiry(h, plane)
        storage_ok = self.reaches(h, Plane.STORAGE)
        if not storage_ok and h.renew_lost_at is None:
            h.renew_lost_at = self.now
            if h.powered:
                lost_at = self.now
                self.at(self.now + self.st.storage_kill, _WORLD, lambda: self._sanlock_kill(h, lost_at))
        elif storage_ok and h.renew_lost_at is not None:
            h.renew_lost_at = None
            # Back in the lockspace: leases whose holder died meanwhile are free again.
            for vm in self.vms.values():
                if vm.lease_holder == h.name and h.name not in vm.copies:
                    vm.lease_holder = None
        self._inventory_soon()

    def _sanlock_kill(self, h: SimHost, lost_at: float) -> None:
        if h.renew_lost_at != lost_at or not h.powered:
            return
        killed = [vm.name for vm in self.vms.values() if h.name in vm.copies]
        for name in killed:
            self.vms[name].copies.discard(h.name)
        if killed:
            self.log(Level.INFO, WORLD, f"host '{h.name}': sanlock killed {', '.join(killed)} (storage lost)")

    def cut(self, host: str, planes: list[Plane]) -> None:
        h = self.hosts[host]
        h.cut |= set(planes)
        self._planes_changed(h)

    def restore(self, host: str, planes: list[Plane]) -> None:
        h = self.hosts[host]
        h.cut -= set(planes)
        self._planes_changed(h)

    def power_off(self, host: str) -> None:
        h = self.hosts[host]
        h.powered = False
        gone = [vm.name for vm in self.vms.values() if host in vm.copies]
        for name in gone:
            self.vms[name].copies.discard(host)
        if gone:
            self.log(Level.INFO, WORLD, f"host '{host}': powered off, {', '.join(gone)} gone")
        self._planes_changed(h)

    def agent_stop(self, host: str) -> None:
        """`systemctl stop vmha-agent`: the agent marks its host record, then its heartbeats end
        (their leases expire after the TTL); the VMs run on."""
        h = self.hosts[host]
        h.agent, h.agent_stopped = False, self.now
        self._recover(AgentStopped(host, self.now))
        self._planes_changed(h)

    def agent_kill(self, host: str) -> None:
        """The agent crashes (no mark): its heartbeats end; the host and its VMs run on."""
        h = self.hosts[host]
        h.agent = False
        self._planes_changed(h)

    def agent_start(self, host: str) -> None:
        h = self.hosts[host]
        h.agent = True
        self._planes_changed(h)

    def vm_kill(self, vm: str) -> None:
        """The VM's copies end (a guest crash, an operator's kill outside vmha): their leases are
        released, the hosts run on."""
        v = self.vms[vm]
        gone = sorted(v.copies)
        v.copies.clear()
        if v.lease_holder in gone:
            v.lease_holder = None
        self.log(Level.INFO, WORLD, f"vm '{vm}': copy ended on {', '.join(gone) or 'no host'}")

    def forge_task(self, vm: str, state: TaskState, source: str, dest: str) -> None:
        """Someone with write access to etcd writes tasks/<vm>: a recovery of `vm` off `source` in
        `state`, with a made-up proof, each step before it recorded done. It passes the strict model:
        only the next leader's checks stand between it and an evacuation."""
        t = self.now
        task = Task(vm=vm, source=source, kind=TaskKind.EVACUATE, recovery=1, priority=0, row="storage",
                    action="fence-evacuate", failed={"storage": t}, created=t, state=state, since=t, dest=dest,
                    proof=FenceProof(vm, source, ProofMethod.EXIT_ATTESTED, t, t, {"trail": "made up"}))
        for step in (Step.PROVE, Step.MARK_DOWN, Step.RELEASE)[: [TaskState.MARKING_DOWN, TaskState.READY,
                                                                 TaskState.EVACUATING].index(state) + 1]:
            task.finish(step, t, "ok")
        self.store[vm] = json.loads(json.dumps(task.to_dict()))
        TaskValue.model_validate(self.store[vm])

    def power_on(self, host: str) -> None:
        h = self.hosts[host]
        if h.powered:
            return  # already on: nothing boots
        h.powered = True
        h.agent = True  # the boot starts it
        h.renew_lost_at = None
        for vm in self.vms.values():
            if vm.lease_holder == host and host not in vm.copies:
                vm.lease_holder = None  # a new sanlock generation: the old leases are stale
        self._planes_changed(h)

    def fabric(self, plane: Plane, down: bool, domain: str | None) -> None:
        if down:
            self.fabric_cuts.add((plane, domain))
        else:
            self.fabric_cuts.discard((plane, domain))
        for h in self.hosts.values():
            if domain is None or h.domain == domain:
                self._planes_changed(h)

    def etcd_leader_change(self) -> None:
        """No writes during the election; then every lease gets TTL + 1 s from the new leader."""
        end = self.now + self.st.election
        self.etcd_down_until = end
        self._health(EtcdStatus(False))

        def elected() -> None:
            self._health(EtcdStatus(True))
            for h in self.hosts.values():
                for plane in PLANES:
                    if h.key_present.get(plane, False):
                        h.lease_deadline[plane] = max(
                            h.lease_deadline[plane], self.now + self.timings.lease_ttl + 1
                        )
                        if not self.beats(h, plane):
                            self._watch_expiry(h, plane)

        self.at(end, _WORLD, elected)

    def manager_failover(self) -> None:
        """The leading manager dies; a standby with fresh cores takes over and loads the tasks."""
        # The old manager's actions in flight still act on the world; their results reach no one.
        self.manager.loop.over = True
        self._ticks.clear()
        self.health = self._health_feed()
        self.manager = _Manager(self)
        tasks = tuple(Task.from_dict(json.loads(json.dumps(d))) for _, d in sorted(self.store.items()))
        self.log(Level.INFO, SIM, f"manager failover: the new leader loads {len(tasks)} task(s)")
        for h in self.hosts.values():
            self._health(HostSeen(h.name, h.domain))
        # The new leader lists the heartbeat keys: a present key is a value, an absent one is gone.
        for h in self.hosts.values():
            for plane in PLANES:
                if h.key_present.get(plane, False):
                    self._health(
                        Heartbeat(h.name, plane, h.seq[plane], h.sent[plane], h.rev[plane], h.lease[plane])
                    )
                else:
                    self._health(LeaseGone(h.name, plane, self._revision))
        self._recover(TasksLoaded(tasks))
        for h in self.hosts.values():
            # What the old leader did to a host and no one undid (the keys.disabled records).
            if h.forced_down:
                self._recover(HostOut(h.name, HostOp.MARK_DOWN, h.quarantined))
            elif h.disabled:
                self._recover(HostOut(h.name, HostOp.DISABLE, h.quarantined))
        for h in self.hosts.values():
            if h.maintenance:
                self._recover(Maintenance(h.name, True))
            if h.agent_stopped is not None:
                self._recover(AgentStopped(h.name, h.agent_stopped))
        self._recover(self._inventory())

    def enable(self, host: str) -> None:
        """`vmha host enable HOST`: the operator re-enables a repaired host (Nova: enable the
        service, clear forced_down; the manager sees keys.disabled(HOST) deleted)."""
        h = self.hosts[host]
        h.disabled = h.forced_down = False
        h.quarantined = ""
        self._recover(HostEnabled(host))
        self._inventory_soon()

    def maintenance(self, host: str, on: bool) -> None:
        """`vmha host maintenance HOST on|off` (keys.maintenance(HOST) written / deleted)."""
        self.hosts[host].maintenance = on
        self._recover(Maintenance(host, on))

    def fail_next(self, kind: str, name: str, count: int, retryable: bool = True) -> None:
        self.failures.setdefault((kind, name), []).extend([retryable] * count)

    def _scripted_failure(self, kind: str, name: str) -> bool | None:
        """None: no failure scripted; else the failure's retryable flag."""
        queue = self.failures.get((kind, name))
        return queue.pop(0) if queue else None

    def _inventory(self) -> Inventory:
        return Inventory(
            tuple(HostInfo(h.name, not h.disabled, h.powered, h.forced_down) for h in self.hosts.values()),
            tuple(
                VmInfo(v.name, v.host, v.ha, v.priority, "running" if v.copies else "stopped")
                for v in self.vms.values()
            ),
        )

    def _inventory_soon(self) -> None:
        """The runtime refreshes the inventory after the world changed (once per instant)."""
        if self._inventory_at == self.now:
            return
        self._inventory_at = self.now
        manager = self.manager
        self.at(self.now, _WORLD, lambda: manager.feed([self._inventory()]))

    # -- actions (the Env of the manager's runtime loop, _Manager, calls these) -----------------

    async def disable(self, host: str) -> None:
        await self.sleep(self.st.disable)
        self.hosts[host].disabled = True
        self._inventory_soon()

    async def enable_host(self, host: str) -> None:
        await self.sleep(self.st.disable)
        h = self.hosts[host]
        h.disabled = h.forced_down = False
        self._inventory_soon()

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        """The runtime's rejoin check: the host renews its lockspace and holds no lease of a VM that
        runs elsewhere (a stray copy)."""
        await self.sleep(self.st.rejoin_check)
        h = self.hosts[host]
        stray = [v for v in vms if self.vms[v].lease_holder == host and self.vms[v].host != host]
        if not h.powered or h.renew_lost_at is not None:
            raise Refused("its lockspace is not renewed")
        if stray:
            raise Refused(f"it holds the lease of {', '.join(stray)}, which run elsewhere")
        return "lockspace renewed, holds none of the leases of " + (", ".join(vms) or "-")

    async def mark_down(self, host: str) -> None:
        await self.sleep(self.st.mark_down)
        failure = self._scripted_failure("mark-down", host)
        if failure is not None:
            raise DriverError("scripted failure", retryable=failure)
        self.hosts[host].forced_down = True
        self._inventory_soon()

    async def prove(self, name: str, host: str, methods: Sequence[ProofMethod]) -> FenceProof:
        started = self.now
        vm, h = self.vms[name], self.hosts[host]
        failure = self._scripted_failure("proof", name)
        if failure is not None:
            await self.sleep(self.st.refuse_after)
            raise Refused("scripted refusal", failure)
        for method in methods:
            when = self._proof_time(method, vm, h)
            if when is None:
                continue
            await _Wake(when)
            if not self._proof_holds(method, vm, h):
                raise Refused(f"{method.value} no longer holds")
            if self._held_elsewhere(vm, h):
                # Every method ends by taking the lease, which a copy started elsewhere meanwhile (a
                # deposed leader's evacuation) holds: refused, after a power fence has switched off.
                if method == ProofMethod.POWER and h.powered:
                    self.power_off(h.name)
                raise Refused(f"{method.value}: the lease is held by '{vm.lease_holder}'")
            self._proof_effect(method, vm, h)
            return FenceProof(name, host, method, started, self.now, {"sim": "scripted"})
        await self.sleep(self.st.refuse_after)
        raise Refused("no method applies yet")

    @staticmethod
    def _held_elsewhere(vm: SimVm, h: SimHost) -> bool:
        """The VM's lease is held by another host than the proof's (a copy runs there, or ran there and
        the host has not renewed since): no method can take it (the prover's checks of the lease's
        owner and its acquire refuse)."""
        return vm.lease_holder not in (None, MANAGER_HOLDS, h.name)

    def _proof_time(self, method: ProofMethod, vm: SimVm, h: SimHost) -> float | None:
        d = self.now + self.st.proof_delay.get(method, 1.0)
        if method != ProofMethod.POWER and self._held_elsewhere(vm, h):
            return None  # the lease's owner is not this host: these methods refuse at once
        match method:
            case ProofMethod.LEASE_TAKEN:
                free = h.name not in vm.copies and vm.lease_holder != h.name
                return d if free else None
            case ProofMethod.REQUEST_FORCE:
                return d if h.powered and h.renew_lost_at is None else None
            case ProofMethod.EXIT_ATTESTED:
                if not self.beats(h, Plane.MANAGEMENT):
                    return None
                if h.name not in vm.copies:
                    return d
                # The copy still runs: the agent can attest only once sanlock has killed it.
                if h.renew_lost_at is not None:
                    return max(d, h.renew_lost_at + self.st.storage_kill)
                return None
            case ProofMethod.POWER:
                # Refused while the host renews its lockspace (alive on the shared storage).
                return d if not h.powered or h.renew_lost_at is not None else None
            case ProofMethod.HOST_DEAD:
                if h.renew_lost_at is None:
                    return None
                return max(d, h.renew_lost_at + self.st.host_dead)
        return None

    def _proof_holds(self, method: ProofMethod, vm: SimVm, h: SimHost) -> bool:
        """At completion: the world may have changed since the attempt began (the host came back)."""
        match method:
            case ProofMethod.LEASE_TAKEN:
                return h.name not in vm.copies and vm.lease_holder != h.name
            case ProofMethod.REQUEST_FORCE:
                return h.powered and h.renew_lost_at is None
            case ProofMethod.EXIT_ATTESTED:
                return self.beats(h, Plane.MANAGEMENT) and h.name not in vm.copies
            case ProofMethod.HOST_DEAD:
                return h.renew_lost_at is not None and self.now + 1e-9 >= h.renew_lost_at + self.st.host_dead
        return True  # POWER: the fence itself turns the host off

    def _proof_effect(self, method: ProofMethod, vm: SimVm, h: SimHost) -> None:
        if method == ProofMethod.POWER and h.powered:
            self.power_off(h.name)
        if h.name in vm.copies:
            vm.copies.discard(h.name)
            self.log(Level.INFO, WORLD, f"vm '{vm.name}': copy on '{h.name}' killed ({method.value})")
        if vm.lease_holder in (h.name, None):
            vm.lease_holder = MANAGER_HOLDS

    async def release(self, vm: str) -> None:
        await self.sleep(self.st.release)
        v = self.vms[vm]
        if v.lease_holder == MANAGER_HOLDS:
            v.lease_holder = None

    async def evacuate(self, name: str, source: str, dest: str | None, proof: str) -> str:
        recovery = int(str(self.store.get(name, {}).get("recovery", 0)))  # persisted before it acts
        await self.sleep(self.st.evacuate)
        vm, src = self.vms[name], self.hosts[source]
        failure = self._scripted_failure("evacuate", name)
        elsewhere = sorted(vm.copies - {source})
        if failure is not None:
            raise DriverError("scripted failure", retryable=failure)
        if elsewhere:
            self.log(Level.INFO, WORLD, f"evacuate vm '{name}': already running on '{elsewhere[0]}'")
            return elsewhere[0]
        if not src.forced_down and dest != source:
            # A restart on the rejoined source itself needs no evacuation from a downed host (the lab
            # driver starts a copy there; it refuses while a copy still runs).
            raise DriverError("source compute service in use")
        if vm.lease_holder is not None:
            raise DriverError(f"lease held by {vm.lease_holder}")
        where = dest or "?"
        if source in vm.copies:
            self.split_brain += 1
            self.log(Level.ERROR, WORLD, f"SPLIT BRAIN: vm '{name}' still runs on '{source}'")
        vm.copies.add(where)
        vm.host, vm.lease_holder = where, where
        self.restarts[(name, recovery)] = self.restarts.get((name, recovery), 0) + 1
        self.evacuated.append((self.now, name, source))
        self.log(Level.INFO, WORLD, f"vm '{name}' started on '{where}' (proof {proof})")
        self._inventory_soon()
        return where

    async def migrate(self, name: str, source: str, dest: str | None) -> str:
        await self.sleep(self.st.migrate)
        vm = self.vms[name]
        failure = self._scripted_failure("migrate", name)
        if failure is not None:
            raise DriverError("scripted failure", retryable=failure)
        if dest is not None and vm.copies == {dest}:
            return dest
        if vm.copies != {source} or not self.reaches(self.hosts[source], Plane.STORAGE):
            raise DriverError("vm not running on source", retryable=False)
        where = dest or "?"
        vm.copies = {where}
        vm.host, vm.lease_holder = where, where
        self.log(Level.INFO, WORLD, f"vm '{name}' live-migrated to '{where}'")
        self._inventory_soon()
        return where

    # -- the end ------------------------------------------------------------------------------

    def summary(self) -> list[str]:
        """Final state, appended to a scenario's log: where each VM runs and how its task ended."""
        lines = []
        for vm in self.vms.values():
            task = self.manager.loop.core.task(vm.name)
            where = ",".join(sorted(vm.copies)) or "nowhere"
            t = "no task" if task is None else f"task {task.recovery} {task.state.value}"
            if task is not None and task.attempts:
                t += f" after {task.attempts} failed attempt(s)"
            if vm.lease_holder == MANAGER_HOLDS:
                t += "; its lease held by the manager"
            lines.append(f"end: vm '{vm.name}' running on {where}; {t}")
        return lines


class Refused(Exception):
    """A simulated proof's or rejoin check's refusal (retryable False: give up at once)."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.retryable = retryable


class _Wake:
    """What a simulated action awaits: the virtual clock reaching `t`."""

    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t

    def __await__(self) -> Generator[_Wake, None, None]:
        yield self


class _Action:
    """A spawned action on the virtual clock: run at once up to its first wait, resumed (in the world
    phase) when the clock reaches it; cancel() raises CancelledError at its wait, as asyncio does.
    `after` runs once the action has paused or ended: the results it fed are stepped then, as the
    daemon's loop takes them from its inbox only after the action that put them there yields."""

    def __init__(self, sim: Sim, coro: Coroutine[Any, Any, None], after: Callable[[], None]) -> None:
        self._sim, self._coro, self._after = sim, coro, after
        self._done = False
        self._wakes = 0  # the resumption scheduled last; an earlier one is void
        self._resume(None)

    def _resume(self, exc: BaseException | None) -> None:
        if self._done:
            return
        try:
            wake = self._coro.send(None) if exc is None else self._coro.throw(exc)
        except (StopIteration, asyncio.CancelledError):
            self._done = True
            self._after()
            return
        self._after()
        if not isinstance(wake, _Wake):
            raise TypeError(f"a simulated action awaited {wake!r}, not the virtual clock")
        self._wakes += 1
        n = self._wakes
        self._sim.at(wake.t, _WORLD, lambda: self._resume(None) if n == self._wakes else None)

    def done(self) -> bool:
        return self._done

    def cancel(self, msg: Any | None = None) -> bool:
        if self._done:
            return False
        self._resume(asyncio.CancelledError(msg))
        return True


class _Manager:
    """The leading manager in the simulator: its runtime loop (the daemon's, vmha.runtime.loop) on a
    fresh RecoveryCore, and the Env it acts through: the sim's world, answering on its virtual clock.
    An event that arrives while a step runs (an action's immediate result) is stepped right after it,
    with the others that arrived meanwhile, as the daemon's inbox batches them."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.loop = Loop(RecoveryCore(sim.policy, sim.settings), self, proof_timeout=0.0)
        self._pending: list[RecoveryEvent] = []
        self._stepping = False

    def feed(self, events: Sequence[RecoveryEvent]) -> None:
        if not self.loop.over:
            self._pending += events
        self._drain()

    def _drain(self) -> None:
        if self._stepping or not self._pending:
            return
        self._stepping = True
        try:
            while self._pending and not self.loop.over:
                batch, self._pending = self._pending, []
                run_now(self.loop.step(batch))
        finally:
            self._stepping = False
        self.sim._schedule_tick("recovery", self.loop.core.next_deadline())

    # -- vmha.runtime.env.Env ---------------------------------------------------------------------

    def now(self) -> float:
        return self.sim.now

    def log(self, lines: Sequence[LogLine]) -> None:
        self.sim.lines.extend(lines)

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        # It must survive JSON and the strict model a leader reads it with, as in etcd.
        for vm, data in tasks.items():
            self.sim.store[vm] = json.loads(json.dumps(data))
            TaskValue.model_validate(self.sim.store[vm])
        for r in records:
            self.sim.records[(r.vm, r.recovery)] = json.loads(json.dumps(r.data))
            TaskValue.model_validate(self.sim.records[(r.vm, r.recovery)])

    def alert(self, alert: Alert) -> None:
        self.sim.log(alert.level, "alert", alert.text)

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        return await self.sim.prove(vm, host, methods)

    async def release(self, vm: str) -> None:
        await self.sim.release(vm)

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        return await self.sim.evacuate(vm, source, dest, proof.method.value)

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        return await self.sim.migrate(vm, source, dest)

    async def disable(self, host: str, reason: str) -> None:
        await self.sim.disable(host)

    async def mark_down(self, host: str) -> None:
        await self.sim.mark_down(host)

    async def enable(self, host: str) -> None:
        await self.sim.enable_host(host)

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        return await self.sim.check_rejoin(host, vms)

    async def quarantine(self, host: str, reason: str) -> None:
        self.sim.hosts[host].quarantined = reason

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> Running:
        return _Action(self.sim, coro, self._drain)

    def result(self, event: RecoveryEvent) -> None:
        if not self.loop.over:
            self._pending.append(event)
