"""The runtime loop on asyncio, as the daemon runs it, against a recording Env: nothing acts before
its persist, an ended term starts nothing, a cancelled proof in flight is answered as the daemon does.
(The scenario tests run the same loop in the simulator.)"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import pytest

from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import Attempt, HealthUpdate, Inventory, ProofRefused, RecoveryEvent
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.log import LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import HostInfo, VmInfo
from vmha.runtime.env import TermOver
from vmha.runtime.loop import Loop

HOSTS = ("h1", "h2", "h3")


def _health(host: str, t: float, down: bool) -> HealthUpdate:
    state = PlaneState.DOWN if down else PlaneState.UP
    planes = {p: PlaneStatus(state if p.value == "storage" else PlaneState.UP, t) for p in PLANES}
    return HealthUpdate(HostHealth(host, "rack1", planes))


class Recorder:
    """An Env whose persist really suspends (as an etcd write does) and whose proofs wait until
    released; every call is recorded in order."""

    def __init__(self) -> None:
        self.t = 0.0
        self.calls: list[tuple[str, str]] = []
        self.results: list[RecoveryEvent] = []
        self.end_term_in_persist = False
        self.loop: Loop | None = None
        self.proofs_go = asyncio.Event()

    def now(self) -> float:
        return self.t

    def log(self, lines: Sequence[LogLine]) -> None:
        pass

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        self.calls.append(("persist", ",".join(sorted(tasks))))
        await asyncio.sleep(0.01)
        if self.end_term_in_persist and self.loop is not None:
            self.loop.over = True  # the leadership was lost during the write

    def alert(self, alert: Alert) -> None:
        self.calls.append(("alert", alert.text))

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        self.calls.append(("prove", vm))
        await self.proofs_go.wait()
        return FenceProof(vm, host, methods[0], 1.0, self.t)

    async def release(self, vm: str) -> None:
        self.calls.append(("release", vm))

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        self.calls.append(("evacuate", vm))
        return dest or ""

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        self.calls.append(("migrate", vm))
        return dest or ""

    async def disable(self, host: str, reason: str) -> None:
        self.calls.append(("disable", host))

    async def mark_down(self, host: str) -> None:
        self.calls.append(("mark-down", host))

    async def enable(self, host: str) -> None:
        self.calls.append(("enable", host))

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        return "ok"

    async def quarantine(self, host: str, reason: str) -> None:
        self.calls.append(("quarantine", host))

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        self.calls.append(("spawn", name))
        return asyncio.create_task(coro, name=name)

    def result(self, event: RecoveryEvent) -> None:
        self.results.append(event)


def _loop(env: Recorder) -> Loop:
    core = RecoveryCore(PolicyTable.parse(DEFAULT_POLICY), RecoverySettings(decide_after=0.0))
    loop = Loop(core, env, proof_timeout=10.0)
    env.loop = loop
    return loop


async def _h2_fails(env: Recorder, loop: Loop, *, term_ends: bool = False) -> None:
    vms = (VmInfo("vm1", "h2", True), VmInfo("vm2", "h2", True))
    await loop.step([Inventory(tuple(HostInfo(h, True, True) for h in HOSTS), vms)]
                    + [_health(h, 0.0, False) for h in HOSTS])
    env.t = 10.0
    env.end_term_in_persist = term_ends
    await loop.step([_health("h2", 10.0, True)])


async def test_nothing_acts_before_its_persist_and_proofs_run_concurrently() -> None:
    env = Recorder()
    loop = _loop(env)
    await _h2_fails(env, loop)
    await asyncio.sleep(0.01)  # the proofs started, and wait
    # The inventory's step persists nothing; h2's: both tasks, then both proofs start.
    assert env.calls == [("persist", ""), ("persist", "vm1,vm2"), ("spawn", "prove vm1"), ("spawn", "prove vm2"),
                         ("prove", "vm1"), ("prove", "vm2")], env.calls
    assert set(loop.inflight) == {("prove", "vm1"), ("prove", "vm2")}
    env.proofs_go.set()
    await asyncio.sleep(0.01)
    assert [type(e).__name__ for e in env.results] == ["ProofObtained", "ProofObtained"]
    assert loop.inflight == {}


async def test_a_term_that_ends_during_the_persist_starts_nothing() -> None:
    env = Recorder()
    loop = _loop(env)
    with pytest.raises(TermOver):
        await _h2_fails(env, loop, term_ends=True)
    assert env.calls == [("persist", ""), ("persist", "vm1,vm2")], env.calls  # and no proof
    assert loop.inflight == {}


async def test_a_proof_cancelled_in_flight_is_refused_as_retryable() -> None:
    env = Recorder()
    loop = _loop(env)
    await _h2_fails(env, loop)
    await asyncio.sleep(0.01)
    proving = loop.inflight[("prove", "vm1")]
    env.t = 12.0
    await loop.step([_health("h2", 12.0, False)])  # back before a proof: attempt 1.1 cancelled
    await asyncio.sleep(0.01)
    assert proving.done()
    refusals = [e for e in env.results if isinstance(e, ProofRefused)]
    assert ProofRefused("vm1", "h2", Attempt(1, 1), "cancelled: the host came back") in refusals, env.results
    assert ("prove", "vm1") in loop.inflight  # the next attempt, not the cancelled one
    assert loop.cancel_all() and loop.over
