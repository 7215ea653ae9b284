"""A lease holder's record names the process by pid and start, so that the exit attestation, the
isolation response and the pruning of records never take a live holder for gone, nor a new process
on a reused pid for the holder. Real processes; the records in a temporary VMHA_RUN_DIR.

A step of the wall clock cannot be made here (it would move every clock of the machine under the
other tests): test_a_step_of_the_wall_clock_leaves_a_live_holder_alive moves psutil's boot time
instead, which is what such a step does to it (the kernel's boot time in Unix time is the wall clock
minus the time since boot). With holders identified by psutil's create_time, as before, it fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmha.locks.lease import Holder, holder_of, prune_records, record, recorded_holders


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    monkeypatch.setenv("VMHA_RUN_DIR", str(tmp_path / "run"))
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_step_of_the_wall_clock_leaves_a_live_holder_alive(proc: subprocess.Popen[bytes],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    record(holder_of("vm1", proc.pid))
    boot = psutil.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 7.0)  # type: ignore[attr-defined]
    [h] = recorded_holders("vm1")
    assert h.alive()
    assert prune_records() == 0


def test_a_reused_pid_is_not_the_holder(proc: subprocess.Popen[bytes]) -> None:
    h = holder_of("vm1", proc.pid)
    assert h.start_ticks is not None
    assert not Holder("vm1", proc.pid, h.start_ticks - 1).alive()


def test_an_exited_holder_is_gone_and_its_record_pruned(proc: subprocess.Popen[bytes]) -> None:
    record(holder_of("vm1", proc.pid))
    proc.kill()
    proc.wait()
    assert not recorded_holders("vm1")[0].alive()
    assert prune_records() == 1 and recorded_holders("vm1") == []


def test_a_zombie_is_gone(proc: subprocess.Popen[bytes]) -> None:
    h = holder_of("vm1", proc.pid)
    proc.kill()
    for _ in range(200):  # not reaped (proc.wait() comes later): a zombie once the signal took
        if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.01)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    assert not h.alive()


def test_a_record_from_before_start_ticks_counts_as_alive_while_its_pid_exists(
        proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """Records written by an earlier vmha name the start in Unix time: this one cannot tell a reused
    pid, so it keeps the attestation from vouching (the manager waits) rather than guess."""
    d = tmp_path / "run" / "lease-holders"
    d.mkdir(parents=True)
    (d / f"vm1.{proc.pid}").write_text(json.dumps({"vm": "vm1", "pid": proc.pid, "started": 1796000000.25}))
    [h] = recorded_holders("vm1")
    assert h == Holder("vm1", proc.pid, None) and h.alive()
    proc.kill()
    proc.wait()
    assert not h.alive()
