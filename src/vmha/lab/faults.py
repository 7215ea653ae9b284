"""Faults the lab injects, each recorded in the fault log (<dir>/faults.jsonl) for verify and the demo.

  host plane down/up   the host's NIC on that plane (link state: carrier lost on the bridge port)
  host power-off/on    every process of the host killed at once / the host's services booted again
  fabric plane down/up the plane's bridge (every host loses that plane together)
  kill manager         SIGKILL to the leading manager (the standby takes over)
  etcd MEMBER down/up  SIGKILL to one etcd member (a name, or "leader" for the current leader) / restart it
  etcd quorum down/up  two members killed at once (the leader among them when there is one) / restarted
  etcd MEMBER plane down/up  the member's NIC on that plane (partitioned from that plane only)
"""

from __future__ import annotations

import os
import signal
import time

from vmha.core.planes import Plane
from vmha.lab import etcdlab
from vmha.lab.cluster import leader
from vmha.lab.hosts import boot_host, power_off
from vmha.lab.net import LabError, pid_alive
from vmha.lab.state import ETCD_MEMBERS, LabState


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


def etcd(state: LabState, member: str, updown: str) -> dict[str, object]:
    """Crash (SIGKILL) or restart one member, or with ``quorum`` two at once."""
    up = _updown(updown)
    state.reload()
    t = time.time()
    if member == "quorum":
        if up:
            etcdlab.start(state, list(ETCD_MEMBERS))
        else:
            alive = etcdlab.running(state)
            if len(alive) * 2 <= len(ETCD_MEMBERS):
                raise LabError(f"etcd has no quorum already (running: {', '.join(alive) or 'none'})")
            lead = etcdlab.leader(state)
            # The leader goes first: the one left is a follower, as after a real double failure.
            victims = sorted(alive, key=lambda m: m != lead)[: len(alive) - len(ETCD_MEMBERS) // 2]
            for m in victims:
                etcdlab.crash(state, m)
            member = ",".join(victims)
    else:
        if member == "leader":
            lead = etcdlab.leader(state)
            if lead is None:
                raise LabError("no etcd member says it leads now: nothing to kill")
            member = lead
        state.etcd_member(member)  # a clear error for an unknown name
        if up:
            etcdlab.start(state, [member])
        else:
            etcdlab.crash(state, member)
    state.save()
    return state.log_fault(member, "etcd", updown, t)


def etcd_plane(state: LabState, member: str, plane: str, updown: str) -> dict[str, object]:
    """The member's NIC on one plane down or up: clients of that plane must use another member."""
    p, up = _plane(plane), _updown(updown)
    node = state.etcd_member(member)
    t = time.time()
    state.net().set_link(node, p, up)
    return state.log_fault(member, f"etcd-{p.value}", updown, t)
