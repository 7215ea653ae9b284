"""Generated vmha config files for the lab's agents and managers (valid for vmha.config.load)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from vmha import config
from vmha.core.planes import PLANES, Plane
from vmha.lab.net import Node
from vmha.lab.nova.rig import CLOUD
from vmha.lab.state import CLUSTER, LEASES_DIR, LabState
from vmha.lab.storage import MOUNT_POINT


def libvirt_uri(node: Node) -> str:
    """A host's libvirtd over the management plane (the lab's libvirtd listens on TCP there)."""
    return f"qemu+tcp://{node.address(Plane.MANAGEMENT)}/system"

Value = str | int | float | bool | list[str]

# A lab with rebalancing (LabState.rebalance): its rounds this far apart, not production's 300 s, so that
# a run of faults ends evened out within minutes.
REBALANCE_COOLDOWN = 20.0


def to_toml(sections: Mapping[str, Mapping[str, Value]]) -> str:
    """TOML for flat sections of scalars and string lists (all the lab writes)."""
    out: list[str] = []
    for name, fields in sections.items():
        out.append(f"[{name}]")
        for k, v in fields.items():
            # JSON spells strings, numbers and string lists the way TOML does; booleans need care.
            out.append(f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}")
        out.append("")
    return "\n".join(out)


def _common(state: LabState) -> dict[str, dict[str, Value]]:
    sections: dict[str, dict[str, Value]] = {"cluster": {"name": CLUSTER}}
    for plane in PLANES:
        sections[f"planes.{plane.value}"] = {"endpoints": [state.etcd_url(plane)]}
    sections["locks"] = {"path": str(MOUNT_POINT / LEASES_DIR), "io_timeout": state.io_timeout}
    return sections


def _write(path: Path, sections: Mapping[str, Mapping[str, Value]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(sections))
    config.load(path)  # a config the daemons would refuse is a lab bug: fail here, with the reason
    return path


def agent_config(state: LabState, host: str) -> Path:
    sections = _common(state)
    sections["host"] = {"name": host, "domain": "default"}
    sections["agent"] = {"isolation_response": "stop"}
    if state.guests == "qemu":  # the agent checks the host's libvirt lock settings (vmha.lab.libvirtd)
        sections["libvirt"] = {"config_dir": "/etc/libvirt"}
    return _write(state.configs / f"agent-{host}.toml", sections)


def manager_config(state: LabState, name: str) -> Path:
    sections = _common(state)
    sections["manager"] = {
        "name": name,
        "endpoints": [state.etcd_url(PLANES[0])],
        "driver": "nova" if state.nova else ("libvirt" if state.guests == "qemu" else "lab"),
        # The lab's power fence (vmha.lab.power) kills every process of a host's namespace: the lab
        # starts its managers through vmha.lab.manager, which injects it, with any driver.
        "power_fence": state.power_fence,
    }
    if state.rebalance:
        sections["manager"].update(rebalance=True, rebalance_cooldown=REBALANCE_COOLDOWN)
    if state.nova:
        # clouds.yaml comes through OS_CLIENT_CONFIG_FILE (vmha.lab.controller.manager_env); the
        # servers are named after the lab VMs, whose leases carry those names.
        sections["nova"] = {"cloud": CLOUD, "vm_names": "name"}
    if state.guests == "qemu":
        # Each host's libvirtd over the management plane (vmha.lab.libvirtd: lab-only TCP transport).
        # The lab's sshfs storage is shared (disks with cache="none"), but libvirt 9 does not know it.
        sections["libvirt"] = {"migrate_unsafe": True}
        sections["libvirt.hosts"] = {h: libvirt_uri(state.node(h)) for h in sorted(state.hosts)}
    return _write(state.configs / f"manager-{name}.toml", sections)


def controller_config(state: LabState) -> Path:
    """For lab-side commands run on the controller (lock initialisation, status)."""
    return _write(state.configs / "controller.toml", _common(state))
