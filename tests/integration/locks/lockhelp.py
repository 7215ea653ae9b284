"""Helpers of the lock-manager tests (simulated hosts, the two-host lockspace); fixtures are in conftest."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmha.etcd.attest import AttestResponse
from vmha.lab.sanlockd import LabSanlock
from vmha.locks import LockSpace, Prover
from vmha.locks.power import PowerFence
from vmha.testing.wait import until_sync

Attest = Callable[[str, str, float], Awaitable[AttestResponse]]
IO = 1  # io_timeout of every test lockspace: renewal failure after 8 s, host_dead after 68 s
HOSTSIDE = Path(__file__).with_name("hostside.py")
MGR_HOST_ID = 2
A_HOST_ID = 1


@dataclass
class SimHost:
    """A simulated host: its sanlock daemon and the processes the test runs on it."""

    name: str
    daemon: LabSanlock
    space_args: dict[str, object]
    vmha_run: Path
    enter: tuple[str, ...] = ()  # command prefix (lab namespaces); () for a SANLOCK_RUN_DIR host
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = self.daemon.env()
        env["VMHA_RUN_DIR"] = str(self.vmha_run)
        return env

    def start(self, cmd: str, ready: str, timeout: float = 30.0, vmha_run: str | None = None,
              **args: object) -> subprocess.Popen[str]:
        """Starts hostside.py CMD on this host and waits for its `ready` line (vmha_run: another
        directory for the holder records, which hides them from the host's agent)."""
        env = self.env()
        if vmha_run is not None:
            env["VMHA_RUN_DIR"] = vmha_run
        p = subprocess.Popen(
            [*self.enter, sys.executable, str(HOSTSIDE), cmd, json.dumps({**self.space_args, **args})],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(p)
        line = _readline(p, timeout)
        if line.strip() != ready:
            p.kill()
            _, err = p.communicate(timeout=10)
            raise AssertionError(f"{self.name}: hostside {cmd} said {line!r}, expected {ready!r}: {err}")
        return p

    def run(self, cmd: str, timeout: float = 60.0, **args: object) -> str:
        p = subprocess.run(
            [*self.enter, sys.executable, str(HOSTSIDE), cmd, json.dumps({**self.space_args, **args})],
            env=self.env(), capture_output=True, text=True, timeout=timeout, check=False,
        )
        assert p.returncode == 0, f"{self.name}: hostside {cmd} failed: {p.stderr}"
        return p.stdout

    def stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        self.procs.clear()


def _readline(p: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of p, bounded by `timeout` (a blocking readline in a helper thread)."""
    out: list[str] = []
    assert p.stdout is not None
    stdout = p.stdout
    t = threading.Thread(target=lambda: out.append(stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else f"<nothing within {timeout} s>"


@dataclass
class LockCluster:
    """A lockspace with the manager's host (this process, host_id 2) and host A (host_id 1)."""

    space: LockSpace  # the manager's view
    a: SimHost
    provers: list[Prover] = field(default_factory=list)

    def prover(self, attest: Attest | None = None, power: PowerFence | None = None) -> Prover:
        async def host_id_of(host: str) -> int | None:
            return {self.a.name: A_HOST_ID, "vt2mgr": MGR_HOST_ID}.get(host)

        p = Prover(self.space, host_id_of=host_id_of, attest=attest, power=power, poll=0.1)
        self.provers.append(p)
        return p

    def release_all(self) -> None:
        for p in self.provers:
            asyncio.run(p.release_all())


def new_lockspace(path: Path) -> LockSpace:
    path.mkdir(parents=True, exist_ok=True)
    return LockSpace(path, f"vt2{secrets.token_hex(3)}", IO)


def join_both(space: LockSpace, a: SimHost) -> None:
    """Joins host A (subprocess) and the manager (this process) at the same time (3 s each)."""
    p = subprocess.Popen(
        [*a.enter, sys.executable, str(HOSTSIDE), "join",
         json.dumps({**a.space_args, "host_id": A_HOST_ID, "host": a.name})],
        env=a.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    space.join(MGR_HOST_ID, "vt2mgr", timeout=30)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "joined" in out, f"host A could not join: {err}"
    # The manager's daemon reports host states only after it has watched a renewal or two.
    until_sync(lambda: {h.host_id for h in space.hosts()} >= {A_HOST_ID, MGR_HOST_ID},
               "the manager's daemon seeing host A", timeout=10 * IO + 5, interval=0.2)  # fmt: skip


def leave_manager(space: LockSpace) -> None:
    # rem_lockspace kills the holders of the lockspace's leases: this process must hold none.
    space.leave(MGR_HOST_ID)


