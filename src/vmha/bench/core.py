"""`vmha bench core`: the decision core at scale (issue 4). Prints numbers, never passes or fails.

1,000 hosts x 20 HA VMs. The whole pure core runs, as in the manager: the HealthCore (heartbeats, lease
expiries, the fabric guard) feeds the RecoveryCore (policy, tasks, queue) through the runtime's health feed. Every
live plane of every host beats once per keepalive interval (0.5 s), in one batch per round, as the
monitor batches them. Then:
  1. a fabric outage: 60 % of the hosts lose the management plane (beats stop, leases expire), the
     fabric guard calls it FABRIC and policy alerts only; 10 s later the plane comes back;
  2. 50 hosts lose storage at once (beats stop, leases expire): DOWN, decide_after, 1,000 tasks proving;
  3. every step of the 1,000 recoveries (proof, mark down, release, evacuate) answered at once and fed
     back until all are DONE, with the configured concurrency limits.
The RecoveryCore runs in the manager's runtime loop (vmha.runtime.loop), whose environment here
answers every action at once (_Instant): results wait in a queue until phase 3 feeds them back.
Measured in decision time only (perf_counter around each HealthCore step and each step of the runtime
loop, which includes the RecoveryCore step and the dispatch of its actions; no etcd, no driver, no
sanlock):
  - the cost of a heartbeat (the steady load between decisions, reported apart);
  - decision time: every core step of a phase except the batches of ordinary heartbeats, i.e. the lease
    expiries, the timer ticks that turn them into SUSPECT / FABRIC / DOWN, the fabric verdict, the
    policy decisions, and the tasks created, persisted and proving (phases 1 and 2);
  - dispatch overhead per task (phase 3).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import Inventory, RecoveryEvent, Tick
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HealthEvent, HealthOutput, HealthTick, HealthTimings, Heartbeat, HostSeen, LeaseGone
from vmha.core.log import LogLine
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import TaskState
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import HostInfo, VmInfo
from vmha.runtime.env import Running
from vmha.runtime.health import HealthFeed
from vmha.runtime.loop import Loop, run_now


@dataclass(slots=True)
class _Spent:
    """Core time of one phase: ordinary heartbeat batches apart from everything else (the decisions)."""

    beats: float = 0.0
    beat_events: int = 0
    decide: float = 0.0
    decide_steps: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # actions emitted, by type


class _Cluster:
    """The cores and the simulated hosts' heartbeats, on a simulated clock."""

    def __init__(self, hosts: Sequence[str], timings: HealthTimings, core: RecoveryCore) -> None:
        self.timings = timings
        self.health = HealthFeed(timings, self._recover, self._observe)
        self.core = core
        self.now = 0.0
        self.spent = _Spent()
        self.env = _Instant(self)
        self.loop = Loop(core, self.env, proof_timeout=0.0)
        self.hosts = list(hosts)
        self.silent: set[tuple[str, Plane]] = set()  # planes whose agent path is cut: no beats
        self._seq = 0
        self._rev = 0
        self._leases: dict[tuple[str, Plane], int] = {}
        self.fabric: list[str] = []  # the fabric verdicts, as text
        self._recovering = 0.0  # recovery core time within the current health step

    def phase(self) -> _Spent:
        done, self.spent = self.spent, _Spent()
        return done

    def _recover(self, events: Sequence[RecoveryEvent]) -> None:
        for ev in events:
            t0 = time.perf_counter()
            run_now(self.loop.step([ev]))
            spent = time.perf_counter() - t0
            self.spent.decide += spent
            self.spent.decide_steps += 1
            self._recovering += spent

    def count(self, action: str, n: int = 1) -> None:
        self.spent.counts[action] = self.spent.counts.get(action, 0) + n

    def _observe(self, out: HealthOutput) -> None:
        self.fabric += [f"{'began' if f.active else 'ended'} at {self.now:.1f} s over {len(f.hosts)} hosts"
                        for f in out.fabric]

    def _health(self, events: Sequence[HealthEvent], beats: bool) -> None:
        t0, self._recovering = time.perf_counter(), 0.0
        out = self.health.step(events, self.now)
        # The feed steps the recovery core with its output (_recover counts that time itself).
        spent = time.perf_counter() - t0 - self._recovering
        if beats and not out.changes and not out.fabric:
            self.spent.beats += spent
            self.spent.beat_events += len(events)
        else:  # it changed a plane state or a fabric verdict: part of a decision
            self.spent.decide += spent
            self.spent.decide_steps += 1

    def register(self) -> None:
        self._health([HostSeen(h, "default") for h in self.hosts], beats=False)

    def inventory(self, vms: tuple[VmInfo, ...]) -> None:
        self._recover([Inventory(tuple(HostInfo(h, True, True) for h in self.hosts), vms)])

    def _beats(self) -> list[HealthEvent]:
        self._seq += 1
        events: list[HealthEvent] = []
        for h in self.hosts:
            for p in PLANES:
                if (h, p) in self.silent:
                    continue
                self._rev += 1
                lease = self._leases.setdefault((h, p), len(self._leases) + 1)
                events.append(Heartbeat(h, p, self._seq, self.now, self._rev, lease))
        return events

    def run_until(self, until: float) -> None:
        """Heartbeat rounds every keepalive interval; the cores' deadlines ticked in between."""
        step = self.timings.keepalive_interval
        while self.now < until - 1e-9:
            nxt = min(until, round(self.now + step, 6))
            for deadline in (self.health.next_deadline(), self.core.next_deadline()):
                if deadline is not None and self.now < deadline < nxt:
                    self.now = deadline
                    self._health([HealthTick()], beats=False)
                    self._recover([Tick()])
            self.now = nxt
            self._health(self._beats(), beats=True)

    def cut(self, hosts: Sequence[str], plane: Plane) -> None:
        self.silent |= {(h, plane) for h in hosts}

    def leases_expire(self, hosts: Sequence[str], plane: Plane) -> None:
        """etcd expired the leases of the cut planes: one batch of key deletions, as the watch delivers."""
        events: list[HealthEvent] = []
        for h in hosts:
            self._rev += 1
            events.append(LeaseGone(h, plane, self._rev))
            self._leases.pop((h, plane), None)  # a returning agent grants a new lease
        self._health(events, beats=False)

    def restore(self, hosts: Sequence[str], plane: Plane) -> None:
        self.silent -= {(h, plane) for h in hosts}


class _Instant:
    """The runtime loop's Env of the bench: every call answers at once (a proof by the last method it
    was given, the driver's steps done); the results wait in `results` for phase 3."""

    def __init__(self, cluster: _Cluster) -> None:
        self.cluster = cluster
        self.results: deque[RecoveryEvent] = deque()

    def now(self) -> float:
        return self.cluster.now

    def log(self, lines: Sequence[LogLine]) -> None:
        pass

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        self.cluster.count("PersistTask", len(tasks))
        self.cluster.count("Alert", len(alerts))

    def alert(self, alert: Alert) -> None:
        pass

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        self.cluster.count("Prove")
        now = self.cluster.now
        return FenceProof(vm, host, methods[-1], now - 1.0, now)

    async def release(self, vm: str) -> None:
        pass

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        return dest or ""

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        return dest or ""

    async def disable(self, host: str, reason: str) -> None:
        pass

    async def mark_down(self, host: str) -> None:
        pass

    async def enable(self, host: str) -> None:
        pass

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        return "bench: no check"

    async def quarantine(self, host: str, reason: str) -> None:
        pass

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> Running:
        run_now(coro)
        return _DONE

    def result(self, event: RecoveryEvent) -> None:
        self.results.append(event)


class _Done:
    """An action that ended before spawn returned."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False

    def done(self) -> bool:
        return True


_DONE = _Done()


def _per_beat(s: _Spent) -> str:
    each = s.beats / max(s.beat_events, 1) * 1e6
    return f"{s.beat_events} heartbeats in {s.beats * 1000:.0f} ms ({each:.1f} us each)"


@click.command()
@click.option("--hosts", default=1000, show_default=True)
@click.option("--vms-per-host", default=20, show_default=True)
@click.option("--failures", default=50, show_default=True, help="hosts losing storage at once")
@click.option("--fabric-share", default=0.6, show_default=True, help="share of hosts in the fabric outage")
@click.option("--max-parallel", default=8, show_default=True)
@click.option("--max-per-host", default=4, show_default=True)
def core(hosts: int, vms_per_host: int, failures: int, fabric_share: float, max_parallel: int,
         max_per_host: int) -> None:
    """Decision time and queue dispatch overhead of the pure core (health and recovery) at scale."""
    names = [f"h{i:04d}" for i in range(hosts)]
    vms = tuple(VmInfo(f"{h}-vm{j:02d}", h, True, j % 5) for h in names for j in range(vms_per_host))
    timings = HealthTimings()
    c = _Cluster(names, timings, RecoveryCore(PolicyTable.parse(DEFAULT_POLICY),
                                              RecoverySettings(max_parallel=max_parallel, max_per_host=max_per_host)))
    c.register()
    c.run_until(1.0)  # every plane UP
    c.inventory(vms)
    c.run_until(5.0)
    load = c.phase()

    # 1. A fabric outage of the management plane over 60 % of the hosts: alerts only, nothing queued.
    hit = names[: int(hosts * fabric_share)]
    c.cut(hit, Plane.MANAGEMENT)
    c.run_until(5.0 + timings.lease_ttl)
    c.leases_expire(hit, Plane.MANAGEMENT)
    c.run_until(17.0)
    c.restore(hit, Plane.MANAGEMENT)
    c.run_until(30.0)  # back, and the fabric outage over
    fabric = c.phase()
    if c.core.tasks() or not c.fabric:
        raise click.ClickException(f"fabric outage not seen as one: verdicts {c.fabric}, {len(c.core.tasks())} tasks")
    fabric_alerts = fabric.counts.get("Alert", 0)

    # 2. 50 hosts lose storage at once.
    failed = names[-failures:]
    c.cut(failed, Plane.STORAGE)
    c.run_until(30.0 + timings.lease_ttl)
    expired = c.now
    c.leases_expire(failed, Plane.STORAGE)
    while sum(1 for t in c.core.tasks() if t.state == TaskState.PROVING) < failures * vms_per_host and c.now < 60:
        c.run_until(c.now + timings.keepalive_interval)
    decision = c.phase()
    tasks = len(c.core.tasks())
    decided_after = max(t.created for t in c.core.tasks()) - expired

    # 3. Every step of every recovery, answered at once, until the queue is empty (no heartbeats here:
    # the queue's own overhead).
    while c.env.results:
        c.now += 0.001
        c._recover([c.env.results.popleft()])
    dispatch = c.phase()
    done = sum(1 for t in c.core.tasks() if t.state == TaskState.DONE)

    click.echo(f"cluster: {hosts} hosts x {vms_per_host} VMs = {len(vms)} VMs; HealthCore + RecoveryCore; "
               f"limits max_parallel={max_parallel} max_per_host={max_per_host}")
    click.echo(f"load (registration, first heartbeats, inventory, 5 s of beats): "
               f"{(load.beats + load.decide) * 1000:.0f} ms; {_per_beat(load)}")
    click.echo(f"fabric outage: {len(hit)} hosts lose management, leases expire; verdict {'; '.join(c.fabric)}: "
               f"decisions {fabric.decide * 1000:.1f} ms in {fabric.decide_steps} steps, {fabric_alerts} alert(s), "
               f"0 tasks queued; {_per_beat(fabric)}")
    click.echo(f"decision: {failures} hosts storage DOWN -> {tasks} tasks proving "
               f"(created {decided_after:.1f} s simulated after the lease expiry: down_grace + decide_after): "
               f"{decision.decide * 1000:.1f} ms in {decision.decide_steps} steps "
               f"({decision.counts.get('Prove', 0)} Prove, {decision.counts.get('PersistTask', 0)} PersistTask); "
               f"{_per_beat(decision)}")
    click.echo(f"dispatch: {done}/{tasks} recoveries to DONE in {dispatch.decide_steps} results: "
               f"{dispatch.decide * 1000:.1f} ms core time, {dispatch.decide / max(done, 1) * 1e6:.0f} us/task, "
               f"{done / dispatch.decide if dispatch.decide else float('inf'):.0f} tasks/s (target >= 1000)")
