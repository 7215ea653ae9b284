"""Agent side: the isolation response (stop every local lease holder) and the exit attestation.

Both run on the VM's host, in the agent. The attestation is what lets the manager reset a lease
before host_dead: it is true only when
- every process recorded or seen holding the VM's lease is gone from the process table (exited,
  not merely signalled; a zombie counts as exited, its writes are complete), and
- the local sanlock daemon reports this host's lockspace gone (failed and removed: sanlock removes
  a failed lockspace only after all its holders have exited, which also covers holders vmha did not
  record, such as a QEMU whose lease libvirt took). A daemon that does not answer is no evidence.
It is valid only where VM disks bypass the host page cache (QEMU cache=none, O_DIRECT): cached
writes could reach storage after the process is gone. The manager enforces that (allow_exit_attested).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmha.locks.lease import Holder, live_holders, recorded_holders
from vmha.locks.space import LockSpace

log = logging.getLogger("vmha.locks.isolation")


@dataclass(frozen=True, slots=True)
class IsolationResult:
    terminated: tuple[Holder, ...]  # exited after SIGTERM
    killed: tuple[Holder, ...]  # needed SIGKILL
    survivors: tuple[Holder, ...]  # still alive after SIGKILL and the wait (should never happen)

    def text(self) -> str:
        def pids(hs: Sequence[Holder]) -> str:
            return ",".join(f"{h.vm}:{h.pid}" for h in hs) or "-"

        return f"terminated={pids(self.terminated)} killed={pids(self.killed)} survivors={pids(self.survivors)}"


async def _wait_gone(holders: Sequence[Holder], timeout: float, poll: float) -> list[Holder]:
    deadline = time.monotonic() + timeout
    alive = [h for h in holders if h.alive()]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        alive = [h for h in alive if h.alive()]
    return alive


def _signal(holders: Sequence[Holder], sig: signal.Signals) -> None:
    for h in holders:
        if h.alive():  # checks the start time too: never signal a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.pid, sig)


async def stop_lease_holders(
    space: LockSpace, *, grace: float = 5.0, kill_timeout: float = 5.0, poll: float = 0.05
) -> IsolationResult:
    """The isolation response: SIGTERM every local process holding a lease of the lockspace, SIGKILL
    those still alive after `grace` seconds, and wait (at most kill_timeout) until they are gone.
    sanlock releases each lease on storage as its holder exits, so the manager can take it."""
    holders = await asyncio.to_thread(live_holders, space)
    _signal(holders, signal.SIGTERM)
    after_term = await _wait_gone(holders, grace, poll)
    _signal(after_term, signal.SIGKILL)
    survivors = await _wait_gone(after_term, kill_timeout, poll)
    killed = [h for h in after_term if h not in survivors]
    terminated = [h for h in holders if h not in after_term]
    result = IsolationResult(tuple(terminated), tuple(killed), tuple(survivors))
    for h in holders:
        how = "survived SIGKILL" if h in survivors else "SIGKILL" if h in killed else "SIGTERM"
        (log.error if h in survivors else log.warning)(
            "isolation: stopped lease holder vm=%s pid=%d lockspace=%s (%s)", h.vm, h.pid, space.name, how
        )
    return result


@dataclass(frozen=True, slots=True)
class Attestation:
    vm: str
    ok: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)


def attest_exit(space: LockSpace, vm: str) -> Attestation:
    """Whether this host can attest that the VM's lease holders are gone and its lockspace is lost."""
    state = space.local_state()
    # The recorded holders only: while the daemon still has the lockspace the answer is "no" anyway,
    # and once it has lost it the daemon no longer knows them (this is what the records are for).
    holders = {(h.vm, h.pid): h for h in recorded_holders(space.resource(vm))}
    alive = [h for h in holders.values() if h.alive()]
    evidence = {
        "lockspace": state,
        "holders": " ".join(f"pid={h.pid}:{'alive' if h in alive else 'gone'}" for h in holders.values()) or "none",
        "checked_at": f"{time.time():.3f}",
    }
    if alive:
        return Attestation(vm, False, f"holders still alive: {' '.join(h.text() for h in alive)}", evidence)
    if state == "no-daemon":
        # A dead daemon says nothing about holders it never told us of (a QEMU whose lease libvirt
        # took): only the daemon's own removal of the lockspace vouches for them.
        return Attestation(vm, False, "the local sanlock daemon does not answer: holders unknown; "
                           "wait for host_dead or a power fence", evidence)
    if state != "absent":
        return Attestation(
            vm, False, f"lockspace {space.name} is {state}: this host's sanlock still renews it", evidence
        )
    return Attestation(vm, True, "holders gone and lockspace lost", evidence)
