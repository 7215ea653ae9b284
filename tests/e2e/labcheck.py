"""What both end-to-end lab suites check after `lab down`, and their progress output."""

from __future__ import annotations

import os
from pathlib import Path

from vmha.lab.procs import vm_processes


def echo(text: str) -> None:
    print(f"  {text}", flush=True)


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
