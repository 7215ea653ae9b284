"""RecoveryCore: the manager's decisions, from host health to recoveries (pure; events in, actions out).

    core = RecoveryCore(policy, RecoverySettings(...))
    out = core.step(event, now)     # out.actions: run them in order, feed each result back as an event
    core.next_deadline()            # call core.step(Tick(), t) no later than this

The runtime executes `out.actions` in list order: a PersistTask always comes before the action of
the step it records (persist, then act), so a leader that dies between the two leaves a task whose
state names the step in flight, and the next leader repeats only that (idempotent) step.

Per host, the policy row of its plane states decides (policy.py): alert, disable, live-migrate
(no proof), or isolate-/fence-evacuate: for every HA VM of the host a task proves the old copy dead
(fencing.proof_methods), the host is marked down, then, by priority and within the concurrency
limits, the proof lease is released and the VM evacuated to the least loaded healthy host.

THE INVARIANT: no Evacuate without a FenceProof for that VM and host. It is enforced in one place,
`Evacuate.__post_init__`: the action cannot be built otherwise, so no code path can emit one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from vmha.core.actions import (
    Alert,
    CancelProof,
    CheckRejoin,
    DisableHost,
    DropProof,
    EnableHost,
    Evacuate,
    InvariantError,
    LiveMigrate,
    MarkHostDown,
    PersistTask,
    Prove,
    QuarantineHost,
    RecordEvidence,
    RecoveryOutput,
    ReleaseProof,
)
from vmha.core.desired import RESTART, STOPPED, STOPPED_KEY, StoppedVms, observing_methods
from vmha.core.events import (
    AgentStopped,
    Attempt,
    FabricUpdate,
    HealthUpdate,
    HostEnabled,
    HostLike,
    HostOp,
    HostOpDone,
    HostOpFailed,
    HostOut,
    Inventory,
    Maintenance,
    Paused,
    ProofObtained,
    ProofRefused,
    RecoveryEvent,
    RejoinChecked,
    StepDone,
    StepFailed,
    TasksLoaded,
    Tick,
    VmLike,
)
from vmha.core.fencing import FenceProof, ProofMethod, proof_methods
from vmha.core.health import FabricChange, HostHealth
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import AGENT_STOPPED_KEY, FABRIC_KEY, MAINTENANCE_KEY, Action, Decision, PolicyTable
from vmha.core.queue import (
    ACTOR,
    RUNNING,
    STEP_STATE,
    TERMINAL,
    RecoveryQueue,
    Step,
    Task,
    TaskKind,
    TaskState,
)
from vmha.core.rebalance import REBALANCE_KEY, plan
from vmha.core.settings import RecoverySettings

# -- the core --------------------------------------------------------------------------------------

_EVACUATING_ACTIONS = frozenset({Action.ISOLATE_EVACUATE, Action.FENCE_EVACUATE})
_MOVING_ACTIONS = _EVACUATING_ACTIONS | {Action.LIVE_MIGRATE}


@dataclass(slots=True)
class _HostDecision:
    decision: Decision
    since: float  # when the row took effect
    act_at: float  # when to act on it, if it still holds
    acted: bool = False
    waiting_inventory: bool = False


class RecoveryCore:
    def __init__(self, policy: PolicyTable, settings: RecoverySettings) -> None:
        self.policy = policy
        self.settings = settings
        self.queue = RecoveryQueue(settings.limits)
        self._health: dict[str, HostHealth] = {}
        self._decisions: dict[str, _HostDecision] = {}
        self._held: set[str] = set()  # hosts whose decision waits (decide_after, inventory)
        self._hosts: dict[str, HostLike] = {}
        self._vms: dict[str, VmLike] = {}
        self._placed: dict[str, str | None] = {}  # vm -> host, updated by our own moves too
        self._vms_on: dict[str, set[str]] = {}  # host -> VMs placed there (all, HA or not)
        self._inventory = False
        self._by_source: dict[str, set[str]] = {}  # host -> VMs with a task from it
        self._disabled: set[str] = set()  # disable requested (done or in flight)
        self._marked_down: set[str] = set()
        self._marking_down: set[str] = set()  # MarkHostDown in flight
        # VMs recovered (done / failed) from a host while it stayed failed: no second task for them
        # until the host has been seen healthy again.
        self._settled: dict[str, set[str]] = {}
        # vm -> the attempt of a Prove cancelled in flight (its task cancelled): a proof that still
        # arrives for it continues the recovery
        self._late_proof: dict[str, Attempt] = {}
        self._dests: list[str] | None = None  # eligible destinations, sorted (None: recompute)
        self._dest_set: set[str] = set()
        self._agent_stopped: dict[str, float] = {}  # host -> when its agent was stopped cleanly
        # (load, host) of eligible destinations, least loaded first. Every load change pushes a
        # fresh entry (_touch); entries whose load is no longer current are dropped when popped.
        self._dest_heap: list[tuple[int, str]] = []
        # Rejoin: hosts taken out by us (disabled / marked down) and healthy since (every plane UP);
        # the row that took each out; those waiting for unproved recoveries from them; those whose
        # CheckRejoin or EnableHost is in flight; those enabled by a rejoin (their keys.disabled
        # deletion comes back as HostEnabled: not the operator's).
        self._healthy_since: dict[str, float] = {}
        self._out_row: dict[str, str] = {}
        self._rejoin_wait: set[str] = set()
        self._rejoin_retry: dict[str, float] = {}  # host -> not before (its last check or enable failed)
        self._rejoining: set[str] = set()
        self._rejoined: set[str] = set()
        # Quarantine: per host, its failures (when, row) within quarantine_window; the hosts whose
        # current failure episode is counted; the hosts kept out until the operator enables them.
        self._failures: dict[str, list[tuple[float, str]]] = {}
        self._episode: set[str] = set()
        self._quarantined: set[str] = set()
        # Hosts in maintenance, and why: "operator" (`vmha host maintenance`), "agent" (a clean agent
        # stop with on_agent_stop = drain). Either keeps it; each ends only its own.
        self._maintenance: dict[str, set[str]] = {}
        # Recoveries paused cluster-wide (Paused); the hosts whose action waits for the resume.
        self._paused = False
        self._pause_held: set[str] = set()
        # Desired state: protected VMs seen stopped; why each due one waits (logged when it changes).
        self._stopped = StoppedVms(settings.restart_after)
        self._restart_wait: dict[str, str] = {}
        # Rebalancing: a host became a destination again (a round is due); no round before this time.
        self._rebalance_due = False
        self._rebalance_next = 0.0
        # Evacuate tasks loaded by this leader and not yet checked against the world (_verify_resumed):
        # nothing is done for them until then.
        self._unverified: set[str] = set()
        # vm -> the destination and proof of a previous leader's evacuation, perhaps still in flight, of a
        # resumed task this leader proves again: seen running there, it is the recovery's restart.
        self._deposed: dict[str, tuple[str, FenceProof | None]] = {}

    # -- queries ----------------------------------------------------------------------------------

    def tasks(self) -> list[Task]:
        return list(self.queue)

    def task(self, vm: str) -> Task | None:
        return self.queue.get(vm)

    def next_deadline(self) -> float | None:
        deadlines = [t.retry_at for t in self.queue.in_state(TaskState.RETRY_WAIT) if t.retry_at is not None]
        deadlines += [
            d.act_at
            for h, d in self._decisions.items()
            if not d.acted and d.decision.action is not None and h not in self._pause_held
        ]
        deadlines += [self._rejoin_at(h) for h in self._healthy_since
                      if h not in self._rejoin_wait and h not in self._rejoining]
        return min(deadlines) if deadlines else None

    def _in_flight(self) -> bool:
        """Some task is not finished."""
        return len(self.queue) > sum(self.queue.count(s) for s in TERMINAL)

    def quarantined(self) -> list[str]:
        return sorted(self._quarantined)

    # -- the step ---------------------------------------------------------------------------------

    def step(self, event: RecoveryEvent, now: float) -> RecoveryOutput:
        out = RecoveryOutput()
        match event:
            case HealthUpdate(health):
                self._health[health.host] = health
                if self._dests is not None and self._is_eligible(health.host) != (health.host in self._dest_set):
                    self._dests = None
                self._reconcile(health.host, now, out)
            case FabricUpdate(change):
                self._fabric(change, now, out)
            case Inventory():
                self._set_inventory(event, now, out)
            case ProofObtained(proof, attempt):
                self._proof_obtained(proof, attempt, now, out)
            case ProofRefused(vm, host, attempt, reason, retryable, alert):
                self._proof_refused(vm, host, attempt, reason, retryable, now, out, alert)
            case StepDone():
                self._step_done(event, now, out)
            case StepFailed(vm, step, reason, retryable):
                task = self._expect(vm, step, now, out)
                if task is not None:
                    self._fail_step(task, step, reason, retryable, now, out)
            case HostOpDone(host, op):
                self._host_op_done(host, op, now, out)
            case HostOpFailed(host, op, reason, retryable):
                self._host_op_failed(host, op, reason, retryable, now, out)
            case HostEnabled(host):
                self._host_enabled(host, now, out)
            case HostOut(host, op, quarantine):
                self._host_out(host, op, quarantine, now, out)
            case RejoinChecked(host, ok, evidence):
                self._rejoin_checked(host, ok, evidence, now, out)
            case AgentStopped(host, since):
                if since is None:
                    self._agent_stopped.pop(host, None)
                else:
                    self._agent_stopped[host] = since
                if self.settings.on_agent_stop == "drain":
                    # A clean stop drains the host first; the agent running again ends that drain.
                    self._maintenance_set(host, "agent", since is not None, "its agent was stopped cleanly"
                                          if since is not None else "its agent runs again", now, out)
                self._reconcile(host, now, out)
            case Maintenance(host, on):
                self._maintenance_set(host, "operator", on, "by the operator", now, out)
            case Paused(on, why):
                self._pause(on, why, now, out)
            case TasksLoaded(tasks):
                self._load(tasks, now, out)
            case Tick():
                pass
        self._timers(now, out)
        if self._stopped:
            self._restart_stopped(now, out)
        if self.queue.count(TaskState.UNPLACED):
            # Room may have come (a host healthy or enabled, a VM gone) or been freed for them (a
            # higher-priority evacuation ended without a place).
            self._unblock_unplaced(now, out)
        if self._rebalance_due and now >= self._rebalance_next and isinstance(event, Inventory):
            self._rebalance(now, out)  # on a fresh inventory: the returned host's flags, settled loads
        self._dispatch(now, out)
        return out

    # -- host decisions ---------------------------------------------------------------------------

    def _reconcile(self, host: str, now: float, out: RecoveryOutput) -> None:
        hh = self._health.get(host)
        if hh is None or any(hh.planes.get(p) is None or hh.planes[p].state == PlaneState.UNKNOWN
                             for p in PLANES):
            self._not_healthy(host)
            return  # not everything known yet (e.g. just after a takeover): decide nothing
        decision = self.policy.decide(hh.states())
        if host in self._maintenance and decision.action is not None:
            decision = Decision(MAINTENANCE_KEY, Action.ALERT)
        elif host in self._agent_stopped and decision.action is not None:
            decision = Decision(AGENT_STOPPED_KEY, Action.ALERT)
        if decision.action is None and any(hh.planes[p].state != PlaneState.UP for p in PLANES):
            # SUSPECT, nothing failed: not back yet, not failed yet (e.g. after a fabric outage); a
            # host on its way back must be UP for rejoin_after in one stretch
            self._not_healthy(host)
            return
        cur = self._decisions.get(host)
        if cur is None or cur.decision != decision:
            self._pause_held.discard(host)  # a new row: alerted anew if it waits for the resume
            old = cur.decision if cur is not None else Decision("", None)
            if decision.action is None:
                self._decisions.pop(host, None)
                self._settled.pop(host, None)
                self._episode.discard(host)
                # What we did to the host (disable, mark down) holds until it rejoins (rejoin_after)
                # or the operator re-enables it (`vmha host enable`, HostEnabled): until then it
                # receives no VM.
                self._dests = None
                if old.action is not None:
                    out.log.append(LogLine(Level.INFO, now, ACTOR,
                                           f"host '{host}': healthy again (was row {old.key})"))
                    self._out_row.setdefault(host, old.key)
                self._healthy(host, now, out)
            else:
                self._not_healthy(host)
                # A new row with the same action (storage -> management+storage) is the same episode.
                same = cur is not None and cur.acted and cur.decision.action == decision.action
                wait = self.settings.settle_after if _better(old, decision) else self.settings.decide_after
                self._decisions[host] = cur = _HostDecision(decision, now, now + wait, acted=same)
                if not same:
                    self._held.add(host)
                hold = f", acting at {now + wait:.1f} if it holds" if wait and not same else ""
                out.log.append(LogLine(
                    Level.WARN, now, ACTOR,
                    f"host '{host}': row {decision.key} -> {decision.action.value if decision.action else '-'}"
                    f" ({self._failed_text(hh)}{hold})"))
            self._withdraw(host, decision, now, out)
        if cur is not None and not cur.acted and now >= cur.act_at:
            self._act(host, cur, hh, now, out)

    @staticmethod
    def _failed_text(hh: HostHealth) -> str:
        lost = [f"{p.value} {hh.planes[p].state.value} since {hh.planes[p].since:.1f}"
                for p in PLANES if hh.planes[p].state in (PlaneState.DOWN, PlaneState.FABRIC)]
        return ", ".join(lost) or "no plane lost"

    def _withdraw(self, host: str, decision: Decision, now: float, out: RecoveryOutput) -> None:
        """The host's row changed: cancel the tasks the new row no longer calls for and that have
        not passed the point of no return (a proof: the old copy is gone, the restart must follow)."""
        proved: list[str] = []
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.active(vm)
            if task is None or task.source != host or task.row in (MAINTENANCE_KEY, STOPPED_KEY) \
                    or vm in self._unverified:
                # A drain is the operator's, not the health row's: maintenance off ends it. A restart's
                # proof only observes a death: the row changes nothing to it. A resumed task waits for
                # its check against the world.
                continue
            if task.kind == TaskKind.EVACUATE:
                if decision.action not in _EVACUATING_ACTIONS and task.proof is not None:
                    proved.append(vm)
                if decision.action in _EVACUATING_ACTIONS or task.proof is not None:
                    continue
            elif decision.action == Action.LIVE_MIGRATE or task.state == TaskState.MIGRATING:
                continue
            if task.kind == TaskKind.EVACUATE and decision.action is None:
                # Back before a proof, but sanlock may have killed the VM meanwhile (a storage blip):
                # the lease decides, not the host's return.
                if not task.recheck:
                    self._recheck(task, now, out)
                continue
            why = f"host back to row {decision.key or 'none'} before a proof" if decision.action is None \
                else f"row now {decision.key} ({decision.action.value if decision.action else '-'})"
            if task.state == TaskState.PROVING:
                attempt = self._attempt(task)
                out.actions.append(CancelProof(vm, host, attempt))
                self._late_proof[vm] = attempt
                task.finish(Step.PROVE, now, "cancelled")
            task.reason = f"cancelled: {why}"
            self._move(task, TaskState.CANCELLED, now, f"cancelled: {why}", out)
            self._finish(task, out)
        if proved:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': row {decision.key or 'none'}, but "
                                   f"{', '.join(proved)} already proved dead there: their recovery continues"))

    def _recheck(self, task: Task, now: float, out: RecoveryOutput) -> None:
        """The task's host is back before a proof: one short lease-taken attempt. Lease taken: the
        VM is dead there and its recovery continues; refused (the holder runs): cancelled."""
        if task.state == TaskState.PROVING:
            out.actions.append(CancelProof(task.vm, task.source, self._attempt(task)))
            task.finish(Step.PROVE, now, "superseded by the recheck")
        elif task.state == TaskState.RETRY_WAIT:
            task.retry_at, task.resume = None, None
        task.recheck = True
        self._prove(task, (ProofMethod.LEASE_TAKEN,), now, out,
                    "host back before a proof: is the VM still running there?",
                    timeout=self.settings.recheck_timeout)

    def _host_enabled(self, host: str, now: float, out: RecoveryOutput) -> None:
        undone = [what for what, flags in (("disabled", self._disabled), ("marked down", self._marked_down),
                                           ("quarantined", self._quarantined)) if host in flags]
        if not undone and host in self._rejoined:
            self._rejoined.discard(host)  # our own rejoin's keys.disabled deletion, seen by the watch
            return
        self._rejoined.discard(host)
        self._disabled.discard(host)
        self._marked_down.discard(host)
        self._quarantined.discard(host)
        self._failures.pop(host, None)
        self._not_healthy(host)
        self._out_row.pop(host, None)
        self._dests = None
        self._rebalance_due = self.settings.rebalance
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': enabled by the operator"
                               + (f" (was {' and '.join(undone)} by vmha)" if undone else "")))

    # -- rejoin and quarantine --------------------------------------------------------------------

    def _healthy(self, host: str, now: float, out: RecoveryOutput) -> None:
        """Every plane of the host is UP: if we took it out, its rejoin clock starts."""
        if (not self.settings.rejoin_after or host in self._healthy_since or host in self._maintenance
                or host in self._rejoining):
            return
        if host not in self._disabled and host not in self._marked_down:
            return
        if host in self._quarantined:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': healthy, but quarantined: it "
                                   f"stays out until `vmha host enable {host}`"))
            return
        self._healthy_since[host] = now
        self._rejoin_retry.pop(host, None)
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoins at "
                               f"{now + self.settings.rejoin_after:.1f} if it stays healthy"))

    def _not_healthy(self, host: str) -> None:
        self._healthy_since.pop(host, None)
        self._rejoin_retry.pop(host, None)
        self._rejoin_wait.discard(host)

    def _rejoin_at(self, host: str) -> float:
        return max(self._healthy_since[host] + self.settings.rejoin_after, self._rejoin_retry.get(host, 0.0))

    def _try_rejoin(self, host: str, now: float, out: RecoveryOutput) -> None:
        since = self._healthy_since[host]
        unproved = sorted(vm for vm in self._by_source.get(host, ())
                          if (t := self.queue.active(vm)) is not None and t.source == host
                          and t.kind == TaskKind.EVACUATE and t.proof is None)
        if unproved:
            # A recovery from the host not proved yet: its VM's fate is open (the recheck decides).
            if host not in self._rejoin_wait:
                self._rejoin_wait.add(host)
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoin waits for the "
                                       f"recovery of {', '.join(unproved)} (not proved yet)"))
            return
        self._rejoin_wait.discard(host)
        self._rejoining.add(host)
        healthy = f"every plane up since {since:.1f}"
        if host in self._marked_down:
            vms = tuple(sorted(self._by_source.get(host, ())))
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {self._why_out(host, 'fenced')}, "
                                   f"{healthy}, its agent beating again: checking its lockspace and leases"
                                   + (f" ({', '.join(vms)} recovered from it)" if vms else "")))
            out.actions.append(CheckRejoin(host, vms))
            return
        self._enable(host, f"nothing was fenced there ({self._why_out(host, 'disabled')}), {healthy}", now, out)

    # -- rebalancing ------------------------------------------------------------------------------

    def _rebalance(self, now: float, out: RecoveryOutput) -> None:
        """One bounded round of live migrations towards the least loaded hosts (core/rebalance.py), when
        no recovery is in flight: a recovery's placement comes first, and a round plans on settled loads."""
        if not self._inventory or self._in_flight():
            return
        hosts = self._eligible()
        loads = {h: self._load_of(h) for h in hosts}
        movable = {h: [(v.priority, v.name) for name in self._vms_on.get(h, ())
                       if (v := self._vms[name]).ha and self._placed.get(name) == h] for h in hosts}
        moves = plan(loads, movable, self.settings.rebalance_moves, self.settings.host_capacity)
        self._rebalance_next = now + self.settings.rebalance_cooldown
        self._rebalance_due = bool(moves)  # moved some: another round after the cool-down, until even
        text = ", ".join(f"{h}={n}" for h, n in sorted(loads.items()))
        if not moves:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"rebalance: loads {text}: even, nothing to move"))
            return
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"rebalance: loads {text}: live-migrating "
                               + ", ".join(f"{vm} from '{src}'" for vm, src in moves)
                               + f" to the least loaded; next round not before {self._rebalance_next:.1f}"))
        for vm, src in moves:
            info = self._vms[vm]
            task = Task(vm=vm, source=src, kind=TaskKind.MIGRATE, recovery=self.queue.next_recovery(vm),
                        priority=info.priority, row=REBALANCE_KEY, action=Action.LIVE_MIGRATE.value,
                        failed={}, created=now)
            self.queue.add(task, now)
            self._by_source.setdefault(src, set()).add(vm)
            self._move(task, TaskState.READY, now, f"rebalance, priority {task.priority}", out)

    # -- pause ------------------------------------------------------------------------------------

    def _pause(self, on: bool, why: str, now: float, out: RecoveryOutput) -> None:
        if on == self._paused:
            return
        self._paused = on
        if on:
            out.actions.append(Alert(Level.WARN, None, None, f"recoveries paused cluster-wide ({why}): new "
                                     "recoveries wait, those started run to their end"))
            return
        waiting = sorted(self._pause_held)
        self._pause_held.clear()
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"recoveries resumed ({why}); hosts waiting: "
                               f"{', '.join(waiting) or 'none'}"))
        self._held.update(waiting)  # _timers acts on them in this step

    # -- maintenance ------------------------------------------------------------------------------

    def _maintenance_set(self, host: str, who: str, on: bool, why: str, now: float, out: RecoveryOutput) -> None:
        reasons = self._maintenance.get(host, set())
        was = bool(reasons)
        reasons = reasons | {who} if on else reasons - {who}
        if reasons:
            self._maintenance[host] = reasons
        else:
            self._maintenance.pop(host, None)
        if was == bool(reasons):
            return  # still (or still not) in maintenance, for another reason
        if not on:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': maintenance off ({why})"))
            self._cancel_drain(host, now, out)
            cur = self._decisions.get(host)
            if cur is not None and cur.decision.key == MAINTENANCE_KEY:
                del self._decisions[host]  # its real row, if any, is decided afresh
            if (host not in self._decisions and self._all_up(host) and host in self._disabled
                    and host not in self._marked_down and host not in self._quarantined):
                self._rejoining.add(host)  # nothing was fenced: back to placement at once
                self._enable(host, f"maintenance over ({why}), every plane up", now, out)
            else:
                self._reconcile(host, now, out)  # a fault meanwhile is acted upon; else it rejoins
                if host not in self._decisions and self._all_up(host):
                    self._healthy(host, now, out)
            return
        self._not_healthy(host)
        self._disable(host, f"maintenance ({why})", now, out)
        self._drain(host, sorted(self._vms_on.get(host, ())), f"maintenance on ({why})", now, out)

    def _drain(self, host: str, vms: list[str], why: str, now: float, out: RecoveryOutput) -> None:
        """Live-migrate the HA VMs among `vms` away from `host` (no task for those that have one)."""
        new: list[Task] = []
        for vm in vms:
            info = self._vms.get(vm)
            if info is None or not info.ha or self.queue.active(vm) is not None:
                continue
            task = Task(vm=vm, source=host, kind=TaskKind.MIGRATE, recovery=self.queue.next_recovery(vm),
                        priority=info.priority, row=MAINTENANCE_KEY, action=Action.LIVE_MIGRATE.value,
                        failed={}, created=now)
            self.queue.add(task, now)
            self._by_source.setdefault(host, set()).add(vm)
            new.append(task)
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {why}: draining {len(new)} HA VM(s), "
                               "its faults alert only"))
        for task in new:
            self._move(task, TaskState.READY, now, f"drain, priority {task.priority}", out)

    def _cancel_drain(self, host: str, now: float, out: RecoveryOutput) -> None:
        """Maintenance off: drain tasks not moving yet are cancelled (a migration in flight ends)."""
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.active(vm)
            if task is None or task.source != host or task.row != MAINTENANCE_KEY or task.state in RUNNING:
                continue
            if task.state == TaskState.RETRY_WAIT:
                task.retry_at, task.resume = None, None
            task.reason = "cancelled: maintenance off"
            self._move(task, TaskState.CANCELLED, now, task.reason, out)
            self._finish(task, out)

    def _all_up(self, host: str) -> bool:
        hh = self._health.get(host)
        return hh is not None and all(
            (st := hh.planes.get(p)) is not None and st.state == PlaneState.UP for p in PLANES)

    def _why_out(self, host: str, what: str) -> str:
        row = self._out_row.get(host)
        return f"{what} for row {row}" if row else f"{what} by an earlier leader"

    def _host_out(self, host: str, op: HostOp, quarantine: str, now: float, out: RecoveryOutput) -> None:
        flags = self._marked_down if op == HostOp.MARK_DOWN else self._disabled
        if op == HostOp.ENABLE or host in flags:
            return
        flags.add(host)
        self._dests = None
        if quarantine:
            self._quarantined.add(host)
            self._not_healthy(host)
        what = "marked down" if op == HostOp.MARK_DOWN else "disabled"
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {what} by an earlier leader, "
                               "not enabled since" + (f", quarantined ({quarantine})" if quarantine else "")))
        if host not in self._decisions and self._all_up(host):
            self._healthy(host, now, out)

    def _enable(self, host: str, evidence: str, now: float, out: RecoveryOutput) -> None:
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoins ({evidence})"))
        out.actions.append(EnableHost(host, evidence))

    def _rejoin_checked(self, host: str, ok: bool, evidence: str, now: float, out: RecoveryOutput) -> None:
        if host not in self._rejoining or host not in self._healthy_since:
            self._rejoining.discard(host)
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoin check ignored "
                                   f"(no longer waiting to rejoin): {evidence}"))
            return
        if ok:
            since = self._healthy_since[host]
            self._enable(host, f"{self._why_out(host, 'fenced')}, every plane up since "
                               f"{since:.1f}, agent beating again, {evidence}", now, out)
            return
        self._rejoining.discard(host)
        self._rejoin_retry[host] = now + self.settings.rejoin_after
        text = (f"host '{host}': rejoin check failed ({evidence}): it stays out, checked again at "
                f"{now + self.settings.rejoin_after:.1f}")
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, host, None, text))

    def _rejoin_done(self, host: str, now: float, out: RecoveryOutput) -> None:
        self._rejoining.discard(host)
        self._disabled.discard(host)
        self._marked_down.discard(host)
        self._not_healthy(host)
        self._out_row.pop(host, None)
        self._rejoined.add(host)
        self._dests = None
        self._rebalance_due = self.settings.rebalance
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': rejoined, a destination again"))

    def _count_failure(self, host: str, row: str, now: float, out: RecoveryOutput) -> None:
        """One failure per episode (from healthy to healthy again), for quarantine."""
        if not self.settings.quarantine_after or host in self._episode:
            return
        self._episode.add(host)
        window = self.settings.quarantine_window
        seen = [(t, r) for t, r in self._failures.get(host, []) if now - t <= window] + [(now, row)]
        self._failures[host] = seen
        if len(seen) < self.settings.quarantine_after or host in self._quarantined:
            return
        self._quarantined.add(host)
        self._not_healthy(host)
        text = (f"host '{host}': quarantined after {len(seen)} failures within {window:g}s ("
                + ", ".join(f"row {r} at {t:.1f}" for t, r in seen)
                + f"): it stays out until `vmha host enable {host}`")
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, host, None, text))
        out.actions.append(QuarantineHost(host, text))

    def _act(self, host: str, cur: _HostDecision, hh: HostHealth, now: float, out: RecoveryOutput) -> None:
        action = cur.decision.action
        assert action is not None
        key = cur.decision.key
        if key == MAINTENANCE_KEY:
            cur.acted = True
            out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': in maintenance, alert only "
                                     f"({self._failed_text(hh)})"))
            return
        if key == AGENT_STOPPED_KEY:
            cur.acted = True
            out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': its agent was stopped cleanly at "
                                     f"{self._agent_stopped.get(host, 0.0):.1f} ({self._failed_text(hh)}): its "
                                     "running VMs are not protected until the agent runs again; those it "
                                     "stopped are recovered once proved stopped"))
            return
        if self._paused and action != Action.ALERT:
            if host not in self._pause_held:
                self._pause_held.add(host)
                out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': row {key} ({action.value}) "
                                         f"waits: recoveries are paused ({self._failed_text(hh)})"))
            return
        if action != Action.ALERT:
            self._count_failure(host, key, now, out)
        if action == Action.ALERT:
            cur.acted = True
            text = f"host '{host}': row {key}: alert only ({self._failed_text(hh)})"
            if key == FABRIC_KEY:
                # The outage itself was alerted once, naming its hosts: one alert per host on top of
                # it would flood the operator (600 in a 600-host outage). The log keeps each host.
                out.log.append(LogLine(Level.INFO, now, ACTOR, text))
            else:
                out.actions.append(Alert(Level.WARN, host, None, text))
            return
        if action in (Action.DISABLE, Action.LIVE_MIGRATE):
            self._disable(host, f"row {key}: {self._failed_text(hh)}", now, out)
            if action == Action.DISABLE:
                cur.acted = True
                out.actions.append(Alert(Level.WARN, host, None, f"host '{host}': row {key}: scheduling "
                                         f"disabled, VMs left running ({self._failed_text(hh)})"))
                return
        if not self._inventory:
            if not cur.waiting_inventory:
                cur.waiting_inventory = True
                out.log.append(LogLine(Level.INFO, now, ACTOR,
                                       f"host '{host}': waiting for the inventory before acting"))
            return
        cur.acted = True
        kind = TaskKind.MIGRATE if action == Action.LIVE_MIGRATE else TaskKind.EVACUATE
        failed = {p.value: hh.planes[p].since for p in PLANES
                  if hh.planes[p].state in (PlaneState.DOWN, PlaneState.FABRIC)}
        settled = self._settled.get(host, set())
        vms = [self._vms[v] for v in sorted(self._vms_on.get(host, ()))]
        new: list[Task] = []
        skipped_non_ha = skipped_known = 0
        for vm in vms:
            if not vm.ha:
                skipped_non_ha += 1
                continue
            if vm.name in settled or self.queue.active(vm.name) is not None:
                skipped_known += 1
                continue
            task = Task(vm=vm.name, source=host, kind=kind, recovery=self.queue.next_recovery(vm.name),
                        priority=vm.priority, row=key, action=action.value, failed=failed, created=now)
            self.queue.add(task, now)
            self._late_proof.pop(vm.name, None)  # a result of the old task's proof is no longer awaited
            self._by_source.setdefault(host, set()).add(vm.name)
            new.append(task)
        out.log.append(LogLine(Level.INFO, now, ACTOR,
                               f"host '{host}': {action.value} {len(new)} HA VM(s)"
                               + (f", {skipped_known} already handled" if skipped_known else "")
                               + (f", {skipped_non_ha} non-HA VM(s) left alone" if skipped_non_ha else "")))
        if kind == TaskKind.EVACUATE:
            self._capacity_check(now, out)
        methods = proof_methods(hh.states(), power_fence=self.settings.power_fence,
                                allow_exit_attested=self.settings.allow_exit_attested)
        for task in new:
            if kind == TaskKind.MIGRATE:
                self._move(task, TaskState.READY, now,
                           f"row {key}, action {action.value}, priority {task.priority}", out)
            else:
                self._prove(task, methods, now, out, f"row {key}, action {action.value}")

    def _disable(self, host: str, reason: str, now: float, out: RecoveryOutput) -> None:
        if host in self._disabled:
            return
        self._disabled.add(host)
        self._dests = None
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': disable scheduling ({reason})"))
        out.actions.append(DisableHost(host, reason))

    def _fabric(self, change: FabricChange, now: float, out: RecoveryOutput) -> None:
        where = "cluster" if change.domain is None else f"domain {change.domain}"
        if change.active:
            text = (f"fabric outage of plane {change.plane.value} in {where} "
                    f"(hosts {', '.join(change.hosts)}): nothing is evacuated because of it")
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, None, None, text))
        else:
            out.log.append(LogLine(Level.INFO, now, ACTOR,
                                   f"fabric outage of plane {change.plane.value} in {where} over"))

    # -- inventory and capacity -------------------------------------------------------------------

    def _set_inventory(self, inv: Inventory, now: float, out: RecoveryOutput) -> None:
        self._hosts = {h.name: h for h in inv.hosts}
        self._vms = {v.name: v for v in inv.vms}
        self._placed = {v.name: v.host for v in inv.vms}
        self._vms_on = {}
        for v in inv.vms:
            if v.host is not None:
                self._vms_on.setdefault(v.host, set()).add(v.name)
        for t in self.queue:
            if t.state not in TERMINAL and t.proof is not None and self._placed.get(t.vm) == t.source \
                    and t.vm not in self._unverified:
                self._place(t.vm, None)  # proved dead there: it takes no room on its source
        self._inventory = True
        self._dests = None
        self._confirm_deposed(now, out)
        stopped = {v.name: v.state == STOPPED for v in inv.vms
                   if v.ha and v.host is not None and self.queue.active(v.name) is None}
        self._stopped.inventory(stopped, now)
        for host in sorted(self._decisions):
            self._reconcile(host, now, out)

    def _restart_stopped(self, now: float, out: RecoveryOutput) -> None:
        """Desired state: every protected VM seen stopped long enough, with no recovery in flight, gets
        a restart task whose proof only observes (desired.observing_methods). On a healthy host it
        restarts in place; on a host whose agent was stopped cleanly and whose planes are lost (shut
        down, powered off) it is recovered like a failed host's VM: proof, mark down, elsewhere.
        While its host is in any other row (a fabric outage, a failure being handled) it waits."""
        for vm, since in self._stopped.due():
            host, info = self._placed.get(vm), self._vms.get(vm)
            if host is None or info is None or self.queue.active(vm) is not None:
                continue
            cur = self._decisions.get(host)
            hh = self._health.get(host)
            if cur is None and hh is not None and self._is_eligible(host) and self._room(host):
                where = "its host is up and takes VMs: restart in place"
            elif cur is not None and cur.decision.key == AGENT_STOPPED_KEY and cur.acted and hh is not None:
                where = (f"its host's agent was stopped cleanly at {self._agent_stopped.get(host, 0.0):.1f} "
                         f"and it lost every plane ({self._failed_text(hh)}): recover it elsewhere")
            else:
                why = (f"its host is in row {cur.decision.key}" if cur is not None
                       else "its host takes no VM now (not up, disabled, in maintenance or full)")
                if self._restart_wait.get(vm) != why:
                    self._restart_wait[vm] = why
                    out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{vm}' on host '{host}': restart waits "
                                           f"({why})"))
                continue
            self._restart_wait.pop(vm, None)
            self._stopped.forget(vm)
            failed = {p.value: hh.planes[p].since for p in PLANES
                      if hh.planes[p].state in (PlaneState.DOWN, PlaneState.FABRIC)}
            task = Task(vm=vm, source=host, kind=TaskKind.EVACUATE, recovery=self.queue.next_recovery(vm),
                        priority=info.priority, row=STOPPED_KEY, action=RESTART, failed=failed, created=now)
            self.queue.add(task, now)
            self._late_proof.pop(vm, None)
            self._by_source.setdefault(host, set()).add(vm)
            self._prove(task, observing_methods(hh.states()), now, out,
                        f"desired state: runs nowhere since {since:.1f} (inventory: stopped), no recovery in "
                        f"flight, {where}")

    def _load_of(self, host: str) -> int:
        return len(self._vms_on.get(host, ())) + self.queue.running_to(host)

    def _is_eligible(self, h: str) -> bool:
        """May receive VMs: every plane UP, enabled and up in the cloud, not disabled by us, not in
        maintenance."""
        info = self._hosts.get(h)
        return (
            info is not None and info.enabled and info.up and not info.forced_down
            and h not in self._disabled and h not in self._marked_down and h not in self._maintenance
            and self._all_up(h)
        )

    def _eligible(self) -> list[str]:
        """The eligible destinations, sorted; cached until something that affects them changes."""
        if self._dests is None:
            self._dests = [h for h in sorted(self._hosts) if self._is_eligible(h)]
            self._dest_set = set(self._dests)
            self._dest_heap = [(self._load_of(h), h) for h in self._dests]
            heapq.heapify(self._dest_heap)
        return self._dests

    def _touch(self, host: str | None) -> None:
        """The load of `host` changed: keep its place in the destination order current."""
        if host is not None and self._dests is not None and host in self._dest_set:
            heapq.heappush(self._dest_heap, (self._load_of(host), host))

    def _pick_dest(self, source: str | None) -> tuple[str | None, bool]:
        """(the least loaded eligible host with room and a free slot, ties by name; whether any host
        has room). (None, True): every host with room is busy; (None, False): no host has room."""
        self._eligible()
        seen: list[tuple[int, str]] = []
        choice: str | None = None
        room = False
        while self._dest_heap:
            entry = heapq.heappop(self._dest_heap)
            load, h = entry
            if h not in self._dest_set or load != self._load_of(h) or entry in seen:
                continue  # stale: a current entry for the host is in the heap
            seen.append(entry)
            if h == source:
                continue
            if not self._room(h):
                break  # the least loaded host is full: every host is
            room = True
            if self.queue.has_slot(h):
                choice = h
                break
        for entry in seen:
            heapq.heappush(self._dest_heap, entry)
        return choice, room

    def _room(self, host: str) -> bool:
        cap = self.settings.host_capacity
        return cap == 0 or self._load_of(host) < cap

    def _capacity_check(self, now: float, out: RecoveryOutput) -> None:
        """Before evacuating: can the surviving hosts hold every VM waiting for a place?"""
        cap = self.settings.host_capacity
        if cap == 0:
            return
        free = sum(max(0, cap - self._load_of(h)) for h in self._eligible())
        waiting = sorted(
            (t for t in self.queue if t.kind == TaskKind.EVACUATE and t.state not in TERMINAL
             and t.dest is None),
            key=lambda t: (-t.priority, t.vm))
        if len(waiting) <= free:
            return
        left = waiting[free:]
        text = (f"capacity shortfall: {len(waiting)} VM(s) to evacuate, room for {free} "
                f"({len(self._eligible())} host(s) x {cap}); cannot be placed: "
                + ", ".join(f"{t.vm} (priority {t.priority})" for t in left))
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, None, None, text))

    def _room_left(self) -> int:
        """Free places on the eligible hosts (host_capacity set)."""
        cap = self.settings.host_capacity
        return sum(max(0, cap - self._load_of(h)) for h in self._eligible())

    def _ahead(self, task: Task) -> int:
        """Evacuations still waiting for a place that go before `task`: higher priority, then name."""
        key = (-task.priority, task.vm)
        return sum(1 for t in self.queue.values()
                   if t.kind == TaskKind.EVACUATE and t.state not in TERMINAL and t.state not in RUNNING
                   and (-t.priority, t.vm) < key)

    def _kept_for_others(self, task: Task) -> str:
        """Why an evacuation must not take a place now: the room left is kept for the higher-priority
        evacuations still waiting (proving, marking down, retrying), so that under a capacity shortfall
        the VMs restarted are the highest priorities, whatever order their proofs arrive in ('' if it
        may go)."""
        if task.kind != TaskKind.EVACUATE or not self.settings.host_capacity:
            return ""
        ahead, free = self._ahead(task), self._room_left()
        return "" if ahead < free else f"the room left ({free}) is kept for {ahead} VM(s) of higher priority"

    def _unblock_unplaced(self, now: float, out: RecoveryOutput) -> None:
        if not any(self._room(h) for h in self._eligible()):
            return
        for t in self.queue.in_state(TaskState.UNPLACED):
            if t.vm not in self._unverified and not self._kept_for_others(t):
                self._move(t, TaskState.READY, now, "room on a host again", out)

    # -- task steps -------------------------------------------------------------------------------

    @staticmethod
    def _attempt(task: Task) -> Attempt:
        """The tag of the task's latest proof attempt."""
        return Attempt(task.recovery, task.attempts_of(Step.PROVE))

    def _prove(self, task: Task, methods: tuple[ProofMethod, ...], now: float, out: RecoveryOutput,
               why: str, timeout: float | None = None) -> None:
        task.begin(Step.PROVE, now)
        if task.proof_started is None:
            task.proof_started = now
        timeout = self._restart_timeout(task, methods) or timeout
        attempt = self._attempt(task)
        self._move(task, TaskState.PROVING, now,
                   f"{why}, methods {','.join(m.value for m in methods)}, attempt {attempt}", out)
        out.actions.append(Prove(task.vm, task.source, methods, attempt, timeout))

    def _restart_timeout(self, task: Task, methods: tuple[ProofMethod, ...]) -> float | None:
        """A restart's lease-taken-only proof answers at once (the lease is free or it is not): no
        waiting the runtime's default, which is long enough for host-dead."""
        if task.row == STOPPED_KEY and ProofMethod.HOST_DEAD not in methods:
            return self.settings.recheck_timeout
        return None

    def _stale_proof(self, vm: str, attempt: Attempt, what: str, now: float, out: RecoveryOutput) -> bool:
        """A result of an older proof attempt than the VM's latest: logged, to be ignored."""
        task = self.queue.get(vm)
        if task is None or self._attempt(task) == attempt:
            return False
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{vm}': {what} of proof attempt {attempt} ignored "
                               f"(stale: the latest is {self._attempt(task)})"))
        return True

    @staticmethod
    def _proof_alert(vm: str, host: str, text: str, now: float, out: RecoveryOutput) -> None:
        """What a proof attempt saw that the operator must fix (once per attempt, whatever its result)."""
        if text:
            out.log.append(LogLine(Level.ERROR, now, ACTOR, f"vm '{vm}': proof on '{host}': {text}"))
            out.actions.append(Alert(Level.ERROR, host, vm, text))

    def _proof_obtained(self, proof: FenceProof, attempt: Attempt, now: float, out: RecoveryOutput) -> None:
        self._proof_alert(proof.vm, proof.host, proof.details.get("alert", ""), now, out)
        if self._stale_proof(proof.vm, attempt, f"proof {proof.method.value}", now, out):
            return
        task = self.queue.get(proof.vm)
        late = task is not None and self._late_proof.get(proof.vm) == attempt
        if task is None or (task.state != TaskState.PROVING and not (late and task.state == TaskState.CANCELLED)):
            out.log.append(LogLine(Level.WARN, now, ACTOR,
                                   f"vm '{proof.vm}': proof {proof.method.value} not expected, ignored"))
            return
        if proof.host != task.source:
            out.log.append(LogLine(Level.ERROR, now, ACTOR,
                                   f"vm '{proof.vm}': proof for host '{proof.host}' but the task is for "
                                   f"'{task.source}': refused"))
            return
        self._late_proof.pop(proof.vm, None)
        task.proof = proof
        if self._placed.get(task.vm) == task.source:
            self._place(task.vm, None)  # proved dead there: it takes no room on its source
        task.finish(Step.PROVE, now, "ok", proof.method.value)
        if task.recheck:
            task.recheck = False
            out.log.append(LogLine(Level.WARN, now, ACTOR,
                                   f"vm '{task.vm}': its lease was free although host '{task.source}' is back: "
                                   "the VM died there (sanlock), the recovery continues"))
        if late:
            task.reason = ""
            out.log.append(LogLine(Level.WARN, now, ACTOR,
                                   f"vm '{task.vm}': proof arrived after the cancel: the old copy is gone, "
                                   "the recovery continues"))
        why = f"proof {proof.method.value} after {proof.proved - proof.started:.1f}s"
        if task.row == STOPPED_KEY and task.source not in self._decisions and task.source not in self._marked_down:
            # Its host is up: nothing there to fence or mark down; the VM starts there again.
            self._move(task, TaskState.READY, now, f"{why}, its host is up: restart in place", out)
            return
        self._mark_down(task, now, out, why)

    def _proof_refused(self, vm: str, host: str, attempt: Attempt, reason: str, retryable: bool, now: float,
                       out: RecoveryOutput, alert: str = "") -> None:
        self._proof_alert(vm, host, alert, now, out)
        if self._stale_proof(vm, attempt, f"refusal ({reason})", now, out):
            return
        if self._late_proof.get(vm) == attempt:
            del self._late_proof[vm]
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{vm}': cancelled proof ended ({reason})"))
            return
        task = self._expect(vm, Step.PROVE, now, out)
        if task is None:
            return
        cur = self._decisions.get(task.source)
        if task.recheck and (cur is None or cur.decision.action not in _EVACUATING_ACTIONS):
            # The VM still holds its lease on a host that is back: nothing to recover.
            task.recheck = False
            task.finish(Step.PROVE, now, f"refused: {reason}")
            why = f"cancelled: host back and the VM still holds its lease ({reason})"
            task.reason = why
            self._move(task, TaskState.CANCELLED, now, why, out)
            self._finish(task, out)
            return
        task.recheck = False  # failed again meanwhile: an ordinary proof, with every method, follows
        self._fail_step(task, Step.PROVE, f"proof refused: {reason}", retryable, now, out)

    @staticmethod
    def _in_place(task: Task) -> bool:
        """A proved desired-state restart whose host was up at the proof (so not marked down): it
        starts there again, nowhere else (a driver restarts elsewhere only from a host marked down)."""
        return task.row == STOPPED_KEY and task.proof is not None and not task.done(Step.MARK_DOWN)

    def _mark_down(self, task: Task, now: float, out: RecoveryOutput, why: str) -> None:
        host = task.source
        if host in self._marked_down:
            task.finish(Step.MARK_DOWN, now, "ok", "host already marked down")
            self._move(task, TaskState.READY, now, f"{why}, host already marked down", out)
            return
        task.begin(Step.MARK_DOWN, now)
        self._move(task, TaskState.MARKING_DOWN, now, why, out)
        if host not in self._marking_down:
            self._marking_down.add(host)
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': mark down (fenced: {why})"))
            out.actions.append(MarkHostDown(host))

    def _host_op_done(self, host: str, op: HostOp, now: float, out: RecoveryOutput) -> None:
        if op == HostOp.ENABLE:
            self._rejoin_done(host, now, out)
            return
        if op == HostOp.DISABLE:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': disabled"))
            return
        self._marking_down.discard(host)
        self._marked_down.add(host)
        self._dests = None
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': marked down"))
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.get(vm)
            if task is not None and task.state == TaskState.MARKING_DOWN and task.source == host:
                task.finish(Step.MARK_DOWN, now, "ok")
                self._move(task, TaskState.READY, now, f"host marked down, priority {task.priority}", out)

    def _host_op_failed(self, host: str, op: HostOp, reason: str, retryable: bool, now: float,
                        out: RecoveryOutput) -> None:
        if op == HostOp.ENABLE:
            self._rejoining.discard(host)
            if host not in self._decisions and self._all_up(host):
                self._healthy(host, now, out)  # an enable at maintenance off has no clock running yet
            if host in self._healthy_since:
                self._rejoin_retry[host] = now + self.settings.rejoin_after
            text = (f"host '{host}': enable failed ({reason}): it stays out, tried again in "
                    f"{self.settings.rejoin_after:g}s")
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, host, None, text))
            return
        if op == HostOp.DISABLE:
            self._disabled.discard(host)
            self._dests = None
            text = f"host '{host}': disable failed: {reason}"
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            out.actions.append(Alert(Level.WARN, host, None, text))
            return
        self._marking_down.discard(host)
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"host '{host}': mark down failed: {reason}"))
        for vm in sorted(self._by_source.get(host, ())):
            task = self.queue.get(vm)
            if task is not None and task.state == TaskState.MARKING_DOWN and task.source == host:
                self._fail_step(task, Step.MARK_DOWN, reason, retryable, now, out)

    def _expect(self, vm: str, step: Step, now: float, out: RecoveryOutput) -> Task | None:
        """The task waiting for this step's result; a stale or unknown result is logged and dropped."""
        task = self.queue.get(vm)
        if task is None or task.state != STEP_STATE[step]:
            state = "no task" if task is None else task.state.value
            out.log.append(LogLine(Level.WARN, now, ACTOR,
                                   f"vm '{vm}': result of step {step.value} ignored ({state})"))
            return None
        return task

    def _step_done(self, ev: StepDone, now: float, out: RecoveryOutput) -> None:
        task = self._expect(ev.vm, ev.step, now, out)
        if task is None:
            return
        if ev.step == Step.RELEASE:
            task.finish(Step.RELEASE, now, "ok", ev.detail)
            self._evacuate(task, now, out, "proof lease released")
            return
        if ev.step in (Step.EVACUATE, Step.MIGRATE):
            task.finish(ev.step, now, "ok", ev.detail)
            task.running_on = ev.running_on or task.dest
            task.reason = ""
            self._move(task, TaskState.DONE, now, f"running on '{task.running_on}'", out)
            self._place(task.vm, task.running_on)
            self._settle(task)
            self._stopped.forget(task.vm)  # an inventory taken before the move may still say stopped
            self._finish(task, out)
            if task.running_on in self._maintenance:
                # It arrived on a host that entered maintenance while it travelled: drain it too.
                self._drain(task.running_on, [task.vm], f"vm '{task.vm}' arrived in maintenance", now, out)
                return
            dest = self._decisions.get(task.running_on or "")
            if dest is not None and dest.acted and dest.decision.action in _MOVING_ACTIONS:
                # It arrived on a host that failed while it travelled: act on that host again, for it.
                out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{task.vm}': arrived on '{task.running_on}', "
                                       f"which failed meanwhile (row {dest.decision.key}): acting on it again"))
                dest.acted, dest.act_at = False, now
                self._held.add(task.running_on or "")
            return
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{ev.vm}': unexpected result of {ev.step.value}"))

    def _settle(self, task: Task) -> None:
        """No second task for the VM while its source stays failed. A source already seen healthy again
        (a move can end after that) settles nothing: its next failure must cover the VM."""
        if task.source in self._decisions:
            self._settled.setdefault(task.source, set()).add(task.vm)

    def _place(self, vm: str, host: str | None) -> None:
        """The VM moved (our own evacuation/migration), before the next inventory says so."""
        old = self._placed.get(vm)
        if old is not None:
            self._vms_on.get(old, set()).discard(vm)
        self._placed[vm] = host
        if host is not None:
            self._vms_on.setdefault(host, set()).add(vm)
        self._touch(old)
        self._touch(host)

    def _evacuate(self, task: Task, now: float, out: RecoveryOutput, why: str) -> None:
        proof = task.proof
        if proof is None:  # unreachable by the state table; Evacuate itself refuses it anyway
            raise InvariantError(f"vm '{task.vm}': evacuating state without a proof")
        task.begin(Step.EVACUATE, now)
        self._move(task, TaskState.EVACUATING, now, f"{why}, to '{task.dest}'", out)
        out.actions.append(Evacuate(task.vm, task.source, task.dest, proof))

    def _fail_step(self, task: Task, step: Step, reason: str, retryable: bool, now: float,
                   out: RecoveryOutput) -> None:
        task.finish(step, now, reason)
        task.attempts += 1
        task.reason = reason
        limits = self.queue.limits
        if not retryable or task.attempts >= limits.max_attempts:
            why = (f"{step.value} failed: {reason}; "
                   + ("not retryable" if not retryable else f"{task.attempts} attempts"))
            task.reason = why
            self._move(task, TaskState.FAILED, now, why, out, Level.ERROR)
            out.actions.append(Alert(Level.ERROR, task.source, task.vm,
                                     f"vm '{task.vm}' recovery FAILED: {why}"))
            if task.proof is not None and not task.released():
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{task.vm}': proof lease released: its old "
                                       f"copy on '{task.source}' is proven dead, it may be started by hand"))
                out.actions.append(DropProof(task.vm, task.source))
            if task.kind == TaskKind.MIGRATE:
                self._source_failed(task, now, out)  # a failed move recovered nothing: not settled
            else:
                self._settle(task)
            self._stopped.give_up(task.vm)
            self._finish(task, out)
            return
        wait = limits.backoff(task.attempts)
        task.retry_at = now + wait
        # A restart step retries from READY: it gives its slot back and may get another destination.
        task.resume = STEP_STATE[step] if step in (Step.PROVE, Step.MARK_DOWN) else TaskState.READY
        self._move(task, TaskState.RETRY_WAIT, now,
                   f"{step.value} failed: {reason}; attempt {task.attempts}/{limits.max_attempts}, "
                   f"retry in {wait:g}s", out, Level.WARN, persist=False)
        if task.resume == TaskState.READY:
            task.dest = None  # after the slot is given back: the retry picks a destination again
        self._persist(task, out)

    def _source_failed(self, task: Task, now: float, out: RecoveryOutput) -> None:
        """A live migration failed: if its source failed meanwhile (a row to evacuate), the host's
        evacuation covers the VM (proof first), acting again if it had acted while the migration held
        the VM; a row that comes later covers it anyway (the VM is not settled)."""
        cur = self._decisions.get(task.source)
        if cur is None or cur.decision.action not in _EVACUATING_ACTIONS:
            return
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{task.vm}': its source '{task.source}' failed during "
                               f"the live migration (row {cur.decision.key}): its {cur.decision.action.value} "
                               "covers the VM"))
        if cur.acted:
            cur.acted, cur.act_at = False, now
            self._held.add(task.source)

    def _timers(self, now: float, out: RecoveryOutput) -> None:
        if self._unverified:
            self._verify_resumed(now, out)
        for host in sorted(self._held):
            d = self._decisions.get(host)
            if d is not None and not d.acted and now >= d.act_at:
                self._reconcile(host, now, out)
            d = self._decisions.get(host)
            if d is None or d.acted:
                self._held.discard(host)
        for host in sorted(self._healthy_since):
            if host not in self._rejoining and (
                    host in self._rejoin_wait or now >= self._rejoin_at(host)):
                self._try_rejoin(host, now, out)
        for task in self.queue.in_state(TaskState.RETRY_WAIT):
            if task.retry_at is None or now < task.retry_at or task.vm in self._unverified:
                continue
            resume = task.resume or TaskState.READY
            task.retry_at, task.resume = None, None
            why = f"retry {task.attempts + 1}/{self.queue.limits.max_attempts}"
            if resume == TaskState.PROVING:
                self._prove(task, self._methods(task), now, out, why)
            elif resume == TaskState.MARKING_DOWN:
                self._mark_down(task, now, out, why)
            else:
                self._move(task, TaskState.READY, now, why, out)

    def _methods(self, task: Task) -> tuple[ProofMethod, ...]:
        hh = self._health.get(task.source)
        states = hh.states() if hh is not None else {}
        if task.row == STOPPED_KEY:
            return observing_methods(states)
        return proof_methods(states, power_fence=self.settings.power_fence,
                             allow_exit_attested=self.settings.allow_exit_attested)

    def _dispatch(self, now: float, out: RecoveryOutput) -> None:
        """Start READY tasks, highest priority first, while slots and destinations allow."""
        if not self._inventory:
            return  # a new leader before its first inventory: no view of the destinations yet
        # Held back and put in the order again afterwards: in-place restarts whose host cannot take
        # them yet, and resumed tasks not checked against the world yet.
        waiting: list[Task] = []
        try:
            self._dispatch_ready(now, out, waiting)
        finally:
            for task in waiting:
                self.queue.push_back(task)

    def _dispatch_ready(self, now: float, out: RecoveryOutput, waiting: list[Task]) -> None:
        while not self.queue.full():
            task = self.queue.pop_ready()
            if task is None:
                return
            if task.vm in self._unverified:
                waiting.append(task)
                continue
            dest: str | None
            if self._in_place(task):
                src = task.source
                if not (self._is_eligible(src) and self._room(src) and self.queue.has_slot(src)):
                    waiting.append(task)
                    continue
                dest, room = src, True
            else:
                # An evacuation may restart the VM on its own source once that rejoined (the proof
                # holds); a live migration moves it away from there.
                dest, room = self._pick_dest(task.source if task.kind == TaskKind.MIGRATE else None)
            kept = self._kept_for_others(task) if room else ""
            if not room or kept:
                task.reason = kept or ("no surviving host has room" if self._eligible() else "no healthy host")
                self._move(task, TaskState.UNPLACED, now, task.reason, out, Level.WARN)
                out.actions.append(Alert(Level.WARN, task.source, task.vm,
                                         f"vm '{task.vm}' cannot be placed: {task.reason}"))
                continue
            if dest is None:
                self.queue.push_back(task)  # every destination with room is busy: wait for a slot
                return
            task.dest = dest
            slots = f"slot {self.queue.running() + 1}/{self.queue.limits.max_parallel}"
            if task.kind == TaskKind.MIGRATE:
                task.begin(Step.MIGRATE, now)
                self._move(task, TaskState.MIGRATING, now, f"live-migrate to '{dest}', {slots}", out)
                out.actions.append(LiveMigrate(task.vm, task.source, dest))
            elif task.released():
                self._evacuate(task, now, out, f"proof lease already released, {slots}")
            else:
                task.begin(Step.RELEASE, now)
                assert task.proof is not None  # READY evacuate tasks are proved (state table)
                self._move(task, TaskState.RELEASING, now, f"to '{dest}', {slots}", out)
                out.actions.append(ReleaseProof(task.vm, task.source, task.proof))

    # -- takeover ---------------------------------------------------------------------------------

    def _load(self, tasks: tuple[Task, ...], now: float, out: RecoveryOutput) -> None:
        self.queue.load(list(tasks))
        self._by_source = {}
        self._settled = {}
        self._marked_down = set()
        self._marking_down = set()
        self._late_proof = {}
        self._dests = None
        # Anyone who can write tasks/ can write a task: an active evacuation is checked against the
        # world before it is acted on (_verify_resumed), and what it says it did proves nothing.
        self._unverified = {t.vm for t in self.queue if t.kind == TaskKind.EVACUATE and t.state not in TERMINAL}
        for t in self.queue:
            self._by_source.setdefault(t.source, set()).add(t.vm)
            if t.done(Step.MARK_DOWN) and t.state not in TERMINAL and t.vm not in self._unverified:
                self._marked_down.add(t.source)
            if t.state in (TaskState.DONE, TaskState.FAILED):
                self._settled.setdefault(t.source, set()).add(t.vm)
        active = [t for t in self.queue if t.state not in TERMINAL]
        out.log.append(LogLine(Level.INFO, now, ACTOR,
                               f"leader: loaded {len(self.queue)} task(s), {len(active)} active"))
        for t in active:
            if t.vm in self._unverified:
                out.log.append(LogLine(Level.INFO, now, ACTOR,
                                       f"vm '{t.vm}': resumed by the new leader ({t.state.value}, host "
                                       f"'{t.source}'): held until the host and the VM are known"))
            else:
                self._resume(t, now, out)

    def _verify_resumed(self, now: float, out: RecoveryOutput) -> None:
        """Act on a resumed evacuation only when the world agrees with it: its host is known and not UP,
        its VM is known and runs on its host, nowhere, or already on its destination. Its stored proof is
        not trusted (this manager does not hold that lease): it is proved again, unless the VM already
        runs on the destination (the evacuation is then only confirmed, which starts nothing)."""
        for vm in sorted(self._unverified):
            task = self.queue.active(vm)
            if task is None:
                self._unverified.discard(vm)
                continue
            hh = self._health.get(task.source)
            if not self._inventory or hh is None or any(
                    hh.planes.get(p) is None or hh.planes[p].state == PlaneState.UNKNOWN for p in PLANES):
                continue  # not everything known yet: wait
            self._unverified.discard(vm)
            placed = self._placed.get(vm)
            wrong = ""
            if vm not in self._vms:
                wrong = "the VM is not in the inventory"
            elif placed is not None and placed not in (task.source, task.dest):
                wrong = f"the VM runs on '{placed}', neither its host nor its destination"
            # Its host up: a host back after a real proof, or a task forged against a healthy host. Only a
            # proof that observes a death (lease-taken) may go on there: it is refused while a copy runs.
            observe = all(hh.planes[p].state == PlaneState.UP for p in PLANES) or task.recheck
            if wrong:
                why = f"resumed task refused: {wrong} (stored state {task.state.value})"
                task.reason = why
                self._move(task, TaskState.CANCELLED, now, why, out, Level.ERROR)
                out.actions.append(Alert(Level.ERROR, task.source, vm, f"vm '{vm}': {why}; not acted on"))
                self._finish(task, out)
            elif (placed is not None and placed == task.dest and task.state in RUNNING) or (
                    task.state in (TaskState.QUEUED, TaskState.PROVING) and not observe):
                self._resume(task, now, out)
            else:
                if task.state == TaskState.RETRY_WAIT:
                    task.retry_at, task.resume = None, None
                if task.state == TaskState.EVACUATING and task.dest is not None:
                    self._deposed[vm] = (task.dest, task.proof)
                task.proof = None
                methods, timeout = self._methods(task), None
                if observe and task.row != STOPPED_KEY:
                    task.recheck = True  # refused (a copy holds the lease on its UP host): cancelled
                    methods, timeout = (ProofMethod.LEASE_TAKEN,), self.settings.recheck_timeout
                self._prove(task, methods, now, out, f"resumed by the new leader ({task.state.value}): "
                            "its proof is not this manager's, proved again", timeout)
                task.dest = None

    def _confirm_deposed(self, now: float, out: RecoveryOutput) -> None:
        """A resumed evacuation proved again may have been completed meanwhile by the previous leader
        (its start was in flight at the failover): the copy it started holds the VM's lease, so this
        leader's proof is refused again and again. The inventory showing the VM running on that
        leader's destination ends the recovery as done; nothing is started. Once this leader proved
        (it holds or held the lease: the old start failed or its own evacuation confirms it), or the
        task ended, the entry goes. The task's evidence keeps the proof that evacuation was made on."""
        for vm, (dest, proof) in sorted(self._deposed.items()):
            task = self.queue.active(vm)
            if task is None or task.state not in (TaskState.PROVING, TaskState.RETRY_WAIT):
                del self._deposed[vm]
                continue
            info = self._vms.get(vm)
            if self._placed.get(vm) != dest or info is None or info.state == STOPPED:
                continue
            del self._deposed[vm]
            if task.state == TaskState.PROVING:
                out.actions.append(CancelProof(vm, task.source, self._attempt(task)))
                task.finish(Step.PROVE, now, "cancelled", f"vm running on '{dest}'")
            task.retry_at, task.resume, task.recheck = None, None, False
            task.finish(Step.EVACUATE, now, "ok", "started by the previous leader")
            task.running_on, task.reason, task.proof = dest, "", proof
            self._move(task, TaskState.DONE, now, f"running on '{dest}': the previous leader's evacuation, "
                       "confirmed by the inventory", out)
            self._settle(task)
            self._stopped.forget(vm)
            self._finish(task, out)

    def _resume(self, task: Task, now: float, out: RecoveryOutput) -> None:
        """Repeat the (idempotent) step that was in flight when the old leader stopped; steps already
        recorded as done are not repeated."""
        why = "resumed by the new leader"
        match task.state:
            case TaskState.PROVING:
                task.finish(Step.PROVE, now, "interrupted by leader change")
                task.begin(Step.PROVE, now)
                methods = self._methods(task)
                timeout = self._restart_timeout(task, methods)
                if task.recheck:
                    methods, timeout = (ProofMethod.LEASE_TAKEN,), self.settings.recheck_timeout
                attempt = self._attempt(task)
                out.log.append(LogLine(Level.INFO, now, ACTOR,
                                       f"vm '{task.vm}': {why}: prove again, attempt {attempt}"))
                out.actions.append(Prove(task.vm, task.source, methods, attempt, timeout))
            case TaskState.MARKING_DOWN:
                if task.source in self._marked_down:
                    task.finish(Step.MARK_DOWN, now, "ok", "host already marked down")
                    self._move(task, TaskState.READY, now, f"{why}, host already marked down", out)
                elif task.source not in self._marking_down:
                    self._marking_down.add(task.source)
                    out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{task.source}': mark down ({why})"))
                    out.actions.append(MarkHostDown(task.source))
            case TaskState.RELEASING:
                assert task.proof is not None
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{task.vm}': {why}: release again"))
                out.actions.append(ReleaseProof(task.vm, task.source, task.proof))
            case TaskState.EVACUATING:
                assert task.proof is not None
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{task.vm}': {why}: evacuate again"))
                out.actions.append(Evacuate(task.vm, task.source, task.dest, task.proof))
            case TaskState.MIGRATING:
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{task.vm}': {why}: migrate again"))
                out.actions.append(LiveMigrate(task.vm, task.source, task.dest))
            case TaskState.QUEUED:
                if task.kind == TaskKind.MIGRATE:
                    self._move(task, TaskState.READY, now, why, out)
                else:
                    self._prove(task, self._methods(task), now, out, why)
            case _:
                pass  # READY / UNPLACED / RETRY_WAIT: dispatch and timers carry on

    # -- the one place state changes are made, persisted and logged ---------------------------------

    def _move(self, task: Task, new: TaskState, now: float, why: str, out: RecoveryOutput,
              level: Level = Level.INFO, persist: bool = True) -> None:
        out.log.append(self.queue.transition(task, new, now, why, level))
        self._touch(task.dest)  # a slot towards task.dest was taken or given back
        if persist:
            self._persist(task, out)

    @staticmethod
    def _persist(task: Task, out: RecoveryOutput) -> None:
        out.actions.append(PersistTask(task.vm, task.to_dict()))

    @staticmethod
    def _finish(task: Task, out: RecoveryOutput) -> None:
        out.actions.append(RecordEvidence(task.vm, task.recovery, task.to_dict()))


def _better(old: Decision, new: Decision) -> bool:
    """The host lost fewer planes than before (a strict subset): it is on its way back."""
    if old.action is None or {FABRIC_KEY, AGENT_STOPPED_KEY, MAINTENANCE_KEY} & {old.key, new.key}:
        return False
    before, after = set(old.key.split("+")), set(new.key.split("+"))
    return after < before


__all__ = ["RecoveryCore"]
