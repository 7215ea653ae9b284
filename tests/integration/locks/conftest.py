"""Real sanlock daemons (io_timeout 1) for the lock-manager tests.

The pytest process plays the manager's host: the sanlock binding binds a process to the daemon that
SANLOCK_RUN_DIR names at its first call, so one session-wide "manager" daemon is started and the
variable set before any sanlock call. Every other simulated host is a daemon of its own, and
everything that runs on it (VM holders, its agent) is a subprocess (hostside.py) with its
environment. Lab-only daemons: no watchdog (see vmha.lab.sanlockd).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockhelp import IO, LockCluster, SimHost, join_both, leave_manager, new_lockspace

from vmha.lab.sanlockd import LabSanlock, start_sanlock, stop_sanlock


@pytest.fixture(scope="session")
def manager_sanlock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSanlock]:
    base = tmp_path_factory.mktemp("vt2-mgr")
    os.environ["SANLOCK_RUN_DIR"] = str(base / "run")
    os.environ["VMHA_RUN_DIR"] = str(base / "vmha")  # holder records of this process
    d = start_sanlock("vt2mgr", run_dir=base / "run", log_path=base / "sanlock.log")
    yield d
    stop_sanlock(d)


@pytest.fixture
def cluster(manager_sanlock: LabSanlock, tmp_path: Path) -> Iterator[LockCluster]:
    space = new_lockspace(tmp_path / "shared")
    space.init()
    space.create_lease("vm1")
    d = start_sanlock("vt2a", run_dir=tmp_path / "a-run", kill_grace=5, log_path=tmp_path / "a-sanlock.log")
    a = SimHost("vt2a", d, {"path": str(space.path), "lockspace": space.name, "io": IO}, tmp_path / "a-vmha")
    c = LockCluster(space, a)
    try:
        join_both(space, a)
        yield c
    finally:
        a.stop_procs()
        stop_sanlock(d)
        c.release_all()
        leave_manager(space)
