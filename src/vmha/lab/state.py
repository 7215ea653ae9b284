"""The lab's recorded state: <dir>/lab.json (nodes, anchors, pids) and <dir>/faults.jsonl (fault log).

Written by `vmha lab up` and the fault commands; read by every lab command, the lab compute driver
and the lab power fence (which run in the managers). `lab down` uses it together with the
<prefix>- namespace names to find everything the lab started, also after a crash.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmha.core.planes import Plane
from vmha.lab.net import LabError, LabNet, Node

DEFAULT_DIR = Path(os.environ.get("VMHA_LAB_DIR", "/var/tmp/vmha-lab/lab"))
CLUSTER = "lab"
ETCD_PORT = 2379
LEASES_DIR = "locks"  # under the storage mount point: lockspace and VM leases
DISKS_DIR = "disks"  # under the storage mount point: one file per lab VM


@dataclass(slots=True)
class NodeState:
    name: str
    index: int
    anchor: int = 0
    power: str = "on"  # "on" or "off" (after `vmha lab fault HOST power-off`)
    pids: dict[str, int] = field(default_factory=dict)  # role -> pid (sshfs, sanlock, agent, ...)


@dataclass(slots=True)
class LabState:
    dir: Path
    prefix: str = "vl"
    io_timeout: int = 1
    hosts: dict[str, NodeState] = field(default_factory=dict)
    controller: NodeState = field(default_factory=lambda: NodeState("controller", 1))
    vms: list[str] = field(default_factory=list)
    created: float = 0.0
    nova: bool = False  # `lab up --nova`: a real Nova control plane, VMs are its servers (vmha.lab.novalab)
    # The managers' lab power fence (vmha.lab.power). Off only through the Python API (the bench's
    # --no-power-fence): power-off is then proven by sanlock's host_dead alone.
    power_fence: bool = True
    guests: str = "process"  # "process": vmha-vm stand-ins; "qemu": QEMU guests under a libvirtd per host
    # The managers rebalance (manager.rebalance, rounds configs.REBALANCE_COOLDOWN apart): only through the
    # Python API (the random fault rounds), whose end checks that the load was evened out.
    rebalance: bool = False

    # paths --------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.dir / "lab.json"

    @property
    def export(self) -> Path:
        """The shared storage's directory on the controller's disk."""
        return self.dir / "storage"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def configs(self) -> Path:
        return self.dir / "config"

    @property
    def fault_log(self) -> Path:
        return self.dir / "faults.jsonl"

    def disk_on_controller(self, vm: str) -> Path:
        return self.export / DISKS_DIR / f"{vm}.disk"

    # nodes --------------------------------------------------------------------------------------
    def net(self) -> LabNet:
        return LabNet(self.prefix, self.logs)

    def node(self, name: str) -> Node:
        """The running node (controller or host) by name, with its anchor."""
        net = self.net()
        if name in ("controller", "ctl"):
            return net.controller(self.controller.anchor)
        ns = self.hosts.get(name)
        if ns is None:
            raise LabError(f"no lab host {name!r}; hosts: {', '.join(sorted(self.hosts)) or 'none'}")
        return net.node(ns.name, ns.index, ns.anchor)

    def etcd_url(self, plane: Plane) -> str:
        return f"http://{self.node('controller').address(plane)}:{ETCD_PORT}"

    # persistence --------------------------------------------------------------------------------
    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        d = asdict(self)
        d["dir"] = str(self.dir)
        # Per process and thread: a manager's power fence saves from worker threads, maybe at once.
        tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # readers (driver, power fence) never see half a file

    @classmethod
    def load(cls, lab_dir: Path) -> LabState:
        p = lab_dir / "lab.json"
        try:
            d: dict[str, Any] = json.loads(p.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {lab_dir} (no lab.json): run `vmha lab up` first") from None
        except (OSError, ValueError) as e:
            raise LabError(f"{p}: unreadable ({e}); `vmha lab down --dir {lab_dir}` cleans up") from None
        return cls(
            dir=Path(d["dir"]),
            prefix=str(d["prefix"]),
            io_timeout=int(d["io_timeout"]),
            hosts={k: NodeState(**v) for k, v in d["hosts"].items()},
            controller=NodeState(**d["controller"]),
            vms=list(d["vms"]),
            created=float(d["created"]),
            nova=bool(d.get("nova", False)),
            power_fence=bool(d.get("power_fence", True)),
            guests=str(d.get("guests", "process")),
            rebalance=bool(d.get("rebalance", False)),
        )

    def reload(self) -> None:
        """Re-reads lab.json in place: another process (a manager's power fence, another lab command)
        may have changed it since this one loaded it; writing a stale copy back would undo that."""
        fresh = LabState.load(self.dir)
        self.hosts, self.controller, self.vms = fresh.hosts, fresh.controller, fresh.vms

    # fault log ----------------------------------------------------------------------------------
    def log_fault(self, target: str, kind: str, action: str, t: float | None = None) -> dict[str, Any]:
        """Appends one fault event; verify and the demo read them back."""
        rec: dict[str, Any] = {"t": time.time() if t is None else t, "target": target, "kind": kind,
                               "action": action}
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.fault_log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def faults(self) -> list[dict[str, Any]]:
        try:
            text = self.fault_log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn line of a killed fault command: nothing to learn from it
        return out
