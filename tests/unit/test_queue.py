"""The recovery queue: de-duplication, the closed transition table, slots, priority order, backoff,
and tasks that survive JSON (they are persisted in etcd)."""

from __future__ import annotations

import json

import pytest

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.queue import (
    TERMINAL,
    TRANSITIONS,
    QueueLimits,
    RecoveryQueue,
    Step,
    Task,
    TaskKind,
    TaskState,
    TransitionError,
)


def task(vm: str, priority: int = 0, recovery: int = 1, source: str = "h1") -> Task:
    return Task(vm, source, TaskKind.EVACUATE, recovery, priority, "storage", "fence-evacuate",
                {"storage": 3.0}, created=3.0)


def test_backoff_doubles_from_base_and_stops_at_the_cap() -> None:
    limits = QueueLimits(retry_base=2.0, retry_cap=60.0)
    assert [limits.backoff(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert QueueLimits(retry_base=0.5, retry_cap=3.0).backoff(4) == 3.0


def test_one_active_task_per_vm_and_a_new_recovery_after_the_old_one_ended() -> None:
    q = RecoveryQueue(QueueLimits())
    t1 = q.add(task("vm1"), 1.0)
    with pytest.raises(TransitionError, match="already has an active"):
        q.add(task("vm1", recovery=2), 2.0)
    q.transition(t1, TaskState.CANCELLED, 3.0, "host back")
    assert q.next_recovery("vm1") == 2
    t2 = q.add(task("vm1", recovery=q.next_recovery("vm1")), 4.0)
    assert q.get("vm1") is t2 and q.active("vm1") is t2
    assert q.in_state(TaskState.CANCELLED) == [] and q.in_state(TaskState.QUEUED) == [t2]


def test_transition_outside_the_table_is_refused_and_changes_nothing() -> None:
    q = RecoveryQueue(QueueLimits())
    t = q.add(task("vm1"), 1.0)
    with pytest.raises(TransitionError, match="queued -> evacuating"):
        q.transition(t, TaskState.EVACUATING, 2.0, "skip the proof")
    assert t.state == TaskState.QUEUED and t.since == 1.0


def test_terminal_states_lead_nowhere_except_a_late_proof_after_a_cancel() -> None:
    assert TRANSITIONS[TaskState.DONE] == frozenset()
    assert TRANSITIONS[TaskState.FAILED] == frozenset()
    assert TRANSITIONS[TaskState.CANCELLED] == frozenset({TaskState.MARKING_DOWN, TaskState.READY})
    assert set(TRANSITIONS) == set(TaskState)
    assert {TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED} == TERMINAL


def test_transition_log_line() -> None:
    q = RecoveryQueue(QueueLimits())
    t = q.add(task("vm3", source="h2"), 1.0)
    line = q.transition(t, TaskState.PROVING, 12.0, "row storage, action fence-evacuate")
    assert line.render() == (
        "info    12.0 manager: vm 'vm3' on host 'h2': queued -> proving (row storage, action fence-evacuate)"
    )


def _to_ready(q: RecoveryQueue, t: Task) -> None:
    q.transition(t, TaskState.PROVING, 1.0, "")
    q.transition(t, TaskState.MARKING_DOWN, 2.0, "")
    q.transition(t, TaskState.READY, 3.0, "")


def test_ready_order_is_priority_then_name_and_push_back_does_not_duplicate() -> None:
    q = RecoveryQueue(QueueLimits())
    for vm, prio in [("b", 1), ("a", 1), ("c", 9), ("d", 0)]:
        _to_ready(q, q.add(task(vm, prio), 0.0))
    first = q.pop_ready()
    assert first is not None and first.vm == "c"
    q.push_back(first)
    q.push_back(first)
    order = []
    while (t := q.pop_ready()) is not None:
        order.append(t.vm)
    assert order == ["c", "a", "b", "d"]


def test_slots_count_running_tasks_globally_and_per_destination() -> None:
    q = RecoveryQueue(QueueLimits(max_parallel=2, max_per_host=1))
    a, b = q.add(task("a"), 0.0), q.add(task("b"), 0.0)
    _to_ready(q, a)
    _to_ready(q, b)
    a.dest = "h2"
    q.transition(a, TaskState.RELEASING, 4.0, "")
    assert q.running() == 1 and q.running_to("h2") == 1
    assert not q.has_slot("h2") and q.has_slot("h3")
    b.dest = "h3"
    q.transition(b, TaskState.RELEASING, 4.0, "")
    assert q.full() and not q.has_slot("h4")
    q.transition(a, TaskState.EVACUATING, 5.0, "")
    assert q.running() == 2  # still the same slot
    q.transition(a, TaskState.DONE, 6.0, "")
    assert q.running() == 1 and q.running_to("h2") == 0 and q.has_slot("h2")


def test_running_state_without_destination_is_refused() -> None:
    q = RecoveryQueue(QueueLimits())
    t = q.add(task("a"), 0.0)
    _to_ready(q, t)
    with pytest.raises(TransitionError, match="needs a destination"):
        q.transition(t, TaskState.RELEASING, 4.0, "")


def test_retry_wait_is_entered_only_with_its_retry_time_and_state() -> None:
    q = RecoveryQueue(QueueLimits())
    t = q.add(task("a"), 0.0)
    q.transition(t, TaskState.PROVING, 1.0, "")
    with pytest.raises(TransitionError, match="needs retry time and state"):
        q.transition(t, TaskState.RETRY_WAIT, 2.0, "proof refused")
    with pytest.raises(TransitionError, match="takes no retry time and state"):
        q.transition(t, TaskState.MARKING_DOWN, 2.0, "proved", retry=(4.0, TaskState.PROVING))
    assert t.state == TaskState.PROVING and t.retry_at is None and t.resume is None
    q.transition(t, TaskState.RETRY_WAIT, 2.0, "proof refused", retry=(4.0, TaskState.PROVING))
    assert (t.state, t.retry_at, t.resume) == (TaskState.RETRY_WAIT, 4.0, TaskState.PROVING)


def test_transition_sets_the_reason_of_a_cancelled_failed_or_unplaced_task_and_clears_it_when_done() -> None:
    q = RecoveryQueue(QueueLimits())
    t = q.add(task("a"), 0.0)
    _to_ready(q, t)
    q.transition(t, TaskState.UNPLACED, 4.0, "no healthy host")
    assert t.reason == "no healthy host"
    q.transition(t, TaskState.READY, 5.0, "room on a host again")
    q.transition(t, TaskState.RELEASING, 6.0, "to 'h2'", dest="h2")
    q.transition(t, TaskState.EVACUATING, 7.0, "released")
    q.transition(t, TaskState.DONE, 8.0, "running on 'h2'")
    assert t.reason == ""
    b = q.add(task("b"), 0.0)
    q.transition(b, TaskState.CANCELLED, 1.0, "cancelled: host back")
    assert b.reason == "cancelled: host back"
    c = q.add(task("c"), 0.0)
    q.transition(c, TaskState.PROVING, 1.0, "")
    q.transition(c, TaskState.FAILED, 2.0, "prove failed: refused; not retryable")
    assert c.reason == "prove failed: refused; not retryable"


def test_the_destination_changes_with_the_state_that_holds_a_slot_towards_it() -> None:
    q = RecoveryQueue(QueueLimits(max_per_host=1))
    t = q.add(task("a"), 0.0)
    _to_ready(q, t)
    with pytest.raises(TransitionError, match="takes no destination"):
        q.transition(t, TaskState.UNPLACED, 4.0, "no healthy host", dest="h2")
    q.transition(t, TaskState.RELEASING, 4.0, "to 'h2'", dest="h2")
    assert t.dest == "h2" and not q.has_slot("h2")
    # A restart step retries from READY: its slot is given back and its destination chosen again.
    q.transition(t, TaskState.RETRY_WAIT, 5.0, "release failed", retry=(7.0, TaskState.READY))
    assert t.dest is None and q.has_slot("h2")
    q.transition(t, TaskState.READY, 7.0, "retry 2/5")
    q.transition(t, TaskState.RELEASING, 8.0, "to 'h3'", dest="h3")
    q.transition(t, TaskState.RETRY_WAIT, 9.0, "release failed", retry=(13.0, TaskState.RELEASING))
    assert t.dest == "h3"  # a retry in its own step keeps its destination


def test_task_survives_json_with_proof_and_steps() -> None:
    t = task("vm1", priority=7)
    t.proof = FenceProof("vm1", "h1", ProofMethod.REQUEST_FORCE, 10.0, 12.0, {"pid": "42"})
    t.begin(Step.PROVE, 10.0)
    t.finish(Step.PROVE, 12.0, "ok", "request-force")
    t.begin(Step.MARK_DOWN, 12.0)
    t.state, t.dest, t.attempts, t.retry_at, t.resume = TaskState.RETRY_WAIT, None, 1, 20.0, TaskState.MARKING_DOWN
    back = Task.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    assert back.done(Step.PROVE) and not back.done(Step.MARK_DOWN)


def test_finish_without_an_open_attempt_records_a_closed_step() -> None:
    t = task("vm1")
    t.finish(Step.MARK_DOWN, 5.0, "ok", "host already marked down")
    assert t.done(Step.MARK_DOWN)
    assert t.steps[0].started == t.steps[0].finished == 5.0


@pytest.mark.parametrize(
    "broken",
    [
        {"vm": "x"},  # fields missing
        {**task("x").to_dict(), "state": "exploded"},
        {**task("x").to_dict(), "failed": {"storage2": 1.0}},
        {**task("x").to_dict(), "proof": "yes"},
    ],
)
def test_broken_persisted_task_raises_for_the_caller_to_log_and_skip(broken: dict[str, object]) -> None:
    with pytest.raises((ValueError, KeyError)):
        Task.from_dict(broken)


def test_describe_answers_why_the_vm_was_restarted() -> None:
    t = task("vm1")
    t.proof = FenceProof("vm1", "h1", ProofMethod.HOST_DEAD, 10.0, 80.0)
    t.begin(Step.EVACUATE, 81.0)
    t.finish(Step.EVACUATE, 83.0, "ok")
    t.state, t.running_on = TaskState.DONE, "h3"
    text = t.describe(lambda at: f"<{at:g}>")  # each time through the caller's formatter
    assert "vm 'vm1' recovery 1: done" in text
    assert "row storage, action fence-evacuate" in text
    assert "storage since <3>" in text
    assert "proof: host-dead started <10>, proved <80> (70.0 s)" in text
    assert "step evacuate: <81> -> <83> (2.0 s) ok" in text
    assert "running on 'h3'" in text
