"""Leases and fence proofs between two real sanlock hosts (io_timeout 1).

Every proof is checked against the holder: when prove() returns, the holder process must be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from lockhelp import A_HOST_ID, IO, LockCluster, new_lockspace

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.etcd import hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.net import pid_alive as alive
from vmha.lab.sanlockd import LabSanlock, stop_sanlock
from vmha.locks import (
    HostIdCollision,
    IoTimeoutMismatch,
    LeaseAreaError,
    LeaseBusy,
    LeaseMissing,
    LockSpace,
    ProofRefused,
    Prover,
    acquire_for,
    acquire_self,
    inquire,
    membership,
    release_for,
)
from vmha.locks.cli import locks
from vmha.testing.etcd import EtcdProcess
from vmha.testing.wait import until, until_sync

pytestmark = pytest.mark.integration


async def prove_watching(cluster: LockCluster, pid: int, methods: tuple[ProofMethod, ...], timeout: float,
                         **kw: object) -> tuple[FenceProof, float]:
    """Runs the proof while checking the holder every 20 ms; returns the proof and its duration.
    Fails if the proof returned while the holder was alive."""
    prover = cluster.prover(**kw)  # type: ignore[arg-type]
    t0 = time.monotonic()
    task = asyncio.create_task(prover.prove("vm1", cluster.a.name, methods, timeout))
    while not task.done():
        await asyncio.sleep(0.02)
    proof = task.result()
    assert not alive(pid), f"proof {proof.method} returned while holder {pid} is alive"
    return proof, time.monotonic() - t0


async def test_lease_held_on_a_cannot_be_taken_from_b(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1")
    with pytest.raises(LeaseBusy, match=r"vm1.*held by another live host"):
        acquire_self(cluster.space, "vm1")
    with pytest.raises(ProofRefused, match="lease held by another host") as e:
        await cluster.prover().prove("vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=5)
    assert "lease-taken" in e.value.attempts[0]
    assert alive(holder.pid)
    owners = cluster.space.owners("vm1")
    assert [o.host_id for o in owners] == [1]


async def test_request_force_kills_the_holder_and_takes_the_lease(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1")
    proof, took = await prove_watching(
        cluster, holder.pid, (ProofMethod.LEASE_TAKEN, ProofMethod.REQUEST_FORCE), timeout=30)
    print(f"request-force proof in {took:.2f} s (io_timeout {IO}): {proof.details['trail']}")
    assert proof.method is ProofMethod.REQUEST_FORCE
    assert holder.wait(timeout=5) == -9  # killed by A's sanlock, not by us
    assert "host_id=2" in proof.details["owners_after"]
    assert "lease-taken" in proof.details["failed_methods"]


async def test_request_force_proves_two_vms_of_one_host_one_after_the_other(cluster: LockCluster) -> None:
    """A's sanlock takes no new request from the manager's host within 6 io of the last one, and the
    manager's daemon flags a request for only 6 io: a second request right after the first is lost
    unless the prover repeats it. Both proofs must come."""
    cluster.space.create_lease("vm2")
    holders = {vm: cluster.a.start("hold", "held", vm=vm) for vm in ("vm1", "vm2")}
    prover = cluster.prover()
    for vm, holder in holders.items():
        t0 = time.monotonic()
        task = asyncio.create_task(prover.prove(vm, cluster.a.name, (ProofMethod.REQUEST_FORCE,), timeout=30))
        while not task.done():
            await asyncio.sleep(0.02)
        proof = task.result()
        assert not alive(holder.pid), f"proof of {vm} returned while holder {holder.pid} is alive"
        print(f"{vm}: request-force proof in {time.monotonic() - t0:.2f} s: {proof.details['trail']}")
        assert proof.method is ProofMethod.REQUEST_FORCE and holder.wait(timeout=5) == -9
    assert prover.held() == ["vm1", "vm2"]


async def test_isolation_response_stops_holders_then_lease_is_free(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1", ignore_term=True)
    out = cluster.a.run("isolate", grace=1.0)
    assert f"killed=vm1:{holder.pid}" in out and "survivors=-" in out
    proof, _ = await prove_watching(cluster, holder.pid, (ProofMethod.LEASE_TAKEN,), timeout=10)
    assert proof.method is ProofMethod.LEASE_TAKEN


async def test_released_lease_moves_to_the_manager_and_back(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1")
    holder.terminate()
    assert holder.wait(timeout=5) == -15
    prover = cluster.prover()
    proof = await prover.prove("vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=10)
    assert prover.held() == ["vm1"] and proof.method is ProofMethod.LEASE_TAKEN
    # Held by the manager: a new VM process on host A is refused.
    with pytest.raises(AssertionError, match="LeaseBusy: VM vm1"):
        cluster.a.start("hold", "held", vm="vm1", timeout=10)
    await prover.release("vm1")
    again = cluster.a.start("hold", "held", vm="vm1")
    assert alive(again.pid)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_lease_area_is_named(manager_sanlock: LabSanlock, tmp_path: Path) -> None:
    space = LockSpace(tmp_path / "not-mounted", "vt2x", IO)
    with pytest.raises(LeaseAreaError, match=r"lease area .*not-mounted is missing.*vmha locks init"):
        space.join(2, "vt2mgr")
    (tmp_path / "not-mounted").mkdir()
    with pytest.raises(LeaseAreaError, match=r"not-mounted/vt2x.ids is missing or unreadable .*vmha locks init"):
        space.join(2, "vt2mgr")
    space.ids_path.write_bytes(b"\xff" * 4096)  # a torn or foreign file: unreadable as a lockspace
    with pytest.raises(LeaseAreaError, match=r"vt2x.ids is missing or unreadable .*fix the mount of locks.path"):
        space.join(2, "vt2mgr")
    other = new_lockspace(tmp_path / "other")
    other.init()
    os.replace(other.ids_path, space.ids_path)  # a lockspace of another name under ours
    with pytest.raises(LeaseAreaError, match=rf"vt2x.ids holds lockspace b'{other.name}', not 'vt2x'.*locks.lockspace"):
        space.join(2, "vt2mgr")
    assert space.local_state() == "absent"  # never joined without protection


def test_lockspace_with_another_io_timeout_is_refused(manager_sanlock: LabSanlock, tmp_path: Path) -> None:
    space = new_lockspace(tmp_path / "shared")
    space.init()
    other = LockSpace(space.path, space.name, io_timeout=2)
    with pytest.raises(IoTimeoutMismatch, match=rf"{space.ids_path} was initialised with io_timeout 1, the config "
                       r"says 2: every host .*set locks.io_timeout = 1, or re-initialise"):
        other.join(2, "vt2mgr")
    with pytest.raises(IoTimeoutMismatch):
        other.init()
    assert space.local_state() == "absent"  # nothing was joined


def test_protected_vm_without_lease_is_refused(manager_sanlock: LabSanlock, tmp_path: Path) -> None:
    space = new_lockspace(tmp_path / "shared")
    space.init()
    fix = "create it with `vmha locks init --vm vm9`; the VM must not start without it"
    with pytest.raises(LeaseMissing, match=rf"VM vm9 is protected but has no usable lease .*vm9.lease .*{fix}"):
        acquire_self(space, "vm9")
    (space.path / "vm9.lease").write_bytes(b"\0" * 4096)  # a file that is not a lease
    with pytest.raises(LeaseMissing, match=rf"VM vm9 .*vm9.lease .*{fix}"):
        acquire_self(space, "vm9")
    space.create_lease("vm8")
    os.replace(space.lease_path("vm8"), space.lease_path("vm9"))  # another VM's lease under vm9's name
    with pytest.raises(LeaseMissing, match=rf"vm9.lease is a lease of b'{space.name}'/b'vm8', not "
                       rf"{space.name}/vm9: remove it and run `vmha locks init --vm vm9`"):
        acquire_self(space, "vm9")


async def test_protected_vm_without_lease_gets_no_proof(cluster: LockCluster) -> None:
    with pytest.raises(ProofRefused, match="vm2 is protected but has no usable lease"):
        await cluster.prover().prove("vm2", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=5)


def test_host_id_collision_is_detected_in_seconds(cluster: LockCluster, tmp_path: Path) -> None:
    # The manager's daemon already joined as host_id 2; a second lockspace view claiming host A's
    # id 1 under another name must be refused before sanlock's own 69 s wait.
    t0 = time.monotonic()
    with pytest.raises(HostIdCollision, match=rf"host_id 1 in {cluster.space.ids_path} is in use by live host "
                       r"'vt2a', not 'vt2other'.*let etcd allocate it"):
        cluster.space.check_host_id(1, "vt2other")
    print(f"collision detected in {time.monotonic() - t0:.1f} s")
    # The same through join(), as an agent given a colliding id would call it.
    with pytest.raises(HostIdCollision, match="in use by live host 'vt2a'"):
        cluster.space.join(1, "vt2other")
    assert cluster.space.local_state() == "joined" and cluster.space.joined(2)  # host_id 2 untouched


class KillHostA:
    """The lab's kind of power fence for this two-daemon setup: kill every process of host A (its
    holders and its sanlock daemon) by pid and confirm they are gone."""

    def __init__(self, cluster: LockCluster, takes: float = 0.0) -> None:
        self.cluster = cluster
        self.takes = takes  # how long the fence takes after the kill, as a BMC's power_wait
        self.calls = 0
        self.running = self.most_at_once = 0

    async def power_off(self, host: str, timeout: float) -> str:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            return await self._power_off(timeout)
        finally:
            self.running -= 1

    async def _power_off(self, timeout: float) -> str:
        pids = [p.pid for p in self.cluster.a.procs] + [self.cluster.a.daemon.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.cluster.a.procs:
            p.wait(timeout=timeout)
        await until(lambda: not any(alive(p) for p in pids), "host A's processes gone after SIGKILL",
                    timeout=timeout, interval=0.02)  # fmt: skip
        await asyncio.sleep(self.takes)
        return f"killed {pids}"


async def test_power_fence_proof_resets_and_takes_the_lease(cluster: LockCluster) -> None:
    cluster.space.create_lease("vm2")
    holder = cluster.a.start("hold", "held", vm="vm1")
    holder2 = cluster.a.start("hold", "held", vm="vm2")
    # Host A's sanlock dies first (it lost its storage, or the host hangs): its lockspace is no longer
    # renewed while the holder still runs. Only then may the power fence act.
    os.kill(cluster.a.daemon.pid, signal.SIGKILL)
    power = KillHostA(cluster, takes=1.0)
    methods = (ProofMethod.LEASE_TAKEN, ProofMethod.POWER)
    # Both VMs of host A proved at once by one prover, as the manager does: never two power-offs of
    # one host at once (the second proof shares the first one's, or, if it comes later, runs its own).
    prover = cluster.prover(power=power)
    t0 = time.monotonic()
    proof, proof2 = await asyncio.gather(prover.prove("vm1", cluster.a.name, methods, 30),
                                         prover.prove("vm2", cluster.a.name, methods, 30))
    took = time.monotonic() - t0
    assert not alive(holder.pid) and not alive(holder2.pid)
    print(f"power proofs in {took:.2f} s (of which one renewal period to see host A not renew)")
    assert proof.method is ProofMethod.POWER and proof2.method is ProofMethod.POWER
    assert power.most_at_once == 1 and power.calls in (1, 2), (power.calls, power.most_at_once)
    assert "no longer renews its lockspace" in proof.details["trail"]
    assert "lease reset (owners were host_id=1" in proof.details["trail"]


async def test_power_fence_spares_a_host_that_renews_its_lockspace(cluster: LockCluster) -> None:
    """Host A is alive on the shared storage (only its agent or etcd paths failed): no power-off."""
    holder = cluster.a.start("hold", "held", vm="vm1")
    power = KillHostA(cluster)
    with pytest.raises(ProofRefused, match="still renews its lockspace") as e:
        await cluster.prover(power=power).prove(
            "vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN, ProofMethod.POWER), timeout=15)
    assert power.calls == 0 and alive(holder.pid)
    assert [a.split(":")[0] for a in e.value.attempts] == ["lease-taken", "power"]


@pytest.mark.parametrize("case", ["no record", "another host's record", "host_id 0"])
async def test_power_fence_needs_sanlocks_own_stale_record_of_the_host(cluster: LockCluster, case: str) -> None:
    """etcd's host_id for a host is only a claim (a forged hostid/ key): the power method acts only on
    sanlock's own delta lease for that id, naming the host and not renewed. Host A is dead on the
    storage (its daemon killed): without these checks each case below would power it off."""
    holder = cluster.a.start("hold", "held", vm="vm1")
    os.kill(cluster.a.daemon.pid, signal.SIGKILL)
    host, host_id, refusal = {
        "no record": (cluster.a.name, 7, "host_id 7 has no delta lease"),
        "another host's record": ("ghost", A_HOST_ID, f"host_id {A_HOST_ID}'s delta lease names '{cluster.a.name}'"),
        "host_id 0": (cluster.a.name, 0, "host_id 0 is outside sanlock's 1.."),
    }[case]

    async def host_id_of(_host: str) -> int | None:
        return host_id

    power = KillHostA(cluster)
    prover = Prover(cluster.space, host_id_of=host_id_of, power=power, poll=0.1)
    cluster.provers.append(prover)
    with pytest.raises(ProofRefused, match=refusal):
        await prover.prove("vm1", host, (ProofMethod.POWER,), timeout=15)
    assert power.calls == 0 and alive(holder.pid)


def locks_config(space: LockSpace, path: Path) -> Path:
    path.write_text(
        '[cluster]\nname = "vt2"\n'
        + "".join(f'[planes.{p}]\nendpoints = ["http://198.18.1.1:2379"]\n' for p in ("management", "storage",
                                                                                    "service"))
        + '[etcd]\ninsecure = true\n'
        + f'[locks]\npath = "{space.path}"\nlockspace = "{space.name}"\nio_timeout = {IO}\n'
    )
    return path


def test_cli_init_and_status(manager_sanlock: LabSanlock, tmp_path: Path) -> None:
    space = new_lockspace(tmp_path / "shared")
    cfg = locks_config(space, tmp_path / "vmha.toml")
    r = CliRunner().invoke(locks, ["init", "--config", str(cfg), "--vm", "vm1", "--vm", "vm2"])
    assert r.exit_code == 0, r.output
    assert f"lockspace {space.name}" in r.output and "lease of VM vm2" in r.output
    r = CliRunner().invoke(locks, ["status", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["this_host"] == "absent" and st["hosts"] == []
    assert st["leases"] == {"vm1": [], "vm2": []}
    cfg.write_text(cfg.read_text().replace(f"io_timeout = {IO}", "io_timeout = 3"))
    r = CliRunner().invoke(locks, ["status", "--config", str(cfg)])
    assert r.exit_code == 1 and "initialised with io_timeout 1, the config says 3" in r.output


def test_cli_status_shows_hosts_and_lease_owners(cluster: LockCluster, tmp_path: Path) -> None:
    cluster.space.create_lease("vm2")
    cluster.a.start("hold", "held", vm="vm1")
    cfg = locks_config(cluster.space, tmp_path / "vmha.toml")

    def status() -> dict[str, Any]:
        r = CliRunner().invoke(locks, ["status", "--config", str(cfg), "--json"])
        assert r.exit_code == 0, r.output
        return cast(dict[str, Any], json.loads(r.output))

    # Right after joining, this daemon reports a host "unknown" until it has watched it renew (every
    # 2 io): wait until no host and no lease owner is, not only the first host (asserted on all).
    def settled() -> dict[str, Any] | None:
        st = status()
        owners = [o for of_vm in st["leases"].values() for o in of_vm]
        return None if any(x["state"] == "unknown" for x in [*st["hosts"], *owners]) else st

    st = until_sync(settled, "no host or lease owner 'unknown'", timeout=4 * IO + 5, interval=0.2)
    assert st["this_host"] == "joined"
    assert {h["host_id"]: (h["name"], h["state"]) for h in st["hosts"]} == {1: ("vt2a", "live"),
                                                                          2: ("vt2mgr", "live")}
    assert [(o["host_id"], o["name"], o["state"]) for o in st["leases"]["vm1"]] == [(1, "vt2a", "live")]
    assert st["leases"]["vm2"] == []
    r = CliRunner().invoke(locks, ["status", "--config", str(cfg)])
    assert r.exit_code == 0 and "vt2a(id 1)" in r.output, r.output


def test_acquire_on_behalf_of_a_registered_process(cluster: LockCluster) -> None:
    # The child registers with the (manager host's) daemon and keeps the connection; the parent
    # takes the lease for it, as a VM launcher does for the VM process.
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal; from vmha.locks import register_self as r\n"
         "fd = r(); print('registered', flush=True); signal.pause()"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "registered"
        acquire_for(cluster.space, "vm1", child.pid)
        assert inquire(cluster.space, child.pid) == ["vm1"]
        assert [o.host_id for o in cluster.space.owners("vm1")] == [2]
        release_for(cluster.space, "vm1", child.pid)
        assert inquire(cluster.space, child.pid) == []
        assert cluster.space.owners("vm1") == []
        acquire_for(cluster.space, "vm1", child.pid)
    finally:
        child.kill()
        child.wait(timeout=5)
    # The holder died: sanlock released its lease, host A may take it.
    holder = cluster.a.start("hold", "held", vm="vm1")
    assert alive(holder.pid)


async def test_agent_join_uses_the_allocated_host_id_and_leaves(manager_sanlock: LabSanlock, tmp_path: Path,
                                                                etcd: EtcdProcess) -> None:
    space = new_lockspace(tmp_path / "shared")
    space.init()
    keys = Keys("vt2")
    async with EtcdClient(etcd.client_urls, tls=etcd.tls(), timeout=2.0) as client:
        await client.create(keys.host_id(1), {"host": "someone-else"})
        with pytest.raises(membership.NoHostId, match="no sanlock host_id in etcd yet"):
            await membership.join(space, client, keys, "vt2mgr")  # an agent never allocates one
        assert await hostids.host_ids(client, keys) == {1: "someone-else"}
        await hostids.allocate(client, keys, "vt2mgr")  # a manager does
        host_id = await membership.join(space, client, keys, "vt2mgr", timeout=30)
        try:
            assert host_id == 2 and space.joined(2) and space.local_state() == "joined"
            assert await membership.join(space, client, keys, "vt2mgr") == 2  # again: same id, no-op
        finally:
            await membership.leave(space, host_id)
    assert space.local_state() == "absent"


def test_exit_attestation_refuses_while_anything_may_write(cluster: LockCluster) -> None:
    holder = cluster.a.start("hold", "held", vm="vm1")
    r = json.loads(cluster.a.run("attest", vm="vm1"))
    assert not r["ok"] and r["reason"] == f"holders still alive: pid={holder.pid}"
    holder.kill()
    holder.wait(timeout=5)
    r = json.loads(cluster.a.run("attest", vm="vm1"))
    assert not r["ok"] and "is joined: this host's sanlock still renews it" in r["reason"]
    assert r["holders"] == f"pid={holder.pid}:gone"
    stop_sanlock(cluster.a.daemon)  # a crashed daemon vouches for nothing
    r = json.loads(cluster.a.run("attest", vm="vm1"))
    assert not r["ok"] and r["lockspace"] == "no-daemon" and "holders unknown" in r["reason"]
