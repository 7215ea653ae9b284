"""The agent's retries to join the lockspace while the shared storage fails (EIO on the lease area, as
after the lab's storage cut): paced by a growing backoff of their own, and logged once per distinct
error. The etcd client's backoff is reset by every successful etcd call, so pacing by it retried (and
logged an ERROR) about ten times a second for as long as the outage lasted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from vmha import config
from vmha.agent import locks as agent_locks
from vmha.agent.locks import JOIN_RETRY_CAP, AgentLocks


async def test_join_retries_back_off_and_log_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    agent = AgentLocks(config.parse({
        "cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
        "etcd": {"insecure": True}, "host": {"name": "h1", "domain": "rack1"},
        "locks": {"path": str(tmp_path / "leases")},
    }, "test.toml"))  # fmt: skip
    attempts = 0

    async def join(*_: object) -> int:
        nonlocal attempts
        attempts += 1
        if attempts <= 6:
            raise OSError(5, "Input/output error", str(tmp_path / "leases"))
        return 3

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(agent_locks, "join", join)
    monkeypatch.setattr(asyncio, "sleep", sleep)  # the module calls asyncio.sleep
    with caplog.at_level(logging.INFO, logger="vmha.agent"):
        await agent._join(client=None)  # type: ignore[arg-type]  # no libvirt section: no etcd call
    assert agent.host_id == 3 and attempts == 7
    assert len(waits) == 6
    assert waits[-1] >= 4 * waits[0]  # growing: 0.05-0.1 s first, 0.8-1.6 s by the fifth
    assert max(waits) <= JOIN_RETRY_CAP
    errors = [r.getMessage() for r in caplog.records if "cannot join lockspace" in r.getMessage()]
    assert len(errors) == 1 and "Input/output error" in errors[0]
