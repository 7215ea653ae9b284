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
`Evacuate.__post_init__` (actions.py): the action cannot be built otherwise, so no code path can emit one.

Where each part lives, read in this order (each module a class over the one before; RecoveryCore is the
last and the only one callers use):
  events.py, actions.py   what the core takes in and gives out; settings.py its knobs
  state.py                what it knows, and `_transition`: the one place a task changes state (queue.transition)
  placement.py            destinations, room and slots, the room kept for higher priorities, rebalance, drain
  steps.py                a task's steps: prove, mark down, release, evacuate / migrate, retries, dispatch
  takeover.py             a new leader: load the tasks, check them against the world, resume
  rejoin.py               hosts coming back (rejoin check, enable) and quarantine
  hosts.py                per-host decisions: the policy row, held then acted upon; fabric, pause, maintenance
  recovery.py             the step itself (one event in), timers, inventory, desired-state restarts
"""

from __future__ import annotations

from vmha.core.actions import RecoveryOutput
from vmha.core.desired import RESTART, STOPPED, STOPPED_KEY, observing_methods
from vmha.core.events import (
    AgentStopped,
    FabricUpdate,
    HealthUpdate,
    HostEnabled,
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
)
from vmha.core.hosts import HostDecisions
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import AGENT_STOPPED_KEY
from vmha.core.queue import ACTOR, TERMINAL, Task, TaskKind, TaskState


class RecoveryCore(HostDecisions):
    """The recovery core: `step(event, now)` in, RecoveryOutput out (module docstring)."""

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
            case StepFailed(vm, step, reason, retryable, retry_after):
                task = self._expect(vm, step, now, out)
                if task is not None:
                    self._fail_step(task, step, reason, retryable, now, out, retry_after)
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
                self._take_over(tasks, now, out)
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
                self._transition(task, TaskState.READY, now, why, out)

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


__all__ = ["RecoveryCore"]
