"""The recovery queue: one task per VM, named steps with recorded progress, bounded concurrency.

A task is a plain dataclass persisted by the runtime as JSON under tasks/<vm> (keys.py), every
transition written with a compare-and-swap. Each transition is one named state change that goes
through `RecoveryQueue.transition`, which checks it against the closed table TRANSITIONS; the
progress of a recovery is the list of finished steps, so a new leader that loads the tasks resumes
at the first step not yet done and never repeats a finished one.

Flows (TaskKind):
  evacuate: queued -> proving -> marking-down -> ready -> releasing -> evacuating -> done
  migrate:  queued -> ready -> migrating -> done
  A failed step goes to retry-wait (exponential backoff) and back to the state of that step, or to
  failed after max_attempts; unplaced waits for capacity. A host back before a proof is rechecked
  (proving again, lease-taken only): cancelled if the VM still holds its lease there.

Concurrency: a task holds a slot (global max_parallel, and max_per_host towards its destination)
from releasing/migrating until it is done or fails that step; proving holds none, as it loads no
destination and may wait a long time for sanlock's host-dead.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vmha.core.fencing import FenceProof
from vmha.core.log import Level, LogLine
from vmha.core.planes import Plane

ACTOR = "manager"


class TaskKind(StrEnum):
    EVACUATE = "evacuate"  # fence proof first, then restart elsewhere
    MIGRATE = "migrate"  # live migration, no proof needed


class Step(StrEnum):
    """The named, idempotent steps of a recovery; each is recorded once done."""

    PROVE = "prove"
    MARK_DOWN = "mark-down"
    RELEASE = "release"
    EVACUATE = "evacuate"
    MIGRATE = "migrate"


class TaskState(StrEnum):
    QUEUED = "queued"
    PROVING = "proving"
    MARKING_DOWN = "marking-down"  # proof held; waiting for the source host to be marked down
    READY = "ready"  # waiting for a concurrency slot and a destination
    UNPLACED = "unplaced"  # no surviving host has room; waits for capacity
    RELEASING = "releasing"  # releasing the proof lease right before the restart
    EVACUATING = "evacuating"
    MIGRATING = "migrating"
    RETRY_WAIT = "retry-wait"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[TaskState] = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
# States that hold a concurrency slot towards task.dest.
RUNNING: frozenset[TaskState] = frozenset({TaskState.RELEASING, TaskState.EVACUATING, TaskState.MIGRATING})
# The state in which each step runs (a retry resumes there).
STEP_STATE: Mapping[Step, TaskState] = {
    Step.PROVE: TaskState.PROVING,
    Step.MARK_DOWN: TaskState.MARKING_DOWN,
    Step.RELEASE: TaskState.RELEASING,
    Step.EVACUATE: TaskState.EVACUATING,
    Step.MIGRATE: TaskState.MIGRATING,
}

_S = TaskState
TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = {
    _S.QUEUED: frozenset({_S.PROVING, _S.READY, _S.CANCELLED}),
    # PROVING -> PROVING: the host came back, the proof in flight is replaced by a lease-taken recheck.
    # PROVING/RETRY_WAIT -> DONE: a resumed evacuation proved again that the previous leader completed
    # (takeover.py, _confirm_deposed): the VM runs on that leader's destination.
    _S.PROVING: frozenset({_S.PROVING, _S.MARKING_DOWN, _S.READY, _S.RETRY_WAIT, _S.DONE, _S.FAILED,
                           _S.CANCELLED}),
    # A task a new leader resumes is checked first (takeover.py, _verify_resumed): -> PROVING when its
    # stored proof is not this manager's to trust (proved again), -> CANCELLED when it contradicts the
    # world (its host is UP, its VM runs elsewhere).
    _S.MARKING_DOWN: frozenset({_S.PROVING, _S.READY, _S.RETRY_WAIT, _S.FAILED, _S.CANCELLED}),
    # READY -> EVACUATING: a retried evacuation whose proof lease was already released.
    _S.READY: frozenset({_S.PROVING, _S.RELEASING, _S.EVACUATING, _S.MIGRATING, _S.UNPLACED, _S.CANCELLED}),
    _S.UNPLACED: frozenset({_S.PROVING, _S.READY, _S.CANCELLED}),
    _S.RELEASING: frozenset({_S.PROVING, _S.EVACUATING, _S.RETRY_WAIT, _S.FAILED, _S.CANCELLED}),
    _S.EVACUATING: frozenset({_S.PROVING, _S.DONE, _S.RETRY_WAIT, _S.FAILED, _S.CANCELLED}),
    _S.MIGRATING: frozenset({_S.DONE, _S.RETRY_WAIT, _S.FAILED}),
    _S.RETRY_WAIT: frozenset(
        {_S.PROVING, _S.MARKING_DOWN, _S.READY, _S.RELEASING, _S.EVACUATING, _S.DONE, _S.FAILED, _S.CANCELLED}
    ),
    # A proof that arrives after a cancel means the old copy is gone: the recovery continues.
    _S.CANCELLED: frozenset({_S.MARKING_DOWN, _S.READY}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
}


# States whose reason (Task.reason) is the transition's why: what ended the task or what it waits for.
_EXPLAINED: frozenset[TaskState] = frozenset({TaskState.CANCELLED, TaskState.FAILED, TaskState.UNPLACED})


class TransitionError(ValueError):
    """A state change outside TRANSITIONS: a bug in the caller, never silently accepted."""


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_parallel: int = 8
    max_per_host: int = 4
    retry_base: float = 2.0
    retry_cap: float = 60.0
    max_attempts: int = 5

    def backoff(self, attempt: int) -> float:
        """Wait after the attempt-th failure: retry_base * 2^(attempt-1), capped at retry_cap."""
        return float(min(self.retry_base * 2 ** (attempt - 1), self.retry_cap))


@dataclass(slots=True)
class StepRecord:
    """One attempt of one step: when it began and ended and how ("ok" or the error)."""

    step: Step
    started: float
    finished: float | None = None
    result: str = ""  # "ok", or the failure reason
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "step": self.step.value,
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> StepRecord:
        finished = d.get("finished")
        return cls(
            step=Step(str(d["step"])),
            started=float(str(d["started"])),
            finished=None if finished is None else float(str(finished)),
            result=str(d.get("result", "")),
            detail=str(d.get("detail", "")),
        )


@dataclass(slots=True)
class Task:
    """The recovery of one VM and its evidence record: why was, or wasn't, this VM restarted."""

    vm: str
    source: str  # the host the VM ran on when the recovery began
    kind: TaskKind
    recovery: int  # n of records/<vm>/<n>: counts the recoveries of this VM
    priority: int
    row: str  # policy row ('storage', 'management+service', ...)
    action: str  # policy action of that row
    failed: dict[str, float]  # plane -> since when it has been DOWN (evidence)
    created: float
    state: TaskState = TaskState.QUEUED
    since: float = 0.0  # when the current state began
    attempts: int = 0  # failed attempts so far (all steps)
    retry_at: float | None = None  # RETRY_WAIT: when to retry
    resume: TaskState | None = None  # RETRY_WAIT: the state to retry in
    dest: str | None = None  # chosen destination (RELEASING..DONE)
    proof: FenceProof | None = None
    proof_started: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    reason: str = ""  # why it is FAILED / CANCELLED / UNPLACED (set by transition), or the last error
    running_on: str | None = None  # where the VM runs once DONE
    # The host came back before a proof: the task is proving with lease-taken only, to learn whether
    # the VM died meanwhile (then its recovery continues) or still runs (then it is cancelled).
    recheck: bool = False

    def attempts_of(self, step: Step) -> int:
        """How many times `step` was begun (the n of a proof attempt's tag)."""
        return sum(1 for r in self.steps if r.step == step)

    def done(self, step: Step) -> bool:
        return any(r.step == step and r.result == "ok" for r in self.steps)

    def released(self) -> bool:
        """The lease of the latest proof was released (a task proved again releases again)."""
        for r in reversed(self.steps):
            if r.result == "ok" and r.step in (Step.PROVE, Step.RELEASE):
                return r.step == Step.RELEASE
        return False

    def begin(self, step: Step, now: float) -> None:
        self.steps.append(StepRecord(step, now))

    def finish(self, step: Step, now: float, result: str, detail: str = "") -> None:
        """Close the open record of `step` (or add a closed one: a step settled without an attempt)."""
        for r in reversed(self.steps):
            if r.step == step and r.finished is None:
                r.finished, r.result, r.detail = now, result, detail
                return
        self.steps.append(StepRecord(step, now, now, result, detail))

    def to_dict(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "source": self.source,
            "kind": self.kind.value,
            "recovery": self.recovery,
            "priority": self.priority,
            "row": self.row,
            "action": self.action,
            "failed": dict(self.failed),
            "created": self.created,
            "state": self.state.value,
            "since": self.since,
            "attempts": self.attempts,
            "retry_at": self.retry_at,
            "resume": None if self.resume is None else self.resume.value,
            "dest": self.dest,
            "proof": None if self.proof is None else self.proof.to_dict(),
            "proof_started": self.proof_started,
            "steps": [r.to_dict() for r in self.steps],
            "reason": self.reason,
            "running_on": self.running_on,
            "recheck": self.recheck,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Task:
        """Parse a persisted task; raises ValueError/KeyError on a broken value (caller logs, skips)."""
        failed = d.get("failed") or {}
        steps = d.get("steps") or []
        proof = d.get("proof")
        if not isinstance(failed, Mapping) or not isinstance(steps, list):
            raise ValueError(f"task {d.get('vm')!r}: 'failed' must be a mapping and 'steps' a list")
        if proof is not None and not isinstance(proof, Mapping):
            raise ValueError(f"task {d.get('vm')!r}: 'proof' must be a mapping")
        for p in failed:
            Plane(str(p))  # refuse an unknown plane name early
        return cls(
            vm=str(d["vm"]),
            source=str(d["source"]),
            kind=TaskKind(str(d["kind"])),
            recovery=int(str(d["recovery"])),
            priority=int(str(d.get("priority", 0))),
            row=str(d.get("row", "")),
            action=str(d.get("action", "")),
            failed={str(k): float(str(v)) for k, v in failed.items()},
            created=float(str(d["created"])),
            state=TaskState(str(d["state"])),
            since=float(str(d.get("since", 0.0))),
            attempts=int(str(d.get("attempts", 0))),
            retry_at=_opt_float(d.get("retry_at")),
            resume=None if d.get("resume") is None else TaskState(str(d["resume"])),
            dest=None if d.get("dest") is None else str(d["dest"]),
            proof=None if proof is None else FenceProof.from_dict(proof),
            proof_started=_opt_float(d.get("proof_started")),
            steps=[StepRecord.from_dict(r) for r in steps],
            reason=str(d.get("reason", "")),
            running_on=None if d.get("running_on") is None else str(d["running_on"]),
            recheck=d.get("recheck") is True,
        )

    def describe(self, when: Callable[[float], str]) -> str:
        """The evidence record as operator text (`vmha recovery show VM`), each time as `when` shows it."""
        lines = [
            f"vm '{self.vm}' recovery {self.recovery}: {self.state.value}"
            + (f" ({self.reason})" if self.reason else ""),
            f"  host '{self.source}', row {self.row or '-'}, action {self.action}, priority {self.priority}",
            "  failed planes: "
            + (", ".join(f"{p} since {when(t)}" for p, t in sorted(self.failed.items())) or "none"),
        ]
        if self.proof is not None:
            lines.append(
                f"  proof: {self.proof.method.value} started {when(self.proof.started)}, "
                f"proved {when(self.proof.proved)} ({self.proof.proved - self.proof.started:.1f} s)"
                + "".join(f" {k}={v}" for k, v in sorted(self.proof.details.items()))
            )
        else:
            lines.append("  proof: none")
        for r in self.steps:
            end = "..." if r.finished is None else f"{when(r.finished)} ({r.finished - r.started:.1f} s)"
            lines.append(
                f"  step {r.step.value}: {when(r.started)} -> {end} {r.result}"
                + (f" ({r.detail})" if r.detail else "")
            )
        if self.running_on:
            lines.append(f"  running on '{self.running_on}'")
        return "\n".join(lines)


def _opt_float(v: object) -> float | None:
    return None if v is None else float(str(v))


class RecoveryQueue:
    """The tasks of the cluster by VM, with slot accounting and the priority order of READY tasks."""

    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._tasks: dict[str, Task] = {}
        self._running_to: dict[str, int] = {}  # dest -> tasks holding a slot towards it
        self._running = 0
        # READY tasks, highest priority first, then by name; stale entries are skipped on pop.
        self._ready: list[tuple[int, str]] = []
        self._in_ready: set[str] = set()  # at most one heap entry per VM
        self._recoveries: dict[str, int] = {}  # vm -> last recovery number seen
        self._states: dict[TaskState, set[str]] = {s: set() for s in TaskState}

    # -- queries ----------------------------------------------------------------------------------

    def get(self, vm: str) -> Task | None:
        return self._tasks.get(vm)

    def __iter__(self) -> Iterator[Task]:
        """All tasks, sorted by VM name."""
        return iter([self._tasks[vm] for vm in sorted(self._tasks)])

    def __len__(self) -> int:
        return len(self._tasks)

    def values(self) -> Iterable[Task]:
        """All tasks, unordered (cheaper than iterating the queue, which sorts)."""
        return self._tasks.values()

    def active(self, vm: str) -> Task | None:
        """The VM's task if it is not finished (one active task per VM)."""
        t = self._tasks.get(vm)
        return t if t is not None and t.state not in TERMINAL else None

    def in_state(self, state: TaskState) -> list[Task]:
        """Tasks in one state, sorted by VM name (cheap: an index, not a scan)."""
        return [self._tasks[vm] for vm in sorted(self._states[state])]

    def count(self, state: TaskState) -> int:
        return len(self._states[state])

    def running(self) -> int:
        return self._running

    def running_to(self, dest: str) -> int:
        return self._running_to.get(dest, 0)

    def has_slot(self, dest: str) -> bool:
        return self._running < self.limits.max_parallel and self.running_to(dest) < self.limits.max_per_host

    def full(self) -> bool:
        return self._running >= self.limits.max_parallel

    def pop_ready(self) -> Task | None:
        """The READY task to dispatch next (highest priority, then name), removed from the order."""
        while self._ready:
            _, vm = heapq.heappop(self._ready)
            self._in_ready.discard(vm)
            t = self._tasks.get(vm)
            if t is not None and t.state == TaskState.READY:
                return t
        return None

    def push_back(self, task: Task) -> None:
        """Return a READY task that could not start yet to the order."""
        if task.vm not in self._in_ready:
            self._in_ready.add(task.vm)
            heapq.heappush(self._ready, (-task.priority, task.vm))

    # -- changes ----------------------------------------------------------------------------------

    def add(self, task: Task, now: float) -> Task:
        """Add a new task; refused while the VM has an active one (de-duplication by VM)."""
        if self.active(task.vm) is not None:
            raise TransitionError(f"vm '{task.vm}' already has an active recovery task")
        task.since = now
        old = self._tasks.get(task.vm)
        if old is not None:
            self._account(old, -1)  # a finished task of an earlier recovery: replaced
        self._recoveries[task.vm] = max(self._recoveries.get(task.vm, 0), task.recovery)
        self._tasks[task.vm] = task
        self._account(task, +1)
        return task

    def next_recovery(self, vm: str) -> int:
        return self._recoveries.get(vm, 0) + 1

    def load(self, tasks: list[Task]) -> None:
        """Replace every task with persisted ones (leadership takeover)."""
        self._tasks = {}
        self._running_to = {}
        self._running = 0
        self._ready = []
        self._in_ready = set()
        self._states = {s: set() for s in TaskState}
        for t in sorted(tasks, key=lambda t: t.vm):
            self._tasks[t.vm] = t
            self._recoveries[t.vm] = max(self._recoveries.get(t.vm, 0), t.recovery)
            self._account(t, +1)

    def transition(self, task: Task, new: TaskState, now: float, why: str, level: Level = Level.INFO,
                   retry: tuple[float, TaskState] | None = None, dest: str | None = None) -> LogLine:
        """THE state change: checked against TRANSITIONS, slots kept in step, one log line out. The state's
        data changes with it: retry, (retry_at, resume), given for RETRY_WAIT and only for it (a retry from
        READY gives its destination up); dest, given only for a state that holds a slot towards it; the
        reason, `why` for a cancelled, failed or unplaced task, none once done."""
        old = task.state
        if new not in TRANSITIONS[old]:
            raise TransitionError(f"vm '{task.vm}': {old.value} -> {new.value} is not a valid transition")
        if (retry is not None) != (new == TaskState.RETRY_WAIT):
            raise TransitionError(f"vm '{task.vm}': -> {new.value} " + ("needs" if retry is None else "takes no")
                                  + " retry time and state")
        if dest is not None and new not in RUNNING:
            raise TransitionError(f"vm '{task.vm}': -> {new.value} takes no destination")
        self._account(task, -1)  # the slot towards the old destination is given back first
        task.state, task.since = new, now
        if retry is not None:
            task.retry_at, task.resume = retry
            if task.resume == TaskState.READY:
                task.dest = None
        if dest is not None:
            task.dest = dest
        if new in _EXPLAINED:
            task.reason = why
        elif new == TaskState.DONE:
            task.reason = ""
        self._account(task, +1)
        return LogLine(
            level, now, ACTOR, f"vm '{task.vm}' on host '{task.source}': {old.value} -> {new.value} ({why})"
        )

    def _account(self, task: Task, sign: int) -> None:
        if sign > 0:
            self._states[task.state].add(task.vm)
        else:
            self._states[task.state].discard(task.vm)
        if task.state in RUNNING:
            if task.dest is None:
                raise TransitionError(f"vm '{task.vm}': {task.state.value} needs a destination")
            self._running += sign
            self._running_to[task.dest] = self._running_to.get(task.dest, 0) + sign
            if self._running_to[task.dest] == 0:
                del self._running_to[task.dest]
        elif task.state == TaskState.READY and sign > 0:
            self.push_back(task)
