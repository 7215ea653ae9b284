"""The lab with a real Nova (`vmha lab up --nova`): the rig's control plane in the controller's
namespaces on its management address, one nova-compute per host inside the host's namespaces, lab
VMs booted through the Nova API.

Each host's nova-compute runs with the lab's virt driver (vmha.lab.nova.virt), which starts and
stops the `vmha-vm` processes (with `--guests qemu`: QEMU guests of the host's libvirtd, in Nova's
instance layout, protected by libvirt's disk leases) as Nova spawns, destroys, evacuates or migrates
servers: a server's name is its lab VM's name. Every Nova process is in a lab namespace and recorded in lab.json
(controller role rig-NAME, host role nova-compute), so `lab down` and a host's power-off remove them
with the rest. The managers use the nova driver through <dir>/nova/clouds.yaml.
"""

from __future__ import annotations

import json
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmha.core.planes import Plane
from vmha.lab.configs import agent_config, libvirt_uri
from vmha.lab.net import LabError, Node, host_env, kill_pids, pid_alive, spawn
from vmha.lab.nova.rig import FLAVOR, IMAGE_ID, NovaRig, RigError
from vmha.lab.procs import vm_binary
from vmha.lab.state import DISKS_DIR, INSTANCES_DIR, LabState
from vmha.lab.storage import MOUNT_POINT
from vmha.lab.vm import INTERVAL

Echo = Callable[[str], None]
NOVA_DIR = "nova"  # under the lab dir: the rig's configs, data, logs and clouds.yaml
COMPUTE = "nova-compute"  # a host's pid role
READY_TIMEOUT = 300.0  # every compute up and discovered (about 25 s here; slower on a busy machine)
BOOT_TIMEOUT = 120.0
HA_METADATA = {"HA_Enabled": "True"}


def rig_dir(state: LabState) -> Path:
    return state.dir / NOVA_DIR


def clouds_yaml(state: LabState) -> Path:
    return rig_dir(state) / "clouds.yaml"


def rig(state: LabState) -> NovaRig:
    """The lab's running rig (its API reached from the controller's namespace)."""
    ctl = state.node("controller")
    try:
        return NovaRig.attach(rig_dir(state), enter=ctl.enter(), netns=ctl.netns)
    except RigError as e:
        raise LabError(str(e)) from None


def start_control(state: LabState, echo: Echo) -> None:
    """The Nova control plane in the controller, unless it already runs (a second `lab up`)."""
    pids = state.controller.pids
    if pid_alive(pids.get("rig-nova-api", 0)):
        return
    if any(k.startswith("rig-") for k in pids):
        raise LabError("part of the lab's Nova control plane is gone: `vmha lab down` and up again")
    ctl = state.node("controller")
    r = NovaRig(hosts=sorted(state.hosts, key=lambda h: int(h[1:])), workdir=rig_dir(state),
                bind=ctl.address(Plane.MANAGEMENT), enter=ctl.enter(), netns=ctl.netns, computes=False)
    echo(f"nova: control plane on {r.bind} in {ctl.netns} (database, broker, schema: about a minute)")
    try:
        r.start_control()
    except RigError as e:
        raise LabError(f"{e}\n(logs: {r.dir}/logs)") from None
    finally:
        for name, proc in r.procs.items():
            pids[f"rig-{name}"] = proc.pid  # recorded even on failure: `lab down` finds them anyway
        state.save()


def virt_config(state: LabState, host: str) -> Path:
    """What the host's virt driver needs to run lab VMs (vmha.lab.nova.virt, VMHA_LAB_VIRT)."""
    path = state.configs / f"virt-{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    lab: dict[str, Any] = {
        "host": host, "vm_binary": vm_binary(), "disks": str(MOUNT_POINT / DISKS_DIR),
        "config": str(agent_config(state, host)), "logs": str(state.logs),
    }  # fmt: skip
    if state.guests == "qemu":
        lab |= {"guests": "qemu", "instances": str(MOUNT_POINT / INSTANCES_DIR), "interval": INTERVAL,
                "libvirt": {h: libvirt_uri(state.node(h)) for h in state.hosts}}  # fmt: skip
    path.write_text(json.dumps(lab))
    return path


def start_compute(state: LabState, node: Node) -> int:
    """The host's nova-compute inside its namespaces, with the host's environment (its children reach
    the host's sanlock daemon); returns its pid."""
    r = NovaRig.attach(rig_dir(state))
    env = r.compute_env(VMHA_LAB_VIRT=str(virt_config(state, node.name)))
    proc = spawn([*node.enter(), *r.compute_command(node.name)], state.logs / f"nova-compute-{node.name}.log",
                 env=host_env(env))
    return proc.pid


def restart_compute(state: LabState, host: str) -> None:
    """Kill and start the host's nova-compute again (an operator's repair: a restarted compute destroys
    the copies of the servers evacuated from it and completes those evacuations)."""
    ns = state.hosts[host]
    old = ns.pids.get(COMPUTE, 0)
    if old and pid_alive(old):
        kill_pids([old], grace=None)  # its SIGTERM takes over 8 s and gains nothing here
    ns.pids[COMPUTE] = start_compute(state, state.node(host))
    state.save()


def wait_ready(state: LabState, echo: Echo) -> None:
    """Until every powered host's nova-compute is up and discovered, and the rig's flavor exists."""
    r = rig(state)
    r.hosts = tuple(h for h in r.hosts if state.hosts[h].power == "on")
    try:
        r.wait_ready(READY_TIMEOUT)
    except RigError as e:
        raise LabError(f"{e}\n(logs: {state.logs}/nova-compute-HOST.log, {r.dir}/logs)") from None
    echo(f"nova: every compute up ({', '.join(r.hosts)})")


def servers(state: LabState) -> dict[str, dict[str, Any]]:
    """Nova's view of the lab VMs: server name -> {"id", "host", "status", "task"} (all projects)."""
    try:
        raw = rig(state).api("GET", "/servers/detail?all_tenants=1")["servers"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LabError(f"nova: list servers: {e}") from None
    return {s["name"]: {"id": s["id"], "host": s.get("OS-EXT-SRV-ATTR:host"), "status": s["status"],
                        "task": s.get("OS-EXT-STS:task_state")} for s in raw}  # fmt: skip


def services(state: LabState) -> dict[str, dict[str, Any]]:
    """host -> its nova-compute service record (state up/down, status enabled/disabled, forced_down)."""
    return {s["host"]: s for s in rig(state).services() if s["binary"] == COMPUTE}


def boot_servers(state: LabState, echo: Echo) -> None:
    """Boots the lab VMs missing in Nova, round-robin on the hosts (a named host each, HA metadata), and
    waits until every one is ACTIVE (its lab VM holds its lease and writes)."""
    r = rig(state)
    have = servers(state)
    hosts = sorted(state.hosts, key=lambda h: int(h[1:]))
    flavor = next(f["id"] for f in r.api("GET", "/flavors")["flavors"] if f["name"] == FLAVOR)
    booted = []
    for i, vm in enumerate(state.vms):
        if vm in have:
            continue
        host = hosts[i % len(hosts)]
        if state.hosts[host].power != "on":
            continue
        r.api("POST", "/servers", {"server": {
            "name": vm, "imageRef": IMAGE_ID, "flavorRef": flavor, "networks": "none", "host": host,
            "metadata": HA_METADATA,
        }})  # fmt: skip
        booted.append(vm)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while booted:
        now = servers(state)
        failed = [f"{vm} on {now[vm]['host']}" for vm in booted if now.get(vm, {}).get("status") == "ERROR"]
        if failed:
            raise LabError(f"nova: servers in ERROR: {', '.join(failed)} (logs: {state.logs}/nova-compute-HOST.log)")
        if all(now.get(vm, {}).get("status") == "ACTIVE" for vm in booted):
            echo(f"nova: booted {len(booted)} servers ({', '.join(booted)})")
            return
        if time.monotonic() > deadline:
            states = ", ".join(f"{vm} {now.get(vm, {}).get('status')}" for vm in booted)
            raise LabError(f"nova: servers not ACTIVE after {BOOT_TIMEOUT:.0f} s: {states}")
        time.sleep(0.5)


def lab_names(state: LabState) -> dict[str, str]:
    """The managers' VM name -> the lab VM's name, where they differ: with QEMU guests the managers name
    VMs by server id (a VM's disk lease is named after its disk's path, which carries the id)."""
    if not state.disk_leases:
        return {}
    return {s["id"]: vm for vm, s in servers(state).items()}


def problems(state: LabState) -> list[str]:
    """What keeps the Nova side healthy: a powered host's compute not up, a lab VM without an ACTIVE
    server. (Where each VM writes is checked against the server's host by the caller.)"""
    out: list[str] = []
    svcs = services(state)
    for name in sorted(state.hosts, key=lambda h: int(h[1:])):
        if state.hosts[name].power == "on" and svcs.get(name, {}).get("state") != "up":
            out.append(f"{name}: nova-compute not up in Nova's view")
    have = servers(state)
    for vm in state.vms:
        s = have.get(vm)
        if s is None or s["status"] != "ACTIVE" or s["task"] is not None:
            out.append(f"{vm}: server {'missing' if s is None else s['status'] + '/' + str(s['task'])} in Nova")
    return out


def placed(state: LabState) -> dict[str, str]:
    """lab VM -> the host Nova placed its server on."""
    return {vm: str(s["host"]) for vm, s in servers(state).items() if vm in state.vms and s["host"]}


def manager_env(state: LabState) -> dict[str, str]:
    return {"OS_CLIENT_CONFIG_FILE": str(clouds_yaml(state))}

