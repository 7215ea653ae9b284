"""`vmha lab up` / `down` / `status`: the whole lab, built from its parts, and removed again."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmha.core.planes import PLANES
from vmha.etcd.keys import Keys
from vmha.lab import controller, etcdlab, etcdq, libvirtd, novalab, owner
from vmha.lab.configs import api_token, api_url, controller_config, metrics_listen
from vmha.lab.hosts import boot_host, lockspace_joined, storage, vmha_command
from vmha.lab.net import HOST_INDEX_BASE, LabError, LabNet, pid_alive, run
from vmha.lab.procs import vm_processes
from vmha.lab.state import CLUSTER, DISKS_DIR, LEASES_DIR, LabState, NodeState
from vmha.lab.vms import start_copy, writing_on

Echo = Callable[[str], None]
KEYS = Keys(CLUSTER)
HEALTHY_TIMEOUT = 120.0  # lockspace joins (~3 s each at io 1) and first heartbeats, on a busy machine


def _quiet(_: str) -> None:
    return None


def up(lab_dir: Path, hosts: int, vms: int, io_timeout: int = 1, prefix: str = "vl",
       echo: Echo = _quiet, nova: bool = False, power_fence: bool = True, guests: str = "process",
       rebalance: bool = False) -> LabState:
    """Builds (or completes) the lab and returns once every host is UP on every plane in the
    manager's view and every VM writes. Running it on a healthy lab changes nothing.
    nova: a real Nova runs the VMs (vmha.lab.novalab) and the managers use the nova driver.
    power_fence False: the managers have no power fence (a power-off is proven by host_dead).
    rebalance: the managers rebalance (vmha.lab.configs.REBALANCE_COOLDOWN).
    guests "qemu": each VM is a QEMU guest under its host's libvirtd (vmha.lab.libvirtd), holding its
    lease through libvirt's sanlock lock manager; the managers use the libvirt driver."""
    if guests not in ("process", "qemu"):
        raise LabError(f"--guests {guests}: process or qemu")
    if not 1 <= hosts <= 50:
        raise LabError(f"--hosts {hosts}: 1 to 50")
    if not 0 <= vms <= 200:
        raise LabError(f"--vms {vms}: 0 to 200")
    t0 = time.monotonic()
    try:
        state = LabState.load(lab_dir)
    except LabError:
        state = LabState(dir=lab_dir, prefix=prefix, io_timeout=io_timeout, created=time.time(), nova=nova,
                         power_fence=power_fence, guests=guests, rebalance=rebalance)
    else:
        asked = (hosts, len(state.vms), io_timeout, prefix, nova, power_fence, guests, rebalance)
        have = (len(state.hosts), len(state.vms), state.io_timeout, state.prefix, state.nova, state.power_fence,
                state.guests, state.rebalance)
        if asked != have:
            raise LabError(
                f"a lab with {have[0]} hosts, {have[1]} VMs, io_timeout {have[2]} (prefix {have[3]}"
                f"{', with Nova' if have[4] else ''}{'' if have[5] else ', without power fence'}, "
                f"{have[6]} guests{', rebalancing' if have[7] else ''}) is recorded in {lab_dir}: "
                "`vmha lab down` first to build another one"
            )
    owner.claim(state.prefix, lab_dir)  # before anything is built into the prefix's namespaces
    for i in range(1, hosts + 1):
        state.hosts.setdefault(f"h{i}", NodeState(f"h{i}", HOST_INDEX_BASE + i))
    state.vms = [f"vm{i}" for i in range(1, vms + 1)]
    state.save()  # from here on, `lab down` finds everything through this file and the names

    echo("controller: network, shared storage, etcd, sanlock")
    controller.boot_network(state)
    state.save()
    controller.start_services(state)
    state.save()
    init_leases(state, [] if state.disk_leases else state.vms)  # libvirt creates disk leases itself
    if state.disk_leases:
        _reserve_host_ids(state)
    if state.nova:
        novalab.start_control(state, echo)
    for name in sorted(state.hosts, key=_host_order):
        ns = state.hosts[name]
        if ns.power == "off":
            continue  # powered off by a fault: `vmha lab fault HOST power-on` boots it
        echo(f"{name}: network, storage mount, sanlock, agent{', nova-compute' if state.nova else ''}")
        boot_host(state, ns)
        state.save()
    if state.nova:
        novalab.wait_ready(state, echo)
    _records(state)
    echo("managers: m1 (leader), m2 (standby)")
    controller.start_managers(state)
    state.save()
    _wait_joined(state, echo)
    if state.nova:
        novalab.boot_servers(state, echo)
    else:
        _start_vms(state, echo)
    wait_healthy(state, echo)
    echo(f"lab up in {time.monotonic() - t0:.1f} s")
    return state


def _host_order(name: str) -> int:
    return int(name[1:])


def init_leases(state: LabState, vms: list[str]) -> None:
    """Lockspace and one lease per VM, written with the lab's io_timeout (`vmha locks init`, through
    manager m1's sanlock daemon: the controller's processes reach no other). Existing ones are kept."""
    ctl = state.node("controller")
    (state.export / LEASES_DIR).mkdir(parents=True, exist_ok=True)
    (state.export / DISKS_DIR).mkdir(parents=True, exist_ok=True)
    cfg = controller_config(state)
    args = [a for vm in vms for a in ("--vm", vm)]
    run([*ctl.enter(), "env", f"SANLOCK_RUN_DIR={controller.sanlock_run_dir(state, controller.MANAGERS[0])}",
         *vmha_command("locks", "init", "--config", str(cfg), *args)], timeout=120)


def _reserve_host_ids(state: LabState) -> None:
    """Host hN's sanlock host_id N in etcd (kept when present), before its agent starts: its libvirtd joins
    libvirt's disk-lease lockspace with the host_id written in qemu-sanlock.conf (vmha.lab.libvirtd), and
    the agent refuses a host whose libvirt uses another id than vmha allocated (the lowest free one)."""
    have, _ = etcdq.get_json_prefix(state, KEYS.host_id_prefix)
    for name in sorted(state.hosts, key=_host_order):
        key = KEYS.host_id(libvirtd.host_id(name))
        if key not in have:
            etcdq.put_json(state, key, {"host": name})


def _records(state: LabState) -> None:
    """Host and placement records in etcd (kept when present: they are the cloud's own state)."""
    have, _ = etcdq.get_json_prefix(state, KEYS.lab(""))
    for name in sorted(state.hosts):
        key = KEYS.lab("hosts", name)
        if key not in have:
            etcdq.put_json(state, key, {"enabled": True, "forced_down": False, "reason": ""})
    if state.nova:
        return  # Nova keeps where its servers are
    hosts = sorted(state.hosts, key=_host_order)
    for i, vm in enumerate(state.vms):
        key = KEYS.lab("vms", vm)
        if key not in have:
            etcdq.put_json(state, key, {"vm": vm, "host": hosts[i % len(hosts)], "ha": True, "priority": 0})


def host_flags_key(state: LabState, host: str) -> str:
    """Where the managers' compute driver keeps a host's enabled / forced_down flags."""
    return KEYS.driver("libvirt", "hosts", host) if state.guests == "qemu" else KEYS.lab("hosts", host)


def _wait_joined(state: LabState, echo: Echo) -> None:
    """Until every powered host's agent has joined the lockspace (VMs there cannot take leases before)."""
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    waiting = [h for h in sorted(state.hosts, key=_host_order) if state.hosts[h].power == "on"]
    while waiting and time.monotonic() < deadline:
        waiting = [h for h in waiting if not lockspace_joined(state.node(h), state.lockspace)]
        if waiting:
            time.sleep(0.5)
    if waiting:
        raise LabError(f"hosts {', '.join(waiting)}: the agent did not join the sanlock lockspace within "
                       f"{HEALTHY_TIMEOUT:.0f} s (logs: {state.logs}/agent-HOST.log)")
    echo("every host joined the lockspace")


def _start_vms(state: LabState, echo: Echo) -> None:
    placed, _ = etcdq.get_json_prefix(state, KEYS.lab("vms", ""))
    running = {p.vm for p in vm_processes(state.prefix)}
    started = 0
    for vm in state.vms:
        rec = placed.get(KEYS.lab("vms", vm), {})
        host = rec.get("host")
        if vm in running or not isinstance(host, str) or state.hosts.get(host, NodeState("", 0)).power != "on":
            continue
        if state.guests == "qemu":
            libvirtd.start_guest(state, vm, host, priority=int(rec.get("priority", 0)))
        else:
            start_copy(state, vm, host)
        started += 1
    if started:
        echo(f"VMs: started {started} of {len(state.vms)}")


def wait_healthy(state: LabState, echo: Echo) -> None:
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    since = time.time()
    problems: list[str] = []
    while time.monotonic() < deadline:
        problems = health_problems(state, since)
        if not problems:
            return
        time.sleep(0.5)
    raise LabError(f"lab not healthy after {HEALTHY_TIMEOUT:.0f} s: {'; '.join(problems[:6])} "
                   f"(logs: {state.logs})")


def health_problems(state: LabState, since: float) -> list[str]:
    """What keeps the lab from being healthy: hosts not UP on every plane in the manager's view,
    VMs not writing since `since`, daemons not running."""
    out: list[str] = []
    view = health_view(state)
    for name in sorted(state.hosts, key=_host_order):
        if state.hosts[name].power != "on":
            continue
        planes = view.get(name, {})
        bad = [p.value for p in PLANES if planes.get(p.value) != "up"]
        if bad:
            out.append(f"{name}: {', '.join(bad)} not up in the manager's view")
        elif not lockspace_joined(state.node(name), state.lockspace):
            out.append(f"{name}: not joined to the sanlock lockspace (cannot take VM leases)")
    if state.nova:
        out += novalab.problems(state)
        placed = novalab.placed(state)
    else:
        records, _ = etcdq.get_json_prefix(state, KEYS.lab("vms", ""))
        placed = {vm: records.get(KEYS.lab("vms", vm), {}).get("host") for vm in state.vms}
        if state.guests == "qemu":  # the libvirt driver moves guests without the lab's placement records
            placed.update({p.vm: p.host for p in vm_processes(state.prefix) if p.active})
    for vm in state.vms:
        host = placed.get(vm)
        if isinstance(host, str) and state.hosts.get(host, NodeState("", 0)).power == "on" and not writing_on(
            state, vm, host, since
        ):
            out.append(f"{vm}: not writing on {host}")
    if leader(state) is None:
        out.append("no manager leader")
    return out


def health_view(state: LabState) -> dict[str, dict[str, str]]:
    """host -> plane -> state, as the manager persisted it (keys.health)."""
    raw, _ = etcdq.get_json_prefix(state, KEYS.health_prefix)
    out: dict[str, dict[str, str]] = {}
    for key, value in raw.items():
        planes = value.get("planes") if isinstance(value, dict) else None
        if isinstance(planes, dict):
            out[key[len(KEYS.health_prefix) :]] = {
                p: str(s.get("state")) for p, s in planes.items() if isinstance(s, dict)
            }
    return out


def leader(state: LabState) -> str | None:
    """Name of the manager holding the leader key, if any."""
    raw = etcdq.get_prefix(state, KEYS.leader)
    value = raw.get(KEYS.leader)
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        d = json.loads(value)
        if isinstance(d, dict) and "name" in d:
            return str(d["name"])
    return value.decode(errors="replace")


def status(state: LabState) -> dict[str, Any]:
    """The JSON of `vmha lab status --json` (a published contract: keep its shape)."""
    view = health_view(state)
    copies = [p for p in vm_processes(state.prefix) if p.active]
    by_vm: dict[str, list[str | None]] = {}
    for p in copies:
        by_vm.setdefault(p.vm, []).append(p.host)
    hosts = []
    for name in sorted(state.hosts, key=_host_order):
        planes = view.get(name, {})
        ns = state.hosts[name]
        # Powered means its anchor (and so its namespaces' life) still runs, whoever turned it off.
        powered = ns.power == "on" and ns.anchor > 0 and pid_alive(ns.anchor)
        hosts.append({"name": name, "planes": {p.value: planes.get(p.value, "unknown") for p in PLANES},
                      "power": "on" if powered else "off"})
    vms = []
    for vm in state.vms:
        on = by_vm.get(vm, [])
        # More than one copy with its disk open: "split" (verify says whether both wrote).
        vms.append({
            "name": vm,
            "host": on[0] if len(on) == 1 else None,
            "state": "running" if len(on) == 1 else ("stopped" if not on else "split"),
        })
    tasks_raw, _ = etcdq.get_json_prefix(state, KEYS.tasks_prefix)
    tasks = [{"vm": k[len(KEYS.tasks_prefix) :], **(v if isinstance(v, dict) else {"value": v})}
             for k, v in sorted(tasks_raw.items())]
    # The first manager's REST API and dashboard (the next ones on the following ports), reachable
    # inside the controller's netns; its admin token.
    api = {"url": api_url(state), "token": api_token(state)}
    # Each daemon's Prometheus endpoint (reached from the controller's namespace).
    metrics = {name: f"http://{metrics_listen(state, name)}/metrics" for name in [*controller.MANAGERS, *state.hosts]}
    return {"hosts": hosts, "vms": vms, "tasks": tasks, "metrics": metrics, "api": api, "etcd": etcdlab.status(state)}


def down(lab_dir: Path, prefix: str = "vl", echo: Echo = _quiet) -> list[str]:
    """Removes every namespace, bridge, mount and process of the lab, also of a crashed one; returns
    what it removed. Works without lab.json (finds leftovers by the <prefix>- names)."""
    removed: list[str] = []
    try:
        state: LabState | None = LabState.load(lab_dir)
    except LabError:
        state = None
    prefix = state.prefix if state is not None else prefix
    owner.refuse_if_owned(prefix, lab_dir, "down")
    if state is not None:
        # Hosts first, their sshfs unmounted while the server still answers (no hung FUSE I/O).
        for name in sorted(state.hosts):
            ns = state.hosts[name]
            node = state.node(name)
            if ns.power == "on" and ns.anchor:
                storage(state).unmount(node, ns.pids.get("sshfs", 0))
    net = LabNet(prefix)
    names = net.existing_netns()
    for ns_name in names:
        if ns_name != net.fabric:
            echo(f"stopping the processes of {ns_name}")
    net.destroy()
    removed.extend(names)
    if state is not None:
        # The data (etcd, disks, leases) goes too: the next `lab up` starts clean.
        for sub in ("etcd", "pki", "storage", "config", "state", "run", "libvirt", novalab.NOVA_DIR):
            shutil.rmtree(state.dir / sub, ignore_errors=True)
        for f in ("lab.json", "faults.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                (state.dir / f).unlink()
    owner.release(prefix, lab_dir)
    return removed
