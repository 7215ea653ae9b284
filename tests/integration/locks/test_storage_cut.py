"""Storage-plane cut: host A reaches the lease storage over sshfs on its storage NIC (lab namespaces,
prefix vt2); the NIC goes down. A's sanlock fails the lockspace and kills the holder; A's agent,
asked over etcd, attests the exit; the manager resets the lease and takes it long before host_dead.

Simplification, on purpose: etcd runs on the machine's loopback and A's agent joins A's mount
namespace only (it talks to A's sanlock daemon and sees A's mount) but not A's network namespace,
since the manager (this process) must reach the same etcd. What is cut is A's storage path, which
is what this test is about; the management plane is not involved in the fault.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lockhelp import IO, LockCluster, SimHost, join_both, leave_manager, new_lockspace

from vmha.core.fencing import ProofMethod
from vmha.core.planes import Plane
from vmha.etcd.attest import AttestResponse, request_attestation
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.net import LabNet, Node, kill_pids
from vmha.lab.net import pid_alive as alive
from vmha.lab.sanlockd import LabSanlock, start_sanlock, stop_sanlock
from vmha.lab.storage import MOUNT_POINT, SharedStorage
from vmha.locks import LockSpace
from vmha.testing.etcd import EtcdProcess

pytestmark = pytest.mark.integration

K = Keys("vt2")


@dataclass
class StorageLab:
    net: LabNet
    host: Node
    cluster: LockCluster
    agent_side: SimHost  # A's mount namespace, the machine's network (reaches etcd on loopback)


@pytest.fixture
def storage_lab(manager_sanlock: LabSanlock, tmp_path: Path) -> Iterator[StorageLab]:
    net = LabNet("vt2", log_dir=tmp_path / "logs")
    net.destroy()  # leftovers of an interrupted run of this test (vt2- namespaces are ours)
    export = tmp_path / "export"
    storage = SharedStorage(export, tmp_path / "state", tmp_path / "logs")
    daemon: LabSanlock | None = None
    sshd = sshfs = 0
    host = net.host(1)
    space: LockSpace | None = None
    cluster: LockCluster | None = None
    a: SimHost | None = None
    agent_side: SimHost | None = None
    try:
        ctl = net.controller()
        net.add_node(ctl)
        ctl = net.start_anchor(ctl)
        net.add_node(host)
        host = net.start_anchor(host)
        sshd = storage.start_server(ctl)
        sshfs = storage.mount(host, ctl.address(Plane.STORAGE))
        space = new_lockspace(export)  # the manager reads the export directly: its storage is not cut
        space.init()
        space.create_lease("vm1")
        daemon = start_sanlock("vt2a", enter=host.enter(), kill_grace=5, log_path=tmp_path / "logs" / "a-sanlock.log")
        args: dict[str, object] = {"path": str(MOUNT_POINT), "lockspace": space.name, "io": IO}
        a = SimHost("vt2a", daemon, args, Path("/run/vmha"), enter=tuple(host.enter()))
        mount_only = ("nsenter", "-t", str(host.anchor), "-m", "--")
        agent_side = SimHost("vt2a", daemon, args, Path("/run/vmha"), enter=mount_only)
        cluster = LockCluster(space, a)
        join_both(space, a)
        yield StorageLab(net, host, cluster, agent_side)
    finally:
        for h in (a, agent_side):
            if h is not None:
                h.stop_procs()
        if host.anchor:
            net.set_link(host, Plane.STORAGE, True)
        if daemon is not None:
            stop_sanlock(daemon)
        if sshfs:
            storage.unmount(host, sshfs)
        if sshd:
            kill_pids([sshd])
        net.destroy()
        if cluster is not None:
            cluster.release_all()
        if space is not None:
            leave_manager(space)


@pytest.mark.parametrize("holder_kind", ["recorded", "unrecorded-ignoring-sigterm"])
async def test_storage_cut_gives_exit_attested_proof(storage_lab: StorageLab, etcd: EtcdProcess,
                                                     holder_kind: str) -> None:
    """recorded: a VM process that took its lease through vmha (the agent checks its pid).
    unrecorded-ignoring-sigterm: a holder the agent does not know (as a QEMU whose lease libvirt took)
    that survives sanlock's SIGTERM: the attestation then rests on sanlock removing the failed
    lockspace only once the holder is gone (SIGKILL after kill_grace, 5 s here)."""
    lab = storage_lab
    # Auth on: A's agent answers as vt2a, the manager (this process) asks as vt2mgr.
    await etcd.setup_auth("vt2", ["vt2a"], ["vt2mgr"])
    tls = etcd.tls("vt2a")
    assert tls is not None
    lab.agent_side.start("agent", "serving", etcd=etcd.client_urls[0], cluster="vt2", host="vt2a",
                         tls={f: str(getattr(tls, f)) for f in ("ca", "cert", "key")})
    if holder_kind == "recorded":
        holder = lab.cluster.a.start("hold", "held", vm="vm1")
    else:
        holder = lab.cluster.a.start("hold", "held", vm="vm1", ignore_term=True, vmha_run="/run/vmha/elsewhere")
    async with EtcdClient(etcd.client_urls, tls=etcd.tls("vt2mgr"), timeout=1.0) as client:

        async def attest(host: str, vm: str, timeout: float) -> AttestResponse:
            return await request_attestation(client, K, host, vm, timeout, poll=0.1)

        prover = lab.cluster.prover(attest=attest)
        t_cut = time.monotonic()
        lab.net.set_link(lab.host, Plane.STORAGE, False)
        proof = await prover.prove("vm1", "vt2a", (ProofMethod.LEASE_TAKEN, ProofMethod.EXIT_ATTESTED),
                                   timeout=8 * IO + 4 * IO + 10)
        took = time.monotonic() - t_cut
        assert not alive(holder.pid), "exit-attested proof returned while the holder is alive"
    print(f"exit-attested proof {took:.2f} s after the storage cut (io_timeout {IO}); "
          f"host states {proof.details['host_states']}\n{proof.details['trail']}")
    assert proof.method is ProofMethod.EXIT_ATTESTED
    assert "lockspace=absent" in proof.details["trail"]
    # A could not write its release to the cut storage: the lease was still A's, reset on the evidence.
    assert "lease reset (owners were host_id=1" in proof.details["trail"]
    assert "host_id=2" in proof.details["owners_after"]
    # Stopped by A's sanlock, not by the test: SIGTERM, or SIGKILL after kill_grace when ignored.
    assert holder.wait(timeout=5) == (-15 if holder_kind == "recorded" else -9)
