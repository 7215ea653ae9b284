"""Generated vmha config files for the lab's agents and managers (valid for vmha.config.load)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path

from vmha import config
from vmha.core.planes import PLANES, Plane
from vmha.etcd.auth import ROOT
from vmha.lab.net import LabError, Node
from vmha.lab.nova.rig import CLOUD
from vmha.lab.pki import PkiError
from vmha.lab.state import CLUSTER, INSTANCES_DIR, LEASES_DIR, LabState
from vmha.lab.storage import MOUNT_POINT

# Each manager's REST API and dashboard, on the controller's management address (reachable inside the
# controller's netns, like the lab's etcd): m1 on API_PORT, the next manager on API_PORT + 1...
API_PORT = 8443

# Prometheus metrics (README "Metrics"), on the management network: each agent at its host's address,
# the managers at the controller's, a port each (the names of controller.MANAGERS).
AGENT_METRICS_PORT = 9110
MANAGER_METRICS_PORTS = {"m1": 9111, "m2": 9112}


def metrics_listen(state: LabState, name: str) -> str:
    """The [metrics] listen address of manager or host `name`."""
    if name in MANAGER_METRICS_PORTS:
        return f"{state.node('controller').address(Plane.MANAGEMENT)}:{MANAGER_METRICS_PORTS[name]}"
    return f"{state.node(name).address(Plane.MANAGEMENT)}:{AGENT_METRICS_PORT}"


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


def _common(state: LabState, user: str) -> dict[str, dict[str, Value]]:
    """Sections every lab process has; ``user`` is its etcd user (its certificate's CN)."""
    try:
        state.pki.create_ca()
        tls = state.pki.issue(user)
    except PkiError as e:
        raise LabError(f"lab certificates in {state.pki.dir}: {e}") from None
    sections: dict[str, dict[str, Value]] = {"cluster": {"name": CLUSTER}}
    sections["etcd"] = {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
    for plane in PLANES:
        sections[f"planes.{plane.value}"] = {"endpoints": state.etcd_urls(plane)}
    sections["locks"] = {"path": str(MOUNT_POINT / LEASES_DIR), "io_timeout": state.io_timeout}
    if state.disk_leases:  # libvirt names each lease after its disk's path: Nova's, by server id
        sections["locks"] |= {"leases": "libvirt-disk", "vm_disk": f"{MOUNT_POINT / INSTANCES_DIR}/{{vm}}/disk"}
    return sections


def _write(path: Path, sections: Mapping[str, Mapping[str, Value]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(sections))
    config.load(path)  # a config the daemons would refuse is a lab bug: fail here, with the reason
    return path


def agent_config(state: LabState, host: str) -> Path:
    sections = _common(state, host)
    sections["host"] = {"name": host, "domain": "default"}
    sections["agent"] = {"isolation_response": "stop"}
    if state.guests == "qemu":  # the agent checks the host's libvirt lock settings (vmha.lab.libvirtd)
        sections["libvirt"] = {"config_dir": "/etc/libvirt"}
    sections["metrics"] = {"listen": metrics_listen(state, host)}
    return _write(state.configs / f"agent-{host}.toml", sections)


def api_url(state: LabState, index: int = 0) -> str:
    return f"https://{state.node('controller').address(PLANES[0])}:{API_PORT + index}"


def api_tokens(state: LabState) -> Path:
    """The lab's API tokens file: one admin and one read-only token, made once (mode 600)."""
    path = state.configs / "api-tokens"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(f"{secrets.token_urlsafe(24)} admin\n{secrets.token_urlsafe(24)} read-only\n")
    return path


def api_token(state: LabState, role: str = "admin") -> str | None:
    """The lab's token of that role, None before the lab made its tokens file."""
    path = state.configs / "api-tokens"
    if not path.exists():
        return None
    return next((f[0] for f in (line.split() for line in path.read_text().splitlines()) if f[1:] == [role]), None)


def manager_config(state: LabState, name: str, index: int = 0) -> Path:
    sections = _common(state, name)
    sections["manager"] = {
        "name": name,
        "endpoints": state.etcd_control_urls(),
        "driver": "nova" if state.nova else ("libvirt" if state.guests == "qemu" else "lab"),
        # The lab's power fence (vmha.lab.power) kills every process of a host's namespace: the lab
        # starts its managers through vmha.lab.manager, which injects it, with any driver.
        "power_fence": state.power_fence,
    }
    if state.rebalance:
        sections["manager"].update(rebalance=True, rebalance_cooldown=REBALANCE_COOLDOWN)
    if state.nova:
        # clouds.yaml comes through OS_CLIENT_CONFIG_FILE (vmha.lab.controller.manager_env); the
        # servers are named after the lab VMs, whose leases carry those names; with QEMU guests a
        # VM's lease is its disk's, whose path carries the server id (Nova's layout).
        sections["nova"] = {"cloud": CLOUD, "vm_names": "id" if state.disk_leases else "name"}
    elif state.guests == "qemu":
        # Each host's libvirtd over the management plane (vmha.lab.libvirtd: lab-only TCP transport).
        # The lab's sshfs storage is shared (disks with cache="none"), but libvirt 9 does not know it.
        sections["libvirt"] = {"migrate_unsafe": True}
        sections["libvirt.hosts"] = {h: libvirt_uri(state.node(h)) for h in sorted(state.hosts)}
    sections["metrics"] = {"listen": metrics_listen(state, name)}
    try:  # the API's server certificate, from the lab's CA (pki/vmha-api.crt)
        tls = state.pki.issue("vmha-api", ips=[state.node("controller").address(PLANES[0])])
    except PkiError as e:
        raise LabError(f"lab certificates in {state.pki.dir}: {e}") from None
    sections["api"] = {"listen": api_url(state, index).removeprefix("https://"), "cert": str(tls.cert),
                       "key": str(tls.key), "tokens_file": str(api_tokens(state)),
                       "public_url": api_url(state, index)}  # the alerts' evidence links
    return _write(state.configs / f"manager-{name}.toml", sections)


def controller_config(state: LabState) -> Path:
    """For lab-side commands run on the controller (lock initialisation, status, etcd setup-auth):
    etcd's root user, on the controllers' link, which no fault of the hosts' fabric cuts."""
    sections = _common(state, ROOT)
    for plane in PLANES:
        sections[f"planes.{plane.value}"] = {"endpoints": state.etcd_control_urls()}
    return _write(state.configs / "controller.toml", sections)
