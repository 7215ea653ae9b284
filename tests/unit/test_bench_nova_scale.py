"""The pure parts of `vmha bench nova --hosts`: the plan of servers over hosts, the failed hosts, the
statistics, the in-flight meter, the Masakari host-failure notification and its auth plugin; and the
bench's manager (HealthCore + RecoveryCore in the runtime loop) against a stand-in driver: every VM
of the failed hosts evacuated, within the queue's limits."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import keystoneauth1.exceptions as ks_exc
import pytest
from click.testing import CliRunner

from vmha.bench import nova as nova_bench
from vmha.bench import nova_scale
from vmha.bench.nova_scale import InFlight, Manager, Phase, Spread, pick_failed, plan_servers, ratio
from vmha.core.health import HealthTimings
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import HostInfo, VmInfo
from vmha.lab.nova.masakari import MasakariSettings, host_failure_notification
from vmha.lab.nova.masakari_auth import RigToken


def test_plan_spreads_servers_evenly_and_names_them_once() -> None:
    plan = plan_servers(["a", "b", "c"], 8)
    assert [len(plan[h]) for h in "abc"] == [3, 3, 2]
    names = [n for h in "abc" for n in plan[h]]
    assert len(set(names)) == 8
    assert plan["a"][:2] == ["ha-0000", "ha-0003"]
    assert plan_servers(["a"], 0) == {"a": []}


def test_plan_refuses_no_hosts_or_negative_count() -> None:
    with pytest.raises(ValueError, match="no hosts"):
        plan_servers([], 3)
    with pytest.raises(ValueError, match="n must be"):
        plan_servers(["a"], -1)


def test_failed_hosts_are_spread_over_the_list() -> None:
    hosts = [f"cmp{i:02d}" for i in range(1, 11)]
    assert pick_failed(hosts, 5) == ["cmp01", "cmp03", "cmp05", "cmp07", "cmp09"]
    assert pick_failed(hosts[:4], 2) == ["cmp01", "cmp03"]
    assert pick_failed(hosts, 1) == ["cmp01"]
    for bad in (0, 10):
        with pytest.raises(ValueError, match="--fail must be between 1 and"):
            pick_failed(hosts, bad)


def test_spread_is_nearest_rank() -> None:
    s = Spread.of([float(v) for v in range(1, 101)])
    assert s is not None and (s.n, s.p50, s.p99, s.max) == (100, 50.0, 99.0, 100.0)
    assert Spread.of([]) is None


def test_inflight_keeps_the_most_at_once_overall_and_per_key() -> None:
    m = InFlight()
    m.enter("h1")
    m.enter("h1")
    m.enter("h2")
    m.leave("h1")
    m.enter("h2")
    m.leave("h2")
    assert (m.now, m.max, m.max_per) == (2, 3, {"h1": 2, "h2": 2})
    with pytest.raises(ValueError, match="without enter"):
        m.leave("h3")


def test_phase_total_and_rate_only_when_every_server_is_back() -> None:
    p = Phase("x", 3, active={"a": 4.0, "b": 6.0}, first_evacuate=2.0)
    assert p.total() is None and p.rate() is None
    assert "NOT all" in p.report()[0]
    p.active["c"] = 10.0
    assert p.total() == 10.0 and p.rate() == pytest.approx(2 / 6)
    assert ratio(200.0, 10.0) == "20.0x"
    assert ratio(None, 10.0).startswith("n/a")


def test_notification_is_what_the_host_monitor_sends() -> None:
    t = datetime(2026, 12, 3, 10, 0, 1, 500000)
    assert host_failure_notification("cmp03", t) == {
        "notification": {
            "type": "COMPUTE_HOST",
            "hostname": "cmp03",
            "generated_time": "2026-12-03T10:00:01.500000",
            "payload": {"event": "STOPPED", "cluster_status": "OFFLINE", "host_status": "NORMAL"},
        }
    }
    # An aware time is sent as the monitor's naive UTC.
    aware = datetime(2026, 12, 3, 12, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))
    assert host_failure_notification("cmp03", aware)["notification"]["generated_time"] == "2026-12-03T10:00:01.500000"
    assert host_failure_notification("h", datetime.now(UTC), "UNKNOWN")["notification"]["payload"]["host_status"] == (
        "UNKNOWN")
    with pytest.raises(ValueError, match="host_status must be one of NORMAL, UNKNOWN"):
        host_failure_notification("h", t, "normal")


def test_masakari_settings_shortest_changes_only_the_waits() -> None:
    d, s = MasakariSettings(), MasakariSettings.shortest()
    assert d.wait_period_after_service_update == 180
    assert (d.host_failure_recovery_threads, d.notification_delay_max) == (3, 5)
    assert (s.wait_period_after_service_update, s.notification_delay_max) == (0, 0)
    assert (s.host_failure_recovery_threads, s.process_unfinished_notifications_interval) == (3, 120)


def test_rig_token_plugin_answers_the_rig_token_for_the_nova_endpoint() -> None:
    loader = RigToken()
    plugin = loader.load_from_options(auth_url="http://127.0.0.1:1/v2.1", username="admin", password="x",
                                      project_name="admin", user_domain_name="Default",
                                      project_domain_name="Default", system_scope=None)
    assert plugin.get_endpoint(None) == "http://127.0.0.1:1/v2.1"
    assert plugin.get_token(None) == "admin:admin"
    with pytest.raises(ValueError, match="username must be set"):
        loader.load_from_options(auth_url="http://x", username="", project_name="admin")


class _Driver:
    """Stand-in for the nova driver: evacuations take a moment; what was asked is recorded."""

    def __init__(self, vms: Sequence[VmInfo], hosts: Sequence[str]) -> None:
        self._vms = {v.name: v for v in vms}
        self._hosts = list(hosts)
        self.marked: list[str] = []
        self.moved: dict[str, str] = {}

    async def hosts(self) -> list[HostInfo]:
        return [HostInfo(h, h not in self.marked, h not in self.marked, h in self.marked) for h in self._hosts]

    async def vms(self, host: str | None = None) -> list[VmInfo]:
        return [v for v in self._vms.values() if host is None or v.host == host]

    async def mark_host_down(self, host: str) -> None:
        self.marked.append(host)

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        assert source in self.marked and dest is not None and dest not in self.marked
        await asyncio.sleep(0.02)
        self.moved[vm] = dest
        v = self._vms[vm]
        self._vms[vm] = VmInfo(v.name, dest, v.ha, v.priority, v.state)
        return dest


async def test_bench_manager_evacuates_every_vm_of_the_failed_hosts_within_the_limits() -> None:
    hosts = ["h1", "h2", "h3", "h4", "h5"]
    plan = plan_servers(hosts, 25)
    driver = _Driver([VmInfo(n, h, True, 0, "ACTIVE") for h, names in plan.items() for n in names], hosts)
    settings = RecoverySettings(max_parallel=3, max_per_host=2, decide_after=0.0, power_fence=True)
    m = Manager(driver, hosts, settings, detection=0.3, proof=0.0,  # type: ignore[arg-type]
                timings=HealthTimings(lease_ttl=1, keepalive_interval=0.1, suspect_after=0.25, down_grace=0.1))
    m.start()
    try:
        await asyncio.sleep(0.3)
        m.fault(["h1", "h3"])
        async with asyncio.timeout(10):
            while len(driver.moved) < 10:
                await asyncio.sleep(0.05)
    finally:
        await m.stop()
    assert sorted(driver.moved) == sorted(plan["h1"] + plan["h3"])
    assert set(driver.moved.values()) <= {"h2", "h4", "h5"}
    assert sorted(driver.marked) == ["h1", "h3"]
    assert m.env.inflight.max == 3 and max(m.env.inflight.max_per.values()) <= 2
    assert m.env.failures == []
    assert m.env.first_evacuate is not None and m.env.first_evacuate >= 0.3
    assert sorted(m.health.down_at) == ["h1", "h3"]


@pytest.mark.parametrize(("args", "message"), [
    (["--hosts", "4", "--api-faults", "404:0.1"], "api fault '404:0.1'"),
    (["--hosts", "4", "--api-faults", "429:0.7,503:0.5"], "add up to more than 1"),
    (["--api-faults", "429:0.1"], "need --hosts"),
])  # fmt: skip
def test_api_faults_refused_before_any_rig_starts(args: list[str], message: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rig(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rig was about to be started")

    # A missed refusal must not start a rig here (either run: --hosts or the rounds).
    monkeypatch.setattr(nova_scale, "run", no_rig)
    monkeypatch.setattr(nova_bench, "_run", no_rig)
    result = CliRunner().invoke(nova_bench.nova, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_observer_outlives_a_failed_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An overloaded Nova API (a listing timing out, as in the 200-server run) costs the observer one
    listing, not the measurement: the server is seen ACTIVE elsewhere at the next one, and the failure
    is in the phase's notes."""
    monkeypatch.setattr(nova_scale, "OBSERVE_EVERY", 0.01)
    answers: list[object] = [ks_exc.ConnectTimeout("timed out"),
                             [types.SimpleNamespace(id="s1", status="ACTIVE", task_state=None, compute_host="b")]]

    def servers(**_: object) -> list[object]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, list)
        return answer

    conn = types.SimpleNamespace(compute=types.SimpleNamespace(servers=servers))
    phase = Phase("vmha", servers=1)
    asyncio.run(nova_scale._observe(conn, phase, {"s1": "a"}, t0=time.monotonic()))
    assert list(phase.active) == ["s1"]
    assert len(phase.notes) == 1 and phase.notes[0].startswith("observer: 1 server listing(s) failed")
    assert "ConnectTimeout" in phase.notes[0]
