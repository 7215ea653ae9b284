"""RecoveryCore driven event by event: every policy row, the proof-first order, cancellation,
retries, limits, capacity, takeover. The scenario tests cover the same through the simulator."""

from __future__ import annotations

import json

import pytest

from vmha.core.actions import (
    Alert,
    CancelProof,
    CheckRejoin,
    DisableHost,
    EnableHost,
    Evacuate,
    InvariantError,
    LiveMigrate,
    MarkHostDown,
    PersistTask,
    Prove,
    QuarantineHost,
    RecordEvidence,
    RecoveryAction,
    RecoveryOutput,
    ReleaseProof,
)
from vmha.core.events import (
    Attempt,
    HealthUpdate,
    HostEnabled,
    HostOp,
    HostOpDone,
    HostOpFailed,
    HostOut,
    Inventory,
    Maintenance,
    Paused,
    ProofObtained,
    ProofRefused,
    RejoinChecked,
    StepDone,
    StepFailed,
    TasksLoaded,
    Tick,
)
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.log import Level
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import Step, Task, TaskKind, TaskState
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import HostInfo, VmInfo

UP, DOWN, SUSPECT, FABRIC, UNKNOWN = (PlaneState.UP, PlaneState.DOWN, PlaneState.SUSPECT,
                                      PlaneState.FABRIC, PlaneState.UNKNOWN)


def health(host: str, t: float = 0.0, **states: PlaneState) -> HostHealth:
    return HostHealth(host, "rack1", {p: PlaneStatus(states.get(p.value, UP), t) for p in PLANES})


def core(**settings: object) -> RecoveryCore:
    settings.setdefault("decide_after", 0.0)  # act at once unless a test is about holding
    c = RecoveryCore(PolicyTable.parse(DEFAULT_POLICY), RecoverySettings(**settings))  # type: ignore[arg-type]
    for h in ("h1", "h2", "h3", "h4"):
        c.step(HealthUpdate(health(h)), 0.0)
    return c


def inventory(vms: list[VmInfo], hosts: tuple[str, ...] = ("h1", "h2", "h3", "h4")) -> Inventory:
    return Inventory(tuple(HostInfo(h, True, True) for h in hosts), tuple(vms))


VMS = [VmInfo("vm1", "h2", True, 5), VmInfo("vm2", "h2", True, 1), VmInfo("vm3", "h3", True),
       VmInfo("junk", "h2", False)]


def of(out: RecoveryOutput, kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in out.actions if isinstance(a, kind)]


FIRST = Attempt(1, 1)  # the first proof attempt of a VM's first recovery


def proof(vm: str, host: str = "h2", t: float = 15.0, attempt: Attempt = FIRST) -> ProofObtained:
    return ProofObtained(FenceProof(vm, host, ProofMethod.REQUEST_FORCE, t - 2, t), attempt)


def tag(c: RecoveryCore, vm: str) -> Attempt:
    """The attempt tag of the VM's latest Prove."""
    task = c.task(vm)
    assert task is not None
    return Attempt(task.recovery, task.attempts_of(Step.PROVE))


def fail_h2(c: RecoveryCore, t: float = 10.0, **states: PlaneState) -> RecoveryOutput:
    return c.step(HealthUpdate(health("h2", t, **(states or {"storage": DOWN}))), t)


def proved_and_marked(c: RecoveryCore) -> RecoveryOutput:
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    c.step(proof("vm1"), 15.0)
    c.step(proof("vm2"), 15.0)
    return c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5)


# -- policy rows ------------------------------------------------------------------------------------


def test_management_down_disables_the_host_and_touches_no_vm() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, management=DOWN)
    assert of(out, DisableHost) == [DisableHost("h2", "row management: management down since 10.0")]
    assert not of(out, Prove) and not of(out, LiveMigrate) and c.tasks() == []


def test_service_down_live_migrates_ha_vms_without_any_proof() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, service=DOWN)
    assert of(out, DisableHost)
    assert [(m.vm, m.source) for m in of(out, LiveMigrate)] == [("vm1", "h2"), ("vm2", "h2")]
    assert not of(out, Prove) and not of(out, Evacuate)
    assert {m.dest for m in of(out, LiveMigrate)} <= {"h1", "h3", "h4"}
    done = c.step(StepDone("vm1", Step.MIGRATE, "h1"), 13.0)
    assert c.task("vm1").state == TaskState.DONE  # type: ignore[union-attr]
    assert of(done, RecordEvidence)[0].data["running_on"] == "h1"


@pytest.mark.parametrize(
    ("states", "action", "methods"),
    [
        ({"storage": DOWN}, "fence-evacuate", ("lease-taken", "exit-attested", "host-dead")),
        ({"management": DOWN, "service": DOWN}, "isolate-evacuate", ("lease-taken", "request-force", "host-dead")),
        ({"management": DOWN, "storage": DOWN}, "fence-evacuate", ("lease-taken", "host-dead")),
        ({"management": DOWN, "storage": DOWN, "service": DOWN}, "fence-evacuate", ("lease-taken", "host-dead")),
    ],
)
def test_evacuating_rows_prove_first_with_the_methods_of_the_situation(
    states: dict[str, PlaneState], action: str, methods: tuple[str, ...]
) -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, **states)
    proves = of(out, Prove)
    assert [(p.vm, p.host) for p in proves] == [("vm1", "h2"), ("vm2", "h2")]  # never the non-HA one
    assert all(tuple(m.value for m in p.methods) == methods for p in proves)
    assert not of(out, Evacuate) and not of(out, MarkHostDown)
    assert c.task("vm1").action == action  # type: ignore[union-attr]


def test_power_fence_setting_adds_the_power_method() -> None:
    c = core(power_fence=True)
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, management=DOWN, storage=DOWN, service=DOWN)
    assert of(out, Prove)[0].methods == (ProofMethod.LEASE_TAKEN, ProofMethod.POWER, ProofMethod.HOST_DEAD)


def test_fabric_row_alerts_only() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, management=FABRIC)
    # No alert per host: the outage itself is alerted once, with its hosts (FabricUpdate).
    assert out.actions == [] and c.tasks() == []
    assert "host 'h2': row fabric: alert only" in out.log[-1].text


# -- the proof-first flow ---------------------------------------------------------------------------


def test_full_evacuation_in_order_persist_before_each_step() -> None:
    c = core()
    out = proved_and_marked(c)
    # Highest priority first; each step's PersistTask precedes the step's action.
    kinds = [(type(a).__name__, getattr(a, "vm", None)) for a in out.actions]
    assert kinds == [("PersistTask", "vm1"), ("PersistTask", "vm2"), ("PersistTask", "vm1"),
                     ("ReleaseProof", "vm1"), ("PersistTask", "vm2"), ("ReleaseProof", "vm2")]
    out = c.step(StepDone("vm1", Step.RELEASE), 15.6)
    evac = of(out, Evacuate)
    assert len(evac) == 1 and evac[0].proof.vm == "vm1" and evac[0].source == "h2"
    assert isinstance(out.actions[0], PersistTask) and out.actions[0].data["state"] == "evacuating"
    out = c.step(StepDone("vm1", Step.EVACUATE, evac[0].dest), 17.0)
    t = c.task("vm1")
    assert t is not None and t.state == TaskState.DONE and t.running_on == evac[0].dest
    assert [r.step for r in t.steps] == [Step.PROVE, Step.MARK_DOWN, Step.RELEASE, Step.EVACUATE]
    assert all(r.result == "ok" for r in t.steps)
    assert of(out, RecordEvidence)[0].recovery == 1


def test_mark_down_is_sent_once_per_host_after_the_first_proof() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    first = c.step(proof("vm1"), 15.0)
    second = c.step(proof("vm2"), 15.1)
    assert of(first, MarkHostDown) == [MarkHostDown("h2")] and of(second, MarkHostDown) == []
    assert c.task("vm2").state == TaskState.MARKING_DOWN  # type: ignore[union-attr]


def test_a_proof_for_another_host_is_refused() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    out = c.step(proof("vm1", host="h3"), 15.0)
    assert "refused" in out.log[0].text and c.task("vm1").state == TaskState.PROVING  # type: ignore[union-attr]


def test_evacuate_action_cannot_exist_without_a_matching_proof() -> None:
    p = FenceProof("vm1", "h2", ProofMethod.HOST_DEAD, 1.0, 2.0)
    Evacuate("vm1", "h2", "h3", p)
    with pytest.raises(InvariantError, match="proof is for vm 'vm1' on 'h2'"):
        Evacuate("vm2", "h2", "h3", p)
    with pytest.raises(InvariantError):
        Evacuate("vm1", "h4", "h3", p)
    with pytest.raises(InvariantError, match="no fence proof"):
        Evacuate("vm1", "h2", "h3", None)  # type: ignore[arg-type]


# -- host back, cancel, late proof ------------------------------------------------------------------


def test_host_back_before_the_proof_rechecks_with_lease_taken_only() -> None:
    c = core(recheck_timeout=4.0)
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    out = c.step(HealthUpdate(health("h2", 12.0)), 12.0)
    assert of(out, CancelProof) == [CancelProof("vm1", "h2", FIRST), CancelProof("vm2", "h2", FIRST)]
    again = Attempt(1, 2)
    assert of(out, Prove) == [Prove("vm1", "h2", (ProofMethod.LEASE_TAKEN,), again, 4.0),
                              Prove("vm2", "h2", (ProofMethod.LEASE_TAKEN,), again, 4.0)]
    assert c.task("vm1").state == TaskState.PROVING and c.task("vm1").recheck  # type: ignore[union-attr]
    # the cancelled attempt's refusal is stale: it changes nothing
    out = c.step(ProofRefused("vm1", "h2", FIRST, "cancelled: the host came back"), 12.0)
    assert "attempt 1.1 ignored (stale: the latest is 1.2)" in out.log[0].text and out.actions == []
    # the VM still holds its lease: cancelled, with the reason
    out = c.step(ProofRefused("vm1", "h2", again, "lease held by h2"), 13.0)
    task = c.task("vm1")
    assert task is not None and task.state == TaskState.CANCELLED and "still holds its lease" in task.reason
    assert "lease held by h2" in out.log[-1].text and len(of(out, RecordEvidence)) == 1
    # sanlock killed vm2 meanwhile: the lease was free, the recovery continues (mark down, restart)
    out = c.step(proof("vm2", t=13.0, attempt=again), 13.0)
    assert of(out, MarkHostDown) == [MarkHostDown("h2")]
    assert c.task("vm2").state == TaskState.MARKING_DOWN and not c.task("vm2").recheck  # type: ignore[union-attr]
    assert any("the VM died there" in line.text for line in out.log)
    c.step(HostOpDone("h2", HostOp.MARK_DOWN), 13.2)
    c.step(StepDone("vm2", Step.RELEASE), 13.3)
    assert c.task("vm2").state == TaskState.EVACUATING  # type: ignore[union-attr]


def test_a_recheck_refused_while_the_host_failed_again_is_an_ordinary_refusal() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    c.step(HealthUpdate(health("h2", 12.0)), 12.0)
    fail_h2(c, 13.0)  # down again: the recheck goes on, no second task
    assert c.task("vm1").recheck and c.task("vm1").recovery == 1  # type: ignore[union-attr]
    c.step(ProofRefused("vm1", "h2", Attempt(1, 2), "lease held"), 14.0)
    task = c.task("vm1")
    assert task is not None and task.state == TaskState.RETRY_WAIT and not task.recheck
    out = c.step(Tick(), 16.0)
    assert [p.methods for p in of(out, Prove)] == [(ProofMethod.LEASE_TAKEN, ProofMethod.EXIT_ATTESTED,
                                                    ProofMethod.HOST_DEAD)]


def test_a_recheck_survives_a_leader_change() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    store: dict[str, dict[str, object]] = {}
    persisted(c.step(HealthUpdate(health("h2", 12.0)), 12.0), store)
    new = core()
    out = new.step(TasksLoaded(tuple(Task.from_dict(json.loads(json.dumps(d))) for d in store.values())), 20.0)
    assert not of(out, Prove)  # checked against the world first: the VMs unknown yet
    out = new.step(inventory(VMS), 20.1)  # h2 is up: a recheck (lease-taken only) may go on all the same
    assert [(p.methods, p.attempt) for p in of(out, Prove)] == [((ProofMethod.LEASE_TAKEN,), Attempt(1, 3))] * 2


def test_a_proof_after_the_cancel_continues_the_recovery() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    c.step(HealthUpdate(health("h2", 12.0, management=DOWN)), 12.0)  # row management: cancelled
    assert c.task("vm1").state == TaskState.CANCELLED  # type: ignore[union-attr]
    out = c.step(proof("vm1"), 12.5)
    assert of(out, MarkHostDown) and c.task("vm1").state == TaskState.MARKING_DOWN  # type: ignore[union-attr]
    assert any("proof arrived after the cancel" in line.text for line in out.log)


def test_host_back_after_the_proof_keeps_recovering() -> None:
    c = core()
    proved_and_marked(c)
    out = c.step(HealthUpdate(health("h2", 16.0)), 16.0)
    assert not of(out, CancelProof)
    assert c.task("vm1").state == TaskState.RELEASING  # type: ignore[union-attr]


def test_suspect_or_unknown_planes_decide_nothing() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    assert c.step(HealthUpdate(health("h2", 11.0, storage=SUSPECT)), 11.0).actions == []
    fresh = core()
    fresh.step(inventory(VMS), 1.0)
    assert fresh.step(HealthUpdate(health("h2", 1.0, storage=DOWN, service=UNKNOWN)), 1.0).actions == []


def test_a_fabric_verdict_cancels_unproved_tasks() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    out = c.step(HealthUpdate(health("h2", 11.0, storage=FABRIC)), 11.0)
    assert len(of(out, CancelProof)) == 2
    assert sum("cancelled: row now fabric" in line.text for line in out.log) == 2


# -- waiting is a state -----------------------------------------------------------------------------


def test_decide_after_holds_the_decision_until_its_deadline() -> None:
    c = core(decide_after=5.0)
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c)
    assert not of(out, Prove) and c.next_deadline() == 15.0
    assert not of(c.step(Tick(), 14.9), Prove)
    assert len(of(c.step(Tick(), 15.0), Prove)) == 2


def test_decisions_wait_for_the_inventory() -> None:
    c = core()
    out = fail_h2(c)
    assert not of(out, Prove) and "waiting for the inventory" in out.log[-1].text
    assert len(of(c.step(inventory(VMS), 11.0), Prove)) == 2


def test_retries_back_off_exponentially_then_fail_with_an_alert() -> None:
    c = core(retry_base=2.0, retry_cap=5.0, max_attempts=4)
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    t, waits = 10.0, []
    for _ in range(3):
        c.step(ProofRefused("vm1", "h2", tag(c, "vm1"), "lease held"), t)
        deadline = c.next_deadline()
        assert deadline is not None
        waits.append(deadline - t)
        assert not of(c.step(Tick(), deadline - 0.01), Prove)
        out = c.step(Tick(), deadline)
        assert [p.vm for p in of(out, Prove)] == ["vm1"]
        t = deadline
    assert waits == [2.0, 4.0, 5.0]
    out = c.step(ProofRefused("vm1", "h2", tag(c, "vm1"), "lease held"), t)
    task = c.task("vm1")
    assert task is not None and task.state == TaskState.FAILED and task.attempts == 4
    alert = of(out, Alert)[0]
    assert alert.vm == "vm1" and "FAILED" in alert.text and "lease held" in alert.text


def test_not_retryable_failure_fails_at_once() -> None:
    c = core()
    proved_and_marked(c)
    c.step(StepDone("vm1", Step.RELEASE), 16.0)
    out = c.step(StepFailed("vm1", Step.EVACUATE, "flavor gone", retryable=False), 17.0)
    assert c.task("vm1").state == TaskState.FAILED and of(out, Alert)  # type: ignore[union-attr]


def test_a_stale_result_is_logged_and_ignored() -> None:
    c = core()
    proved_and_marked(c)
    out = c.step(StepDone("vm1", Step.EVACUATE, "h3"), 16.0)
    assert out.actions == [] and "ignored (releasing)" in out.log[0].text
    out = c.step(StepDone("nobody", Step.RELEASE), 16.0)
    assert "ignored (no task)" in out.log[0].text


# -- limits and capacity ----------------------------------------------------------------------------


def test_concurrency_limits_global_and_per_destination() -> None:
    vms = [VmInfo(f"vm{i}", "h1", True, i) for i in range(6)]
    c = core(max_parallel=3, max_per_host=1)
    c.step(inventory(vms), 1.0)
    c.step(HealthUpdate(health("h1", 10.0, storage=DOWN)), 10.0)
    for i in range(6):
        c.step(ProofObtained(FenceProof(f"vm{i}", "h1", ProofMethod.HOST_DEAD, 10.0, 11.0), FIRST), 11.0)
    out = c.step(HostOpDone("h1", HostOp.MARK_DOWN), 12.0)
    started = of(out, ReleaseProof)
    assert [r.vm for r in started] == ["vm5", "vm4", "vm3"]  # by priority, 3 at a time
    running = [t for t in c.tasks() if t.state == TaskState.RELEASING]
    assert sorted(t.dest for t in running) == ["h2", "h3", "h4"]  # type: ignore[type-var]  # one each
    c.step(StepDone("vm5", Step.RELEASE), 12.1)
    out = c.step(StepDone("vm5", Step.EVACUATE, "h2"), 13.0)
    assert [r.vm for r in of(out, ReleaseProof)] == ["vm2"]


def test_capacity_shortfall_reports_the_lowest_priorities_and_places_the_rest() -> None:
    vms = [VmInfo("a", "h1", True), VmInfo("b", "h3", True), VmInfo("c", "h4", True), VmInfo("d", "h4", True),
           VmInfo("x1", "h2", True, 9), VmInfo("x2", "h2", True, 1), VmInfo("x3", "h2", True, 5)]
    c = core(host_capacity=2)
    c.step(inventory(vms), 1.0)
    out = fail_h2(c)
    warn = [line.text for line in out.log if "capacity shortfall" in line.text]
    assert warn == ["capacity shortfall: 3 VM(s) to evacuate, room for 2 (3 host(s) x 2); "
                    "cannot be placed: x2 (priority 1)"]
    for vm in ("x1", "x2", "x3"):
        c.step(proof(vm), 15.0)
    c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5)
    states = {t.vm: t.state for t in c.tasks()}
    assert states == {"x1": TaskState.RELEASING, "x3": TaskState.RELEASING, "x2": TaskState.UNPLACED}
    # Room appears (a new host): the unplaced task goes back to the queue and starts.
    out = c.step(inventory(vms, ("h1", "h2", "h3", "h4", "h5")), 20.0)
    c.step(HealthUpdate(health("h5", 20.0)), 20.0)
    assert c.task("x2").state == TaskState.RELEASING and c.task("x2").dest == "h5"  # type: ignore[union-attr]


def test_under_a_shortfall_the_highest_priorities_are_placed_whatever_order_the_proofs_come_in() -> None:
    vms = [VmInfo("a", "h1", True), VmInfo("b", "h3", True), VmInfo("c", "h4", True), VmInfo("d", "h4", True),
           VmInfo("x1", "h2", True, 9), VmInfo("x2", "h2", True, 1), VmInfo("x3", "h2", True, 5)]
    c = core(host_capacity=2)
    c.step(inventory(vms), 1.0)
    fail_h2(c)
    # The lowest priority is proved first and the host marked down: it would take a place at once.
    c.step(proof("x2"), 12.0)
    out = c.step(HostOpDone("h2", HostOp.MARK_DOWN), 12.5)
    assert c.task("x2").state == TaskState.UNPLACED  # type: ignore[union-attr]
    assert [a.text for a in of(out, Alert)] == [
        "vm 'x2' cannot be placed: the room left (2) is kept for 2 VM(s) of higher priority"]
    c.step(proof("x3"), 13.0)
    assert c.task("x3").state == TaskState.RELEASING  # type: ignore[union-attr]
    # The highest priority fails for good: the place kept for it goes to the next one waiting.
    out = c.step(ProofRefused("x1", "h2", FIRST, "no method worked", retryable=False), 14.0)
    assert c.task("x1").state == TaskState.FAILED  # type: ignore[union-attr]
    assert c.task("x2").state == TaskState.RELEASING  # type: ignore[union-attr]
    assert "vm 'x2' on host 'h2': unplaced -> ready (room on a host again)" in [line.text for line in out.log]


# -- takeover ---------------------------------------------------------------------------------------


def persisted(out: RecoveryOutput, store: dict[str, dict[str, object]]) -> None:
    for a in out.actions:
        if isinstance(a, PersistTask):
            store[a.vm] = json.loads(json.dumps(a.data))


def test_new_leader_resumes_each_task_at_its_step_without_repeating_done_ones() -> None:
    c = core()
    store: dict[str, dict[str, object]] = {}
    persisted(c.step(inventory(VMS), 1.0), store)
    persisted(fail_h2(c), store)
    persisted(c.step(proof("vm1"), 15.0), store)
    persisted(c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5), store)
    persisted(c.step(StepDone("vm1", Step.RELEASE), 15.6), store)  # vm1 evacuating, vm2 proving
    dest = store["vm1"]["dest"]
    new = core()
    out = new.step(TasksLoaded(tuple(Task.from_dict(d) for d in store.values())), 30.0)
    assert not of(out, Prove) and not of(out, Evacuate)  # nothing before the world is known
    new.step(HealthUpdate(health("h2", 30.0, storage=DOWN)), 30.0)
    # vm1 already runs on its destination: its evacuation is confirmed (starts nothing); vm2 is proved
    # again (the old leader's proof is not this manager's lease).
    out = new.step(inventory([VmInfo("vm1", str(dest), True, 5), *VMS[1:]]), 30.0)
    actions: list[RecoveryAction] = out.actions
    evac = [a for a in actions if isinstance(a, Evacuate)]
    assert [(e.vm, e.proof.vm) for e in evac] == [("vm1", "vm1")]
    assert [p.vm for p in of(out, Prove)] == ["vm2"]
    assert not of(out, ReleaseProof) and not of(out, MarkHostDown)
    # vm2's proof arrives: the host is known marked down (keys.disabled), no second mark-down.
    new.step(HostOut("h2", HostOp.MARK_DOWN, ""), 30.5)
    out = new.step(proof("vm2", t=31.0, attempt=Attempt(1, 2)), 31.0)  # the resumed attempt
    assert not of(out, MarkHostDown) and new.task("vm2").state == TaskState.RELEASING  # type: ignore[union-attr]


def test_a_resumed_task_waits_until_its_hosts_planes_are_settled() -> None:
    """A new leader sees a dead host's planes go SUSPECT, then DOWN one by one, ms apart. Acted on
    before they settle, the resumed tasks were proved, then cancelled by the passing row `management`
    (disable), and each VM recovered a second time (test_leader_lost_mid_queue[kill], 2026-12-03)."""
    c = core()
    store: dict[str, dict[str, object]] = {}
    persisted(c.step(inventory(VMS), 1.0), store)
    persisted(fail_h2(c, management=DOWN, storage=DOWN, service=DOWN), store)  # vm1, vm2 proving
    # The new leader knows the other hosts UP, h2 not yet (its monitor starts from nothing).
    new = RecoveryCore(PolicyTable.parse(DEFAULT_POLICY), RecoverySettings(decide_after=0.0))
    for h in ("h1", "h3", "h4"):
        new.step(HealthUpdate(health(h)), 30.0)
    new.step(TasksLoaded(tuple(Task.from_dict(d) for d in store.values())), 30.0)
    new.step(inventory(VMS), 30.0)
    steps = [dict.fromkeys(("management", "storage", "service"), SUSPECT),
             {"management": DOWN, "storage": SUSPECT, "service": SUSPECT},
             {"management": DOWN, "storage": DOWN, "service": SUSPECT}]
    for i, states in enumerate(steps):
        out = new.step(HealthUpdate(health("h2", 30.1 + i / 100, **states)), 30.1 + i / 100)
        assert not of(out, Prove), states
        assert {new.task(vm).state for vm in ("vm1", "vm2")} == {TaskState.PROVING}, states  # type: ignore[union-attr]
    out = new.step(HealthUpdate(health("h2", 30.2, management=DOWN, storage=DOWN, service=DOWN)), 30.2)
    assert sorted(p.vm for p in of(out, Prove)) == ["vm1", "vm2"]
    assert all(new.task(vm).recovery == 1 for vm in ("vm1", "vm2"))  # type: ignore[union-attr]


def test_new_leader_does_not_recreate_finished_recoveries() -> None:
    c = core()
    store: dict[str, dict[str, object]] = {}
    persisted(proved_and_marked(c), store)
    persisted(c.step(StepDone("vm1", Step.RELEASE), 16.0), store)
    persisted(c.step(StepDone("vm1", Step.EVACUATE, "h3"), 17.0), store)
    new = RecoveryCore(PolicyTable.parse(DEFAULT_POLICY), RecoverySettings())
    new.step(TasksLoaded(tuple(Task.from_dict(d) for d in store.values())), 30.0)
    new.step(inventory(VMS), 30.0)  # a stale inventory still shows vm1 on h2
    out = new.step(HealthUpdate(health("h2", 30.0, storage=DOWN)), 30.0)
    assert [p.vm for p in of(out, Prove)] == ["vm2"]  # vm2 (ready) is proved again; vm1 (done) is not
    assert new.task("vm1").recovery == 1  # type: ignore[union-attr]


def test_a_resumed_evacuation_still_on_its_host_is_proved_and_released_again() -> None:
    c = core()
    store: dict[str, dict[str, object]] = {}
    persisted(proved_and_marked(c), store)
    persisted(c.step(StepDone("vm1", Step.RELEASE), 16.0), store)  # vm1 evacuating, RELEASE done
    new = core()
    new.step(TasksLoaded(tuple(Task.from_dict(d) for d in store.values())), 30.0)
    new.step(HealthUpdate(health("h2", 30.0, storage=DOWN)), 30.0)
    out = new.step(inventory(VMS), 30.0)  # vm1 still on h2: its old proof proves nothing to us
    assert not of(out, Evacuate) and [p.vm for p in of(out, Prove)] == ["vm1", "vm2"]
    assert new.task("vm1").proof is None and new.task("vm1").dest is None  # type: ignore[union-attr]
    new.step(proof("vm1", t=31.0, attempt=Attempt(1, 2)), 31.0)
    out = new.step(HostOpDone("h2", HostOp.MARK_DOWN), 31.5)
    # proved again: its lease is this manager's now and is released before the restart
    assert [r.vm for r in of(out, ReleaseProof)] == ["vm1"] and not of(out, Evacuate)


def test_a_forged_resumed_task_is_refused() -> None:
    """Anyone who writes tasks/ can forge one: evacuating, a made-up proof, every step done. vm3 runs on
    neither its host nor its destination: refused with an alert. vm1's host is UP: only a lease-taken
    recheck, which the running copy refuses: cancelled. Nothing is killed, marked or moved."""
    made_up = FenceProof("vm1", "h2", ProofMethod.EXIT_ATTESTED, 1.0, 2.0)
    forged = [Task("vm1", "h2", TaskKind.EVACUATE, 1, 5, "storage", "fence-evacuate", {"storage": 1.0}, 1.0,
                   state=TaskState.EVACUATING, dest="h3", proof=made_up),
              Task("vm3", "h2", TaskKind.EVACUATE, 1, 0, "storage", "fence-evacuate", {"storage": 1.0}, 1.0,
                   state=TaskState.MARKING_DOWN, proof=FenceProof("vm3", "h2", ProofMethod.POWER, 1.0, 2.0))]
    for t in forged:
        for step in (Step.PROVE, Step.MARK_DOWN, Step.RELEASE):
            t.finish(step, 1.0, "ok")
    new = core()
    out = new.step(TasksLoaded(tuple(forged)), 5.0)
    out = new.step(inventory(VMS), 5.0)  # h2 is up; vm3 runs on h3, not on h2
    assert not of(out, Evacuate) and not of(out, MarkHostDown) and not of(out, ReleaseProof)
    assert [(p.vm, p.methods) for p in of(out, Prove)] == [("vm1", (ProofMethod.LEASE_TAKEN,))]
    assert [a.text for a in of(out, Alert)] == [
        "vm 'vm3': resumed task refused: the VM runs on 'h3', neither its host nor its destination "
        "(stored state marking-down); not acted on"]
    out = new.step(ProofRefused("vm1", "h2", of(out, Prove)[0].attempt, "lease held by h2"), 6.0)
    assert not of(out, Evacuate) and not of(out, MarkHostDown)
    assert {t.state for t in new.tasks()} == {TaskState.CANCELLED}
    # h2 fails later: a fresh recovery of each, with its own proof
    out = new.step(HealthUpdate(health("h2", 9.0, storage=DOWN)), 9.0)
    assert [p.vm for p in of(out, Prove)] == ["vm1", "vm2"]


def test_from_health_keeps_each_hosts_last_view_of_one_instant() -> None:
    from vmha.core.events import from_health
    from vmha.core.health import HealthChange, HealthOutput

    first = health("h2", 5.0, management=DOWN)
    last = health("h2", 5.0, management=DOWN, storage=DOWN)
    other = health("h3", 5.0, service=DOWN)
    out = HealthOutput(changes=[
        HealthChange("h2", PLANES[0], UP, DOWN, first),
        HealthChange("h3", PLANES[2], UP, DOWN, other),
        HealthChange("h2", PLANES[1], UP, DOWN, last),
    ])
    assert from_health(out) == [HealthUpdate(last), HealthUpdate(other)]


def test_a_late_proof_of_a_cancelled_task_does_not_touch_the_next_task_of_the_vm() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)  # evacuate tasks proving
    c.step(HealthUpdate(health("h2", 11.0, service=DOWN)), 11.0)  # row service: cancel, live-migrate
    t = c.task("vm1")
    assert t is not None and t.recovery == 2 and t.state == TaskState.MIGRATING
    out = c.step(proof("vm1"), 12.0)
    assert "attempt 1.1 ignored (stale: the latest is 2.0)" in out.log[0].text and out.actions == []
    assert c.task("vm1").state == TaskState.MIGRATING  # type: ignore[union-attr]


def test_a_host_on_its_way_back_does_not_act_on_passing_rows() -> None:
    c = core(settle_after=5.0)
    c.step(inventory(VMS), 1.0)
    c.step(HealthUpdate(health("h2", 10.0, management=DOWN, service=DOWN)), 10.0)  # isolate-evacuate
    c.step(proof("vm1", t=12.0), 12.0)  # vm1 proved, vm2 still proving
    # management returns first: row service (live-migrate) is held, unproved vm2 is cancelled
    out = c.step(HealthUpdate(health("h2", 14.0, service=DOWN)), 14.0)
    assert not of(out, DisableHost) and not of(out, LiveMigrate)
    assert of(out, CancelProof) == [CancelProof("vm2", "h2", FIRST)]
    assert "acting at 19.0 if it holds" in out.log[0].text and c.next_deadline() == 19.0
    # service stays down: after the settle time the row is acted upon (vm2 gets a migrate task)
    out = c.step(Tick(), 19.0)
    assert of(out, DisableHost) and [m.vm for m in of(out, LiveMigrate)] == ["vm2"]
    assert c.task("vm1").state == TaskState.MARKING_DOWN  # type: ignore[union-attr]


# -- a repaired host re-enabled by the operator -----------------------------------------------------


def test_a_marked_down_host_takes_vms_again_only_once_enabled() -> None:
    c = core()
    proved_and_marked(c)  # h2 marked down, vm1 releasing towards a destination
    c.step(HealthUpdate(health("h2", 20.0)), 20.0)  # repaired: every plane UP
    assert "h2" not in c._eligible()
    # the driver shows it enabled (the operator ran `vmha host enable h2`), the core still excludes it
    c.step(inventory(VMS), 21.0)
    assert "h2" not in c._eligible()
    out = c.step(HostEnabled("h2"), 22.0)
    assert out.log[-1].text == "host 'h2': enabled by the operator (was marked down by vmha)"
    assert "h2" in c._eligible()
    # the next failure of h2 marks it down again (without the enable: "host already marked down")
    vms = [*VMS, VmInfo("vm5", "h2", True)]
    c.step(inventory(vms), 23.0)
    fail_h2(c, 30.0)
    out = c.step(proof("vm5", t=31.0), 31.0)
    assert of(out, MarkHostDown) == [MarkHostDown("h2")]


def test_a_vm_arriving_on_a_host_that_failed_meanwhile_is_moved_on() -> None:
    """vm1 is evacuated to a host that loses its service network while vm1 travels: that host's live
    migration ran before vm1 arrived, so on arrival the manager acts on the host again, for vm1."""
    c = core()
    out = proved_and_marked(c)
    [rel] = [a for a in of(out, ReleaseProof) if a.vm == "vm1"]
    out = c.step(StepDone("vm1", Step.RELEASE), 16.0)
    [ev] = [a for a in of(out, Evacuate) if a.vm == "vm1"]
    dest = ev.dest
    assert dest is not None and rel.vm == "vm1"
    out = c.step(HealthUpdate(health(dest, 16.5, service=DOWN)), 16.5)
    assert [a.vm for a in of(out, LiveMigrate)] == []  # vm1 is still on its way: not on dest yet
    out = c.step(StepDone("vm1", Step.EVACUATE, running_on=dest), 17.0)
    assert [(a.vm, a.source) for a in of(out, LiveMigrate)] == [("vm1", dest)]
    assert any("failed meanwhile" in line.text for line in out.log)


def test_a_move_ending_after_its_host_is_healthy_again_does_not_block_its_next_failure() -> None:
    """Seen in the lab bench: h2's service came back while its VMs were still migrating away; the
    VMs later came back to h2, and when h2 failed again one of them was skipped as 'already handled'
    (and stayed stopped). A recovery ending after its host was healthy again settles nothing."""
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c, service=DOWN)
    c.step(HealthUpdate(health("h2", 12.0)), 12.0)  # healthy again while the migrations run
    c.step(StepDone("vm1", Step.MIGRATE, "h1"), 12.5)
    c.step(StepDone("vm2", Step.MIGRATE, "h3"), 12.5)
    c.step(inventory(VMS), 20.0)  # both back on h2 since (evacuated there from a later failure)
    out = c.step(HealthUpdate(health("h2", 30.0, management=DOWN, service=DOWN)), 30.0)
    assert sorted(p.vm for p in of(out, Prove)) == ["vm1", "vm2"]
    assert not any("already handled" in line.text for line in out.log)


def test_a_lease_never_held_on_the_host_is_alerted_once_per_proof() -> None:
    """The prover refuses a never-held lease and names the cause: the operator gets it as an alert of
    its own (not only as the generic refusal, alerted after the last retry), once per proof attempt,
    also when another method (power, host-dead) then proved."""
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    cause = "VM vm1: its lease was never acquired: is libvirt's lock_manager = \"sanlock\" configured on h2?"
    out = c.step(ProofRefused("vm1", "h2", FIRST, "every method failed", True, cause), 12.0)
    assert of(out, Alert) == [Alert(Level.ERROR, "h2", "vm1", cause)]
    assert c.task("vm1").state == TaskState.RETRY_WAIT  # type: ignore[union-attr]
    out = c.step(ProofRefused("vm1", "h2", FIRST, "every method failed"), 12.5)  # no cause: no alert
    assert of(out, Alert) == []
    proved = FenceProof("vm2", "h2", ProofMethod.HOST_DEAD, 10.0, 15.0, {"alert": cause})
    out = c.step(ProofObtained(proved, FIRST), 15.0)
    assert of(out, Alert) == [Alert(Level.ERROR, "h2", "vm2", cause)]
    assert c.task("vm2").state == TaskState.MARKING_DOWN  # type: ignore[union-attr]


# -- rejoin and quarantine ---------------------------------------------------------------------------


def texts(out: RecoveryOutput) -> list[str]:
    return [line.text for line in out.log]


def test_a_disabled_host_rejoins_once_healthy_for_rejoin_after() -> None:
    c = core(rejoin_after=20.0)
    c.step(inventory(VMS), 1.0)
    fail_h2(c, management=DOWN)
    c.step(HostOpDone("h2", HostOp.DISABLE), 10.2)
    out = c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    assert "host 'h2': rejoins at 50.0 if it stays healthy" in texts(out)
    assert c.next_deadline() == 50.0
    assert not of(c.step(Tick(), 49.9), EnableHost)
    out = c.step(Tick(), 50.0)
    assert of(out, EnableHost) == [EnableHost("h2", "nothing was fenced there (disabled for row management), "
                                                    "every plane up since 30.0")]
    assert "host 'h2': rejoined, a destination again" in texts(c.step(HostOpDone("h2", HostOp.ENABLE), 50.2))
    # The watch reports our own keys.disabled deletion: not the operator's enable.
    assert texts(c.step(HostEnabled("h2"), 50.3)) == []
    # A destination again: h3's VM goes to h2, the least loaded host.
    c.step(HealthUpdate(health("h3", 60.0, storage=DOWN)), 60.0)
    c.step(proof("vm3", "h3", 62.0), 62.0)
    out = c.step(HostOpDone("h3", HostOp.MARK_DOWN), 62.5)
    assert [a.host for a in of(out, ReleaseProof)] == ["h3"] and c.task("vm3").dest in ("h1", "h2", "h4")


def test_a_blink_restarts_the_rejoin_clock_and_zero_means_never() -> None:
    c = core(rejoin_after=20.0)
    c.step(inventory(VMS), 1.0)
    fail_h2(c, management=DOWN)
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    c.step(HealthUpdate(health("h2", 40.0, service=SUSPECT)), 40.0)
    assert c.next_deadline() is None
    c.step(HealthUpdate(health("h2", 41.0)), 41.0)
    assert not of(c.step(Tick(), 55.0), EnableHost)
    assert of(c.step(Tick(), 61.0), EnableHost)

    never = core(rejoin_after=0.0)
    never.step(inventory(VMS), 1.0)
    fail_h2(never, management=DOWN)
    never.step(HealthUpdate(health("h2", 30.0)), 30.0)
    assert never.next_deadline() is None and not of(never.step(Tick(), 1000.0), EnableHost)


def test_a_fenced_host_rejoins_only_after_its_rejoin_check() -> None:
    c = core(rejoin_after=20.0)
    proved_and_marked(c)
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    out = c.step(Tick(), 50.0)
    assert of(out, CheckRejoin) == [CheckRejoin("h2", ("vm1", "vm2"))] and not of(out, EnableHost)
    assert c.next_deadline() is None  # no second check while one runs
    out = c.step(RejoinChecked("h2", False, "its lockspace delta lease (host_id 2) is not renewed"), 52.0)
    assert not of(out, EnableHost)
    assert [a.text for a in of(out, Alert)] == [
        "host 'h2': rejoin check failed (its lockspace delta lease (host_id 2) is not renewed): it stays out, "
        "checked again at 72.0"]
    assert of(c.step(Tick(), 72.0), CheckRejoin)
    out = c.step(RejoinChecked("h2", True, "lockspace renewed (host_id 2 gen 3)"), 74.0)
    assert [a.reason for a in of(out, EnableHost)] == [
        "fenced for row storage, every plane up since 30.0, agent beating again, lockspace renewed (host_id 2 gen 3)"]


def test_a_check_result_after_the_host_failed_again_is_ignored() -> None:
    c = core(rejoin_after=20.0)
    proved_and_marked(c)
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    c.step(Tick(), 50.0)
    c.step(HealthUpdate(health("h2", 51.0, storage=DOWN)), 51.0)
    out = c.step(RejoinChecked("h2", True, "ok"), 52.0)
    assert not of(out, EnableHost) and "no longer waiting to rejoin" in texts(out)[0]


def test_rejoin_waits_for_recoveries_from_the_host_not_proved_yet() -> None:
    c = core(rejoin_after=20.0, recheck_timeout=5.0)
    c.step(inventory(VMS), 1.0)
    fail_h2(c)
    c.step(proof("vm1"), 15.0)  # vm2 not proved yet
    c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5)
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)  # vm2: a lease-taken recheck
    out = c.step(Tick(), 50.0)
    assert not of(out, CheckRejoin) and "host 'h2': rejoin waits for the recovery of vm2 (not proved yet)" in texts(out)
    out = c.step(ProofRefused("vm2", "h2", tag(c, "vm2"), "lease held by h2"), 51.0)
    assert c.task("vm2").state == TaskState.CANCELLED and of(out, CheckRejoin)


def test_an_unplaced_vm_restarts_on_its_rejoined_source() -> None:
    c = core(rejoin_after=20.0)
    c.step(Inventory((HostInfo("h2", True, True),), tuple(VMS)), 1.0)  # h2 is the only host
    fail_h2(c)
    c.step(proof("vm1"), 15.0)
    c.step(proof("vm2"), 15.0)
    c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5)
    assert c.task("vm1").state == TaskState.UNPLACED
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    c.step(Tick(), 50.0)
    c.step(RejoinChecked("h2", True, "ok"), 52.0)
    out = c.step(HostOpDone("h2", HostOp.ENABLE), 52.2)
    assert [a.vm for a in of(out, ReleaseProof)] == ["vm1", "vm2"]
    assert {(t.vm, t.state, t.dest) for t in c.tasks()} == {
        ("vm1", TaskState.RELEASING, "h2"), ("vm2", TaskState.RELEASING, "h2")}


def test_a_host_failing_three_times_in_the_window_is_quarantined_until_enabled() -> None:
    c = core(rejoin_after=5.0, quarantine_after=3, quarantine_window=100.0)
    c.step(inventory(VMS), 1.0)
    for t in (10.0, 30.0):
        fail_h2(c, t, management=DOWN)
        c.step(HealthUpdate(health("h2", t + 1)), t + 1)
        assert of(c.step(Tick(), t + 6), EnableHost)
        c.step(HostOpDone("h2", HostOp.ENABLE), t + 6.1)
    out = fail_h2(c, 50.0, management=DOWN)
    assert next(a.text for a in of(out, Alert)) == (
        "host 'h2': quarantined after 3 failures within 100s (row management at 10.0, row management at 30.0, "
        "row management at 50.0): it stays out until `vmha host enable h2`")
    assert c.quarantined() == ["h2"]
    out = c.step(HealthUpdate(health("h2", 51.0)), 51.0)
    assert "host 'h2': healthy, but quarantined: it stays out until `vmha host enable h2`" in texts(out)
    assert not of(c.step(Tick(), 500.0), EnableHost)
    assert texts(c.step(HostEnabled("h2"), 501.0)) == [
        "host 'h2': enabled by the operator (was disabled and quarantined by vmha)"]
    assert c.quarantined() == []


def test_failures_outside_the_window_do_not_count() -> None:
    c = core(rejoin_after=5.0, quarantine_after=2, quarantine_window=30.0)
    c.step(inventory(VMS), 1.0)
    fail_h2(c, 10.0, management=DOWN)
    c.step(HealthUpdate(health("h2", 11.0)), 11.0)
    fail_h2(c, 50.0, management=DOWN)
    assert c.quarantined() == []
    # The planes of one episode changing rows (management, then management+service) count once.
    c.step(HealthUpdate(health("h2", 52.0, management=DOWN, service=DOWN)), 52.0)
    assert c.quarantined() == []


def test_a_new_leader_lets_hosts_the_old_one_took_out_rejoin() -> None:
    c = core(rejoin_after=20.0)
    c.step(TasksLoaded(()), 0.5)
    c.step(inventory(VMS), 1.0)
    out = c.step(HostOut("h2", HostOp.MARK_DOWN), 1.0)
    assert texts(out) == ["host 'h2': marked down by an earlier leader, not enabled since",
                          "host 'h2': rejoins at 21.0 if it stays healthy"]
    out = c.step(Tick(), 21.0)
    assert of(out, CheckRejoin) == [CheckRejoin("h2", ())]
    assert "host 'h2': fenced by an earlier leader, every plane up since 1.0" in texts(out)[0]
    out = c.step(HostOpFailed("h2", HostOp.ENABLE, "nova: 503"), 22.0)
    assert [a.text for a in of(out, Alert)] == [
        "host 'h2': enable failed (nova: 503): it stays out, tried again in 20s"]


# -- cluster-wide pause ------------------------------------------------------------------------------


def test_pause_holds_new_recoveries_and_resume_acts_on_them() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    out = c.step(Paused(True, "by the operator"), 5.0)
    assert [a.text for a in of(out, Alert)] == [
        "recoveries paused cluster-wide (by the operator): new recoveries wait, those started run to their end"]
    out = fail_h2(c, 10.0)
    assert not of(out, Prove) and c.tasks() == []
    assert [a.text for a in of(out, Alert)] == [
        "host 'h2': row storage (fence-evacuate) waits: recoveries are paused (storage down since 10.0)"]
    assert c.next_deadline() is None  # a waiting host is no timer: no busy loop while paused
    assert not of(c.step(Tick(), 30.0), Alert)  # alerted once
    out = c.step(Paused(False, "by the operator"), 40.0)
    assert "recoveries resumed (by the operator); hosts waiting: h2" in texts(out)
    assert sorted(p.vm for p in of(out, Prove)) == ["vm1", "vm2"]


def test_pause_lets_a_started_recovery_finish() -> None:
    c = core()
    c.step(inventory(VMS), 1.0)
    fail_h2(c, 10.0)
    c.step(Paused(True, "upgrade"), 12.0)
    c.step(proof("vm1"), 15.0)
    c.step(proof("vm2"), 15.0)
    c.step(HostOpDone("h2", HostOp.MARK_DOWN), 15.5)
    out = c.step(StepDone("vm1", Step.RELEASE), 15.6)
    assert [e.vm for e in of(out, Evacuate)] == ["vm1"]  # proved: the restart must follow


# -- maintenance and drain ---------------------------------------------------------------------------


def test_maintenance_drains_by_priority_and_alerts_only_on_faults() -> None:
    c = core(max_parallel=1)
    c.step(inventory(VMS), 1.0)
    out = c.step(Maintenance("h2", True), 5.0)
    assert of(out, DisableHost) == [DisableHost("h2", "maintenance (by the operator)")]
    assert [(a.vm, a.source) for a in of(out, LiveMigrate)] == [("vm1", "h2")]  # priority 5 first, 1 slot
    out = fail_h2(c, 10.0)  # storage lost while in maintenance: no fence, no evacuation
    assert not of(out, Prove) and not of(out, MarkHostDown)
    assert [a.text for a in of(out, Alert)] == ["host 'h2': in maintenance, alert only (storage down since 10.0)"]
    out = c.step(StepDone("vm1", Step.MIGRATE, "h1"), 12.0)
    assert [(a.vm, a.dest) for a in of(out, LiveMigrate)] == [("vm2", "h4")]  # the least loaded


def test_maintenance_off_with_a_fault_meanwhile_acts_on_the_real_row() -> None:
    c = core(rejoin_after=20.0)
    c.step(inventory(VMS), 1.0)
    c.step(Maintenance("h2", True), 5.0)
    c.step(HostOpDone("h2", HostOp.DISABLE), 5.2)
    fail_h2(c, 10.0, management=DOWN)
    out = c.step(Maintenance("h2", False), 20.0)
    assert "host 'h2': row management -> disable (management down since 10.0)" in texts(out)
    assert not of(out, EnableHost)
    # Repaired: it rejoins by the rejoin rules, nothing having been fenced.
    c.step(HealthUpdate(health("h2", 30.0)), 30.0)
    assert [a.reason for a in of(c.step(Tick(), 50.0), EnableHost)] == [
        "nothing was fenced there (disabled for row management), every plane up since 30.0"]


def test_maintenance_off_enables_at_once_and_retries_a_failed_enable() -> None:
    c = core(rejoin_after=20.0, max_parallel=1)
    c.step(inventory(VMS), 1.0)
    c.step(Maintenance("h2", True), 5.0)
    out = c.step(Maintenance("h2", False), 6.0)
    assert [a.reason for a in of(out, EnableHost)] == ["maintenance over (by the operator), every plane up"]
    assert {t.vm: t.state for t in c.tasks()}["vm2"] == TaskState.CANCELLED  # its drain had not begun
    c.step(HostOpFailed("h2", HostOp.ENABLE, "nova: 503"), 7.0)
    assert c.next_deadline() == 27.0
    assert of(c.step(Tick(), 27.0), EnableHost)


def test_maintenance_off_does_not_end_a_quarantine_and_a_new_leader_keeps_it() -> None:
    c = core(rejoin_after=5.0, quarantine_after=1)
    c.step(inventory(VMS), 1.0)
    out = fail_h2(c, 10.0, management=DOWN)
    assert [a.host for a in of(out, QuarantineHost)] == ["h2"]
    c.step(HealthUpdate(health("h2", 11.0)), 11.0)
    c.step(Maintenance("h2", True), 12.0)
    assert not of(c.step(Maintenance("h2", False), 13.0), EnableHost)
    assert not of(c.step(Tick(), 100.0), EnableHost)
    new = core(rejoin_after=5.0, quarantine_after=1)
    new.step(TasksLoaded(()), 0.5)
    new.step(HostOut("h2", HostOp.DISABLE, "3 failures"), 1.0)
    assert new.quarantined() == ["h2"] and not of(new.step(Tick(), 100.0), EnableHost)


@pytest.mark.parametrize(("retry_after", "wait"), [(0.0, 2.0), (1.0, 2.0), (9.0, 9.0), (1e9, 60.0)])
def test_the_apis_retry_after_lengthens_the_backoff_up_to_the_cap(retry_after: float, wait: float) -> None:
    c = core(retry_base=2.0, retry_cap=60.0)
    proved_and_marked(c)
    c.step(StepDone("vm1", Step.RELEASE), 16.0)
    out = c.step(StepFailed("vm1", Step.EVACUATE, "HTTP 429: rate-limited", retry_after=retry_after), 17.0)
    assert c.next_deadline() == 17.0 + wait
    assert ("API asked" in out.log[-1].text) == (retry_after > 0), out.log[-1].text
