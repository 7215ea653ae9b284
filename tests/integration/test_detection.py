"""Manager-side detection end to end: real etcd, real `vmha agent` processes whose planes each go
through a cuttable proxy, and the HealthMonitor. Cutting one plane of one host must show exactly
that plane DOWN, and nothing else, then UP again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmha.config import Timings
from vmha.core.health import FabricChange, HealthChange, HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd import health_store
from vmha.etcd.auth import OPERATOR
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.manager.detection import Change, HealthMonitor, unix_monotonic
from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import ProxiedHost, config_text
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

K = Keys("t")
HOSTS = ("h1", "h2", "h3")
UP, SUSPECT, DOWN, FABRIC = PlaneState.UP, PlaneState.SUSPECT, PlaneState.DOWN, PlaneState.FABRIC


class Recorder:
    """Runs a HealthMonitor and records every change it publishes."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        self.changes: list[Change] = []
        self._sub = monitor.subscribe()
        self._tasks = [asyncio.create_task(monitor.run()), asyncio.create_task(self._record())]

    async def _record(self) -> None:
        async for c in self._sub:
            self.changes.append(c)

    def plane_changes(self) -> list[tuple[str, str, str]]:
        return [(c.host, c.plane.value, c.new.value) for c in self.changes if isinstance(c, HealthChange)]

    def saw(self, host: str, plane: Plane, state: PlaneState) -> bool:
        """Whether the change to `state` reached this recorder (it lags the monitor's view: a queue
        and a task apart, so a test asserting on changes waits for them, not for states())."""
        return (host, plane.value, state.value) in self.plane_changes()

    def states(self) -> dict[tuple[str, Plane], PlaneState]:
        return {(h, p): s.state for h, hh in self.monitor.view().items() for p, s in hh.planes.items()}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t



@pytest.fixture
async def hosts(tmp_path: Path, etcd: EtcdProcess) -> AsyncIterator[dict[str, ProxiedHost]]:
    hs: dict[str, ProxiedHost] = {}
    try:
        for name in HOSTS:
            hs[name] = await ProxiedHost.create(tmp_path, "t", name, "r1", etcd)
            await hs[name].start_agent()
        yield hs
    finally:
        for h in hs.values():
            await h.close()


@pytest.fixture
async def recorder(client: EtcdClient) -> AsyncIterator[Recorder]:
    r = Recorder(HealthMonitor(client, K, Timings().health(), name="m1"))
    try:
        yield r
    finally:
        await r.close()


def all_up(r: Recorder) -> bool:
    s = r.states()
    return len(s) == 3 * len(HOSTS) and all(v == UP for v in s.values())


@pytest.mark.parametrize("blackhole", [False, True], ids=["reset", "blackhole"])
async def test_one_plane_of_one_host_down_and_nothing_else(
    hosts: dict[str, ProxiedHost], recorder: Recorder, client: EtcdClient, blackhole: bool
) -> None:
    await until(lambda: all_up(recorder), "all planes UP", timeout=20)
    await asyncio.sleep(1.0)  # steady state: no flapping while nothing is cut
    assert all(new == "up" for _, _, new in recorder.plane_changes())
    recorder.changes.clear()

    cut = time.monotonic()
    await hosts["h2"].cut(Plane.STORAGE, blackhole=blackhole)
    await until(lambda: recorder.saw("h2", Plane.STORAGE, DOWN), "h2 storage DOWN recorded", timeout=20)
    detected = time.monotonic() - cut
    await asyncio.sleep(1.5)  # let anything wrong show up (nothing else may change)
    assert recorder.plane_changes() == [("h2", "storage", "suspect"), ("h2", "storage", "down")]
    states = recorder.states()
    assert {k for k, v in states.items() if v != UP} == {("h2", Plane.STORAGE)}
    down = next(c for c in recorder.changes if isinstance(c, HealthChange) and c.new == DOWN)
    assert down.health.failed() == frozenset({Plane.STORAGE})
    assert "lease expired" in down.health.planes[Plane.STORAGE].evidence
    logging.getLogger("test").info("cut -> DOWN in %.2fs", detected)

    # The persisted view says the same (what `vmha status` and a new leader read).
    async def persisted_down() -> health_store.HealthView | None:
        v = await health_store.load(client, K)
        h2 = v.hosts.get("h2")
        return v if h2 and h2.health.planes[Plane.STORAGE].state == DOWN else None

    view = await until(persisted_down, "h2 storage DOWN persisted", timeout=5)
    assert view.hosts["h2"].health.failed() == frozenset({Plane.STORAGE})
    assert all(not view.hosts[h].health.failed() for h in ("h1", "h3"))

    recorder.changes.clear()
    hosts["h2"].restore(Plane.STORAGE)
    # Wait for the change asserted on: states() shows UP a queue hop before plane_changes() does
    # (CI failed here, seeing UP in one and [] in the other).
    await until(lambda: recorder.saw("h2", Plane.STORAGE, UP), "h2 storage UP again recorded", timeout=20)
    assert recorder.plane_changes() == [("h2", "storage", "up")]
    assert all_up(recorder)


async def test_same_plane_cut_on_every_host_is_a_fabric_outage_not_down(
    hosts: dict[str, ProxiedHost], recorder: Recorder
) -> None:
    await until(lambda: all_up(recorder), "all planes UP", timeout=20)
    recorder.changes.clear()
    for h in hosts.values():
        await h.cut(Plane.SERVICE)
    await until(lambda: all(recorder.saw(h, Plane.SERVICE, FABRIC) for h in HOSTS), "service FABRIC", timeout=20)
    await until(lambda: any(isinstance(c, FabricChange) for c in recorder.changes), "fabric outage recorded")
    await asyncio.sleep(1.5)  # let anything wrong show up (no DOWN)
    assert DOWN not in recorder.states().values()
    fabric = [c for c in recorder.changes if isinstance(c, FabricChange)]
    assert fabric and all(f.plane == Plane.SERVICE and f.active for f in fabric)
    for h in hosts.values():
        h.restore(Plane.SERVICE)
    await until(lambda: all_up(recorder), "all UP after the outage", timeout=20)
    assert recorder.monitor.fabric_outages() == []


async def test_broken_values_are_skipped_and_the_monitor_keeps_going(
    hosts: dict[str, ProxiedHost], recorder: Recorder, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await until(lambda: all_up(recorder), "all planes UP", timeout=20)
    await client.put(K.heartbeat("h1", Plane.STORAGE) + "x", b"{}")  # not a heartbeat key
    await client.put(K.heartbeat("ghost", Plane.STORAGE), b"\x00garbage")  # not JSON
    await client.put_json(K.heartbeat("ghost", Plane.SERVICE), {"host": "other", "plane": "service"})
    await client.put(K.host("junk"), b"[1,")

    def text() -> str:
        return caplog.text

    # The monitor has read all four once it has refused the last of each watch (a watch keeps put order).
    await until(lambda: K.heartbeat("ghost", Plane.SERVICE) in text() and K.host("junk") in text(), "refused")
    assert all_up(recorder)  # ghost never appeared, nothing crashed, every real plane still UP
    assert "ghost" not in recorder.monitor.view()
    assert "junk" not in recorder.monitor.view()
    assert K.heartbeat("ghost", Plane.STORAGE) in text()
    # And it still detects.
    await hosts["h3"].cut(Plane.MANAGEMENT)
    await until(lambda: recorder.states()[("h3", Plane.MANAGEMENT)] == DOWN, "h3 management DOWN", timeout=20)


async def test_a_monitor_started_later_sees_a_missing_heartbeat_as_down(
    hosts: dict[str, ProxiedHost], client: EtcdClient
) -> None:
    first = Recorder(HealthMonitor(client, K, Timings().health(), name="m1"))
    try:
        await until(lambda: all_up(first), "all planes UP", timeout=20)
    finally:
        await first.close()
    await hosts["h1"].stop_agent()
    # Its leases run out (a clean stop does not revoke them): the keys go while no monitor runs.
    async def keys_gone() -> bool:
        return not (await client.get_prefix(K.heartbeat_prefix + "h1/"))[0]

    await until(keys_gone, "h1's heartbeat keys expired", timeout=10, interval=0.1)
    second = Recorder(HealthMonitor(client, K, Timings().health(), name="m2"))
    try:
        await until(lambda: all(second.states().get(("h1", p)) == DOWN for p in PLANES), "h1 DOWN from the listing",
                    timeout=20)  # fmt: skip
        assert {k for k, v in second.states().items() if v != UP} == {("h1", p) for p in PLANES}
    finally:
        await second.close()


async def test_status_command_prints_the_view(
    hosts: dict[str, ProxiedHost], recorder: Recorder, etcd: EtcdProcess, client: EtcdClient
) -> None:
    await until(lambda: all_up(recorder), "all planes UP", timeout=20)
    await hosts["h1"].cut(Plane.SERVICE)
    await until(lambda: recorder.states()[("h1", Plane.SERVICE)] == DOWN, "h1 service DOWN", timeout=20)
    vmha = str(Path(sys.executable).with_name("vmha"))
    cfg = hosts["h1"].workdir / "operator.toml"  # the read-only operator's certificate and role
    cfg.write_text(config_text("t", None, "-", {p: etcd.client_urls for p in PLANES}, etcd=etcd.toml(OPERATOR)))
    args = [vmha, "status", "--config", str(cfg)]

    async def failed_planes() -> dict[str, list[str]] | None:
        out = await asyncio.to_thread(subprocess.run, [*args, "--json"], capture_output=True, text=True, timeout=30)
        data = json.loads(out.stdout)
        # No manager runs here (the monitor alone): CRITICAL for a monitor, exit 2, and the view all the same.
        assert out.returncode == 2 and data["status"]["summary"].startswith("VMHA CRITICAL - no active manager"), out
        failed = {h["host"]: h["failed"] for h in data["hosts"]}
        return failed if failed.get("h1") == ["service"] else None  # the writer task persists asynchronously

    failed = await until(failed_planes, "h1 service DOWN in `vmha status`", timeout=10, interval=0.1)
    assert failed == {"h1": ["service"], "h2": [], "h3": []}
    out = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "DOWN" in out.stdout and "h3" in out.stdout, out.stdout
    assert "host 'h1': service DOWN since " in out.stdout  # one line per problem, local and relative time
    # Without a config: the endpoints and the operator's TLS files on the command line.
    tls = etcd.tls(OPERATOR)
    assert tls is not None
    bare = [vmha, "status", "--endpoints", ",".join(etcd.client_urls), "--cluster", "t", "--json"]
    out = await asyncio.to_thread(subprocess.run, [*bare, "--ca", str(tls.ca), "--cert", str(tls.cert), "--key",
                                                   str(tls.key)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert {h["host"]: h["failed"] for h in json.loads(out.stdout)["hosts"]} == failed
    out = await asyncio.to_thread(subprocess.run, bare, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "need --ca, --cert, --key" in out.stderr, out.stderr


async def test_a_stalled_manager_sees_no_fabric_outage(hosts: dict[str, ProxiedHost], client: EtcdClient) -> None:
    # The manager's process stalls for 2 s (a long GC pause, a starved CPU): to its core, time jumps
    # 2 s between two batches of heartbeats. Before the silence rule every plane went stale at once
    # after such a gap: SUSPECT everywhere and a fabric outage of every plane, under which a real
    # failure would have been FABRIC instead of DOWN.
    offset = 0.0
    unix = unix_monotonic()
    r = Recorder(HealthMonitor(client, K, Timings().health(), name="m1", clock=lambda: unix() + offset))
    try:
        await until(lambda: all_up(r), "all planes UP", timeout=20)
        await asyncio.sleep(1.0)
        r.changes.clear()
        offset = 2.0
        await asyncio.sleep(3.0)
        assert r.plane_changes() == []
        assert [c for c in r.changes if isinstance(c, FabricChange)] == []
    finally:
        await r.close()


async def test_the_health_view_of_many_hosts_is_written_in_batches(client: EtcdClient) -> None:
    # A storm of changes is persisted with one transaction per MAX_HOSTS_PER_WRITE hosts.
    keys = Keys("batch")
    views = [
        HostHealth(f"h{i:03d}", "r1", {p: PlaneStatus(UP if i % 7 else DOWN, float(i), "e") for p in PLANES})
        for i in range(health_store.MAX_HOSTS_PER_WRITE + 50)
    ]
    await health_store.save_hosts(client, keys, views[: health_store.MAX_HOSTS_PER_WRITE], 5.0, "m1")
    await health_store.save_hosts(client, keys, views[health_store.MAX_HOSTS_PER_WRITE :], 6.0, "m1")
    stored = (await health_store.load(client, keys)).hosts
    assert sorted(stored) == [v.host for v in views]
    assert stored["h042"].health == views[42]
    assert (stored["h000"].updated, stored["h149"].updated, stored["h149"].manager) == (5.0, 6.0, "m1")
    with pytest.raises(ValueError):
        await health_store.save_hosts(client, keys, views, 7.0, "m1")


async def test_poisoned_values_neither_crash_nor_blind_the_monitor(
    hosts: dict[str, ProxiedHost], recorder: Recorder, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: values an attacker (or a bug) can put in etcd. The monitor refuses each one, names
    its key, and still detects a host killed meanwhile."""
    caplog.set_level(logging.WARNING)
    await until(lambda: all_up(recorder), what="all planes UP")
    recorder.changes.clear()
    deep = b'{"domain":"r1","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    await client.put(K.host("h3"), deep)  # a registered host's record, overwritten
    await client.put(K.host("h4"), deep)
    await client.put(K.heartbeat("h1", Plane.SERVICE), b'{"host":"h1","plane":"service","seq":1e400,"t":1}')
    await client.put_json(K.task("vm1"), {"vm": "vm1", "steps": ["x"]})
    # A well-formed heartbeat on a live lease from a host nobody registered: it must not count.
    lease = await client.grant(10)
    for seq in (1, 2, 3):  # alerted once, not at every beat
        await client.put_json(K.heartbeat("ghost", Plane.STORAGE), {"host": "ghost", "plane": "storage", "seq": seq,
                                                                    "t": time.time()}, lease=lease)  # fmt: skip
    # A second machine named h1 beats on its own lease between the real h1's beats.
    other = await client.grant(10)
    for seq in (1, 2):
        await client.put_json(K.heartbeat("h1", Plane.MANAGEMENT), {"host": "h1", "plane": "management", "seq": seq,
                                                                    "t": time.time()}, lease=other)  # fmt: skip
        await asyncio.sleep(0.8)  # the real h1 beats meanwhile (every keepalive interval)
    # A heartbeat key deleted by hand while its lease lives is no lease expiry.
    await client.delete(K.heartbeat("h1", Plane.STORAGE))
    await asyncio.sleep(2.0)
    assert recorder.plane_changes() == []  # not even SUSPECT
    assert all_up(recorder)
    assert sorted(recorder.monitor.view()) == ["h1", "h2", "h3"]  # h3 kept, h4 and ghost never counted
    for key in (K.host("h3"), K.host("h4"), K.heartbeat("h1", Plane.SERVICE), K.heartbeat("ghost", Plane.STORAGE)):
        assert f"ALERT etcd key {key}" in caplog.text
    assert "ALERT host h1 plane storage: heartbeat key deleted while its lease" in caplog.text
    assert caplog.text.count(f"ALERT etcd key {K.heartbeat('ghost', Plane.STORAGE)}") == 1
    assert caplog.text.count("ALERT host h1 plane management: heartbeats alternate between leases") == 1
    recorder.changes.clear()

    assert hosts["h2"].proc is not None
    hosts["h2"].proc.kill()  # the host dies: its leases run out
    await until(lambda: all(recorder.states()[("h2", p)] == DOWN for p in PLANES), what="h2 DOWN")
    assert {k for k, v in recorder.states().items() if v != UP} == {("h2", p) for p in PLANES}
