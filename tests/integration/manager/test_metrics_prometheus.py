"""A real Prometheus scrapes a real manager and a real agent; a fault shows in PromQL.

Real: etcd, Prometheus (Debian's), the manager process (election, detection, the recovery core and
its term, with [metrics] listen), the agent of h1 (`vmha agent`, [metrics] listen), whose storage
plane goes through a TCP proxy; the other hosts' heartbeats run in this process. Test doubles: the
compute driver and the prover (recording_parts.py), as in the failover test: what is tested is what
the metrics say about a fault and its recoveries, not compute or fencing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_manager_failover import ManagerProcess, write_config

from vmha.core.planes import PLANES, Plane
from vmha.etcd.client import EtcdClient
from vmha.etcd.heartbeat import PlaneHeartbeat
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register
from vmha.testing.etcd import EtcdProcess, free_ports
from vmha.testing.hosts import config_text
from vmha.testing.process import stop_process
from vmha.testing.prometheus import PROMETHEUS, PrometheusServer
from vmha.testing.proxy import TcpProxy
from vmha.testing.wait import until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="needs Debian's prometheus (scripts/setup.sh)"),
]

CLUSTER = "vt5"  # write_config's
KEYS = Keys(CLUSTER)
HOSTS = ["h1", "h2", "h3", "h4"]
VMS = ["vm1", "vm2", "vm3", "vm4"]  # all on h1
VMHA = str(Path(sys.executable).with_name("vmha"))


def agent_config(path: Path, etcd: EtcdProcess, storage_url: str, listen: str) -> Path:
    """h1's agent: etcd user h1, its storage plane through ``storage_url``."""
    endpoints = {p: [storage_url if p is Plane.STORAGE else etcd.client_urls[0]] for p in PLANES}
    path.write_text(config_text(CLUSTER, "h1", "default", endpoints, extra=f'[metrics]\nlisten = "{listen}"\n',
                                etcd=etcd.toml("h1")))  # fmt: skip
    return path


async def test_prometheus_sees_a_storage_fault_and_its_recoveries(etcd: EtcdProcess, tmp_path: Path) -> None:
    url = etcd.client_urls[0]
    storage = await TcpProxy.to(url)
    (tmp_path / "state.json").write_text(json.dumps(
        {"hosts": HOSTS, "placement": dict.fromkeys(VMS, "h1"), "restarts": {}, "disabled": [], "down": []}))
    agent_port, manager_port = free_ports(2)
    client = EtcdClient([url], timeout=2.0, tls=etcd.tls())
    # Auth on: the agent, the other hosts' heartbeats and the manager each write as themselves.
    await etcd.setup_auth(CLUSTER, HOSTS, ["mgr-a"])
    beats = [PlaneHeartbeat(KEYS, h, p, [url], ttl=2, interval=0.5, tls=etcd.tls(h)) for h in HOSTS[1:] for p in PLANES]
    agent_cfg = agent_config(tmp_path / "agent.toml", etcd, storage.url, f"127.0.0.1:{agent_port}")
    mgr_cfg = write_config(tmp_path / "manager.toml", "mgr-a", etcd, url)
    with open(mgr_cfg, "a") as f:
        f.write(f'[metrics]\nlisten = "127.0.0.1:{manager_port}"\n')
    prom = PrometheusServer(tmp_path / "prometheus", {"manager": [f"127.0.0.1:{manager_port}"],
                                                      "agent": [f"127.0.0.1:{agent_port}"]})  # fmt: skip
    agent: subprocess.Popen[bytes] | None = None
    manager: ManagerProcess | None = None
    try:
        await asyncio.to_thread(prom.start)  # blocking until ready: before any heartbeat must flow
        for h in HOSTS[1:]:
            await register(client, KEYS, h, "default")
        for hb in beats:
            hb.start()
        with open(tmp_path / "agent.log", "wb") as out:
            agent = subprocess.Popen([VMHA, "agent", "--config", str(agent_cfg), "--status-file",
                                      str(tmp_path / "agent.json")], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

        async def value(expr: str) -> float | None:
            return await asyncio.to_thread(prom.value, expr)

        async def equals(expr: str, want: float) -> bool:
            return await value(expr) == want

        async def holds(expr: str, want: float, what: str, timeout: float = 30) -> None:
            await until(lambda: equals(expr, want), f"{what}: {expr} == {want}", timeout=timeout, interval=0.5)

        # The agent beats on every plane before the manager starts (a registered host without
        # heartbeats is a failed host to a manager that lists it).
        await holds("sum(vmha_agent_plane_reachable)", 3, "the agent beats on every plane")
        manager = ManagerProcess("mgr-a", mgr_cfg, tmp_path)
        # Before the fault, as Prometheus scraped it: the manager leads and sees h1's three planes UP,
        # no recovery has run.
        await holds("vmha_manager_leader", 1, "the manager leads")
        await holds('sum(vmha_plane_up{host="h1"})', 3, "h1's planes UP")
        assert await value('sum(vmha_recovery_phase_seconds_count{phase="recover"}) or vector(0)') == 0

        await storage.cut(blackhole=True)  # h1's storage path: everything dropped, nothing refused

        await holds('vmha_agent_plane_reachable{plane="storage"}', 0, "the agent lost storage")
        await holds('vmha_plane_up{host="h1",plane="storage"}', 0, "the manager sees h1 storage DOWN")
        await holds('vmha_plane_state{host="h1",plane="storage",state="down"}', 1, "its state set says down")
        await holds('sum(vmha_plane_up{host="h1"})', 2, "h1's other planes still UP")
        # Row storage: fence-evacuate. Every VM proved (the recording prover) and restarted.
        await holds('sum(vmha_recovery_phase_seconds_count{phase="recover"})', len(VMS), "recoveries done", 60)
        await holds('vmha_tasks{state="done"}', len(VMS), "the queue: every task done")
        for phase in ("detect", "decide", "prove"):
            await holds(f'sum(vmha_recovery_phase_seconds_count{{phase="{phase}"}})', len(VMS), f"{phase} phases")
        await holds("sum(vmha_proofs_total)", len(VMS), "one proof per VM")
        await holds('vmha_detection_latency_seconds_count{plane="storage"}', 1, "one DOWN verdict timed")
        assert await value("sum(vmha_plane_up{host=~\"h[234]\"})") == 9
        assert await value("vmha_proofs_refused_total") == 0

        latency = await value('vmha_detection_latency_seconds_sum{plane="storage"}')
        phases = {p: await value(f'sum(vmha_recovery_phase_seconds_sum{{phase="{p}"}}) / '
                                 f'sum(vmha_recovery_phase_seconds_count{{phase="{p}"}})')
                  for p in ("detect", "decide", "prove", "recover")}  # fmt: skip
        print(f"\ndetection latency (last heartbeat -> DOWN): {latency:.2f} s; mean phases: "
              + ", ".join(f"{p} {v:.2f} s" for p, v in phases.items() if v is not None))
        # Lease TTL 2 s, keepalives every 0.5 s, down_grace 0.3 s: a DOWN within a few seconds of the
        # last heartbeat; decide waits decide_after (1 s) once the row settled.
        assert latency is not None and 1.0 <= latency <= 6.0
        assert phases["decide"] is not None and phases["decide"] >= 1.0
        # The recording prover and driver take 0.6 s a step.
        assert phases["prove"] is not None and phases["prove"] >= 0.6
        assert phases["recover"] is not None and phases["recover"] >= 0.6
    finally:
        if manager is not None:
            manager.stop()
        if agent is not None:
            stop_process(agent, timeout=10)
        prom.stop()
        for hb in beats:
            await hb.stop(revoke=True)
            await hb.client.close()
        await client.close()
        await storage.close()
        if manager is not None and manager.proc.returncode not in (0, None):
            print(f"--- manager (exit {manager.proc.returncode}):\n{manager.log.read_text()[-3000:]}")
