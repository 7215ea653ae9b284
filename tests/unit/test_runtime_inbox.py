"""The runtime loop's event batching: a burst is taken at once, and a host's superseded health
views are dropped (the planes of a dead host go DOWN one change at a time)."""

from __future__ import annotations

import asyncio

from vmha.core.events import HealthUpdate, Tick
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.runtime.loop import Inbox, coalesce


def _health(host: str, down: set[Plane]) -> HealthUpdate:
    planes = {p: PlaneStatus(PlaneState.DOWN if p in down else PlaneState.UP, 1.0) for p in PLANES}
    return HealthUpdate(HostHealth(host, "default", planes))


def test_coalesce_keeps_the_last_view_of_each_host_in_place() -> None:
    a1 = _health("a", {Plane.MANAGEMENT})
    b1 = _health("b", {Plane.SERVICE})
    a2 = _health("a", {Plane.MANAGEMENT, Plane.STORAGE})
    tick = Tick()
    a3 = _health("a", set(PLANES))
    assert coalesce([a1, b1, a2, tick, a3]) == [b1, tick, a3]
    assert coalesce([tick]) == [tick]


async def test_inbox_takes_a_burst_and_times_out_empty() -> None:
    inbox = Inbox()
    assert await inbox.take(0.01) == []
    events = [_health("a", set()), Tick()]
    for e in events:
        inbox.put(e)
    assert await inbox.take(None) == events

    async def later() -> None:
        await asyncio.sleep(0.01)
        inbox.put(Tick())

    task = asyncio.create_task(later())
    assert await asyncio.wait_for(inbox.take(None), 5) == [Tick()]
    await task
