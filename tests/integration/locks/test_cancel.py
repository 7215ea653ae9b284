"""A proof cancelled while sanlock grants the VM's lease (the manager's term ends, a step is
superseded, the manager stops) must not leave the manager's sanlock host holding that lease without
the prover knowing: the VM could then start nowhere. The lease is given back once granted.

Real sanlock daemons; the tests only control WHEN the real calls run: sanlock.acquire (or the
prover's hand-over) is held at its start until the test has cancelled the proof.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sanlock
from lockhelp import LockCluster

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.lab.net import pid_alive as alive
from vmha.locks import prover as prover_mod
from vmha.locks.lease import recorded_holders
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

WAIT = 30.0  # bound on every wait for a thread of the test (never a timing under test)


class Gate:
    """Wraps a callable: marks `entered`, blocks until `go`, runs the real call, records its outcome."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        self.outcome = "not run"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.go.wait(WAIT):
            self.outcome = "gate never opened"
            raise RuntimeError(self.outcome)
        try:
            result = self.real(*args, **kwargs)
            self.outcome = "ok"
            return result
        except Exception as e:
            self.outcome = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.done.set()


def gate_acquire(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate(sanlock.acquire)
    monkeypatch.setattr(sanlock, "acquire", gate)
    return gate


def start_proof(cluster: LockCluster, p: prover_mod.Prover) -> asyncio.Task[FenceProof]:
    return asyncio.create_task(p.prove("vm1", cluster.a.name, (ProofMethod.LEASE_TAKEN,), timeout=20))


def assert_given_back(cluster: LockCluster, p: prover_mod.Prover) -> None:
    """Nothing of the cancelled proof is left: no owner on storage, nothing held, no holder record,
    and host A can take the lease."""
    assert cluster.space.owners("vm1") == [], "the manager's host still owns the lease of a cancelled proof"
    assert p.held() == []
    assert [h for h in recorded_holders("vm1") if h.pid == os.getpid()] == []
    holder = cluster.a.start("hold", "held", vm="vm1", timeout=10)
    assert alive(holder.pid)


async def test_cancelled_while_sanlock_acquires(cluster: LockCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = gate_acquire(monkeypatch)
    p = cluster.prover()
    task = start_proof(cluster, p)
    assert await asyncio.to_thread(gate.entered.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.go.set()  # sanlock now grants the lease, to a proof that no longer exists
    assert await asyncio.to_thread(gate.done.wait, WAIT)
    assert gate.outcome == "ok"
    # The worker thread releases on storage first, then drops its holder record: wait for both, the
    # views assert_given_back checks, not for the first alone.
    await until(lambda: cluster.space.owners("vm1") == [] and not [h for h in recorded_holders("vm1")
                if h.pid == os.getpid()], "the lease given back", timeout=WAIT)  # fmt: skip
    assert_given_back(cluster, p)


def test_cancelled_by_the_loop_ending_while_sanlock_acquires(
    cluster: LockCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager stops (asyncio.run ends, cancelling every task) while sanlock is granting: the
    worker thread gives the lease back itself, the loop being gone when the grant arrives."""
    gate = gate_acquire(monkeypatch)
    p = cluster.prover()
    tasks: list[asyncio.Task[FenceProof]] = []

    async def main() -> None:
        tasks.append(start_proof(cluster, p))
        assert await asyncio.to_thread(gate.entered.wait, WAIT)
        # Opened once asyncio.run has cancelled the proof and waits for the worker threads.
        threading.Timer(0.5, gate.go.set).start()

    asyncio.run(main())
    assert gate.done.is_set() and gate.outcome == "ok"
    assert tasks[0].cancelled()
    assert_given_back(cluster, p)


async def test_cancelled_after_the_grant_before_the_proof_resumed(
    cluster: LockCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sanlock granted the lease, but the proof is cancelled before it resumes to take it: the
    cancelled proof gives it back (in a thread), and release_all waits for that."""
    gate = Gate(prover_mod._Grant.take)
    monkeypatch.setattr(prover_mod._Grant, "take", lambda self: gate(self))
    p = cluster.prover()
    task = start_proof(cluster, p)
    assert await asyncio.to_thread(gate.entered.wait, WAIT)
    gate.go.set()
    # Block the event loop (no await) until the grant is complete: the proof cannot resume meanwhile.
    assert gate.done.wait(WAIT) and gate.outcome == "ok"
    assert [o.host_id for o in cluster.space.owners("vm1")] == [2]  # granted to the manager's host
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.release_all()
    assert_given_back(cluster, p)
