"""Property tests: whatever the order of health changes, inventories, results (good, failed, stale,
bogus), ticks and leader takeovers, the RecoveryCore never
  - emits an Evacuate for a VM without a FenceProof delivered for that VM and its source host,
  - marks a host down (Nova force_down) before a FenceProof was delivered for one of its VMs,
  - has two restarts (release / evacuate / live-migrate) of one VM in flight,
  - runs more than max_parallel restarts, or more than max_per_host towards one host,
  - enables a host (rejoin) that is not UP on every plane, or a fenced one without a passed rejoin check,
  - raises (a TransitionError or InvariantError would be a bug: any event order is legal input)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmha.core.actions import (
    CheckRejoin,
    DisableHost,
    EnableHost,
    Evacuate,
    LiveMigrate,
    MarkHostDown,
    PersistTask,
    Prove,
    QuarantineHost,
    RecoveryAction,
    ReleaseProof,
)
from vmha.core.events import (
    AgentStopped,
    Attempt,
    HealthUpdate,
    HostEnabled,
    HostOp,
    HostOpDone,
    HostOpFailed,
    HostOut,
    Inventory,
    Maintenance,
    ProofObtained,
    ProofRefused,
    RecoveryEvent,
    RejoinChecked,
    StepDone,
    StepFailed,
    TasksLoaded,
    Tick,
)
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import RUNNING, STEP_STATE, Step, Task, TaskKind, TaskState
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import HostInfo, VmInfo

HOSTS = ("h1", "h2", "h3", "h4")
VMS = tuple(VmInfo(f"vm{i}", HOSTS[i % 3], i != 5, priority=i % 3) for i in range(7))
# Mostly UP: destinations must exist for restarts to happen at all.
STATES = (*[PlaneState.UP] * 6, PlaneState.DOWN, PlaneState.DOWN, PlaneState.SUSPECT, PlaneState.FABRIC,
          PlaneState.UNKNOWN)
POLICY = PolicyTable.parse(DEFAULT_POLICY)


_STEP: dict[type, Step] = {ReleaseProof: Step.RELEASE, Evacuate: Step.EVACUATE, LiveMigrate: Step.MIGRATE}


class Harness:
    def __init__(self, s: RecoverySettings) -> None:
        self.settings = s
        self.core = RecoveryCore(POLICY, s)
        self.now = 0.0
        self.store: dict[str, dict[str, object]] = {}
        self.outstanding: list[RecoveryAction] = []
        self.proofs: set[tuple[str, str]] = set()
        self.up: dict[str, bool] = {}  # host -> every plane UP in its last health event
        self.fenced: set[str] = set()  # marked down (a delivered mark-down result)
        self.disabled: set[str] = set()  # disabled (a delivered disable result)
        self.checked: set[str] = set()  # a passed rejoin check delivered since
        self.maintenance: set[str] = set()
        self.quarantined: set[str] = set()  # QuarantineHost emitted (keys.quarantined written)

    def step(self, ev: RecoveryEvent) -> None:
        if isinstance(ev, ProofObtained):
            self.proofs.add((ev.proof.vm, ev.proof.host))
        elif isinstance(ev, HealthUpdate):
            self.up[ev.health.host] = all(s.state == PlaneState.UP for s in ev.health.planes.values())
            if not self.up[ev.health.host]:
                self.checked.discard(ev.health.host)
        elif isinstance(ev, HostOpDone) and ev.op == HostOp.MARK_DOWN:
            self.fenced.add(ev.host)
            self.checked.discard(ev.host)
        elif isinstance(ev, HostOpDone) and ev.op == HostOp.DISABLE:
            self.disabled.add(ev.host)
        elif isinstance(ev, Maintenance):
            (self.maintenance.add if ev.on else self.maintenance.discard)(ev.host)
        elif isinstance(ev, RejoinChecked) and ev.ok:
            self.checked.add(ev.host)
        elif isinstance(ev, HostEnabled) or (isinstance(ev, HostOpDone) and ev.op == HostOp.ENABLE):
            self.fenced.discard(ev.host)
            self.disabled.discard(ev.host)
            if isinstance(ev, HostEnabled):
                self.quarantined.discard(ev.host)
        moving = {t.vm for t in self.core.tasks() if t.state in RUNNING}
        out = self.core.step(ev, self.now)
        for t in self.core.tasks():
            # A move that starts (not one a new leader repeats, nor the restart after its release)
            # never goes to a host in maintenance.
            if t.state in RUNNING and t.vm not in moving and not isinstance(ev, TasksLoaded):
                assert t.dest not in self.maintenance, f"{t.vm} sent to {t.dest}, which is in maintenance"
        for a in out.actions:
            if isinstance(a, PersistTask):
                self.store[a.vm] = json.loads(json.dumps(a.data))
            elif isinstance(a, Evacuate):
                assert (a.vm, a.source) in self.proofs, f"evacuate {a.vm} from {a.source} without a proof"
            elif isinstance(a, MarkHostDown):
                # Nova's force_down (and disable) lets evacuations in: only once a VM there is proved dead.
                assert any(h == a.host for _, h in self.proofs), f"mark down {a.host} without a proof"
            if isinstance(a, QuarantineHost):
                self.quarantined.add(a.host)
            if isinstance(a, EnableHost):
                assert a.host not in self.quarantined, f"rejoin of quarantined {a.host}"
                assert self.up.get(a.host), f"rejoin of {a.host}, which is not UP on every plane"
                assert a.host not in self.fenced or a.host in self.checked, f"rejoin of fenced {a.host} unchecked"
            if isinstance(a, Prove | ReleaseProof | Evacuate | LiveMigrate | MarkHostDown | DisableHost
                          | CheckRejoin | EnableHost):
                self.outstanding.append(a)
        self.check()

    def check(self) -> None:
        restarts: dict[str, int] = {}
        for a in self.outstanding:
            if isinstance(a, ReleaseProof | Evacuate | LiveMigrate):
                restarts[a.vm] = restarts.get(a.vm, 0) + 1
        assert all(n == 1 for n in restarts.values()), restarts
        running = [t for t in self.core.tasks() if t.state in RUNNING]
        assert len(running) <= self.settings.max_parallel
        assert self.core.queue.running() == len(running)
        per: dict[str, int] = {}
        for t in running:
            assert t.dest is not None
            per[t.dest] = per.get(t.dest, 0) + 1
        assert all(n <= self.settings.max_per_host for n in per.values()), per
        for t in self.core.tasks():
            # Releasing or evacuating: on a proof (a resumed task proved again has an older release
            # recorded while its proof is redone).
            if t.kind == TaskKind.EVACUATE and t.state in (TaskState.RELEASING, TaskState.EVACUATING):
                assert t.proof is not None and (t.vm, t.source) in self.proofs

    def answer(self, i: int, ok: bool, retryable: bool) -> RecoveryEvent:
        a = self.outstanding.pop(i % len(self.outstanding))
        match a:
            case Prove(vm, host, methods, attempt):
                if ok:
                    return ProofObtained(FenceProof(vm, host, methods[-1], self.now - 1, self.now), attempt)
                return ProofRefused(vm, host, attempt, "refused", retryable)
            case ReleaseProof(vm, _, _):
                return StepDone(vm, Step.RELEASE) if ok else StepFailed(vm, Step.RELEASE, "x", retryable)
            case Evacuate(vm, _, dest, _):
                return StepDone(vm, Step.EVACUATE, dest) if ok else StepFailed(vm, Step.EVACUATE, "x", retryable)
            case LiveMigrate(vm, _, dest):
                return StepDone(vm, Step.MIGRATE, dest) if ok else StepFailed(vm, Step.MIGRATE, "x", retryable)
            case MarkHostDown(host):
                return HostOpDone(host, HostOp.MARK_DOWN) if ok else HostOpFailed(
                    host, HostOp.MARK_DOWN, "x", retryable)
            case DisableHost(host, _):
                return HostOpDone(host, HostOp.DISABLE) if ok else HostOpFailed(host, HostOp.DISABLE, "x")
            case EnableHost(host, _):
                return HostOpDone(host, HostOp.ENABLE) if ok else HostOpFailed(host, HostOp.ENABLE, "x")
            case CheckRejoin(host, _):
                return RejoinChecked(host, ok, "x")
        raise AssertionError(a)

    def delivered(self, ev: RecoveryEvent) -> None:
        """A step result for a VM whose step is in flight is that step's one result (the core cannot
        tell it apart, nor does it need to: each action has exactly one): it is no longer outstanding."""
        task = self.core.task(ev.vm) if isinstance(ev, StepDone | StepFailed) else None
        if task is not None and task.state == STEP_STATE[ev.step]:
            for i, a in enumerate(self.outstanding):
                if isinstance(a, ReleaseProof | Evacuate | LiveMigrate) and a.vm == ev.vm and _STEP[type(a)] == ev.step:
                    del self.outstanding[i]
                    return

    def failover(self) -> None:
        """The leader dies: its pending results are lost; a new core loads the persisted tasks."""
        self.outstanding = []
        self.core = RecoveryCore(POLICY, self.settings)
        self.step(TasksLoaded(tuple(Task.from_dict(d) for _, d in sorted(self.store.items()))))
        # The daemon reads what earlier leaders did to the hosts (keys.disabled) and the maintenance
        # marks (keys.maintenance) at takeover.
        for host in sorted(self.fenced | self.disabled):
            self.step(HostOut(host, HostOp.MARK_DOWN if host in self.fenced else HostOp.DISABLE,
                              "quarantined" if host in self.quarantined else ""))
        for host in sorted(self.maintenance):
            self.step(Maintenance(host, True))


def health_event(host: str, states: list[PlaneState], t: float) -> HealthUpdate:
    return HealthUpdate(HostHealth(host, "rack1", {p: PlaneStatus(s, t) for p, s in zip(PLANES, states, strict=True)}))


settings_st = st.builds(
    RecoverySettings,
    max_parallel=st.integers(1, 3),
    max_per_host=st.integers(1, 2),
    retry_base=st.sampled_from([0.5, 2.0]),
    retry_cap=st.sampled_from([1.0, 10.0]),
    max_attempts=st.integers(1, 4),
    decide_after=st.sampled_from([0.0, 0.0, 3.0]),
    power_fence=st.booleans(),
    host_capacity=st.sampled_from([0, 0, 4, 5]),
    rejoin_after=st.sampled_from([0.0, 5.0, 20.0]),
    quarantine_after=st.sampled_from([0, 2, 3]),
    quarantine_window=st.sampled_from([60.0, 3600.0]),
    on_agent_stop=st.sampled_from(["alert", "drain"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=settings_st, data=st.data())
def test_random_event_sequences_keep_the_invariants(s: RecoverySettings, data: st.DataObject) -> None:
    h = Harness(s)
    for host in HOSTS:
        h.step(health_event(host, [PlaneState.UP] * 3, 0.0))
    h.step(Inventory(tuple(HostInfo(x, True, True) for x in HOSTS), VMS))
    for _ in range(data.draw(st.integers(5, 80), label="length")):
        kind = data.draw(st.sampled_from(
            ["health", "health", "repair", "repair", *["answer"] * 6, "tick", "tick", "bogus", "inventory",
             "failover", "enable", "agent", "maintenance"]),
            label="kind")
        if kind == "repair":
            h.step(health_event(data.draw(st.sampled_from(HOSTS)), [PlaneState.UP] * 3, h.now))
        elif kind == "health":
            host = data.draw(st.sampled_from(HOSTS))
            states = data.draw(st.lists(st.sampled_from(STATES), min_size=3, max_size=3))
            h.step(health_event(host, states, h.now))
        elif kind == "answer" and h.outstanding:
            ok = data.draw(st.sampled_from([True, True, True, False]))
            h.step(h.answer(data.draw(st.integers(0, 50)), ok, data.draw(st.booleans())))
        elif kind == "tick":
            h.now += data.draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
            h.step(Tick())
        elif kind == "bogus":
            vm = data.draw(st.sampled_from([v.name for v in VMS] + ["ghost"]))
            host = data.draw(st.sampled_from(HOSTS))
            step = data.draw(st.sampled_from(list(Step)))
            # Any attempt tag: the current one of the VM's task (a duplicate) or an older/unknown one.
            attempt = Attempt(data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)))
            ev = data.draw(st.sampled_from([
                StepDone(vm, step, host),
                StepFailed(vm, step, "late", True),
                ProofRefused(vm, host, attempt, "late"),
                ProofObtained(FenceProof(vm, host, ProofMethod.HOST_DEAD, h.now, h.now), attempt),
                HostOpDone(host, HostOp.MARK_DOWN),
            ]))
            h.delivered(ev)
            h.step(ev)
        elif kind == "inventory":
            flags = data.draw(st.lists(st.booleans(), min_size=len(HOSTS), max_size=len(HOSTS)))
            h.step(Inventory(tuple(HostInfo(x, f, True) for x, f in zip(HOSTS, flags, strict=True)), VMS))
        elif kind == "maintenance":
            h.step(Maintenance(data.draw(st.sampled_from(HOSTS)), data.draw(st.booleans())))
        elif kind == "enable":
            h.step(HostEnabled(data.draw(st.sampled_from(HOSTS))))
        elif kind == "agent":
            h.step(AgentStopped(data.draw(st.sampled_from(HOSTS)), data.draw(st.sampled_from([None, h.now]))))
        elif kind == "failover":
            h.failover()
            h.step(Inventory(tuple(HostInfo(x, True, True) for x in HOSTS), VMS))


# -- the whole pipeline: random faults in the simulator (agents, etcd leases, HealthCore, RecoveryCore,
# a scripted sanlock / Nova world) never restart a VM whose old copy still runs --------------------

SIM_HOSTS = {"h1": "rack1", "h2": "rack1", "h3": "rack1", "h4": "rack2", "h5": "rack2"}
SIM_VMS = [VmInfo(f"vm{i}", f"h{i % 5 + 1}", i != 3, priority=i % 3) for i in range(8)]
PLANE_WORDS = ("management", "storage", "service", "all", "all")


def sim_command(draw: st.DrawFn) -> tuple[str, ...]:
    # Weighted towards faults that need a fence (a host cut off entirely, powered off).
    kind = draw(st.sampled_from(["cut", "cut", "cut", "restore", "power-off", "power-off", "power-on",
                                 "enable", "fabric", "etcd-leader-change", "manager-failover", "fail",
                                 "agent-stop", "agent-kill", "agent-start"]))
    host = draw(st.sampled_from(sorted(SIM_HOSTS)))
    if kind in ("cut", "restore"):
        return (kind, host, draw(st.sampled_from(PLANE_WORDS)))
    if kind in ("power-off", "power-on", "enable", "agent-stop", "agent-kill", "agent-start"):
        return (kind, host)
    if kind == "fabric":
        plane = draw(st.sampled_from(PLANE_WORDS[:3]))
        return ("fabric", plane, draw(st.sampled_from(["down", "up"])), *draw(st.sampled_from([(), ("rack2",)])))
    if kind == "fail":
        what = draw(st.sampled_from(["fail-evacuate", "fail-proof", "fail-migrate"]))
        vm = draw(st.sampled_from([v.name for v in SIM_VMS]))
        return (what, vm, str(draw(st.integers(1, 3))), *draw(st.sampled_from([(), ("fatal",)])))
    return (kind,)


@st.composite
def cmdlists(draw: st.DrawFn) -> list[tuple[float, tuple[str, ...]]]:
    """Faults at random times, most of them repaired some seconds later (so hosts rejoin, and fail
    again, and are quarantined)."""
    n = draw(st.integers(1, 8))
    times = sorted(draw(st.lists(st.integers(1, 100), min_size=n, max_size=n)))
    out: list[tuple[float, tuple[str, ...]]] = []
    for t in times:
        cmd = sim_command(draw)
        out.append((float(t), cmd))
        repair = {"cut": ("restore", *cmd[1:]), "power-off": ("power-on", *cmd[1:2])}.get(cmd[0])
        if repair is not None and draw(st.booleans()):
            out.append((float(t + draw(st.integers(3, 40))), repair))
    return sorted(out, key=lambda c: c[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=settings_st, commands=cmdlists())
def test_random_faults_in_the_simulator_never_split_a_vm(
    s: RecoverySettings, commands: list[tuple[float, tuple[str, ...]]]
) -> None:
    from vmha.core.health import HealthTimings
    from vmha.sim.env import Sim, SimTimings
    from vmha.sim.scenario import Command, Scenario

    sim = Sim(SIM_HOSTS, SIM_VMS, POLICY, s, HealthTimings(), SimTimings(duration=180.0))
    scenario = Scenario("random", sim, [Command(t, w, f"random:{i}") for i, (t, w) in enumerate(commands)], 180.0)
    scenario.run()
    assert sim.split_brain == 0, "\n".join(line.render() for line in sim.lines)
    for vm in sim.vms.values():
        assert len(vm.copies) <= 1, f"{vm.name} runs on {sorted(vm.copies)}"
