"""The nova driver's desired state: which servers are "stopped" (ended by themselves) and which were
stopped by an operator, read from Nova's answers, which are untrusted; and how a proved-stopped server
is started again. A stand-in connection answers; what is tested is the driver's own logic (the e2e in
test_lab_nova_desired.py runs it against a real Nova)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from vmha.config import NovaConfig
from vmha.core.desired import STOPPED
from vmha.drivers.base import DriverError
from vmha.drivers.nova import NovaDriver, run_state, stop_by

SHUTDOWN, RUNNING = 4, 1


def act(action: str, user: str | None, t: str) -> Any:
    return SimpleNamespace(action=action, user_id=user, start_time=t)


SELF_STOP = [act("create", "u1", "2026-12-03T10:00:00"), act("stop", None, "2026-12-03T11:00:00")]
USER_STOP = [*SELF_STOP, act("start", "admin", "2026-12-03T11:01:00"), act("stop", "u1", "2026-12-03T12:00:00")]


def test_stop_by_names_who_made_the_newest_stop() -> None:
    assert stop_by([act("create", "u1", "t1")]) is None
    assert stop_by(SELF_STOP) == ""
    assert stop_by(list(reversed(USER_STOP))) == "u1"  # newest by time, whatever the order Nova lists
    # A self-stop after the user's stop: the guest was started again, then ended by itself.
    assert stop_by([*USER_STOP, act("start", "u1", "2026-12-03T13:00"), act("stop", None, "2026-12-03T14:00")]) == ""
    # A user id that is none (untrusted answer): not Nova's own stop.
    for odd in ("", 7, ["u1"]):
        assert stop_by([act("stop", odd, "t")]) not in ("", None)  # type: ignore[arg-type]


def test_only_a_server_that_ended_by_itself_is_stopped() -> None:
    assert run_state("SHUTOFF", None, SHUTDOWN, "") == STOPPED
    assert run_state("SHUTOFF", None, 6, "") == STOPPED  # CRASHED
    assert run_state("SHUTOFF", None, SHUTDOWN, "u1") == "SHUTOFF"  # an operator's stop: theirs
    assert run_state("SHUTOFF", None, SHUTDOWN, None) == "SHUTOFF"  # no stop in the history
    assert run_state("SHUTOFF", "powering-on", SHUTDOWN, "") == "SHUTOFF"  # a start under way
    assert run_state("SHUTOFF", None, RUNNING, "") == "SHUTOFF"  # Nova's record says the guest runs
    assert run_state("SHUTOFF", None, "4", "") == "SHUTOFF"  # a power state that is no number
    for status in ("ERROR", "ACTIVE", "PAUSED", "SUSPENDED", "SHELVED"):
        assert run_state(status, None, SHUTDOWN, "") == status
    # Untrusted words: refused, never read as stopped.
    for status in ("STOPPED", "shutoff", "", None, 4):
        assert run_state(status, None, SHUTDOWN, "") == "unknown"


class Compute:
    """Answers like Nova's compute API; counts the history reads and records the starts."""

    def __init__(self, servers: list[Any], actions: dict[str, list[Any]]) -> None:
        self._servers, self.actions, self.reads, self.started = servers, actions, 0, []
        self.fail_actions = False

    def servers(self, **_: Any) -> list[Any]:
        return list(self._servers)

    def get_server(self, sid: str) -> Any:
        return next(s for s in self._servers if s.id == sid)

    def server_actions(self, sid: str) -> list[Any]:
        if self.fail_actions:
            raise TimeoutError
        self.reads += 1
        return self.actions.get(sid, [])

    def start_server(self, sid: str) -> None:
        self.started.append(sid)
        self.actions[sid] = [*self.actions.get(sid, []), act("start", "admin", "2026-12-03T15:00:00")]
        s = self.get_server(sid)
        s.status, s.power_state, s.updated_at = "ACTIVE", RUNNING, "t-started"


def srv(sid: str, status: str = "SHUTOFF", power: int = SHUTDOWN, ha: bool = True, updated: str = "t0") -> Any:
    return SimpleNamespace(id=sid, name=sid, compute_host="cmp1", status=status, task_state=None, power_state=power,
                           updated_at=updated, metadata={"HA_Enabled": "true"} if ha else {}, tags=[], flavor={},
                           fault=None)


def driver(compute: Compute) -> NovaDriver:
    return NovaDriver(NovaConfig(vm_names="id"), connection=SimpleNamespace(compute=compute), poll_interval=0.0)


async def test_inventory_reads_each_history_once_per_change_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    servers = [srv("a"), srv("b"), srv("c", status="ACTIVE", power=RUNNING), srv("d", ha=False),
               srv("e", status="REBOOTING")]
    compute = Compute(servers, {"a": SELF_STOP, "b": USER_STOP, "d": SELF_STOP})
    d = driver(compute)
    with caplog.at_level(logging.INFO, logger="vmha.drivers.nova"):
        first = {v.name: v.state for v in await d.vms()}
        assert {v.name: v.state for v in await d.vms()} == first
    assert first == {"a": STOPPED, "b": "SHUTOFF", "c": "ACTIVE", "d": "SHUTOFF", "e": "unknown"}
    assert compute.reads == 2  # a and b, once: c runs, d is not protected, e's status is refused
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "nova: vm=a host=cmp1 SHUTOFF, stopped by Nova itself (no user: the guest ended by itself): runs nowhere, "
        "the desired state restarts it",
        "nova: vm=b host=cmp1 SHUTOFF, stopped by user u1: left stopped (an operator's stop)",
        "nova: vm=e host=cmp1 status 'REBOOTING' is none Nova defines: not taken as stopped, not restarted",
    ]
    # The server changed (Nova's `updated`): its history is read again.
    servers[0].updated_at = "t1"
    await d.vms()
    assert compute.reads == 3


async def test_an_unreadable_history_is_no_stop() -> None:
    compute = Compute([srv("a")], {"a": SELF_STOP})
    compute.fail_actions = True
    d = driver(compute)
    assert [v.state for v in await d.vms()] == ["SHUTOFF"]
    compute.fail_actions = False
    assert [v.state for v in await d.vms()] == [STOPPED]  # asked again, not cached


async def test_a_server_that_ended_by_itself_is_started_on_its_host() -> None:
    compute = Compute([srv("a")], {"a": SELF_STOP})
    assert await driver(compute).evacuate("a", "cmp1", "cmp1") == "cmp1"
    assert compute.started == ["a"]
    # Repeated (a new leader unsure of the step): already ACTIVE, not started twice.
    assert await driver(compute).evacuate("a", "cmp1", "cmp1") == "cmp1"
    assert compute.started == ["a"]


async def test_active_on_its_host_with_no_start_since_is_retried_not_done() -> None:
    """Nova still shows the server ACTIVE on its host (its compute has not seen the guest end, e.g. an
    evacuation to a source that rejoined): neither done nor started, retried."""
    compute = Compute([srv("a", status="ACTIVE", power=RUNNING)], {"a": [act("create", "u1", "t1")]})
    with pytest.raises(DriverError, match="still shows it ACTIVE on host=cmp1 \\(newest action create\\)") as e:
        await driver(compute).evacuate("a", "cmp1", "cmp1")
    assert e.value.retryable and compute.started == []


async def test_an_operators_stop_since_the_inventory_is_not_undone() -> None:
    compute = Compute([srv("a")], {"a": USER_STOP})
    with pytest.raises(DriverError, match="did not end by itself") as e:
        await driver(compute).evacuate("a", "cmp1", "cmp1")
    assert not e.value.retryable and compute.started == []


async def test_a_server_elsewhere_or_busy_is_not_started_in_place() -> None:
    s = srv("a")
    compute = Compute([s], {"a": SELF_STOP})
    s.compute_host = "cmp2"
    with pytest.raises(DriverError, match="is on host cmp2, not cmp1") as e:
        await driver(compute).evacuate("a", "cmp1", "cmp1")
    assert not e.value.retryable
    s.compute_host, s.task_state = "cmp1", "rebuilding"
    with pytest.raises(DriverError, match="busy") as e:
        await driver(compute).evacuate("a", "cmp1", "cmp1")
    assert e.value.retryable and compute.started == []


async def test_a_start_that_fails_is_reported() -> None:
    s = srv("a")
    compute = Compute([s], {"a": SELF_STOP})
    compute.start_server = lambda sid: setattr(s, "status", "ERROR")  # type: ignore[method-assign]
    with pytest.raises(DriverError, match="start on cmp1 failed: host=cmp1 status=ERROR"):
        await driver(compute).evacuate("a", "cmp1", "cmp1")


@pytest.mark.parametrize(("history", "started"), [(SELF_STOP, ["a"]), (USER_STOP, [])])
async def test_an_evacuated_server_is_started_only_if_it_had_ended_by_itself(history: list[Any],
                                                                              started: list[str]) -> None:
    """At 2.94 Nova keeps an evacuated stopped server stopped: the driver starts the one that had ended
    by itself (desired state), not the one its owner stopped."""
    s = srv("a")
    compute = Compute([s], {"a": history})
    compute.evacuate_server = lambda sid, host: setattr(s, "compute_host", host or "cmp2")  # type: ignore[attr-defined]
    compute.migrations = lambda **_: []  # type: ignore[attr-defined]
    assert await driver(compute).evacuate("a", "cmp1", "cmp2") == "cmp2"
    assert compute.started == started
    assert s.status == ("ACTIVE" if started else "SHUTOFF")
