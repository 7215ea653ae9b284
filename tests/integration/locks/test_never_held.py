"""No vacuous proof: a free lease proves a VM stopped only if a process on the VM's host held it.

A VM that runs without its lease (on a real host: QEMU under libvirt without lock_manager = "sanlock")
leaves the lease free from the start: lease-taken, request-force, exit-attested and host-dead (DEAD
vouches only for lease holders; see vmha/model/fencing.pml, variant host-dead-never-held) must refuse it,
naming the VM, the host and what the lease's leader record shows, with an alert. Real sanlock (two
daemons, io_timeout 1); the leader record is read from storage as sanlock wrote it.
"""

from __future__ import annotations

import os
import signal

import pytest
from lockhelp import (
    A_HOST_ID,
    FREE_LEASE_METHODS,
    MGR_HOST_ID,
    LockCluster,
    assert_never_held_refused,
    held_then_released,
)
from test_leases import KillHostA

from vmha.core.fencing import ProofMethod
from vmha.etcd.attest import AttestResponse
from vmha.locks import PaxosLeader

pytestmark = pytest.mark.integration


class AttestsOk:
    """An agent that attests "no holders left, lockspace lost" for anything it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, host: str, vm: str, timeout: float) -> AttestResponse:
        self.asked.append(vm)
        return AttestResponse(vm, host, "n", True, "holders gone and lockspace lost")


async def test_a_lease_never_held_gives_no_proof_and_an_alert(cluster: LockCluster) -> None:
    assert cluster.space.leader("vm1") == PaxosLeader(owner_id=0, owner_generation=0, lver=0, timestamp=0)
    attest = AttestsOk()
    refused = await assert_never_held_refused(
        cluster.prover(attest=attest), "vm1", cluster.a.name,
        r"was never acquired since it was initialised or reset \(lver 0\)",
        (*FREE_LEASE_METHODS, ProofMethod.HOST_DEAD))
    assert attest.asked == []  # refused before the agent was even asked
    assert cluster.space.leader("vm1").lver == 0  # nothing taken, nothing reset
    print(f"refused: {refused.alert}")


async def test_a_lease_held_then_released_on_the_host_proves(cluster: LockCluster) -> None:
    for vm in ("vm2", "vm3"):
        cluster.space.create_lease(vm)
    for vm in ("vm1", "vm2", "vm3"):
        held_then_released(cluster.a, vm)
    # A release keeps the last owner in the leader record; only the timestamp says "free".
    leader = cluster.space.leader("vm1")
    assert (leader.owner_id, leader.lver, leader.timestamp) == (A_HOST_ID, 1, 0) and leader.owner_generation > 0
    prover = cluster.prover(attest=AttestsOk())
    for vm, method in (("vm1", ProofMethod.LEASE_TAKEN), ("vm2", ProofMethod.REQUEST_FORCE),
                       ("vm3", ProofMethod.EXIT_ATTESTED)):
        proof = await prover.prove(vm, cluster.a.name, (method,), timeout=20)
        assert proof.method is method and "alert" not in proof.details
        assert f"leader record owner_id={A_HOST_ID} " in proof.details["trail"]
    assert prover.held() == ["vm1", "vm2", "vm3"]
    assert cluster.space.leader("vm1").owner_id == MGR_HOST_ID  # the manager's acquire made it the owner


async def test_a_lease_last_held_by_another_host_gives_no_proof(cluster: LockCluster) -> None:
    """The manager proved the VM once and released the lease for the restart, but the restarted copy
    never took it: the lease's last owner is the manager's host, which says nothing about A's copy."""
    held_then_released(cluster.a, "vm1")
    first = cluster.prover()
    await first.prove("vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=20)
    await first.release("vm1")
    await assert_never_held_refused(
        cluster.prover(attest=AttestsOk()), "vm1", cluster.a.name,
        rf"was last held by host_id {MGR_HOST_ID} \(gen \d+, lver 2\), not by {cluster.a.name}'s host_id {A_HOST_ID}")
    # Once a process on A holds and releases it, it is evidence again.
    held_then_released(cluster.a, "vm1")
    proof = await cluster.prover().prove("vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=20)
    assert proof.method is ProofMethod.LEASE_TAKEN


async def test_power_still_proves_a_never_held_lease_with_the_alert(cluster: LockCluster) -> None:
    """Power is evidence about the host itself: it proves, and the proof keeps the alert."""
    os.kill(cluster.a.daemon.pid, signal.SIGKILL)  # A stops renewing its lockspace: the fence may act
    proof = await cluster.prover(power=KillHostA(cluster)).prove(
        "vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN, ProofMethod.POWER), timeout=30)
    assert proof.method is ProofMethod.POWER
    assert "was never acquired" in proof.details["alert"]
    assert "lease-taken: VM vm1: its lease" in proof.details["failed_methods"]
