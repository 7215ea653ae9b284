"""The lab's etcd: three members (e1, e2, e3), each in a namespace of its own with a client address on
every plane, as controllers are in production. The members replicate over a network of their own
(bridge br-etcd, 198.19.0.0/24: the controllers' link, none of the three planes), so a plane's fabric
outage cuts clients, never the cluster. The controller is on that link too: its managers and the lab's
tools reach the members there, as managers running next to etcd on the controllers do in production.
Clients and peers use TLS with the lab's PKI (vmha.lab.pki:
etcd-server, etcd-peer).

Started, crashed (SIGKILL by recorded PID) and restarted by `vmha lab up` and `vmha lab fault etcd ...`.
A restarted member resumes from its data directory (<lab dir>/etcd/<member>).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

from vmha.core.planes import PLANES
from vmha.etcd.auth import ROOT
from vmha.lab.net import LabError, kill_pids, pid_alive, run
from vmha.lab.state import ETCD_MEMBERS, ETCD_PEER_PORT, ETCD_PORT, LabState
from vmha.testing.etcd import ETCDCTL, EtcdProcess, EtcdStartError

STATUS_TIMEOUT = 2.0  # seconds one member may take to answer `endpoint status`


def role(member: str) -> str:
    """The member's key in the controller's recorded pids."""
    return f"etcd-{member}"


PEER_BRIDGE = "br-etcd"
PEER_NIC = "peer"


def _peer_url(state: LabState, member: str) -> str:
    return f"https://{state.etcd_control_address(member)}:{ETCD_PEER_PORT}"


def _process(state: LabState, member: str) -> EtcdProcess:
    node = state.etcd_member(member)
    return EtcdProcess(
        data_dir=state.dir / "etcd" / member,
        client_urls=[*(state.etcd_member_url(member, p) for p in PLANES),
                     f"https://{state.etcd_control_address(member)}:{ETCD_PORT}"],
        peer_url=_peer_url(state, member),
        netns=node.netns,
        name=member,
        initial_cluster=",".join(f"{m}={_peer_url(state, m)}" for m in ETCD_MEMBERS),
        # As in production (README): the agents' heartbeats write a revision per plane every
        # keepalive, and a lab left up for days would otherwise grow its store without bound.
        extra_args=["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m"],
        pki=state.pki,
    )


def create_network(state: LabState) -> None:
    """Each member's namespace with its three plane addresses and its peer link, and the controller's
    link (kept when present)."""
    net = state.net()
    if run(["ip", "-n", net.fabric, "link", "show", PEER_BRIDGE], check=False).returncode != 0:
        run(["ip", "-n", net.fabric, "link", "add", PEER_BRIDGE, "type", "bridge", "stp_state", "0",
             "forward_delay", "0"])  # fmt: skip
    run(["ip", "-n", net.fabric, "link", "set", PEER_BRIDGE, "up"])
    for m in ["controller", *ETCD_MEMBERS]:
        node = state.node(m) if m == "controller" else state.etcd_member(m)
        if m != "controller":
            net.add_node(node)
        port = f"{m[:3]}-{PEER_NIC}"
        if run(["ip", "-n", net.fabric, "link", "show", port], check=False).returncode != 0:
            run(["ip", "-n", net.fabric, "link", "add", port, "type", "veth", "peer", "name", PEER_NIC,
                 "netns", node.netns])  # fmt: skip
        run(["ip", "-n", net.fabric, "link", "set", port, "master", PEER_BRIDGE, "up"])
        run(["ip", "-n", node.netns, "addr", "replace", f"{state.etcd_control_address(m)}/24", "dev", PEER_NIC])
        run(["ip", "-n", node.netns, "link", "set", PEER_NIC, "up"])


def running(state: LabState) -> list[str]:
    return [m for m in ETCD_MEMBERS if pid_alive(state.controller.pids.get(role(m), 0))]


def start(state: LabState, members: list[str]) -> None:
    """Starts those members not running; waits for their health when a quorum runs afterwards (a lone
    member answers nothing that needs the leader). The caller saves the state."""
    procs = []
    for m in members:
        if m in running(state):
            continue
        proc = _process(state, m)
        try:
            proc.start(wait=False)
        except OSError as e:
            raise LabError(f"etcd member {m}: cannot start: {e}") from None
        assert proc.pid is not None
        state.controller.pids[role(m)] = proc.pid
        procs.append(proc)
    if len(running(state)) * 2 <= len(ETCD_MEMBERS):
        return
    for proc in procs:
        try:
            proc.wait_ready()
        except EtcdStartError as e:
            raise LabError(f"etcd member {proc.name} did not start in {proc.netns}: {e}") from None


def crash(state: LabState, member: str) -> None:
    """SIGKILL to the member's recorded PID (a crash: its data stays for the restart)."""
    pid = state.controller.pids.get(role(member), 0)
    if not pid_alive(pid):
        raise LabError(f"etcd member {member} does not run (recorded pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    kill_pids([pid], grace=None)  # waits until it is gone (and reaps it, when it is our child)


def status(state: LabState) -> list[dict[str, Any]]:
    """[{"name", "up", "leader"}]: up when the process runs and answers; leader as the member says."""
    out = []
    alive = running(state)
    for m in ETCD_MEMBERS:
        st = _endpoint_status(state, m) if m in alive else None
        leader = st is not None and st.get("leader") == st.get("header", {}).get("member_id")
        out.append({"name": m, "up": st is not None, "leader": bool(leader)})
    return out


def leader(state: LabState) -> str | None:
    return next((m["name"] for m in status(state) if m["leader"]), None)


def _endpoint_status(state: LabState, member: str) -> dict[str, Any] | None:
    """The member's own status (answered without quorum), asked over the first plane it answers on."""
    tls = state.pki.client(ROOT)
    node = state.node("controller")
    for url in [state.etcd_member_url(member, p) for p in PLANES]:
        cp = run(["ip", "netns", "exec", node.netns, "env", "ETCDCTL_API=3", ETCDCTL, f"--endpoints={url}",
                  f"--cacert={tls.ca}", f"--cert={tls.cert}", f"--key={tls.key}",
                  f"--dial-timeout={STATUS_TIMEOUT:.0f}s", f"--command-timeout={STATUS_TIMEOUT:.0f}s",
                  "endpoint", "status", "-w", "json"], check=False, timeout=STATUS_TIMEOUT + 3)  # fmt: skip
        if cp.returncode != 0:
            continue
        try:
            rows = json.loads(cp.stdout)
            st = rows[0]["Status"]
        except (ValueError, LookupError, TypeError):
            continue  # not what etcdctl prints: try the next plane
        if isinstance(st, dict):
            return st
    return None
