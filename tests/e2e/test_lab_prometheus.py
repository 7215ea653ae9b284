"""A real Prometheus (Debian's) scrapes every manager and every agent of a running lab (3 hosts, 4 VMs,
prefix vp), its targets taken from `vmha lab status --json`; a storage cut of one host shows in PromQL:
that host's storage plane DOWN (as the leading manager and the host's own agent see it), the
detection latency histogram counted it, the recovery phase histograms and the queue moved, the other
hosts' planes stayed UP.

Prometheus runs in the controller's network namespace, where the lab's daemons are reachable (like
the lab's etcd); its data stays under the test's tmp dir and it is stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, controller, faults
from vmha.lab.state import LabState
from vmha.testing.prometheus import PROMETHEUS, PrometheusServer
from vmha.testing.wait import until_sync

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="needs Debian's prometheus (scripts/setup.sh)"),
]

PREFIX = "vp"
FAULTED = "h2"
LEADER = " and on(instance) (vmha_manager_leader == 1)"  # the series of the leading manager only


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab-prometheus")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=4, io_timeout=1, prefix=PREFIX, echo=echo)
    finally:
        cluster.down(lab_dir, prefix=PREFIX)
        assert_nothing_left(lab_dir, PREFIX)


def lab_status(lab: LabState) -> dict[str, object]:
    cp = subprocess.run([sys.executable, "-m", "vmha.cli", "lab", "status", "--json", "--dir", str(lab.dir)],
                        capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(cp.stdout)  # type: ignore[no-any-return]


def test_prometheus_sees_a_storage_cut_across_the_lab(lab: LabState, tmp_path: Path) -> None:
    st = lab_status(lab)
    urls = st["metrics"]
    assert isinstance(urls, dict)
    targets = {name: urlsplit(url).netloc for name, url in urls.items()}
    managers = [targets[m] for m in controller.MANAGERS]
    agents = {h: targets[h] for h in lab.hosts}
    assert len(agents) == 3 and len(managers) == len(controller.MANAGERS)
    vms = st["vms"]
    assert isinstance(vms, list)
    on_faulted = [v["name"] for v in vms if v["host"] == FAULTED]
    assert on_faulted, f"no VM on {FAULTED}: {vms}"
    prom = PrometheusServer(tmp_path / "prometheus", {"manager": managers, "agent": list(agents.values())},
                            scrape_interval=0.5, netns=lab.node("controller").netns)  # fmt: skip

    def holds(expr: str, want: float, what: str, timeout: float = 60) -> None:
        until_sync(lambda: prom.value(expr) == want, f"{what}: {expr} == {want}", timeout=timeout, interval=0.5)

    def at_least(expr: str, want: float, what: str, timeout: float = 90) -> None:
        until_sync(lambda: (prom.value(expr) or 0) >= want, f"{what}: {expr} >= {want}", timeout=timeout,
                   interval=0.5)  # fmt: skip

    t_fault = None
    with prom:
        holds('count(up == 1)', len(managers) + len(agents), "every manager and agent scraped")
        holds("sum(vmha_manager_leader)", 1, "one manager leads")
        holds(f"sum(vmha_plane_up{LEADER})", 9, "the leader sees every plane of every host UP")
        holds("sum(vmha_agent_plane_reachable)", 9, "every agent beats on every plane")
        base = {
            "detected": prom.value(f'sum(vmha_detection_latency_seconds_count{{plane="storage"}}{LEADER})') or 0,
            **{p: prom.value(f'sum(vmha_recovery_phase_seconds_count{{phase="{p}"}})') or 0
               for p in ("detect", "decide", "prove", "recover")},
            "done": prom.value('sum(vmha_tasks{state="done"})') or 0,
        }
        try:
            t_fault = time.time()
            faults.host_plane(lab, FAULTED, "storage", "down")
            holds(f'vmha_plane_up{{host="{FAULTED}",plane="storage"}}{LEADER}', 0, f"{FAULTED} storage DOWN")
            holds(f'vmha_agent_plane_reachable{{instance="{agents[FAULTED]}",plane="storage"}}', 0,
                  f"{FAULTED}'s agent lost storage")  # fmt: skip
            at_least(f'sum(vmha_detection_latency_seconds_count{{plane="storage"}}{LEADER})', base["detected"] + 1,
                     "the DOWN verdict timed in the detection latency histogram")  # fmt: skip
            n = len(on_faulted)
            for phase in ("recover", "detect", "decide", "prove"):  # recover last in time: waited for first
                at_least(f'sum(vmha_recovery_phase_seconds_count{{phase="{phase}"}})', base[phase] + n,
                         f"the {phase} phase of {n} recoveries", timeout=120)  # fmt: skip
            at_least('sum(vmha_tasks{state="done"})', base["done"] + n, "the queue: their tasks done")
            # The queue moved: while they ran, some task was not yet done (queued, proving, evacuating...).
            window = f"{int(time.time() - t_fault) + 5}s"
            busy = prom.value(f'max_over_time((sum(vmha_tasks{{state!="done"}}{LEADER}) or vector(0))[{window}:500ms])')
            assert busy is not None and busy >= 1, busy
            assert prom.value(f'sum(vmha_plane_up{{host!="{FAULTED}"}}{LEADER})') == 6  # the other hosts: UP
            assert prom.value(f'sum(vmha_plane_up{{host="{FAULTED}"}}{LEADER})') == 2  # its other planes: UP
            agents_up = prom.value(f'sum(vmha_agent_plane_reachable{{instance!="{agents[FAULTED]}"}})')
            assert agents_up == 6
            latency = prom.value(f'sum(vmha_detection_latency_seconds_sum{{plane="storage"}}{LEADER})')
            phases = {p: prom.value(f'sum(vmha_recovery_phase_seconds_sum{{phase="{p}"}}) / '
                                    f'sum(vmha_recovery_phase_seconds_count{{phase="{p}"}})')
                      for p in ("detect", "decide", "prove", "recover")}  # fmt: skip
            echo(f"storage cut of {FAULTED} ({n} VMs): detection latency sum {latency:.2f} s over the lab's "
                 "verdicts; mean phases: " + ", ".join(f"{p} {v:.2f} s" for p, v in phases.items() if v is not None)
                 + f"; queue busy max {busy:.0f}; {time.time() - t_fault:.1f} s from the cut to these answers")
        finally:
            faults.host_plane(lab, FAULTED, "storage", "up")
    assert prom.proc is not None and prom.proc.poll() is not None  # stopped by PID
    assert (tmp_path / "prometheus" / "data").is_dir()
