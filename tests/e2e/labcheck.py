"""What the end-to-end lab suites share: the check after `lab down`, progress output, waiting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmha.lab.procs import vm_processes

POLL = 0.5


def echo(text: str) -> None:
    print(f"  {text}", flush=True)


def wait_for(what: str, ok: Callable[[], bool], timeout: float) -> float:
    """Seconds until ok() holds; fails the test after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ok():
            return time.monotonic() - t0
        time.sleep(POLL)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def assert_nothing_left(lab_dir: Path, prefix: str) -> None:
    """No namespace, VM process, process naming the lab directory, or mount of it is left."""
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(f"{prefix}-")]
    assert not vm_processes(prefix)
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(lab_dir).encode() in cmd:
                leftovers.append((pid, cmd[:120]))
    assert not leftovers, f"processes of the lab left running: {leftovers}"
    assert str(lab_dir) not in Path("/proc/self/mounts").read_text()
