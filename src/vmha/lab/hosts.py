"""Lab hosts: boot (anchor, sshfs, sanlock daemon, agent; nova-compute in a lab with Nova) and power
off (kill the whole namespace).

A host's processes all sit in its netns and its anchor's mount namespace, so `ip netns pids` lists
every one of them, VMs included: power-off kills that list until it is empty (a real power loss:
no process gets to release anything), power-on boots the host's services again (not its VMs: those
were evacuated, or are started again by whoever decides so).
"""

from __future__ import annotations

import sys
import time

from vmha.core.planes import Plane
from vmha.lab import libvirtd, novalab
from vmha.lab.configs import agent_config
from vmha.lab.net import LabError, Node, pid_alive, run, spawn
from vmha.lab.sanlockd import start_sanlock
from vmha.lab.state import LabState, NodeState
from vmha.lab.storage import SharedStorage

# sanlock's -g: SIGTERM to SIGKILL of the holders of a lost lockspace. The lab VM honours SIGTERM at
# once; a short grace bounds how long a hung one could keep its lease's disk open.
KILL_GRACE = 5
JOIN_TIMEOUT = 120.0  # the agent's first join of the lockspace (about 3 s at io_timeout 1; busy machine)


def storage(state: LabState) -> SharedStorage:
    return SharedStorage(state.export, state.dir / "state", state.logs)


def vmha_command(*args: str) -> list[str]:
    """`vmha ARGS` with this interpreter (the lab may run from a venv that is not on PATH)."""
    return [sys.executable, "-m", "vmha.cli", *args]


def boot_host(state: LabState, ns: NodeState) -> Node:
    """Brings one host up; idempotent (a running part is kept). Records pids in `ns`."""
    net = state.net()
    node = net.node(ns.name, ns.index, ns.anchor)
    net.add_node(node)
    node = net.start_anchor(node)
    ns.anchor = node.anchor
    ctl = state.node("controller")
    st = storage(state)
    if not st.is_mounted(node):
        ns.pids["sshfs"] = st.mount(node, ctl.address(Plane.STORAGE))
    if not pid_alive(ns.pids.get("sanlock", 0)):
        d = start_sanlock(ns.name, enter=node.enter(), kill_grace=KILL_GRACE,
                          log_path=state.logs / f"sanlock-{ns.name}.log")
        ns.pids["sanlock"] = d.pid
    if state.guests == "qemu" and not pid_alive(ns.pids.get("agent", 0)):
        libvirtd.prepare(state, node)  # the agent checks libvirt's lock settings at start
    if not pid_alive(ns.pids.get("agent", 0)):
        cfg = agent_config(state, ns.name)
        proc = spawn([*node.enter(), *vmha_command("agent", "--config", str(cfg))],
                     state.logs / f"agent-{ns.name}.log")
        ns.pids["agent"] = proc.pid
    if state.guests == "qemu":
        if state.disk_leases and not pid_alive(ns.pids.get("libvirtd", 0)):
            # libvirtd joins libvirt's disk-lease lockspace at its start and exits when the agent's join of
            # the same lockspace is still in progress (sanlock: EINPROGRESS): after the agent's join.
            _wait_joined(state, node)
        ns.pids.update(libvirtd.start(state, node))
    if state.nova and not pid_alive(ns.pids.get(novalab.COMPUTE, 0)):
        ns.pids[novalab.COMPUTE] = novalab.start_compute(state, node)
    ns.power = "on"
    return node


def _wait_joined(state: LabState, node: Node) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not lockspace_joined(node, state.lockspace):
        if time.monotonic() > deadline:
            raise LabError(f"{node.name}: the agent did not join lockspace {state.lockspace} within "
                           f"{JOIN_TIMEOUT:.0f} s (log: {state.logs}/agent-{node.name}.log)")
        time.sleep(0.5)


def lockspace_joined(node: Node, lockspace: str = "vmha") -> bool:
    """Whether the host's sanlock daemon has joined the lockspace (the agent joins it at start): only
    then can a VM take its lease there. `sanlock client gets` lists "s NAME:ID:PATH:OFFSET", with a
    trailing ADD or REM while joining or leaving."""
    cp = run([*node.enter(), "sanlock", "client", "gets"], check=False, timeout=10)
    return any(line.startswith(f"s {lockspace}:") and not line.rstrip().endswith(("ADD", "REM"))
               for line in cp.stdout.splitlines())


def power_off(state: LabState, name: str) -> list[int]:
    """Kills every process of the host at once (SIGKILL, no grace); returns their pids."""
    ns = state.hosts.get(name)
    if ns is None:
        raise LabError(f"no lab host {name!r}")
    killed = state.net().kill_node(state.node(name), grace=None)
    ns.anchor = 0
    ns.pids.clear()
    ns.power = "off"
    return killed
