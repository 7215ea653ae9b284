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
  waits for sanlock's kill if storage is lost), power (if configured), host-dead.
- Nova: evacuation needs the source marked down (unless it restarts the VM on its rejoined source),
  the VM lease free (released by the manager) and no copy running elsewhere (then it reports where
  it runs: idempotent); a copy still running on the source at restart is logged as SPLIT BRAIN, the
  error every scenario checks for.
- A manager failover drops the old manager's pending results (their effects on the world still
  happen) and starts new cores that load the persisted tasks.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import (
    EtcdStatus,
    HealthCore,
    HealthEvent,
    HealthTick,
    HealthTimings,
    Heartbeat,
    HostSeen,
    LeaseGone,
)
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import PolicyTable
from vmha.core.queue import Step, Task, TaskKind, TaskState
from vmha.core.recovery import (
    AgentStopped,
    Alert,
    CancelProof,
    CheckRejoin,
    DisableHost,
    DropProof,
    EnableHost,
    Evacuate,
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
    RecoverySettings,
    RejoinChecked,
    ReleaseProof,
    StepDone,
    StepFailed,
    TasksLoaded,
    from_health,
)
from vmha.core.recovery import Tick as RecoveryTick
from vmha.drivers.base import HostInfo, VmInfo
from vmha.etcd.values import TaskValue

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
        self.cancelled: set[tuple[int, Prove]] = set()  # (epoch, Prove) of cancelled proofs
        self.etcd_down_until = 0.0
        self.epoch = 0
        self.split_brain = 0
        self.restarts: dict[str, int] = {}  # vm -> copies started by evacuation
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = 0
        self._revision = 0
        self._lease_ids = 0
        self._ticks: set[tuple[str, float]] = set()
        self._inventory_at: float | None = None
        self._proving: set[tuple[int, Prove]] = set()  # proofs whose completion is scheduled
        self.health = HealthCore(timings)
        self.recovery = RecoveryCore(policy, settings)
        self._start()

    # -- clock --------------------------------------------------------------------------------

    def at(self, t: float, phase: int, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, phase, self._seq, fn))

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, _, fn = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            fn()
        self.now = max(self.now, until)

    def log(self, level: Level, actor: str, text: str) -> None:
        self.lines.append(LogLine(level, self.now, actor, text))

    # -- cores --------------------------------------------------------------------------------

    def _start(self) -> None:
        for h in self.hosts.values():
            self._health(HostSeen(h.name, h.domain))
        self._recover(self._inventory())
        self.at(0.0, _BEAT, lambda: self._beat(0))

    def _health(self, ev: HealthEvent) -> None:
        out = self.health.step(ev, self.now)
        if self.log_health:
            self.lines.extend(out.log)
        for rev in from_health(out):
            self._recover(rev)
        self._schedule_tick("health", self.health.next_deadline())

    def _recover(self, ev: RecoveryEvent) -> None:
        out = self.recovery.step(ev, self.now)
        self.lines.extend(out.log)
        for action in out.actions:
            self._execute(action)
        self._schedule_tick("recovery", self.recovery.next_deadline())

    def _schedule_tick(self, which: str, deadline: float | None) -> None:
        if deadline is None or deadline <= self.now or (which, deadline) in self._ticks:
            return
        self._ticks.add((which, deadline))
        epoch = self.epoch

        def fire() -> None:
            self._ticks.discard((which, deadline))
            if epoch != self.epoch:
                return
            if which == "health":
                self._health(HealthTick())
            else:
                self._recover(RecoveryTick())

        self.at(deadline + _TICK_SLACK, _TICK, fire)

    def _deliver(self, ev: RecoveryEvent, epoch: int) -> None:
        """A result reaches the manager that asked, if it still leads."""
        if epoch == self.epoch:
            self._recover(ev)

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
        self.epoch += 1
        self._ticks.clear()
        self.health = HealthCore(self.timings)
        self.recovery = RecoveryCore(self.policy, self.settings)
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
        epoch = self.epoch
        self.at(self.now, _WORLD, lambda: self._deliver(self._inventory(), epoch))

    # -- actions ------------------------------------------------------------------------------

    def _execute(self, action: RecoveryAction) -> None:
        epoch = self.epoch
        match action:
            case PersistTask(vm, data):
                # It must survive JSON and the strict model a leader reads it with, as in etcd.
                self.store[vm] = json.loads(json.dumps(data))
                TaskValue.model_validate(self.store[vm])
            case RecordEvidence(vm, recovery, data):
                self.records[(vm, recovery)] = json.loads(json.dumps(data))
                TaskValue.model_validate(self.records[(vm, recovery)])
            case Alert(level, _, _, text):
                self.log(level, "alert", text)
            case DisableHost(host, _):
                self.at(self.now + self.st.disable, _WORLD, lambda: self._disable(host, epoch))
            case EnableHost(host, _):
                self.at(self.now + self.st.disable, _WORLD, lambda: self._enable_done(host, epoch))
            case QuarantineHost(host, reason):
                self.hosts[host].quarantined = reason
            case CheckRejoin(host, vms):
                self.at(self.now + self.st.rejoin_check, _WORLD, lambda: self._check_rejoin(host, vms, epoch))
            case MarkHostDown(host):
                self.at(self.now + self.st.mark_down, _WORLD, lambda: self._mark_down(host, epoch))
            case Prove():
                self._prove(action, epoch)
            case CancelProof(vm, host, attempt):
                self.cancelled |= {(e, p) for e, p in self._proving if e == epoch and p.vm == vm
                                   and p.attempt == attempt}
                self.at(
                    self.now,
                    _WORLD,
                    lambda: self._deliver(ProofRefused(vm, host, attempt, "cancelled", retryable=False), epoch),
                )
            case ReleaseProof(vm, _, _):
                self.at(self.now + self.st.release, _WORLD, lambda: self._release(vm, epoch))
            case DropProof(vm, _):
                self.at(self.now + self.st.release, _WORLD, lambda: self._drop(vm))
            case Evacuate():
                self.at(self.now + self.st.evacuate, _WORLD, lambda: self._evacuate(action, epoch))
            case LiveMigrate():
                self.at(self.now + self.st.migrate, _WORLD, lambda: self._migrate(action, epoch))

    def _disable(self, host: str, epoch: int) -> None:
        self.hosts[host].disabled = True
        self._deliver(HostOpDone(host, HostOp.DISABLE), epoch)
        self._inventory_soon()

    def _enable_done(self, host: str, epoch: int) -> None:
        h = self.hosts[host]
        h.disabled = h.forced_down = False
        self._deliver(HostOpDone(host, HostOp.ENABLE), epoch)
        self._inventory_soon()

    def _check_rejoin(self, host: str, vms: tuple[str, ...], epoch: int) -> None:
        """The runtime's rejoin check: the host renews its lockspace and holds no lease of a VM that
        runs elsewhere (a stray copy)."""
        h = self.hosts[host]
        stray = [v for v in vms if self.vms[v].lease_holder == host and self.vms[v].host != host]
        if not h.powered or h.renew_lost_at is not None:
            ev = RejoinChecked(host, False, "its lockspace is not renewed")
        elif stray:
            ev = RejoinChecked(host, False, f"it holds the lease of {', '.join(stray)}, which run elsewhere")
        else:
            ev = RejoinChecked(host, True, "lockspace renewed, holds none of the leases of " + (", ".join(vms) or "-"))
        self._deliver(ev, epoch)

    def _mark_down(self, host: str, epoch: int) -> None:
        failure = self._scripted_failure("mark-down", host)
        if failure is not None:
            self._deliver(HostOpFailed(host, HostOp.MARK_DOWN, "scripted failure", failure), epoch)
            return
        self.hosts[host].forced_down = True
        self._deliver(HostOpDone(host, HostOp.MARK_DOWN), epoch)
        self._inventory_soon()

    def _prove(self, p: Prove, epoch: int) -> None:
        started = self.now
        vm, h = self.vms[p.vm], self.hosts[p.host]
        failure = self._scripted_failure("proof", p.vm)
        if failure is not None:
            ev = ProofRefused(p.vm, p.host, p.attempt, "scripted refusal", failure)
            self.at(self.now + self.st.refuse_after, _WORLD, lambda: self._deliver(ev, epoch))
            return
        for method in p.methods:
            when = self._proof_time(method, vm, h)
            if when is None:
                continue
            self._proving.add((epoch, p))

            def complete(method: ProofMethod = method) -> None:
                self._proving.discard((epoch, p))
                if (epoch, p) in self.cancelled:
                    self.cancelled.discard((epoch, p))
                    return
                if not self._proof_holds(method, vm, h):
                    self._deliver(
                        ProofRefused(p.vm, p.host, p.attempt, f"{method.value} no longer holds", True), epoch
                    )
                    return
                self._proof_effect(method, vm, h)
                proof = FenceProof(p.vm, p.host, method, started, self.now, {"sim": "scripted"})
                self._deliver(ProofObtained(proof, p.attempt), epoch)

            self.at(when, _WORLD, complete)
            return
        ev = ProofRefused(p.vm, p.host, p.attempt, "no method applies yet", True)
        self.at(self.now + self.st.refuse_after, _WORLD, lambda: self._deliver(ev, epoch))

    def _proof_time(self, method: ProofMethod, vm: SimVm, h: SimHost) -> float | None:
        d = self.now + self.st.proof_delay.get(method, 1.0)
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

    def _drop(self, vm: str) -> None:
        v = self.vms[vm]
        if v.lease_holder == MANAGER_HOLDS:
            v.lease_holder = None

    def _release(self, vm: str, epoch: int) -> None:
        self._drop(vm)
        self._deliver(StepDone(vm, Step.RELEASE), epoch)

    def _evacuate(self, e: Evacuate, epoch: int) -> None:
        vm, src = self.vms[e.vm], self.hosts[e.source]
        failure = self._scripted_failure("evacuate", e.vm)
        elsewhere = sorted(vm.copies - {e.source})
        if failure is not None:
            self._deliver(StepFailed(e.vm, Step.EVACUATE, "scripted failure", failure), epoch)
        elif elsewhere:
            self.log(Level.INFO, WORLD, f"evacuate vm '{e.vm}': already running on '{elsewhere[0]}'")
            self._deliver(StepDone(e.vm, Step.EVACUATE, elsewhere[0], "already there"), epoch)
        elif not src.forced_down and e.dest != e.source:
            # A restart on the rejoined source itself needs no evacuation from a downed host (the lab
            # driver starts a copy there; it refuses while a copy still runs).
            self._deliver(StepFailed(e.vm, Step.EVACUATE, "source compute service in use", True), epoch)
        elif vm.lease_holder is not None:
            self._deliver(StepFailed(e.vm, Step.EVACUATE, f"lease held by {vm.lease_holder}", True), epoch)
        else:
            dest = e.dest or "?"
            if e.source in vm.copies:
                self.split_brain += 1
                self.log(Level.ERROR, WORLD, f"SPLIT BRAIN: vm '{e.vm}' still runs on '{e.source}'")
            vm.copies.add(dest)
            vm.host, vm.lease_holder = dest, dest
            self.restarts[e.vm] = self.restarts.get(e.vm, 0) + 1
            self.log(Level.INFO, WORLD, f"vm '{e.vm}' started on '{dest}' (proof {e.proof.method.value})")
            self._deliver(StepDone(e.vm, Step.EVACUATE, dest), epoch)
            self._inventory_soon()

    def _migrate(self, m: LiveMigrate, epoch: int) -> None:
        vm = self.vms[m.vm]
        failure = self._scripted_failure("migrate", m.vm)
        if failure is not None:
            self._deliver(StepFailed(m.vm, Step.MIGRATE, "scripted failure", failure), epoch)
        elif m.dest is not None and vm.copies == {m.dest}:
            self._deliver(StepDone(m.vm, Step.MIGRATE, m.dest, "already there"), epoch)
        elif vm.copies != {m.source} or not self.reaches(self.hosts[m.source], Plane.STORAGE):
            self._deliver(StepFailed(m.vm, Step.MIGRATE, "vm not running on source", False), epoch)
        else:
            dest = m.dest or "?"
            vm.copies = {dest}
            vm.host, vm.lease_holder = dest, dest
            self.log(Level.INFO, WORLD, f"vm '{m.vm}' live-migrated to '{dest}'")
            self._deliver(StepDone(m.vm, Step.MIGRATE, dest), epoch)
            self._inventory_soon()

    # -- the end ------------------------------------------------------------------------------

    def summary(self) -> list[str]:
        """Final state, appended to a scenario's log: where each VM runs and how its task ended."""
        lines = []
        for vm in self.vms.values():
            task = self.recovery.task(vm.name)
            where = ",".join(sorted(vm.copies)) or "nowhere"
            t = "no task" if task is None else f"task {task.recovery} {task.state.value}"
            if task is not None and task.attempts:
                t += f" after {task.attempts} failed attempt(s)"
            if vm.lease_holder == MANAGER_HOLDS:
                t += "; its lease held by the manager"
            lines.append(f"end: vm '{vm.name}' running on {where}; {t}")
        return lines
