"""Prometheus metrics of the manager and the agent: every definition, and the updates the daemons call.

A manager serves the registry MANAGER, an agent AGENT (the etcd errors are in both), on a listener of
its own when the config has `[metrics] listen = "IP:port"` (served()); without it they count unseen.
Names follow Prometheus' conventions: the vmha_ prefix, base units (seconds), _total for counters.

Manager (the leader fills the per-host and queue metrics; a standby shows vmha_manager_leader 0):
  vmha_manager_leader                          1 while this manager leads
  vmha_plane_up{host,plane}                    1 when the plane is UP, else 0 (alert on it)
  vmha_plane_state{host,plane,state}           1 for the plane's current state (up, suspect, down, fabric, unknown)
  vmha_detection_latency_seconds{plane}        last heartbeat seen -> DOWN verdict, per DOWN verdict
  vmha_recovery_phase_seconds{phase,method}    per recovery: detect (the failed host's last heartbeat ->
                                               the verdict acted on), decide (-> task created), prove
                                               (method: the proof's), recover (proof -> VM running)
  vmha_tasks{state}                            recovery tasks by state (queue depth)
  vmha_proofs_total{method}, vmha_proofs_refused_total, vmha_power_fence_total{result}
  vmha_alerts_total{level}, vmha_webhook_undelivered_total
  vmha_notification_undelivered_total          message-bus notifications given up on
Both:
  vmha_etcd_errors_total{kind}                 etcd calls failed: unavailable, error, compacted
Agent:
  vmha_agent_plane_reachable{plane}            1 while its heartbeat on that plane beats
  vmha_agent_isolated                          1 while the isolation response has fired

The decision cores (vmha.core) import nothing from here: the daemons feed these from what the cores
decided.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from vmha.core.fencing import FenceProof
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.core.queue import Step, Task, TaskKind, TaskState

if TYPE_CHECKING:  # config imports the etcd client, which counts its errors here
    from vmha.config import Config

log = logging.getLogger("vmha.metrics")

# What each daemon serves: its own metrics, and the etcd errors both count.
MANAGER = CollectorRegistry(auto_describe=True)
AGENT = CollectorRegistry(auto_describe=True)

# Seconds: from sub-second verdicts to sanlock's host-dead (8 io_timeout + 60 s) and slow evacuations.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

LEADER = Gauge("vmha_manager_leader", "1 while this manager leads the cluster", registry=MANAGER)
PLANE_UP = Gauge("vmha_plane_up", "1 when the host's plane is UP, else 0", ["host", "plane"], registry=MANAGER)
PLANE_STATE = Gauge("vmha_plane_state", "1 for the plane's current state", ["host", "plane", "state"],
                    registry=MANAGER)  # fmt: skip
DETECTION = Histogram("vmha_detection_latency_seconds", "From a plane's last heartbeat seen to its DOWN verdict",
                      ["plane"], buckets=BUCKETS, registry=MANAGER)  # fmt: skip
PHASE = Histogram("vmha_recovery_phase_seconds", "Duration of each phase of a recovery (method: the proof's)",
                  ["phase", "method"], buckets=BUCKETS, registry=MANAGER)  # fmt: skip
TASKS = Gauge("vmha_tasks", "Recovery tasks by state", ["state"], registry=MANAGER)
PROOFS = Counter("vmha_proofs", "Fence proofs obtained, by method", ["method"], registry=MANAGER)
PROOFS_REFUSED = Counter("vmha_proofs_refused", "Proof attempts that ended without a proof", registry=MANAGER)
POWER_FENCE = Counter("vmha_power_fence", "Out-of-band power-offs, by result (off: confirmed; failed)",
                      ["result"], registry=MANAGER)  # fmt: skip
ALERTS = Counter("vmha_alerts", "Alerts raised, by level", ["level"], registry=MANAGER)
UNDELIVERED = Counter("vmha_webhook_undelivered", "Alerts a webhook never took (in the undelivered log)",
                      registry=MANAGER)  # fmt: skip
BUS_UNDELIVERED = Counter("vmha_notification_undelivered",
                          "Notifications the message bus never took (in their undelivered log)", registry=MANAGER)
ETCD_ERRORS = Counter("vmha_etcd_errors", "etcd calls that failed, by kind", ["kind"], registry=None)
MANAGER.register(ETCD_ERRORS)
AGENT.register(ETCD_ERRORS)
AGENT_REACHABLE = Gauge("vmha_agent_plane_reachable", "1 while the agent's heartbeat on the plane beats",
                        ["plane"], registry=AGENT)  # fmt: skip
AGENT_ISOLATED = Gauge("vmha_agent_isolated", "1 while the agent's isolation response has fired", registry=AGENT)

_STATES = tuple(PlaneState)


@contextlib.contextmanager
def served(cfg: Config, registry: CollectorRegistry) -> Iterator[None]:
    """Serve `registry` (MANAGER or AGENT) on http://[metrics] listen/metrics while in the block (no
    [metrics]: not at all), from a thread of its own: a slow scrape never delays the event loop.
    ConfigError when it cannot listen there."""
    if cfg.metrics is None:
        yield
        return
    host, port = cfg.metrics.address()
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        from vmha.config import ConfigError  # see TYPE_CHECKING above

        raise ConfigError(f"[metrics] listen = {cfg.metrics.listen!r}: cannot listen there: {e.strerror}") from None
    log.info("metrics on http://%s/metrics", cfg.metrics.listen)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- manager ---------------------------------------------------------------------------------------


def plane_state(host: str, plane: Plane, state: PlaneState) -> None:
    PLANE_UP.labels(host, plane.value).set(1 if state == PlaneState.UP else 0)
    for s in _STATES:
        PLANE_STATE.labels(host, plane.value, s.value).set(1 if s == state else 0)


def forget_host(host: str) -> None:
    """The host left the cluster: its series go."""
    for plane in PLANES:
        for gauge, labels in ((PLANE_UP, ()), *((PLANE_STATE, (s.value,)) for s in _STATES)):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(host, plane.value, *labels)


def forget_planes() -> None:
    """The leadership ended: this manager no longer knows the planes (the new leader shows them)."""
    PLANE_UP.clear()
    PLANE_STATE.clear()
    TASKS.clear()


def detected(plane: Plane, last_seen: float | None, now: float) -> None:
    """A DOWN verdict at `now` on a plane whose last heartbeat was seen at `last_seen`."""
    if last_seen is not None and now >= last_seen:
        DETECTION.labels(plane.value).observe(now - last_seen)


def tasks_by_state(count: Callable[[TaskState], int]) -> None:
    for s in TaskState:
        TASKS.labels(s.value).set(count(s))


def proof(p: FenceProof) -> None:
    PROOFS.labels(p.method.value).inc()
    PHASE.labels("prove", p.method.value).observe(max(0.0, p.proved - p.started))


def proof_refused() -> None:
    PROOFS_REFUSED.inc()


def webhook_undelivered() -> None:
    UNDELIVERED.inc()


def notification_undelivered() -> None:
    BUS_UNDELIVERED.inc()


def power_fenced(ok: bool) -> None:
    POWER_FENCE.labels("off" if ok else "failed").inc()


def alert(level: str) -> None:
    ALERTS.labels(level).inc()


def recovery_started(task: Task, last_seen: Mapping[str, float]) -> None:
    """A recovery's task was created: its detect and decide phases. `last_seen`: plane -> when the
    source host's last heartbeat on it was seen (the planes of task.failed)."""
    if not task.failed:
        return  # not from a failure (maintenance drain, a VM seen stopped): nothing was detected
    verdict = max(task.failed.values())
    seen = [last_seen[p] for p in task.failed if p in last_seen]
    if seen and verdict >= min(seen):
        PHASE.labels("detect", "").observe(verdict - min(seen))
    PHASE.labels("decide", "").observe(max(0.0, task.created - verdict))


def recovery_finished(task: Task) -> None:
    """A recovery ended: its recover phase, from the proof (or, for a live migration, the task's
    creation) to the VM running at its destination. Only a recovery that ended DONE is observed."""
    if task.state != TaskState.DONE:
        return
    last = Step.EVACUATE if task.kind == TaskKind.EVACUATE else Step.MIGRATE
    ends = [r.finished for r in task.steps if r.step == last and r.result == "ok" and r.finished is not None]
    proved = [r.finished for r in task.steps if r.step == Step.PROVE and r.result == "ok" and r.finished is not None]
    if not ends:
        return
    start = proved[-1] if proved else task.created
    PHASE.labels("recover", "").observe(max(0.0, ends[-1] - start))


# -- agent -----------------------------------------------------------------------------------------


def agent_planes(reachable: Mapping[Plane, bool], isolated: bool) -> None:
    for plane, ok in reachable.items():
        AGENT_REACHABLE.labels(plane.value).set(1 if ok else 0)
    AGENT_ISOLATED.set(1 if isolated else 0)


# -- both ------------------------------------------------------------------------------------------


def etcd_error(kind: str) -> None:
    ETCD_ERRORS.labels(kind).inc()


__all__ = [
    "AGENT", "MANAGER", "agent_planes", "alert", "detected", "etcd_error", "forget_host", "forget_planes",
    "notification_undelivered", "plane_state", "power_fenced", "proof", "proof_refused", "recovery_finished",
    "recovery_started", "served", "tasks_by_state", "webhook_undelivered",
]
