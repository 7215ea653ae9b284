"""Rebalancing: the plan of one round (core/rebalance.py) and its use in RecoveryCore (off by default)."""

from __future__ import annotations

from test_recovery import FABRIC, core, health, inventory, of

from vmha.core.actions import LiveMigrate
from vmha.core.events import HealthUpdate, HostEnabled
from vmha.core.rebalance import REBALANCE_KEY, plan
from vmha.drivers.base import VmInfo


def test_a_round_moves_lowest_priorities_from_the_most_to_the_least_loaded_within_its_bound() -> None:
    movable = {"h1": [(5, "a"), (0, "b"), (1, "c"), (0, "d")], "h2": [(0, "e")], "h3": []}
    assert plan({"h1": 4, "h2": 1, "h3": 0}, movable, 1) == [("b", "h1")]
    assert plan({"h1": 4, "h2": 1, "h3": 0}, movable, 5) == [("b", "h1"), ("d", "h1")]  # then 2, 1, 2: even
    assert plan({"h1": 2, "h2": 1, "h3": 1}, movable, 5) == []  # one apart is even
    assert plan({"h1": 4, "h2": 0}, {"h1": [], "h2": []}, 5) == []  # nothing may move
    assert plan({"h1": 4, "h2": 2}, movable, 5, capacity=2) == []  # the least loaded is full
    assert plan({"h1": 9}, movable, 5) == []


def vms(n1: int, n2: int) -> list[VmInfo]:
    return ([VmInfo(f"a{i}", "h1", True, i % 3, "running") for i in range(n1)]
            + [VmInfo(f"b{i}", "h2", True, 0, "running") for i in range(n2)])


def test_rebalancing_is_off_by_default_and_bounded_with_a_cooldown_when_on() -> None:
    c = core()
    c.step(inventory(vms(6, 0)), 1.0)
    c.step(HostEnabled("h3"), 2.0)
    assert not of(c.step(inventory(vms(6, 0)), 3.0), LiveMigrate)
    c = core(rebalance=True, rebalance_moves=2, rebalance_cooldown=30.0)
    c.step(inventory(vms(6, 0)), 1.0)
    assert not of(c.step(inventory(vms(6, 0)), 2.0), LiveMigrate)  # no host returned
    c.step(HostEnabled("h3"), 3.0)
    out = c.step(inventory(vms(6, 0)), 4.0)
    moved = of(out, LiveMigrate)
    assert [(m.vm, m.source) for m in moved] == [("a0", "h1"), ("a3", "h1")]  # priority 0 first, 2 at most
    assert all(c.task(m.vm).row == REBALANCE_KEY for m in moved)  # type: ignore[union-attr]
    assert not of(c.step(inventory(vms(6, 0)), 20.0), LiveMigrate)  # in flight, and cooling down


def test_a_round_with_no_destination_to_judge_stays_due() -> None:
    """A round that falls in a fabric outage sees no eligible host: it must come again once the
    hosts are back, not be dropped (a random-rounds lab run ended with all 10 VMs on one host,
    seed 531130757, 2026-12-03)."""
    c = core(rebalance=True, rebalance_moves=2, rebalance_cooldown=30.0)
    c.step(inventory(vms(6, 0)), 1.0)
    c.step(HostEnabled("h3"), 2.0)
    for h in ("h1", "h2", "h3", "h4"):
        c.step(HealthUpdate(health(h, 3.0, storage=FABRIC)), 3.0)
    assert not of(c.step(inventory(vms(6, 0)), 4.0), LiveMigrate)  # nothing eligible: no round now
    for h in ("h1", "h2", "h3", "h4"):
        c.step(HealthUpdate(health(h, 10.0)), 10.0)
    moved = of(c.step(inventory(vms(6, 0)), 40.0), LiveMigrate)  # after the cool-down
    assert [(m.vm, m.source) for m in moved] == [("a0", "h1"), ("a3", "h1")]
