"""`vmha bench locks`: time to fence proof per method, and lease acquire/release throughput.

Runs its own lab sanlock daemons (LAB ONLY: no watchdog, see vmha.lab.sanlockd) in a temporary
directory: this process is the manager's host (host_id 2), host A (host_id 1) is another daemon
whose VM holders run as subprocesses. exit-attested builds a small namespace lab (prefix vt2b):
A reaches the lease storage over sshfs on its storage NIC, which the benchmark cuts; etcd runs on
the loopback and A's agent joins A's mount namespace only. Prints numbers; never pass/fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from vmha.core.fencing import ProofMethod
from vmha.core.planes import Plane
from vmha.etcd.attest import AttestResponse, request_attestation
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.net import LabNet, Node, kill_pids, pid_alive
from vmha.lab.pki import Pki
from vmha.lab.sanlockd import LabSanlock, start_sanlock, stop_sanlock
from vmha.lab.storage import MOUNT_POINT, SharedStorage
from vmha.locks import LeaseHold, LockSpace, Prover
from vmha.locks.power import FenceAgentPower, fence_agents
from vmha.testing.etcd import EtcdProcess
from vmha.testing.ipmi import IpmiSim

A_ID, MGR_ID = 1, 2
# fence-agent: the production power fence alone (FenceAgentPower through fence_ipmilan and ipmitool)
# against OpenIPMI's ipmi_sim, a fresh simulated BMC per run; no proof around it.
METHODS = ("request-force", "power", "exit-attested", "host-dead", "fence-agent")

# What runs on host A, as `python -c` programs (each host's clients are processes of their own).
_JOIN = "from vmha.locks import LockSpace as S; S({path!r}, {ls!r}, {io}).join(1, 'vt2ba', timeout=60)"
_HOLD = ("import signal; from vmha.locks import LockSpace as S, acquire_self as a\n"
         "h = a(S({path!r}, {ls!r}, {io}), {vm!r}); print('held', flush=True); signal.pause()")
_AGENT = """
import asyncio
from vmha.etcd.attest import serve_attestations
from pathlib import Path
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles
from vmha.locks import LockSpace, attest_exit
s = LockSpace({path!r}, {ls!r}, {io})
tls = TlsFiles(*(Path(f) for f in {tls!r}))
async def check(vm):
    return await asyncio.to_thread(attest_exit, s, vm)
async def main():
    async with EtcdClient([{etcd!r}], timeout=1.0, tls=tls) as c:
        print("serving", flush=True)
        await serve_attestations(c, Keys("vt2b"), "vt2ba", check, poll=0.1)
asyncio.run(main())
"""


class HostA:
    """Host A: its daemon and the processes run on it."""

    def __init__(self, base: Path, path: str, lockspace: str, io: int, enter: tuple[str, ...] = ()) -> None:
        self.base, self.path, self.lockspace, self.io, self.enter = base, path, lockspace, io, enter
        self.daemon: LabSanlock | None = None
        self.procs: list[subprocess.Popen[str]] = []

    def env(self) -> dict[str, str]:
        assert self.daemon is not None
        return {**self.daemon.env(), "VMHA_RUN_DIR": str(self.base / "a-vmha")}

    def boot(self) -> subprocess.Popen[str]:
        """Starts A's daemon and its join (returns the join process: wait for it)."""
        run_dir = None if self.enter else self.base / "a-run"
        self.daemon = start_sanlock("vt2ba", run_dir=run_dir, enter=self.enter, kill_grace=5,
                                    log_path=self.base / "a-sanlock.log")
        return self.spawn(_JOIN.format(path=self.path, ls=self.lockspace, io=self.io))

    def spawn(self, code: str, enter: tuple[str, ...] | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen([*(self.enter if enter is None else enter), sys.executable, "-c", code], env=self.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        return p

    def hold(self, vm: str) -> subprocess.Popen[str]:
        p = self.spawn(_HOLD.format(path=self.path, ls=self.lockspace, io=self.io, vm=vm))
        assert p.stdout is not None
        if p.stdout.readline().strip() != "held":
            raise click.ClickException(f"host A could not take the lease of {vm}")
        return p

    def kill_daemon(self) -> None:
        """A's sanlock daemon dies: its lockspace is no longer renewed while its holders run on."""
        assert self.daemon is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.daemon.pid, signal.SIGKILL)
        stop_sanlock(self.daemon)  # reaps it
        self.daemon = None

    def power_off(self) -> list[int]:
        """Kills every process of A (its holders and its daemon) by pid."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        if self.daemon is not None:
            pids.append(self.daemon.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=10)
        if self.daemon is not None:
            stop_sanlock(self.daemon)  # reaps it
        self.procs.clear()
        self.daemon = None
        return pids

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        self.procs.clear()
        if self.daemon is not None:
            stop_sanlock(self.daemon)
            self.daemon = None


class KillPower:
    def __init__(self, a: HostA) -> None:
        self.a = a

    async def power_off(self, host: str, timeout: float) -> str:
        return f"killed {await asyncio.to_thread(self.a.power_off)}"


@click.command(name="locks")
@click.option("--leases", default=1000, show_default=True, help="leases for the throughput run")
@click.option("--io-timeout", "io", default=1, show_default=True, help="sanlock io_timeout of the bench lockspace")
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS), help="proof methods (default: all)")
@click.option("--repeat", default=3, show_default=True, help="proofs per fast method")
@click.option("--parallel", default=8, show_default=True, help="threads for the parallel throughput run")
def locks(leases: int, io: int, methods: tuple[str, ...], repeat: int, parallel: int) -> None:
    """Time to fence proof per method, and acquire/release throughput of VM leases (lab daemons)."""
    if os.environ.get("SANLOCK_RUN_DIR"):
        raise click.ClickException("run without SANLOCK_RUN_DIR: the benchmark starts its own daemons")
    chosen = methods or METHODS
    with tempfile.TemporaryDirectory(prefix="vt2b-", dir="/var/tmp") as tmp, _manager(Path(tmp)) as base:
        _throughput(base, leases, io, parallel)
        for m in ("request-force", "power", "host-dead"):
            if m in chosen:
                _proofs(base, io, ProofMethod(m), 1 if m == "host-dead" else repeat)
        if "exit-attested" in chosen:
            _exit_attested(base, io, repeat)
    if "fence-agent" in chosen:
        _fence_agent(max(repeat, 5))


def _fence_agent(repeat: int) -> None:
    times = []
    for _ in range(repeat):
        with IpmiSim() as bmc:
            power = FenceAgentPower(fence_agents({"h1": bmc.power_options()}))
            t0 = time.monotonic()
            evidence = asyncio.run(power.power_off("h1", 30))
            times.append(time.monotonic() - t0)
            if bmc.host_alive():
                raise click.ClickException(f"the simulated host still runs after {evidence!r}")
    text = " ".join(f"{t:.2f}" for t in times)
    click.echo(f"power_off via fence_ipmilan + ipmi_sim: median {statistics.median(times):.2f} s (runs: {text})")


@contextlib.contextmanager
def _manager(base: Path) -> Iterator[Path]:
    # The binding binds this process to the daemon SANLOCK_RUN_DIR names at its first call.
    os.environ["SANLOCK_RUN_DIR"] = str(base / "mgr-run")
    os.environ["VMHA_RUN_DIR"] = str(base / "mgr-vmha")
    d = start_sanlock("vt2bmgr", run_dir=base / "mgr-run", log_path=base / "mgr-sanlock.log")
    try:
        yield base
    finally:
        stop_sanlock(d)


def _space(path: Path, io: int, tag: str) -> LockSpace:
    path.mkdir(parents=True, exist_ok=True)
    space = LockSpace(path, f"vt2b{tag}", io)
    space.init()
    return space


def _throughput(base: Path, n: int, io: int, parallel: int) -> None:
    space = _space(base / "tp", io, "tp")
    t = time.monotonic()
    for i in range(n):
        space.create_lease(f"vm{i}")
    created = time.monotonic() - t
    t = time.monotonic()
    space.join(MGR_ID, "vt2bmgr", timeout=60)
    joined = time.monotonic() - t
    click.echo(f"leases: created {n} in {created:.2f} s ({n / created:.0f}/s); join {joined:.1f} s")
    holds: list[LeaseHold] = []
    try:
        for workers in (1, parallel):
            # Each hold is its own sanlock registration (as the manager's proofs are); the daemon
            # serves them with its worker threads (-t, default 8).
            with ThreadPoolExecutor(workers) as pool:
                t = time.monotonic()
                holds = list(pool.map(lambda i: LeaseHold(space, f"vm{i}"), range(n)))
                acq = time.monotonic() - t
                t = time.monotonic()
                list(pool.map(LeaseHold.release, holds))
                rel = time.monotonic() - t
            click.echo(
                f"leases: {workers} thread(s): acquired {n} in {acq:.2f} s ({n / acq:.0f}/s, "
                f"{1000 * acq / n:.2f} ms each); released in {rel:.2f} s ({n / rel:.0f}/s)"
            )
    finally:
        for h in holds:
            h.release()
        space.leave(MGR_ID)


def _proofs(base: Path, io: int, method: ProofMethod, repeat: int) -> None:
    space = _space(base / method.value, io, method.value.replace("-", "")[:8])
    a = HostA(base, str(space.path), space.name, io)
    times: list[float] = []
    try:
        for r in range(repeat):
            vm = f"vm{r}"
            space.create_lease(vm)
            join = a.boot() if a.daemon is None else None
            if space.local_state() != "joined":
                space.join(MGR_ID, "vt2bmgr", timeout=60)
            if join is not None:
                join.wait(timeout=120)
            while {h.host_id for h in space.hosts()} < {A_ID, MGR_ID}:
                time.sleep(0.2)
            holder = a.hold(vm)

            async def prove(vm: str = vm, holder: subprocess.Popen[str] = holder) -> float:
                async def host_id_of(host: str) -> int | None:
                    return A_ID

                prover = Prover(space, host_id_of=host_id_of, power=KillPower(a), poll=0.05)
                t0 = time.monotonic()
                if method is ProofMethod.HOST_DEAD:
                    await asyncio.to_thread(a.power_off)
                    t0 = time.monotonic()
                elif method is ProofMethod.POWER:
                    # Power is refused while A renews its lockspace: its storage (or A) failed first.
                    await asyncio.to_thread(a.kill_daemon)
                    t0 = time.monotonic()
                try:
                    await prover.prove(vm, "vt2ba", (method,), timeout=space.host_dead + 60)
                    took = time.monotonic() - t0
                    assert not pid_alive(holder.pid), "proof returned while the holder is alive"
                finally:  # leaving the lockspace with a lease held would make sanlock kill this process
                    await prover.release_all()
                return took

            times.append(asyncio.run(prove()))
            if method is ProofMethod.REQUEST_FORCE:
                # A's sanlock takes no new request from this host within 6 io of the last one: wait
                # that out, so that each run measures a first request.
                time.sleep(8 * io)
        if method is ProofMethod.REQUEST_FORCE:
            pair = _request_force_pair(space, a)
    finally:
        a.stop()
        with contextlib.suppress(Exception):
            space.leave(MGR_ID)
    _report(method.value, times, io)
    if method is ProofMethod.REQUEST_FORCE:
        click.echo(f"proof request-force  io_timeout={io}: two VMs of one host proved one after the other: "
                   f"{pair[0]:.2f} s, then {pair[1]:.2f} s (sanlock's 6 io request window)")


def _request_force_pair(space: LockSpace, a: HostA) -> tuple[float, float]:
    """Two VMs of host A proved one after the other by REQ_FORCE (a host with more VMs than the
    manager proves at once): the time of each proof."""
    holders = {}
    for vm in ("pair0", "pair1"):
        space.create_lease(vm)
        holders[vm] = a.hold(vm)

    async def prove() -> tuple[float, float]:
        async def host_id_of(host: str) -> int | None:
            return A_ID

        prover = Prover(space, host_id_of=host_id_of, poll=0.05)
        took: list[float] = []
        try:
            for vm, holder in holders.items():
                t0 = time.monotonic()
                await prover.prove(vm, "vt2ba", (ProofMethod.REQUEST_FORCE,), timeout=space.host_dead)
                took.append(time.monotonic() - t0)
                assert not pid_alive(holder.pid), "proof returned while the holder is alive"
        finally:
            await prover.release_all()
        return took[0], took[1]

    return asyncio.run(prove())


def _report(name: str, times: list[float], io: int) -> None:
    text = " ".join(f"{t:.2f}" for t in times)
    click.echo(f"proof {name:14s} io_timeout={io}: median {statistics.median(times):.2f} s (runs: {text})")


def _exit_attested(base: Path, io: int, repeat: int) -> None:
    net = LabNet("vt2b", log_dir=base / "logs")
    net.destroy()
    storage = SharedStorage(base / "export", base / "state", base / "logs")
    # TLS with client certificates, as every etcd connection of vmha: host A's agent as its host, the
    # prover as a manager (auth stays off: the bench measures proofs, not roles).
    etcd = EtcdProcess(base / "etcd", pki=Pki(base / "pki"))
    host = net.host(1)
    sshd = sshfs = 0
    a: HostA | None = None
    space: LockSpace | None = None
    times: list[float] = []
    try:
        etcd.start()
        ctl = net.start_anchor(_added(net, net.controller()))
        host = net.start_anchor(_added(net, host))
        sshd = storage.start_server(ctl)
        sshfs = storage.mount(host, ctl.address(Plane.STORAGE))
        space = _space(base / "export", io, "ea")
        a = HostA(base, str(MOUNT_POINT), space.name, io, enter=tuple(host.enter()))
        mount_only = ("nsenter", "-t", str(host.anchor), "-m", "--")
        for r in range(repeat):
            vm = f"vm{r}"
            space.create_lease(vm)
            join = a.boot()
            if space.local_state() != "joined":
                space.join(MGR_ID, "vt2bmgr", timeout=60)
            join.wait(timeout=120)
            while {h.host_id for h in space.hosts()} < {A_ID, MGR_ID}:
                time.sleep(0.2)
            tls_a = etcd.tls("vt2ba")
            assert tls_a is not None
            agent = a.spawn(_AGENT.format(path=str(MOUNT_POINT), ls=space.name, io=io, etcd=etcd.client_urls[0],
                                          tls=(str(tls_a.ca), str(tls_a.cert), str(tls_a.key))), enter=mount_only)
            assert agent.stdout is not None and agent.stdout.readline().strip() == "serving"
            holder = a.hold(vm)

            async def prove(vm: str = vm, holder: subprocess.Popen[str] = holder, sp: LockSpace = space) -> float:
                async with EtcdClient(etcd.client_urls, timeout=1.0, tls=etcd.tls("vt2bmgr")) as client:
                    async def attest(host_name: str, vm_name: str, timeout: float) -> AttestResponse:
                        return await request_attestation(client, Keys("vt2b"), host_name, vm_name, timeout,
                                                         poll=0.05)

                    async def host_id_of(host_name: str) -> int | None:
                        return A_ID

                    prover = Prover(sp, host_id_of=host_id_of, attest=attest, poll=0.05)
                    t0 = time.monotonic()
                    net.set_link(host, Plane.STORAGE, False)
                    try:
                        await prover.prove(vm, "vt2ba", (ProofMethod.EXIT_ATTESTED,), timeout=sp.renewal_fail + 30)
                        took = time.monotonic() - t0
                        assert not pid_alive(holder.pid), "proof returned while the holder is alive"
                    finally:
                        await prover.release_all()
                    return took

            times.append(asyncio.run(prove()))
            a.stop()
            net.set_link(host, Plane.STORAGE, True)
            time.sleep(2 * io + 4)  # sshfs reconnects (ServerAliveInterval 1, reconnect)
    finally:
        if a is not None:
            a.stop()
        if host.anchor:
            net.set_link(host, Plane.STORAGE, True)
        if sshfs:
            storage.unmount(host, sshfs)
        if sshd:
            kill_pids([sshd])
        net.destroy()
        etcd.stop()
        if space is not None:
            with contextlib.suppress(Exception):
                space.leave(MGR_ID)
    _report("exit-attested", times, io)


def _added(net: LabNet, node: Node) -> Node:
    net.add_node(node)
    return node


__all__ = ["locks"]
