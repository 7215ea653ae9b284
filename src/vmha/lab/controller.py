"""The lab controller: etcd on its three plane addresses, the shared storage server, and two
`vmha manager`s, each with a sanlock daemon of its own (its lock host for fence proofs: in
production each manager runs on its own machine with its own daemon). The managers' daemons use
SANLOCK_RUN_DIR (sockets under <lab dir>/run/<manager>) since they share the controller's namespaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmha.core.planes import PLANES, Plane
from vmha.lab import novalab
from vmha.lab.configs import manager_config
from vmha.lab.hosts import storage
from vmha.lab.net import LabError, Node, host_env, pid_alive, spawn
from vmha.lab.sanlockd import start_sanlock
from vmha.lab.state import ETCD_PORT, LabState
from vmha.testing.etcd import EtcdProcess, EtcdStartError

MANAGERS = ("m1", "m2")  # the first started becomes the leader, the other stands by


def boot_network(state: LabState) -> Node:
    """The controller's netns and anchor (the fabric comes with it)."""
    net = state.net()
    node = net.controller(state.controller.anchor)
    net.add_node(node)
    node = net.start_anchor(node)
    state.controller.anchor = node.anchor
    return node


def start_services(state: LabState) -> None:
    """Storage server, etcd and the managers' sanlock daemons; kept when already running."""
    pids = state.controller.pids
    node = state.node("controller")
    if not pid_alive(pids.get("sshd", 0)):
        pids["sshd"] = storage(state).start_server(node)
    if not pid_alive(pids.get("etcd", 0)):
        etcd = EtcdProcess(
            data_dir=state.dir / "etcd" / "data",
            client_urls=[f"http://{node.address(p)}:{ETCD_PORT}" for p in PLANES],
            peer_url=f"http://{node.address(Plane.MANAGEMENT)}:2380",
            netns=node.netns,
            name="etcd-lab",
            # As in production (README): the agents' heartbeats write a revision per plane every
            # keepalive, and a lab left up for days would otherwise grow its store without bound.
            extra_args=["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m"],
        )
        try:
            etcd.start()
        except EtcdStartError as e:
            raise LabError(f"etcd did not start in {node.netns}: {e}") from None
        assert etcd.pid is not None
        pids["etcd"] = etcd.pid
    for name in MANAGERS:
        role = f"sanlock-{name}"
        if not pid_alive(pids.get(role, 0)):
            d = start_sanlock(name, run_dir=sanlock_run_dir(state, name), enter=node.enter(),
                              log_path=state.logs / f"{role}.log")
            pids[role] = d.pid


def sanlock_run_dir(state: LabState, manager: str) -> Path:
    return state.dir / "run" / manager


def start_managers(state: LabState) -> None:
    pids = state.controller.pids
    node = state.node("controller")
    for index, name in enumerate(MANAGERS):
        role = f"manager-{name}"
        if pid_alive(pids.get(role, 0)):
            continue
        cfg = manager_config(state, name, index)
        # The lab's own entry point: it gives the manager the lab's driver and power fence.
        proc = spawn([*node.enter(), sys.executable, "-m", "vmha.lab.manager", "--config", str(cfg),
                      "--lab-dir", str(state.dir)],
                     state.logs / f"{role}.log", env=manager_env(state, name))
        pids[role] = proc.pid


def manager_env(state: LabState, manager: str) -> dict[str, str]:
    """A manager's environment: its own sanlock daemon, and VMHA_LAB_DIR for the lab commands it may
    run (its lab parts get the lab's directory from vmha.lab.manager's --lab-dir)."""
    nova = novalab.manager_env(state) if state.nova else {}
    return host_env(VMHA_LAB_DIR=str(state.dir), SANLOCK_RUN_DIR=str(sanlock_run_dir(state, manager)), **nova)
