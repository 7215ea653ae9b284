"""Task steps: prove, mark down, release, evacuate or migrate, retry; the results of each, and the
dispatch of READY tasks to destinations within the concurrency limits.
"""

from __future__ import annotations

from vmha.core.actions import (
    Alert,
    CancelProof,
    DropProof,
    Evacuate,
    InvariantError,
    LiveMigrate,
    MarkHostDown,
    Prove,
    RecoveryOutput,
    ReleaseProof,
)
from vmha.core.desired import STOPPED_KEY, observing_methods
from vmha.core.events import Attempt, StepDone
from vmha.core.fencing import FenceProof, ProofMethod, proof_methods
from vmha.core.log import Level, LogLine
from vmha.core.placement import Placement
from vmha.core.queue import ACTOR, STEP_STATE, Step, Task, TaskKind, TaskState
from vmha.core.state import EVACUATING_ACTIONS, MOVING_ACTIONS


class TaskSteps(Placement):
    """A recovery task, step by step: each step begun, its result taken in, retried or given up."""

    def _prove(self, task: Task, methods: tuple[ProofMethod, ...], now: float, out: RecoveryOutput,
               why: str, timeout: float | None = None) -> None:
        task.begin(Step.PROVE, now)
        if task.proof_started is None:
            task.proof_started = now
        timeout = self._restart_timeout(task, methods) or timeout
        attempt = self._attempt(task)
        self._transition(task, TaskState.PROVING, now,
                         f"{why}, methods {','.join(m.value for m in methods)}, attempt {attempt}", out)
        out.actions.append(Prove(task.vm, task.source, methods, attempt, timeout))

    def _restart_timeout(self, task: Task, methods: tuple[ProofMethod, ...]) -> float | None:
        """A restart's lease-taken-only proof answers at once (the lease is free or it is not): no
        waiting the runtime's default, which is long enough for host-dead."""
        if task.row == STOPPED_KEY and ProofMethod.HOST_DEAD not in methods:
            return self.settings.recheck_timeout
        return None

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
            self._transition(task, TaskState.READY, now, f"{why}, its host is up: restart in place", out)
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
        if task.recheck and (cur is None or cur.decision.action not in EVACUATING_ACTIONS):
            # The VM still holds its lease on a host that is back: nothing to recover.
            task.recheck = False
            task.finish(Step.PROVE, now, f"refused: {reason}")
            why = f"cancelled: host back and the VM still holds its lease ({reason})"
            self._transition(task, TaskState.CANCELLED, now, why, out)
            self._record_evidence(task, out)
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
            self._transition(task, TaskState.READY, now, f"{why}, host already marked down", out)
            return
        task.begin(Step.MARK_DOWN, now)
        self._transition(task, TaskState.MARKING_DOWN, now, why, out)
        if host not in self._marking_down:
            self._marking_down.add(host)
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': mark down (fenced: {why})"))
            out.actions.append(MarkHostDown(host))

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
            self._evacuate(task, now, out, "proof lease released", task.dest)
            return
        if ev.step in (Step.EVACUATE, Step.MIGRATE):
            task.finish(ev.step, now, "ok", ev.detail)
            task.running_on = ev.running_on or task.dest
            self._transition(task, TaskState.DONE, now, f"running on '{task.running_on}'", out)
            self._place(task.vm, task.running_on)
            self._mark_handled(task)
            self._stopped.forget(task.vm)  # an inventory taken before the move may still say stopped
            self._record_evidence(task, out)
            if task.running_on in self._maintenance:
                # It arrived on a host that entered maintenance while it travelled: drain it too.
                self._drain(task.running_on, [task.vm], f"vm '{task.vm}' arrived in maintenance", now, out)
                return
            dest = self._decisions.get(task.running_on or "")
            if dest is not None and dest.acted and dest.decision.action in MOVING_ACTIONS:
                # It arrived on a host that failed while it travelled: act on that host again, for it.
                out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{task.vm}': arrived on '{task.running_on}', "
                                       f"which failed meanwhile (row {dest.decision.key}): acting on it again"))
                dest.acted, dest.act_at = False, now
                self._held.add(task.running_on or "")
            return
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{ev.vm}': unexpected result of {ev.step.value}"))

    def _mark_handled(self, task: Task) -> None:
        """No second task for the VM while its source stays failed. A source already seen healthy again
        (a move can end after that) marks nothing: its next failure must cover the VM."""
        if task.source in self._decisions:
            self._handled.setdefault(task.source, set()).add(task.vm)

    def _evacuate(self, task: Task, now: float, out: RecoveryOutput, why: str, dest: str | None) -> None:
        proof = task.proof
        if proof is None:  # unreachable by the state table; Evacuate itself refuses it anyway
            raise InvariantError(f"vm '{task.vm}': evacuating state without a proof")
        task.begin(Step.EVACUATE, now)
        self._transition(task, TaskState.EVACUATING, now, f"{why}, to '{dest}'", out, dest=dest)
        out.actions.append(Evacuate(task.vm, task.source, dest, proof))

    def _fail_step(self, task: Task, step: Step, reason: str, retryable: bool, now: float,
                   out: RecoveryOutput, retry_after: float = 0.0) -> None:
        task.finish(step, now, reason)
        task.attempts += 1
        task.reason = reason
        limits = self.queue.limits
        if not retryable or task.attempts >= limits.max_attempts:
            why = (f"{step.value} failed: {reason}; "
                   + ("not retryable" if not retryable else f"{task.attempts} attempts"))
            self._transition(task, TaskState.FAILED, now, why, out, Level.ERROR)
            out.actions.append(Alert(Level.ERROR, task.source, task.vm,
                                     f"vm '{task.vm}' recovery FAILED: {why}"))
            if task.proof is not None and not task.released():
                out.log.append(LogLine(Level.INFO, now, ACTOR, f"vm '{task.vm}': proof lease released: its old "
                                       f"copy on '{task.source}' is proven dead, it may be started by hand"))
                out.actions.append(DropProof(task.vm, task.source))
            if task.kind == TaskKind.MIGRATE:
                self._source_failed(task, now, out)  # a failed move recovered nothing: not handled
            else:
                self._mark_handled(task)
            self._stopped.give_up(task.vm)
            self._record_evidence(task, out)
            return
        # The API's own ask (Retry-After) lengthens the backoff, never beyond the cap.
        wait = max(limits.backoff(task.attempts), min(retry_after, limits.retry_cap))
        # A restart step retries from READY: it gives its slot back and may get another destination.
        resume = STEP_STATE[step] if step in (Step.PROVE, Step.MARK_DOWN) else TaskState.READY
        self._transition(task, TaskState.RETRY_WAIT, now,
                         f"{step.value} failed: {reason}; attempt {task.attempts}/{limits.max_attempts}, "
                         f"retry in {wait:g}s" + (f" (API asked {retry_after:g}s)" if retry_after > 0 else ""),
                         out, Level.WARN, retry=(now + wait, resume))

    def _source_failed(self, task: Task, now: float, out: RecoveryOutput) -> None:
        """A live migration failed: if its source failed meanwhile (a row to evacuate), the host's
        evacuation covers the VM (proof first), acting again if it had acted while the migration held
        the VM; a row that comes later covers it anyway (the VM is not marked handled)."""
        cur = self._decisions.get(task.source)
        if cur is None or cur.decision.action not in EVACUATING_ACTIONS:
            return
        out.log.append(LogLine(Level.WARN, now, ACTOR, f"vm '{task.vm}': its source '{task.source}' failed during "
                               f"the live migration (row {cur.decision.key}): its {cur.decision.action.value} "
                               "covers the VM"))
        if cur.acted:
            cur.acted, cur.act_at = False, now
            self._held.add(task.source)

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
                why = kept or ("no surviving host has room" if self._eligible() else "no healthy host")
                self._transition(task, TaskState.UNPLACED, now, why, out, Level.WARN)
                out.actions.append(Alert(Level.WARN, task.source, task.vm, f"vm '{task.vm}' cannot be placed: {why}"))
                continue
            if dest is None:
                self.queue.push_back(task)  # every destination with room is busy: wait for a slot
                return
            slots = f"slot {self.queue.running() + 1}/{self.queue.limits.max_parallel}"
            if task.kind == TaskKind.MIGRATE:
                task.begin(Step.MIGRATE, now)
                self._transition(task, TaskState.MIGRATING, now, f"live-migrate to '{dest}', {slots}", out, dest=dest)
                out.actions.append(LiveMigrate(task.vm, task.source, dest))
            elif task.released():
                self._evacuate(task, now, out, f"proof lease already released, {slots}", dest)
            else:
                task.begin(Step.RELEASE, now)
                assert task.proof is not None  # READY evacuate tasks are proved (state table)
                self._transition(task, TaskState.RELEASING, now, f"to '{dest}', {slots}", out, dest=dest)
                out.actions.append(ReleaseProof(task.vm, task.source, task.proof))
