"""Nova API errors and rate limits, provoked for real (issue 14, item 3): the fault proxy
(vmha.lab.nova.faults) stands between the nova driver and the rig's nova-api, and the manager's
decision path (the bench's Manager: HealthCore, RecoveryCore and its queue in the runtime loop, the
nova driver's real calls; fence proofs stand-ins, as the rig has no sanlock) recovers a failed host
through it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from vmha.bench.nova_scale import Manager
from vmha.config import NovaConfig
from vmha.core.queue import Step, Task, TaskState
from vmha.core.settings import RecoverySettings
from vmha.drivers import nova
from vmha.lab.nova.faults import Fault, FaultProxy
from vmha.lab.nova.rig import NovaRig
from vmha.testing.wait import until

Boot = Callable[..., Any]

pytestmark = [pytest.mark.integration, pytest.mark.nova]


def evacuations(task: Task) -> list[tuple[float, float, str]]:
    """(started, finished, result) of each evacuate attempt."""
    return [(r.started, r.finished or 0.0, r.result) for r in task.steps if r.step == Step.EVACUATE]


async def test_evacuation_through_rate_limits_errors_and_a_lost_answer(
    rig: NovaRig, admin: Any, boot: Boot, fault_cmp1: None
) -> None:
    limited = boot(admin, "cmp1", "faults-limited", metadata={"HA_Enabled": "True"})
    lost = boot(admin, "cmp1", "faults-lost", metadata={"HA_Enabled": "True"})
    # `limited`: its first evacuate answered 429 with Retry-After 5 (longer than the queue's first
    # backoff, 2 s), the next 503, neither reaching Nova.
    # `lost`: its first evacuate reaches Nova, which starts the evacuation; the answer becomes a 502.
    rules = [
        Fault(429, "POST", f"/servers/{limited.id}/action", first=1, retry_after=5),
        Fault(503, "POST", f"/servers/{limited.id}/action", first=1),
        Fault(502, "POST", f"/servers/{lost.id}/action", first=1),
    ]
    with FaultProxy(rig.nova_url, rules) as proxy:
        # The existing openstacksdk setting points the driver at the proxy: no knob in the driver.
        conn = nova.connect(**(rig.connect_options() | {"compute_endpoint_override": proxy.url}))
        driver = nova.NovaDriver(NovaConfig(), connection=conn, poll_interval=0.3, evacuate_timeout=90)
        manager = Manager(driver, rig.hosts, RecoverySettings(power_fence=True), detection=0.5, proof=0.1)
        manager.start()
        try:
            await manager.ready()
            rig.kill_compute("cmp1")
            manager.fault(["cmp1"])

            def finished() -> list[Task]:
                tasks = [t for t in manager.core.tasks() if t.vm in (limited.id, lost.id)]
                terminal = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
                return tasks if len(tasks) == 2 and all(t.state in terminal for t in tasks) else []

            tasks = {t.vm: t for t in await until(finished, "both recoveries finished", timeout=180, interval=0.5)}
        finally:
            await manager.stop()
        answers = list(proxy.answers)

    a, b = tasks[limited.id], tasks[lost.id]
    log = "\n".join(line.render() for line in manager.env.lines)
    assert (a.state, b.state) == (TaskState.DONE, TaskState.DONE), log
    # The evidence names each failed attempt and its HTTP code; the queue waited as Nova's answer
    # asked (Retry-After 5 s), then its own backoff (4 s).
    (_, f1, r1), (s2, f2, r2), (s3, _, r3) = evacuations(a)
    assert "HTTP 429" in r1 and "HTTP 503" in r2 and r3 == "ok", log
    assert s2 - f1 >= 5.0 and s3 - f2 >= 4.0
    (_, _, r1), (_, _, r2) = evacuations(b)
    assert "HTTP 502" in r1 and r2 == "ok", log
    assert "retry in 5s (API asked 5s)" in log and "retry in 4s" in log and "retry in 2s" in log

    # Nova: both ACTIVE elsewhere, each evacuated exactly once.
    for s, t in ((limited, a), (lost, b)):
        now = admin.compute.get_server(s.id)
        assert (now.status, now.task_state, now.compute_host) == ("ACTIVE", None, t.running_on)
        assert t.running_on in ("cmp2", "cmp3")
        assert [x.action for x in admin.compute.server_actions(s.id)].count("evacuate") == 1
        assert len(list(admin.compute.migrations(server_id=s.id, migration_type="evacuation"))) == 1
    # What Nova saw of the evacuate calls: `limited` once (after 429, 503 answered by the proxy),
    # `lost` once (the retry found its evacuation under way or done and sent none).
    posts = [(p.split("/")[-2], code, fwd) for m, p, code, fwd in answers if m == "POST" and p.endswith("/action")]
    assert [(c, f) for sid, c, f in posts if sid == limited.id] == [(429, False), (503, False), (200, True)]
    assert [(c, f) for sid, c, f in posts if sid == lost.id] == [(502, True)]


async def test_failed_reads_while_an_evacuation_runs_cost_no_attempt(
    rig: NovaRig, admin: Any, boot: Boot, fault_cmp1: None, caplog: pytest.LogCaptureFixture
) -> None:
    vm = boot(admin, "cmp1", "faults-polled", metadata={"HA_Enabled": "True"})
    rig.kill_compute("cmp1")
    with FaultProxy(rig.nova_url, []) as proxy:
        conn = nova.connect(**(rig.connect_options() | {"compute_endpoint_override": proxy.url}))
        driver = nova.NovaDriver(NovaConfig(), connection=conn, poll_interval=0.3, evacuate_timeout=90)
        await driver.mark_host_down("cmp1")
        with caplog.at_level(logging.WARNING, logger="vmha.drivers.nova"):
            moving = asyncio.create_task(driver.evacuate(vm.id, "cmp1", "cmp2"))
            try:
                await until(lambda: any(m == "POST" and fwd for m, _, _, fwd in proxy.answers),
                            "the evacuate call reached Nova", timeout=30)  # fmt: skip
                # The next reads of the server while Nova evacuates it: 503, 503, 429, then answered.
                reads = f"/servers/{vm.id}$"
                proxy.set_rules([Fault(503, "GET", reads, first=2), Fault(429, "GET", reads, first=1)])
                assert await moving == "cmp2"
            finally:
                moving.cancel()
    # The wait read again: the evacuation's one attempt survived three failed polls.
    assert caplog.text.count(f"vm={vm.id} evacuation: reading its state failed") == 3
    assert [c for m, _, c, fwd in proxy.answers if not fwd] == [503, 503, 429]
    assert [x.action for x in admin.compute.server_actions(vm.id)].count("evacuate") == 1
