"""Faults the lab injects, each recorded in the fault log (<dir>/faults.jsonl) for verify and the demo.

  host plane down/up   the host's NIC on that plane (link state: carrier lost on the bridge port)
  host power-off/on    every process of the host killed at once / the host's services booted again
  fabric plane down/up the plane's bridge (every host loses that plane together)
  kill manager         SIGKILL to the leading manager (the standby takes over)
"""

from __future__ import annotations

import os
import signal
import time

from vmha.core.planes import Plane
from vmha.lab.cluster import leader
from vmha.lab.hosts import boot_host, power_off
from vmha.lab.net import LabError, pid_alive
from vmha.lab.state import LabState


def _plane(name: str) -> Plane:
    try:
        return Plane(name)
    except ValueError:
        raise LabError(f"unknown plane {name!r}: management, storage or service") from None


def _updown(word: str) -> bool:
    if word not in ("up", "down"):
        raise LabError(f"{word!r}: say up or down")
    return word == "up"


def host_plane(state: LabState, host: str, plane: str, updown: str) -> dict[str, object]:
    p, up = _plane(plane), _updown(updown)
    node = state.node(host)
    t = time.time()
    state.net().set_link(node, p, up)
    return state.log_fault(host, p.value, updown, t)


def fabric(state: LabState, plane: str, updown: str) -> dict[str, object]:
    p, up = _plane(plane), _updown(updown)
    t = time.time()
    state.net().set_bridge(p, up)
    return state.log_fault("fabric", p.value, updown, t)


def power(state: LabState, host: str, on: bool) -> dict[str, object]:
    state.reload()  # a manager's power fence may have turned it off meanwhile
    if host not in state.hosts:
        raise LabError(f"no lab host {host!r}; hosts: {', '.join(sorted(state.hosts))}")
    t = time.time()
    if on:
        if state.hosts[host].power == "on" and pid_alive(state.hosts[host].anchor):
            raise LabError(f"{host} is already powered on")
        boot_host(state, state.hosts[host])
    else:
        power_off(state, host)
    state.save()
    return state.log_fault(host, "power", "on" if on else "off", t)


def kill_manager(state: LabState) -> dict[str, object]:
    """SIGKILL to the manager holding the leader key; `vmha lab up` starts it again."""
    name = leader(state)
    if name is None:
        raise LabError("no manager leads now (leader key absent): nothing to kill")
    pid = state.controller.pids.get(f"manager-{name}", 0)
    if not pid_alive(pid):
        raise LabError(f"manager {name} leads but its recorded pid {pid} does not run")
    t = time.time()
    os.kill(pid, signal.SIGKILL)
    return state.log_fault("manager", "kill", name, t)
