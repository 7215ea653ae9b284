"""Takeover: a new leader loads the persisted tasks, checks each active evacuation against the world
before acting on it, and repeats only the (idempotent) step that was in flight.
"""

from __future__ import annotations

from vmha.core.actions import (
    Alert,
    CancelProof,
    Evacuate,
    LiveMigrate,
    MarkHostDown,
    Prove,
    RecoveryOutput,
    ReleaseProof,
)
from vmha.core.desired import STOPPED, STOPPED_KEY
from vmha.core.fencing import ProofMethod
from vmha.core.log import Level, LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.queue import ACTOR, RUNNING, TERMINAL, Step, Task, TaskKind, TaskState
from vmha.core.steps import TaskSteps


class Takeover(TaskSteps):
    """Resuming the tasks of an earlier leader, which are not trusted until the world agrees with them."""

    def _take_over(self, tasks: tuple[Task, ...], now: float, out: RecoveryOutput) -> None:
        self.queue.load(list(tasks))
        self._by_source = {}
        self._handled = {}
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
                self._handled.setdefault(t.source, set()).add(t.vm)
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
            # Known and settled: a new leader sees a dead host's planes go SUSPECT, then DOWN one by one
            # (ms apart). Resumed on a half-changed view (management DOWN, the others SUSPECT), the task
            # was then cancelled by that row's withdrawal and the VM recovered a second time.
            if not self._inventory or hh is None or any(
                    hh.planes.get(p) is None or hh.planes[p].state in (PlaneState.UNKNOWN, PlaneState.SUSPECT)
                    for p in PLANES):
                continue  # not everything known, or not settled yet: wait
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
                self._transition(task, TaskState.CANCELLED, now, why, out, Level.ERROR)
                out.actions.append(Alert(Level.ERROR, task.source, vm, f"vm '{vm}': {why}; not acted on"))
                self._record_evidence(task, out)
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
            task.running_on, task.proof = dest, proof
            self._transition(task, TaskState.DONE, now, f"running on '{dest}': the previous leader's evacuation, "
                             "confirmed by the inventory", out)
            self._mark_handled(task)
            self._stopped.forget(vm)
            self._record_evidence(task, out)

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
                    self._transition(task, TaskState.READY, now, f"{why}, host already marked down", out)
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
                    self._transition(task, TaskState.READY, now, why, out)
                else:
                    self._prove(task, self._methods(task), now, out, why)
            case _:
                pass  # READY / UNPLACED / RETRY_WAIT: dispatch and timers carry on
