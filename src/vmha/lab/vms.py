"""Starting and watching lab VM copies (used by `lab up` and by the lab compute driver)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vmha.lab.configs import agent_config
from vmha.lab.net import spawn
from vmha.lab.procs import vm_binary
from vmha.lab.state import DISKS_DIR, LabState
from vmha.lab.storage import MOUNT_POINT
from vmha.lab.vm import last_record


def disk_on_host(vm: str) -> Path:
    return MOUNT_POINT / DISKS_DIR / f"{vm}.disk"


def start_copy(state: LabState, vm: str, host: str, incoming: float = 0.0) -> subprocess.Popen[bytes]:
    """Runs `vmha-vm VM` inside the host's namespaces (it takes the lease itself before writing)."""
    node = state.node(host)
    cmd = [*node.enter(), vm_binary(), vm, "--host", host, "--disk", str(disk_on_host(vm)),
           "--config", str(agent_config(state, host))]
    if incoming:
        cmd += ["--incoming", str(incoming)]
    return spawn(cmd, state.logs / f"vm-{vm}.log")


def writing_on(state: LabState, vm: str, host: str, since: float) -> bool:
    """Whether a copy on `host` wrote the VM's disk at or after unix time `since`."""
    rec = last_record(state.disk_on_controller(vm))
    return rec is not None and rec.get("host") == host and float(str(rec.get("t", 0))) >= since
