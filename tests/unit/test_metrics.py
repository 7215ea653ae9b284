"""vmha.metrics: what each update records, the detection loop feeding the plane gauges, the config
of the listener and the listener itself.

The registry is per process and the metrics accumulate: each test reads the change it caused."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from vmha import config, metrics
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HealthTick, HealthTimings, Heartbeat, HostSeen, LeaseGone
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.core.queue import Step, StepRecord, Task, TaskKind, TaskState
from vmha.etcd.keys import Keys
from vmha.manager.detection import HealthMonitor

M, S = Plane.MANAGEMENT, Plane.STORAGE


def value(name: str, **labels: str) -> float:
    registry = metrics.AGENT if name.startswith("vmha_agent_") else metrics.MANAGER
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def phase_count(phase: str, method: str = "") -> float:
    return value("vmha_recovery_phase_seconds_count", phase=phase, method=method)


def phase_sum(phase: str, method: str = "") -> float:
    return value("vmha_recovery_phase_seconds_sum", phase=phase, method=method)


def test_plane_state_sets_up_and_the_state_set() -> None:
    metrics.plane_state("mh1", M, PlaneState.UP)
    assert value("vmha_plane_up", host="mh1", plane="management") == 1
    metrics.plane_state("mh1", M, PlaneState.DOWN)
    assert value("vmha_plane_up", host="mh1", plane="management") == 0
    states = {s.value: value("vmha_plane_state", host="mh1", plane="management", state=s.value) for s in PlaneState}
    assert states == {s.value: (1.0 if s == PlaneState.DOWN else 0.0) for s in PlaneState}


def test_forget_host_removes_its_series_only() -> None:
    metrics.plane_state("mh2", M, PlaneState.UP)
    metrics.plane_state("mh3", S, PlaneState.SUSPECT)
    metrics.forget_host("mh2")
    assert metrics.MANAGER.get_sample_value("vmha_plane_up", {"host": "mh2", "plane": "management"}) is None
    assert value("vmha_plane_state", host="mh3", plane="storage", state="suspect") == 1


def test_detection_latency_needs_a_heartbeat_seen_before() -> None:
    before = value("vmha_detection_latency_seconds_count", plane="storage")
    before_sum = value("vmha_detection_latency_seconds_sum", plane="storage")
    metrics.detected(S, 100.0, 102.5)
    metrics.detected(S, None, 102.5)  # never beat: no latency to tell
    assert value("vmha_detection_latency_seconds_count", plane="storage") == before + 1
    assert value("vmha_detection_latency_seconds_sum", plane="storage") == pytest.approx(before_sum + 2.5)


def evacuation(state: TaskState = TaskState.DONE) -> Task:
    task = Task(vm="vm1", source="h1", kind=TaskKind.EVACUATE, recovery=1, priority=0, row="management+storage+service",
                action="fence-evacuate", failed={"management": 10.0, "storage": 10.8, "service": 10.4}, created=12.0,
                state=state)  # fmt: skip
    task.steps = [StepRecord(Step.PROVE, 12.0, 14.0, "refused: not yet"), StepRecord(Step.PROVE, 16.0, 19.0, "ok"),
                  StepRecord(Step.RELEASE, 19.5, 19.6, "ok"), StepRecord(Step.EVACUATE, 19.6, 23.0, "ok")]  # fmt: skip
    return task


def test_recovery_phases_detect_decide_recover() -> None:
    counts = {p: phase_count(p) for p in ("detect", "decide", "recover")}
    sums = {p: phase_sum(p) for p in ("detect", "decide", "recover")}
    task = evacuation()
    # The host's last heartbeats: the verdict acted on (10.8, the last plane DOWN) minus the earliest.
    metrics.recovery_started(task, {"management": 8.0, "storage": 8.3, "service": 8.1})
    metrics.recovery_finished(task)
    assert {p: phase_count(p) - counts[p] for p in counts} == {"detect": 1, "decide": 1, "recover": 1}
    assert phase_sum("detect") - sums["detect"] == pytest.approx(2.8)
    assert phase_sum("decide") - sums["decide"] == pytest.approx(1.2)
    assert phase_sum("recover") - sums["recover"] == pytest.approx(4.0)  # proof at 19.0 -> running at 23.0


def test_no_phases_for_what_did_not_happen() -> None:
    counts = {p: phase_count(p) for p in ("detect", "decide", "recover")}
    drain = Task(vm="vm2", source="h2", kind=TaskKind.MIGRATE, recovery=1, priority=0, row="maintenance",
                 action="live-migrate", failed={}, created=5.0)  # fmt: skip
    metrics.recovery_started(drain, {})  # nothing failed: nothing detected or decided on a failure
    metrics.recovery_finished(evacuation(TaskState.FAILED))
    metrics.recovery_finished(evacuation(TaskState.CANCELLED))
    assert {p: phase_count(p) - counts[p] for p in counts} == {"detect": 0, "decide": 0, "recover": 0}


def test_proofs_by_method_and_refusals() -> None:
    before = phase_count("prove", "request-force"), value("vmha_proofs_total", method="request-force")
    refused = value("vmha_proofs_refused_total")
    metrics.proof(FenceProof("vm1", "h1", ProofMethod.REQUEST_FORCE, started=50.0, proved=53.5))
    metrics.proof_refused()
    assert phase_count("prove", "request-force") == before[0] + 1
    assert value("vmha_proofs_total", method="request-force") == before[1] + 1
    assert value("vmha_proofs_refused_total") == refused + 1


def test_counters_alerts_power_etcd_and_the_agent() -> None:
    before = (value("vmha_alerts_total", level="err"), value("vmha_power_fence_total", result="failed"),
              value("vmha_etcd_errors_total", kind="unavailable"))  # fmt: skip
    metrics.alert("err")
    metrics.power_fenced(False)
    metrics.etcd_error("unavailable")
    after = (value("vmha_alerts_total", level="err"), value("vmha_power_fence_total", result="failed"),
             value("vmha_etcd_errors_total", kind="unavailable"))  # fmt: skip
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    metrics.agent_planes({M: True, S: False, Plane.SERVICE: True}, isolated=False)
    assert [value("vmha_agent_plane_reachable", plane=p.value) for p in PLANES] == [1, 0, 1]
    assert value("vmha_agent_isolated") == 0


def test_queue_depth_by_state() -> None:
    depth = {TaskState.PROVING: 3, TaskState.READY: 1}
    metrics.tasks_by_state(lambda s: depth.get(s, 0))
    assert value("vmha_tasks", state="proving") == 3
    assert value("vmha_tasks", state="done") == 0
    metrics.forget_planes()  # the leadership ended: the queue is the next leader's
    assert metrics.MANAGER.get_sample_value("vmha_tasks", {"state": "proving"}) is None


def test_the_detection_loop_feeds_the_plane_gauges_and_the_latency() -> None:
    """HealthMonitor (no etcd: its core stepped directly) turns each verdict into the gauges, and a
    DOWN verdict into one detection latency: last heartbeat seen -> DOWN."""
    now = [1000.0]
    mon = HealthMonitor(None, Keys("c"), HealthTimings(), clock=lambda: now[0])  # type: ignore[arg-type]
    before = value("vmha_detection_latency_seconds_count", plane="service")
    before_sum = value("vmha_detection_latency_seconds_sum", plane="service")
    mon.step(HostSeen("dh1", "d"))
    for p in PLANES:
        mon.step(Heartbeat("dh1", p, 1, now[0], 1, 7))
    assert value("vmha_plane_up", host="dh1", plane="service") == 1
    now[0] += 0.5
    mon.step(Heartbeat("dh1", Plane.SERVICE, 2, now[0], 2, 7))  # the last sign of life: 1000.5
    now[0] = 1002.0
    mon.step(LeaseGone("dh1", Plane.SERVICE, 3))
    assert value("vmha_plane_state", host="dh1", plane="service", state="suspect") == 1
    now[0] = 1002.4  # past down_grace (0.3 s)
    mon.step(HealthTick())
    assert value("vmha_plane_up", host="dh1", plane="service") == 0
    assert value("vmha_plane_state", host="dh1", plane="service", state="down") == 1
    assert value("vmha_detection_latency_seconds_count", plane="service") == before + 1
    assert value("vmha_detection_latency_seconds_sum", plane="service") - before_sum == pytest.approx(1.9)
    mon._host_delete(Keys("c").host("dh1"))
    assert metrics.MANAGER.get_sample_value("vmha_plane_up", {"host": "dh1", "plane": "service"}) is None


def cfg(listen: str | None) -> config.Config:
    planes = {p.value: {"endpoints": ["http://127.0.0.1:2379"]} for p in PLANES}
    data: dict[str, object] = {"cluster": {"name": "c"}, "planes": planes, "etcd": {"insecure": True}}
    if listen is not None:
        data["metrics"] = {"listen": listen}
    return config.parse(data)


@pytest.mark.parametrize(("listen", "why"), [
    ("localhost:9100", "'localhost' is not an IP address"),
    ("198.18.0.2", "is not IP:port"),
    ("198.18.0.2:0", "the port must be 1-65535"),
    ("198.18.0.2:99999", "the port must be 1-65535"),
    ("198.18.0.2:http", "the port must be 1-65535"),
])  # fmt: skip
def test_listen_must_be_ip_and_port(listen: str, why: str) -> None:
    with pytest.raises(config.ConfigError, match=r"metrics\.listen") as e:
        cfg(listen)
    assert why in str(e.value)


def test_listen_addresses() -> None:
    assert cfg("198.18.0.2:9101").metrics.address() == ("198.18.0.2", 9101)  # type: ignore[union-attr]
    assert cfg("[::1]:9101").metrics.address() == ("::1", 9101)  # type: ignore[union-attr]
    assert cfg(None).metrics is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_served_on_its_listener_and_stopped_after() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    metrics.etcd_error("error")
    with metrics.served(cfg(f"127.0.0.1:{port}"), metrics.MANAGER):
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "# TYPE vmha_recovery_phase_seconds histogram" in body
        assert "vmha_manager_leader " in body and 'vmha_etcd_errors_total{kind="error"}' in body
        assert "vmha_agent_" not in body  # a manager shows no agent metrics
        taken = cfg(f"127.0.0.1:{port}")
        with pytest.raises(config.ConfigError, match="cannot listen there"), metrics.served(taken, metrics.AGENT):
            pass
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
    with metrics.served(cfg(None), metrics.MANAGER):  # no [metrics]: nothing listens
        pass


def test_an_agent_shows_its_metrics_and_the_etcd_errors_only() -> None:
    port = free_port()
    with metrics.served(cfg(f"127.0.0.1:{port}"), metrics.AGENT):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "vmha_agent_isolated " in body and "vmha_etcd_errors_total" in body
    assert "vmha_manager_leader" not in body and "vmha_plane_up" not in body
