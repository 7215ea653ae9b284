"""The agent's isolation response is configurable (agent.isolation_response): "stop" stops every local
lease holder, "leave" touches none, as vSphere's isolation response.

The holder is a real process, recorded as a lease holder the way the agent records the VMs it starts.
No sanlock daemon answers here (SANLOCK_RUN_DIR points at an empty directory), so the holder is found
from its record alone; that stopping a holder frees its lease on the shared storage is tested against
real sanlock daemons in tests/integration/locks/test_leases.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_config import agent_locks_for

from vmha.locks.lease import holder_of, record, recorded_holders


@pytest.fixture
def holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    monkeypatch.setenv("VMHA_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SANLOCK_RUN_DIR", str(tmp_path / "no-sanlock"))
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record(holder_of("vm1", proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def test_stop_ends_every_lease_holder(holder: subprocess.Popen[bytes], tmp_path: Path) -> None:
    await agent_locks_for(tmp_path, agent={"isolation_response": "stop"}).on_isolated()
    assert holder.wait(timeout=1) == -15  # SIGTERM
    assert not any(h.alive() for h in recorded_holders("vm1"))


async def test_leave_keeps_the_vms_running(holder: subprocess.Popen[bytes], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    await agent_locks_for(tmp_path, agent={"isolation_response": "leave"}).on_isolated()
    assert holder.poll() is None
    assert "isolation_response=leave, HA VMs keep running" in caplog.text
