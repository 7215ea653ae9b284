"""The health feed (vmha.runtime.health): the health core stepped a batch at a time, each output seen by
the environment first, then handed on as the recovery core's events; and the manager's monitor on it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from vmha.core.events import FabricUpdate, HealthUpdate
from vmha.core.health import (
    FabricChange,
    HealthChange,
    HealthOutput,
    HealthTimings,
    Heartbeat,
    HostSeen,
    LeaseGone,
)
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd.keys import Keys
from vmha.manager.detection import HealthMonitor
from vmha.runtime.health import HealthFeed

T = HealthTimings(fabric_min_hosts=3, fabric_fraction=0.5)


class Recorder:
    """What a feed's environment sees, in order: ("out", output) and ("events", recovery events)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.feed = HealthFeed(T, self.deliver, self.observe)

    def observe(self, out: HealthOutput) -> None:
        self.seen.append(("out", out))

    def deliver(self, events: Sequence[HealthUpdate | FabricUpdate]) -> None:
        self.seen.append(("events", list(events)))

    def take(self) -> list[tuple[str, object]]:
        seen, self.seen = self.seen, []
        return seen


def beats(hosts: Sequence[str], now: float, seq: int) -> list[Heartbeat]:
    return [Heartbeat(h, p, seq, now, seq, 1) for h in hosts for p in PLANES]


def test_a_batch_is_observed_then_delivered_as_each_changed_hosts_last_view() -> None:
    r = Recorder()
    r.feed.step([HostSeen("h1", "r1"), HostSeen("h2", "r1")], 0.0)
    r.take()
    out = r.feed.step(beats(["h1", "h2"], 0.1, 1), 0.1)  # every plane of both: UNKNOWN -> UP
    assert len(out.changes) == 6
    seen = r.take()
    assert [kind for kind, _ in seen] == ["out", "events"]
    assert seen[0][1] is out
    # One event per host, its view after all three planes changed: never a half-changed view.
    assert seen[1][1] == [HealthUpdate(r.feed.core.view()["h1"]), HealthUpdate(r.feed.core.view()["h2"])]
    assert all(s.state == PlaneState.UP for e in seen[1][1] for s in e.health.planes.values())  # type: ignore[attr-defined]


def test_an_output_without_changes_delivers_nothing() -> None:
    r = Recorder()
    r.feed.step([HostSeen("h1", "r1")], 0.0)
    r.feed.step(beats(["h1"], 0.1, 1), 0.1)
    r.take()
    r.feed.step(beats(["h1"], 0.6, 2), 0.6)  # the same planes, still UP
    assert [kind for kind, _ in r.take()] == ["out"]


def test_a_fabric_outage_is_delivered_after_the_host_views() -> None:
    hosts = ["h1", "h2", "h3", "h4"]
    r = Recorder()
    r.feed.step([HostSeen(h, "r1") for h in hosts], 0.0)
    r.feed.step(beats(hosts, 0.1, 1), 0.1)
    r.take()
    out = r.feed.step([LeaseGone(h, Plane.MANAGEMENT, 10) for h in hosts[:3]], 1.0)
    assert out.fabric and out.fabric[0].active
    events = r.take()[1][1]
    assert isinstance(events, list)
    assert events[:3] == [HealthUpdate(r.feed.core.view()[h]) for h in hosts[:3]]
    assert events[3:] == [FabricUpdate(f) for f in out.fabric]


def test_tick_steps_only_once_a_deadline_has_come() -> None:
    r = Recorder()
    r.feed.step([HostSeen("h1", "r1")], 0.0)
    r.feed.step(beats(["h1"], 0.1, 1), 0.1)
    r.feed.step([LeaseGone("h1", Plane.STORAGE, 5)], 0.5)  # SUSPECT; DOWN once down_grace has passed
    r.take()
    deadline = r.feed.next_deadline()
    assert deadline == 0.5 + T.down_grace
    assert r.feed.tick(deadline - 0.01).changes == []
    assert r.take() == []  # not stepped: nothing observed
    out = r.feed.tick(deadline)
    assert [(c.plane, c.new) for c in out.changes] == [(Plane.STORAGE, PlaneState.DOWN)]
    assert [kind for kind, _ in r.take()] == ["out", "events"]


def test_whole_view_is_every_hosts_view() -> None:
    r = Recorder()
    r.feed.step([HostSeen("h2", "r1"), HostSeen("h1", "r1")], 0.0)
    view = r.feed.core.view()
    assert r.feed.whole_view() == [HealthUpdate(h) for h in view.values()]
    assert {e.health.host for e in r.feed.whole_view()} == {"h1", "h2"}


def test_whole_view_carries_the_fabric_outage_in_progress() -> None:
    # A leader that starts during an outage must know of it (its alert, and the log line of its end),
    # not only see FABRIC planes.
    hosts = ["h1", "h2", "h3", "h4"]
    r = Recorder()
    r.feed.step([HostSeen(h, "r1") for h in hosts], 0.0)
    r.feed.step(beats(hosts, 0.1, 1), 0.1)
    out = r.feed.step([LeaseGone(h, Plane.MANAGEMENT, 10) for h in hosts[:3]], 1.0)
    view = r.feed.core.view()
    assert r.feed.whole_view() == [HealthUpdate(view[h]) for h in hosts] + [FabricUpdate(f) for f in out.fabric]


async def test_the_monitor_publishes_an_outputs_changes_then_its_recovery_events() -> None:
    """The daemon's term takes the HealthUpdates from this stream into its inbox: they must follow the
    changes of their output, one per host, as the feed made them."""
    now = [1000.0]
    mon = HealthMonitor(None, Keys("c"), T, clock=lambda: now[0])  # type: ignore[arg-type]
    changes = mon.subscribe()
    got: list[object] = []

    async def drain() -> None:
        async for c in changes:
            got.append(c)

    task = asyncio.create_task(drain())
    mon.step(HostSeen("h1", "r1"))
    for p in PLANES:
        mon.step(Heartbeat("h1", p, 1, now[0], 1, 7))
    await asyncio.sleep(0)
    task.cancel()
    kinds = [type(c).__name__ for c in got]
    assert kinds == ["HealthChange", "HealthUpdate"] * 3
    assert got[-1] == HealthUpdate(mon.view()["h1"])
    assert all(isinstance(c, HealthChange | FabricChange | HealthUpdate) for c in got)
