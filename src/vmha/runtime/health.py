"""The health feed: the one place the health core is stepped and its outputs handed to the recovery
side, for the manager's monitor, the simulator and the benches alike.

    feed = HealthFeed(timings, deliver=inbox_put_all, observe=log_and_persist)
    feed.step(events, now)      # a batch of health events of one instant (heartbeats, lease expiries...)
    feed.tick(now)              # at feed.next_deadline(): staleness and grace deadlines judged

One step: the batch goes through HealthCore.step_many; the environment sees the whole output first
(`observe`: its log lines, metrics, persisting the view), then the recovery core's events of it
(core/events.py's from_health: each changed host's last view, then the fabric changes) go to
`deliver`, whose other end is the runtime loop (vmha.runtime.loop). Where the health events come
from is each environment's own: the etcd watch with its trust checks (manager/detection.py), the
simulator's model (sim/env.py), the benches' generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vmha.core.events import FabricUpdate, HealthUpdate, from_health
from vmha.core.health import HealthCore, HealthEvent, HealthOutput, HealthTick, HealthTimings

Deliver = Callable[[Sequence[HealthUpdate | FabricUpdate]], None]
Observe = Callable[[HealthOutput], None]


class HealthFeed:
    """One manager's health core, fed a batch at a time, its outputs handed on as recovery events."""

    def __init__(self, timings: HealthTimings, deliver: Deliver, observe: Observe | None = None) -> None:
        self.core = HealthCore(timings)
        self._deliver = deliver
        self._observe = observe

    def step(self, events: Sequence[HealthEvent], now: float) -> HealthOutput:
        out = self.core.step_many(events, now)
        # Observed first: a log reads health change, then the decision it caused.
        if self._observe is not None:
            self._observe(out)
        recovery = from_health(out)
        if recovery:
            self._deliver(recovery)
        return out

    def tick(self, now: float) -> HealthOutput:
        """The periodic HealthTick, stepped once next_deadline() has come (before, it judges nothing)."""
        deadline = self.core.next_deadline()
        if deadline is None or now < deadline:
            return HealthOutput()
        return self.step([HealthTick()], now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def whole_view(self) -> list[HealthUpdate | FabricUpdate]:
        """Every host's current view, then the fabric outages in progress, as recovery events: what a
        recovery core that starts now (a new leader's) must know before the changes that follow."""
        hosts: list[HealthUpdate | FabricUpdate] = [HealthUpdate(h) for h in self.core.view().values()]
        return hosts + [FabricUpdate(f) for f in self.core.fabric_outages()]


__all__ = ["Deliver", "HealthFeed", "Observe"]
