"""The lab controller: the etcd members (vmha.lab.etcdlab), the shared storage server, and two
`vmha manager`s, each with a sanlock daemon of its own (its lock host for fence proofs: in
production each manager runs on its own machine with its own daemon). The managers' daemons use
SANLOCK_RUN_DIR (sockets under <lab dir>/run/<manager>) since they share the controller's namespaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmha.core.planes import PLANES
from vmha.etcd.auth import OPERATOR, ROOT
from vmha.lab import etcdlab, novalab
from vmha.lab.configs import controller_config, manager_config
from vmha.lab.hosts import storage, vmha_command
from vmha.lab.net import LabError, Node, host_env, pid_alive, run, spawn
from vmha.lab.pki import PkiError
from vmha.lab.sanlockd import start_sanlock
from vmha.lab.state import ETCD_MEMBERS, LabState

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
    if len(etcdlab.running(state)) < len(ETCD_MEMBERS):
        try:
            # The published names (vmha.lab.pki): one certificate per host, manager, operator, root.
            # etcd's server certificate names every member's address on every plane and the controllers' link.
            state.pki.create([*(state.etcd_member(m).address(p) for m in ETCD_MEMBERS for p in PLANES),
                              *(state.etcd_control_address(m) for m in ETCD_MEMBERS)],
                             [*sorted(state.hosts), *MANAGERS, OPERATOR, ROOT])
        except PkiError as e:
            raise LabError(f"lab certificates in {state.pki.dir}: {e} (the lab runs etcd with TLS only)") from None
        etcdlab.create_network(state)
        etcdlab.start(state, list(ETCD_MEMBERS))
        setup_auth(state)
    for name in MANAGERS:
        role = f"sanlock-{name}"
        if not pid_alive(pids.get(role, 0)):
            d = start_sanlock(name, run_dir=sanlock_run_dir(state, name), enter=node.enter(),
                              log_path=state.logs / f"{role}.log")
            pids[role] = d.pid


def setup_auth(state: LabState) -> None:
    """etcd users and roles (`vmha etcd setup-auth`, as root): each host writes only its own keys."""
    hosts = sorted(state.hosts, key=lambda h: state.hosts[h].index)
    args = [a for h in hosts for a in ("--host", h)] + [a for m in MANAGERS for a in ("--manager", m)]
    run([*state.node("controller").enter(), *vmha_command("etcd", "setup-auth", "--config",
                                                          str(controller_config(state)), *args)], timeout=60)


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
