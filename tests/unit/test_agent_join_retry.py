"""The agent's retries to join the lockspace while the shared storage fails (EIO on the lease area, as
after the lab's storage cut): paced by a growing backoff of their own, and logged once per distinct
error; the libvirt lock settings it checks before each attempt are logged when they change. The etcd
client's backoff is reset by every successful etcd call, so pacing by it retried (and logged an ERROR)
about ten times a second for as long as the outage lasted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from agent_config import agent_locks_for

from vmha.agent import locks as agent_locks
from vmha.agent.libvirt_locks import LockSettings
from vmha.agent.locks import JOIN_RETRY_CAP


async def test_join_retries_back_off_and_log_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    locks = agent_locks_for(tmp_path)
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
        await locks._join(client=None)  # type: ignore[arg-type]  # no libvirt section: no etcd call
    assert locks.host_id == 3 and attempts == 7
    assert len(waits) == 6
    assert waits[-1] >= 4 * waits[0]  # growing: 0.05-0.1 s first, 0.8-1.6 s by the fifth
    assert max(waits) <= JOIN_RETRY_CAP
    errors = [r.getMessage() for r in caplog.records if "cannot join lockspace" in r.getMessage()]
    assert len(errors) == 1 and "Input/output error" in errors[0]


def _settings_found(monkeypatch: pytest.MonkeyPatch, found: list[LockSettings | None]) -> None:
    """Each lock settings check finds the next of `found`; no etcd behind host ids and registration."""

    async def allocated_host_id(*_: object) -> int:
        return 3

    async def register(*_: object, **__: object) -> None:
        return None

    monkeypatch.setattr(agent_locks, "allocated_host_id", allocated_host_id)
    monkeypatch.setattr(agent_locks, "register", register)
    monkeypatch.setattr(agent_locks, "check_lock_settings", lambda *_: found.pop(0))


async def test_lock_settings_logged_when_they_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    locks = agent_locks_for(tmp_path, libvirt={"config_dir": str(tmp_path / "libvirt")})
    same = LockSettings("sanlock", False, "lock_manager=sanlock")
    found: list[LockSettings | None] = [same, same,
                                        LockSettings("sanlock", True, "lock_manager=sanlock; auto_disk_leases=1")]

    _settings_found(monkeypatch, found)
    with caplog.at_level(logging.INFO, logger="vmha.agent"):
        for _ in range(3):
            assert await locks._settings_refuse(client=None) is False  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "settings checked" in line] == [
        "host h1: libvirt lock settings checked: lock_manager=sanlock",
        "host h1: libvirt lock settings checked: lock_manager=sanlock; auto_disk_leases=1"]
    assert not [line for line in lines if "not configured" in line]


async def test_libvirt_not_configured_is_logged_once_not_per_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    locks = agent_locks_for(tmp_path, libvirt={"config_dir": str(tmp_path / "libvirt")})
    found: list[LockSettings | None] = [None, None, None, LockSettings("sanlock", False, "lock_manager=sanlock")]

    _settings_found(monkeypatch, found)
    with caplog.at_level(logging.INFO, logger="vmha.agent"):
        for _ in range(4):
            assert await locks._settings_refuse(client=None) is False  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "libvirt not configured here" in line]) == 1
    assert [line for line in lines if "settings checked" in line] == [
        "host h1: libvirt lock settings checked: lock_manager=sanlock"]
