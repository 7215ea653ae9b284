"""Desired state (core/desired.py and its use in RecoveryCore): a protected VM that runs nowhere is
restarted once proved stopped, never on one snapshot, never with a method that ends a copy."""

from __future__ import annotations

from test_recovery import DOWN, FABRIC, UP, core, health, inventory, of

from vmha.core.actions import Evacuate, MarkHostDown, Prove, ReleaseProof
from vmha.core.desired import STOPPED_KEY, StoppedVms, observing_methods
from vmha.core.events import (
    AgentStopped,
    Attempt,
    HealthUpdate,
    HostOp,
    HostOpDone,
    ProofObtained,
    ProofRefused,
    StepDone,
    StepFailed,
    TasksLoaded,
    Tick,
)
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.core.queue import Step, Task, TaskState
from vmha.drivers.base import VmInfo

FIRST = Attempt(1, 1)


def vms(**stopped: bool) -> list[VmInfo]:
    """vm1 on h2 (priority 5), vm2 on h2, vm3 on h3, junk (not HA) on h2; stopped=True: no copy runs."""
    return [VmInfo("vm1", "h2", True, 5, "stopped" if stopped.get("vm1") else "running"),
            VmInfo("vm2", "h2", True, 1, "stopped" if stopped.get("vm2") else "running"),
            VmInfo("vm3", "h3", True, 0, "stopped" if stopped.get("vm3") else "running"),
            VmInfo("junk", "h2", False, 0, "stopped")]


def test_observing_methods_never_end_a_copy() -> None:
    for states in ({p: s for p in PLANES} for s in PlaneState):
        methods = observing_methods(states)
        assert ProofMethod.REQUEST_FORCE not in methods and ProofMethod.POWER not in methods
        assert methods[0] == ProofMethod.LEASE_TAKEN
    assert observing_methods({Plane.STORAGE: UP}) == (ProofMethod.LEASE_TAKEN,)
    assert observing_methods({Plane.STORAGE: DOWN}) == (ProofMethod.LEASE_TAKEN, ProofMethod.HOST_DEAD)


def test_two_snapshots_restart_after_apart_and_given_up_vms_wait_for_the_operator() -> None:
    s = StoppedVms(20.0)
    s.inventory({"a": True, "b": True}, 10.0)
    assert s.due() == []  # one snapshot: it may predate one of our own moves
    s.inventory({"a": True, "b": False}, 29.9)
    assert s.due() == []
    s.inventory({"a": True}, 30.0)
    assert s.due() == [("a", 10.0)]
    s.give_up("a")
    s.inventory({"a": True}, 60.0)
    s.inventory({"a": True}, 90.0)
    assert s.due() == []  # its recovery FAILED: the operator's, until seen running
    s.inventory({"a": False}, 100.0)
    s.inventory({"a": True}, 110.0)
    s.inventory({"a": True}, 130.0)
    assert s.due() == [("a", 110.0)]
    assert StoppedVms(0.0).due() == [] and not StoppedVms(0.0)


def test_a_vm_stopped_on_a_healthy_host_restarts_in_place_on_a_lease_taken_proof() -> None:
    c = core(restart_after=20.0)
    c.step(inventory(vms(vm1=True)), 10.0)
    assert not of(c.step(inventory(vms(vm1=True)), 29.0), Prove)
    out = c.step(inventory(vms(vm1=True)), 30.0)
    assert of(out, Prove) == [Prove("vm1", "h2", (ProofMethod.LEASE_TAKEN,), FIRST, 5.0)]
    task = c.task("vm1")
    assert task is not None and task.row == STOPPED_KEY and task.action == "restart"
    out = c.step(ProofObtained(FenceProof("vm1", "h2", ProofMethod.LEASE_TAKEN, 30.0, 30.5), FIRST), 30.5)
    assert not of(out, MarkHostDown)  # the host is up: nothing to fence there
    assert [(a.vm, a.host) for a in of(out, ReleaseProof)] == [("vm1", "h2")] and task.dest == "h2"
    out = c.step(StepDone("vm1", Step.RELEASE), 30.6)
    assert [(e.source, e.dest) for e in of(out, Evacuate)] == [("h2", "h2")]
    c.step(StepDone("vm1", Step.EVACUATE, "h2"), 32.0)
    assert task.state == TaskState.DONE
    # A snapshot taken before the restart, delivered after it, starts no second one.
    c.step(inventory(vms(vm1=True)), 33.0)
    assert not of(c.step(inventory(vms()), 43.0), Prove)


def test_a_vm_stopped_during_a_fabric_outage_waits_for_the_repair() -> None:
    c = core(restart_after=20.0)
    for h in ("h1", "h2", "h3", "h4"):
        c.step(HealthUpdate(health(h, 10.0, storage=FABRIC)), 10.0)
    c.step(inventory(vms(vm1=True, vm2=True, vm3=True)), 20.0)
    out = c.step(inventory(vms(vm1=True, vm2=True, vm3=True)), 40.0)
    assert not of(out, Prove)
    assert "vm 'vm1' on host 'h2': restart waits (its host is in row fabric)" in [x.text for x in out.log]
    out = c.step(HealthUpdate(health("h2", 45.0)), 45.0)
    assert sorted(p.vm for p in of(out, Prove)) == ["vm1", "vm2"]
    assert all(p.methods == (ProofMethod.LEASE_TAKEN,) for p in of(out, Prove))


def test_a_shut_down_host_has_its_stopped_vms_recovered_elsewhere_after_a_host_dead_proof() -> None:
    c = core(restart_after=20.0, power_fence=True)
    c.step(inventory(vms()), 1.0)
    c.step(AgentStopped("h2", 5.0), 5.0)
    c.step(HealthUpdate(health("h2", 8.0, management=DOWN, storage=DOWN, service=DOWN)), 8.0)
    c.step(Tick(), 9.0)
    c.step(inventory(vms(vm1=True)), 10.0)  # vm2 still runs there: the agent stop leaves it alone
    out = c.step(inventory(vms(vm1=True)), 30.0)
    # power_fence is configured, yet a restart only observes: lease-taken, host-dead.
    assert of(out, Prove) == [Prove("vm1", "h2", (ProofMethod.LEASE_TAKEN, ProofMethod.HOST_DEAD), FIRST, None)]
    out = c.step(ProofObtained(FenceProof("vm1", "h2", ProofMethod.HOST_DEAD, 30.0, 70.0), FIRST), 70.0)
    assert of(out, MarkHostDown) == [MarkHostDown("h2")]
    out = c.step(HostOpDone("h2", HostOp.MARK_DOWN), 70.2)
    task = c.task("vm1")
    assert task is not None and task.dest not in (None, "h2") and of(out, ReleaseProof)
    assert c.task("vm2") is None


def test_a_restart_retry_still_only_observes_and_a_failed_restart_is_not_repeated() -> None:
    c = core(restart_after=20.0, max_attempts=2, retry_base=1.0)
    c.step(inventory(vms(vm1=True)), 10.0)
    c.step(inventory(vms(vm1=True)), 30.0)
    c.step(ProofRefused("vm1", "h2", FIRST, "lease held"), 35.0)
    out = c.step(Tick(), 36.0)
    assert [(p.methods, p.timeout) for p in of(out, Prove)] == [((ProofMethod.LEASE_TAKEN,), 5.0)]
    c.step(ProofRefused("vm1", "h2", Attempt(1, 2), "lease held"), 37.0)
    task = c.task("vm1")
    assert task is not None and task.state == TaskState.FAILED
    c.step(inventory(vms(vm1=True)), 40.0)
    assert not of(c.step(inventory(vms(vm1=True)), 70.0), Prove)


def test_an_in_place_restart_proved_waits_for_its_host_and_never_goes_elsewhere_unmarked() -> None:
    c = core(restart_after=20.0, rejoin_after=10.0)
    c.step(inventory(vms(vm1=True)), 10.0)
    c.step(inventory(vms(vm1=True)), 30.0)
    c.step(HealthUpdate(health("h2", 30.2, management=DOWN)), 30.2)  # disabled: takes no VM now
    c.step(ProofObtained(FenceProof("vm1", "h2", ProofMethod.LEASE_TAKEN, 30.0, 30.1), FIRST), 30.5)
    task = c.task("vm1")
    # Proved while its host had a row: it is marked down first (a driver restarts a VM elsewhere only
    # from a host marked down).
    assert task is not None and task.state == TaskState.MARKING_DOWN
    c2 = core(restart_after=20.0, rejoin_after=10.0)
    c2.step(inventory(vms(vm1=True)), 10.0)
    c2.step(inventory(vms(vm1=True)), 30.0)
    c2.step(ProofObtained(FenceProof("vm1", "h2", ProofMethod.LEASE_TAKEN, 30.0, 30.1), FIRST), 30.1)
    t2 = c2.task("vm1")
    assert t2 is not None and t2.state == TaskState.RELEASING and t2.dest == "h2"
    # Released, then the host fails before the restart: the restart fails and waits for its host.
    c2.step(StepDone("vm1", Step.RELEASE), 30.2)
    c2.step(HealthUpdate(health("h2", 30.3, management=DOWN)), 30.3)
    c2.step(HostOpDone("h2", HostOp.DISABLE), 30.4)
    c2.step(StepFailed("vm1", Step.EVACUATE, "host unreachable"), 31.0)
    out = c2.step(Tick(), 40.0)
    assert not of(out, Evacuate) and t2.state == TaskState.READY
    # Back and rejoined: the VM starts there.
    c2.step(HealthUpdate(health("h2", 41.0)), 41.0)
    c2.step(Tick(), 51.0)
    out = c2.step(HostOpDone("h2", HostOp.ENABLE), 51.2)
    assert [(e.source, e.dest) for e in of(out, Evacuate)] == [("h2", "h2")]


def test_a_new_leader_resumes_a_restart_with_observing_methods_only() -> None:
    c = core(restart_after=20.0, power_fence=True)
    c.step(inventory(vms(vm1=True)), 10.0)
    c.step(inventory(vms(vm1=True)), 30.0)
    task = c.task("vm1")
    assert task is not None
    c2 = core(restart_after=20.0, power_fence=True)
    out = c2.step(TasksLoaded((Task.from_dict(task.to_dict()),)), 31.0)
    assert of(out, Prove) == []  # a resumed task waits until its host and the inventory are known
    c2.step(HealthUpdate(health("h2", 31.0)), 31.0)
    out = c2.step(inventory(vms(vm1=True)), 31.5)
    assert [(p.methods, p.timeout) for p in of(out, Prove)] == [((ProofMethod.LEASE_TAKEN,), 5.0)]
