"""`vmha status`'s verdict (vmha.manager.assess) and the CLI's human-readable times (vmha.timefmt):
pure functions, what etcd said in, exit code and lines out."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from vmha.core.queue import Step, Task, TaskKind, TaskState
from vmha.etcd.quorum import Answer
from vmha.manager.assess import Level, assess, cannot_read
from vmha.timefmt import relative, when

NOW = datetime.datetime(2026, 12, 3, 10, 41, 19).timestamp()  # local time
E1, E2, E3 = (f"http://198.18.1.{i}:2379" for i in (2, 3, 4))
MEMBERS: dict[str, Answer] = {E1: (0xA, 0xA), E2: (0xB, 0xA), E3: (0xC, 0xA)}


def host(name: str, **planes: tuple[str, float]) -> dict[str, Any]:
    states = {p: planes.get(p, ("up", NOW - 3600)) for p in ("management", "storage", "service")}
    return {"host": name, "domain": "default", "failed": [p for p, (s, _) in states.items() if s == "down"],
            "planes": {p: {"state": s, "since": t, "evidence": ""} for p, (s, t) in states.items()},
            "out": None, "quarantined": None, "maintenance": False, "maintenance_since": None}  # fmt: skip


def cluster(*hosts: dict[str, Any], leader: str | None = "m1", fabric: list[dict[str, Any]] | None = None,
            pause: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"time": NOW, "hosts": list(hosts) or [host("h1"), host("h2")], "fabric": fabric or [],
            "leader": leader, "pause": pause or {"paused": False}}  # fmt: skip


def task(vm: str, state: TaskState, since: float = NOW - 12, **kw: Any) -> Task:
    return Task(vm, "h1", TaskKind.EVACUATE, 1, 5, "storage", "fence-evacuate", {"storage": NOW - 30},
                created=NOW - 30, state=state, since=since, **kw)  # fmt: skip


def test_times_are_local_and_relative() -> None:
    assert when(NOW - 12, NOW) == "10:41:07 (12 s ago)"
    assert when(NOW - 12.3456, NOW, ms=True) == "10:41:06.654 (12 s ago)"
    assert when(NOW - 86400 * 3, NOW) == "2026-11-30 10:41:19 (3 days ago)"
    assert when(NOW + 30, NOW) == "10:41:49 (in 30 s)"  # a retry still to come
    assert [relative(s) for s in (0, 119, 120, 7199, 7200, 172799, 172800)] == [
        "0 s ago", "119 s ago", "2 min ago", "120 min ago", "2 h ago", "48 h ago", "2 days ago"]


def test_all_up_with_a_leader_is_ok() -> None:
    v = assess(cluster(), [task("vm0", TaskState.DONE)], {}, MEMBERS, NOW)
    assert (v.level, v.summary, v.problems) == (Level.OK, "VMHA OK - 2 hosts, all planes up, leader m1", ())


def test_a_plane_down_maintenance_and_pause_are_degraded() -> None:
    down = host("h1", storage=("down", NOW - 12))
    away = {**host("h2"), "maintenance": True, "maintenance_since": NOW - 60}
    paused = {"paused": True, "t": NOW - 5, "by": "cli", "why": "upgrade"}
    v = assess(cluster(down, away, host("h3"), pause=paused), [], {}, MEMBERS, NOW)
    assert v.level == Level.DEGRADED == 1
    assert v.summary == "VMHA DEGRADED - 2 hosts degraded; recoveries paused"
    texts = [p.text for p in v.problems]
    assert "host 'h1': storage DOWN since 10:41:07 (12 s ago)" in texts
    assert "host 'h2': in maintenance since 10:40:19 (60 s ago)" in texts
    assert "recoveries paused cluster-wide since 10:41:14 (5 s ago) by cli: upgrade" in texts


def test_a_recovery_under_way_an_unreadable_task_and_a_member_down_are_degraded() -> None:
    members: dict[str, Answer] = {**MEMBERS, E3: "connection refused"}
    tasks = [task("vm1", TaskState.EVACUATING, dest="h2")]
    v = assess(cluster(), tasks, {"/vmha/c/tasks/vm9": "not JSON"}, members, NOW)
    assert v.level == Level.DEGRADED
    assert v.summary == "VMHA DEGRADED - 1 recovery under way; 1 unreadable task; 1 etcd member down"
    assert [p.text for p in v.problems] == [
        "etcd member http://198.18.1.4:2379 not answering: connection refused",
        "vm 'vm1' (from host 'h1', row storage): recovery evacuating since 10:41:07 (12 s ago)",
        "unreadable task /vmha/c/tasks/vm9: not JSON (fix or delete the key)"]


def test_no_manager_is_critical_and_named_first() -> None:
    v = assess(cluster(host("h1", storage=("down", NOW - 12)), host("h2", service=("suspect", NOW - 1)),
                       leader=None), [], {}, MEMBERS, NOW)  # fmt: skip
    assert v.level == Level.CRITICAL == 2
    assert v.summary == "VMHA CRITICAL - no active manager; 2 hosts degraded"
    assert v.problems[0].text.startswith("no active manager")


def test_a_fabric_outage_and_a_lost_quorum_are_critical() -> None:
    outage = {"plane": "storage", "domain": None, "active": True, "hosts": ["h1", "h2"], "since": NOW - 12}
    lost: dict[str, Answer] = {E1: (0xA, 0), E2: "timeout", E3: "timeout"}
    v = assess(cluster(fabric=[outage]), [], {}, lost, NOW)
    assert v.summary == "VMHA CRITICAL - etcd quorum lost; fabric outage (storage)"
    assert "fabric outage: plane storage in the whole cluster since 10:41:07 (12 s ago): hosts h1, h2" in [
        p.text for p in v.problems]


@pytest.mark.parametrize(("state", "extra", "words"), [
    (TaskState.FAILED, {"reason": "evacuate failed: no room"}, "recovery FAILED since 10:41:07 (12 s ago)"),
    (TaskState.UNPLACED, {}, "proved dead, runs nowhere"),
    (TaskState.RETRY_WAIT, {"resume": TaskState.PROVING, "attempts": 1}, "down, no fence proof (refused: alive)"),
])  # fmt: skip
def test_a_vm_the_manager_cannot_recover_is_critical(state: TaskState, extra: dict[str, Any], words: str) -> None:
    t = task("vm1", state, **extra)
    t.begin(Step.PROVE, NOW - 20)
    t.finish(Step.PROVE, NOW - 19, "refused: alive")
    v = assess(cluster(), [t], {}, MEMBERS, NOW)
    assert (v.level, v.summary) == (Level.CRITICAL, "VMHA CRITICAL - vm 'vm1' not recovered")
    assert words in v.problems[0].text


def test_a_proof_in_flight_is_only_degraded_and_an_old_failure_no_longer_counts() -> None:
    proving = task("vm1", TaskState.PROVING)
    proving.begin(Step.PROVE, NOW - 5)  # sanlock's host-dead takes minutes: waiting is no refusal
    old = task("vm2", TaskState.FAILED, since=NOW - 2 * 86400)
    v = assess(cluster(), [proving, old], {}, MEMBERS, NOW)
    assert (v.level, v.summary) == (Level.DEGRADED, "VMHA DEGRADED - 1 recovery under way")
    assert assess(cluster(), [old], {}, MEMBERS, NOW, failed_window=3 * 86400).level == Level.CRITICAL


def test_etcd_unreadable_is_unknown_unless_its_members_report_a_lost_quorum() -> None:
    v = cannot_read("cannot read etcd (http://198.18.1.2:2379): timeout", {E1: "timeout"})
    assert (v.level, v.summary) == (Level.UNKNOWN, "VMHA UNKNOWN - cannot read etcd (http://198.18.1.2:2379): timeout")
    assert v.level == 3
    v = cannot_read("cannot read etcd: no leader", {E1: (0xA, 0), E2: (0xB, 0)})
    assert (v.level, v.summary) == (Level.CRITICAL, "VMHA CRITICAL - etcd quorum lost: cannot read etcd: no leader")
