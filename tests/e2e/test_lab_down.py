"""`vmha lab down` after a killed `vmha lab up` (prefix vt4k): what the killed command started runs
on in sessions of its own; down finds it through lab.json and the namespace names and removes every
namespace, mount and process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from labcheck import assert_nothing_left

from vmha.lab.net import LabError, LabNet, pid_alive
from vmha.lab.state import LabState
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.e2e

PREFIX = "vt4k"


def _agent_runs(lab_dir: Path, host: str) -> bool:
    try:
        ns = LabState.load(lab_dir).hosts.get(host)
    except LabError:
        return False  # not recorded yet, or being replaced
    return ns is not None and pid_alive(ns.pids.get("agent", 0))


def test_down_after_a_killed_up(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    up = subprocess.Popen([sys.executable, "-m", "vmha.cli", "lab", "up", "--hosts", "2", "--vms", "2",
                           "--prefix", PREFIX, "--dir", str(lab_dir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once a host runs its agent: controller, etcd, storage, sanlock daemons and a host are up.
        until_sync(lambda: _agent_runs(lab_dir, "h1") or up.poll() is not None, "h1's agent running",
                   timeout=120, interval=0.1)  # fmt: skip
        assert up.poll() is None, "lab up ended before it could be killed"
        up.kill()
        up.wait()
        left = LabNet(PREFIX).existing_netns()
        assert f"{PREFIX}-ctl" in left and f"{PREFIX}-h1" in left
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        down = subprocess.run([sys.executable, "-m", "vmha.cli", "lab", "down", "--dir", str(lab_dir)],
                              capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert "removed" in down.stdout
    assert_nothing_left(lab_dir, PREFIX)
