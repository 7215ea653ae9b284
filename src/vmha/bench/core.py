"""`vmha bench core`: the RecoveryCore at scale (issue 4). Prints numbers, never passes or fails.

1,000 hosts x 20 HA VMs are loaded; a fabric outage of one plane hits 60 % of the hosts (alert only),
ends, then 50 hosts lose storage at once. Measured, in core time only (perf_counter around
core.step; the answers to actions are immediate):
  - decision time: the 50 health updates -> 1,000 tasks created, persisted and proving;
  - dispatch overhead per task: every step of the 1,000 recoveries (proof, mark down, release,
    evacuate) fed back until all are DONE, with the configured concurrency limits.
"""

from __future__ import annotations

import time
from collections import deque

import click

from vmha.core.fencing import FenceProof
from vmha.core.health import FabricChange, HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import Step, TaskState
from vmha.core.recovery import (
    Evacuate,
    FabricUpdate,
    HealthUpdate,
    HostOp,
    HostOpDone,
    Inventory,
    MarkHostDown,
    ProofObtained,
    Prove,
    RecoveryAction,
    RecoveryCore,
    RecoveryEvent,
    RecoverySettings,
    ReleaseProof,
    StepDone,
    Tick,
)
from vmha.drivers.base import HostInfo, VmInfo


def _health(host: str, t: float, **states: PlaneState) -> HostHealth:
    return HostHealth(host, "default", {p: PlaneStatus(states.get(p.value, PlaneState.UP), t) for p in PLANES})


class _Clocked:
    """Feeds events to the core and sums the time spent inside core.step."""

    def __init__(self, core: RecoveryCore) -> None:
        self.core = core
        self.spent = 0.0
        self.steps = 0
        self.actions: deque[RecoveryAction] = deque()
        self.counts: dict[str, int] = {}

    def step(self, ev: RecoveryEvent, now: float) -> None:
        t0 = time.perf_counter()
        out = self.core.step(ev, now)
        self.spent += time.perf_counter() - t0
        self.steps += 1
        for a in out.actions:
            name = type(a).__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            if isinstance(a, Prove | MarkHostDown | ReleaseProof | Evacuate):
                self.actions.append(a)


def _answer(a: RecoveryAction, now: float) -> RecoveryEvent:
    match a:
        case Prove(vm, host, methods, attempt):
            return ProofObtained(FenceProof(vm, host, methods[-1], now - 1.0, now), attempt)
        case MarkHostDown(host):
            return HostOpDone(host, HostOp.MARK_DOWN)
        case ReleaseProof(vm, _, _):
            return StepDone(vm, Step.RELEASE)
        case Evacuate(vm, _, dest, _):
            return StepDone(vm, Step.EVACUATE, dest)
    raise ValueError(f"no answer for {a!r}")


@click.command()
@click.option("--hosts", default=1000, show_default=True)
@click.option("--vms-per-host", default=20, show_default=True)
@click.option("--failures", default=50, show_default=True, help="hosts losing storage at once")
@click.option("--fabric-share", default=0.6, show_default=True, help="share of hosts in the fabric outage")
@click.option("--max-parallel", default=8, show_default=True)
@click.option("--max-per-host", default=4, show_default=True)
def core(hosts: int, vms_per_host: int, failures: int, fabric_share: float, max_parallel: int,
         max_per_host: int) -> None:
    """Decision time and queue dispatch overhead of the RecoveryCore at scale."""
    names = [f"h{i:04d}" for i in range(hosts)]
    vms = tuple(VmInfo(f"{h}-vm{j:02d}", h, True, j % 5) for h in names for j in range(vms_per_host))
    c = _Clocked(RecoveryCore(PolicyTable.parse(DEFAULT_POLICY),
                              RecoverySettings(max_parallel=max_parallel, max_per_host=max_per_host)))
    now = 0.0
    for h in names:
        c.step(HealthUpdate(_health(h, now)), now)
    c.step(Inventory(tuple(HostInfo(h, True, True) for h in names), vms), now)
    load = c.spent

    # A fabric outage of the management plane: alerts only, nothing queued.
    now, c.spent = 10.0, 0.0
    hit = names[: int(hosts * fabric_share)]
    for h in hit:
        c.step(HealthUpdate(_health(h, now, management=PlaneState.FABRIC)), now)
    c.step(FabricUpdate(FabricChange(Plane.MANAGEMENT, None, True, tuple(hit), now)), now)
    for h in hit:
        c.step(HealthUpdate(_health(h, now + 5)), now + 5)
    fabric = c.spent
    assert not c.core.tasks(), "a fabric outage queued recoveries"

    # 50 hosts lose storage at once.
    now, c.spent, c.counts = 20.0, 0.0, {}
    failed = names[-failures:]
    for h in failed:
        c.step(HealthUpdate(_health(h, now, storage=PlaneState.DOWN)), now)
    # The rows are held for decide_after (a dead host's leases expire apart): act when it is over.
    now += c.core.settings.decide_after
    c.step(Tick(), now)
    decision = c.spent
    tasks = len(c.core.tasks())
    decided = dict(c.counts)

    # Every step of every recovery, answered at once, until the queue is empty.
    c.spent, steps0 = 0.0, c.steps
    while c.actions:
        now += 0.001
        c.step(_answer(c.actions.popleft(), now), now)
    dispatch = c.spent
    done = sum(1 for t in c.core.tasks() if t.state == TaskState.DONE)

    click.echo(f"cluster: {hosts} hosts x {vms_per_host} VMs = {len(vms)} VMs; "
               f"limits max_parallel={max_parallel} max_per_host={max_per_host}")
    click.echo(f"load (health of every host + inventory): {load * 1000:.1f} ms")
    click.echo(f"fabric outage over {len(hit)} hosts and its end: {fabric * 1000:.1f} ms "
               f"({2 * len(hit) + 1} events), 0 tasks queued")
    click.echo(f"decision: {failures} hosts storage DOWN -> {tasks} tasks proving: {decision * 1000:.1f} ms "
               f"({decided.get('Prove', 0)} Prove, {decided.get('PersistTask', 0)} PersistTask)")
    click.echo(f"dispatch: {done}/{tasks} recoveries to DONE in {c.steps - steps0} results: "
               f"{dispatch * 1000:.1f} ms core time, {dispatch / max(done, 1) * 1e6:.0f} us/task, "
               f"{done / dispatch if dispatch else float('inf'):.0f} tasks/s (target >= 1000)")
