"""The runtime loop: the one place the recovery core is stepped and its actions carried out, for the
manager daemon, the simulator and the core bench alike (each an Env, vmha.runtime.env).

    loop = Loop(RecoveryCore(policy, settings), env, proof_timeout=...)
    await loop.step(events)         # the daemon: `await loop.run(inbox)` takes the batches itself

One step: the events that arrived together (a host's superseded health views dropped, `coalesce`)
are stepped one after another at env.now(), and their outputs applied together:
  1. the log lines go to env.log,
  2. the tasks they changed, the finished recoveries' evidence and the decision stream are made
     durable (env.persist) BEFORE any other action of that output starts (persist, then act: a
     leader that dies in between leaves a task naming the step in flight, which the next one repeats),
  3. the other actions start concurrently (env.spawn; the core bounds how many), each feeding its
     result back (env.result) to be stepped with the next batch.
The path of a fault: plane event (manager/detection.py's etcd watch, the simulator's model) ->
runtime/health.py (the health feed: core/health.py stepped, its output turned into HealthUpdate
events, put in this loop's inbox) -> core/policy.py (via core/hosts.py's per-host decisions) ->
core/fencing.py (Prove, here carried out by env.prove) -> core/queue.py -> the driver
(env.evacuate / migrate / mark_down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any

from vmha.core.actions import (
    Alert,
    CancelProof,
    CheckRejoin,
    DisableHost,
    DropProof,
    EnableHost,
    Evacuate,
    LiveMigrate,
    MarkHostDown,
    PersistTask,
    Prove,
    QuarantineHost,
    RecordEvidence,
    RecoveryAction,
    RecoveryOutput,
    ReleaseProof,
)
from vmha.core.events import (
    Attempt,
    HealthUpdate,
    HostOp,
    HostOpDone,
    HostOpFailed,
    ProofObtained,
    ProofRefused,
    RecoveryEvent,
    RejoinChecked,
    StepDone,
    StepFailed,
    Tick,
)
from vmha.core.fencing import ProofMethod
from vmha.core.queue import Step
from vmha.core.recovery import RecoveryCore
from vmha.drivers.base import DriverError
from vmha.runtime.env import Env, Running, TermOver

log = logging.getLogger("vmha.runtime")


class Inbox:
    """The decision loop's input: events are taken all at once, so that a burst is decided together."""

    def __init__(self) -> None:
        self._items: list[RecoveryEvent] = []
        self._ready = asyncio.Event()

    def put(self, event: RecoveryEvent) -> None:
        self._items.append(event)
        self._ready.set()

    def put_all(self, events: Sequence[RecoveryEvent]) -> None:
        """Events that arrived together (a health output's: vmha.runtime.health), in one batch."""
        self._items += events
        self._ready.set()

    async def take(self, timeout: float | None) -> list[RecoveryEvent]:
        """Every pending event; waits up to `timeout` for one (an empty list: timed out)."""
        if not self._items:
            self._ready.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        items, self._items = self._items, []
        return items


def coalesce(events: list[RecoveryEvent]) -> list[RecoveryEvent]:
    """Drop a host's HealthUpdate when a later one of the same host follows in the batch: each is the
    host's whole view, and the planes of a dead host go DOWN one change at a time within one
    detection step; deciding on the first of them would act on a row that never really held."""
    last = {e.health.host: i for i, e in enumerate(events) if isinstance(e, HealthUpdate)}
    return [e for i, e in enumerate(events) if not isinstance(e, HealthUpdate) or last[e.health.host] == i]


def run_now(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never waits (a step against an Env whose calls answer at once: the
    simulator's, the bench's) to its end."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("a step that must not wait waited")


class Loop:
    """One manager's (one term's) core, stepped against its Env."""

    def __init__(self, core: RecoveryCore, env: Env, *, proof_timeout: float) -> None:
        self.core = core
        self.env = env
        self.proof_timeout = proof_timeout  # a Prove's timeout when the core names none
        self.inflight: dict[tuple[str, str], Running] = {}
        self.over = False  # the term ended: nothing more is decided or started

    async def run(self, inbox: Inbox) -> None:
        """Take the events as they arrive (and a Tick at the core's next deadline), step, apply; until
        the term is over."""
        ticked: float | None = None
        while not self.over:
            deadline = self.core.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.env.now())
            if timeout is not None and deadline == ticked:
                timeout = max(timeout, 0.2)  # a deadline a Tick did not clear: never spin on it
            batch = await inbox.take(timeout)
            if not batch:
                batch, ticked = [Tick()], deadline
            await self.step(batch)

    async def step(self, batch: list[RecoveryEvent]) -> None:
        """Every event of the batch is stepped, then their outputs are applied at once: one durable
        write for many transitions, and still no action before its persist."""
        merged = RecoveryOutput()
        for event in coalesce(batch):
            out = self.core.step(event, self.env.now())
            merged.actions += out.actions
            merged.log += out.log
        await self._apply(merged)

    async def _apply(self, out: RecoveryOutput) -> None:
        self.env.log(out.log)
        persist: dict[str, dict[str, object]] = {}
        records: list[RecordEvidence] = []
        alerts: list[Alert] = []
        for a in out.actions:
            if isinstance(a, PersistTask):
                persist[a.vm] = a.data  # the last state of a VM in this output includes the earlier ones
            elif isinstance(a, RecordEvidence):
                records.append(a)
            elif isinstance(a, Alert):
                alerts.append(a)
        await self.env.persist(persist, records, out.log, alerts)
        if self.over:
            raise TermOver()
        for a in out.actions:
            self._start(a)

    def _start(self, a: RecoveryAction) -> None:
        env = self.env
        match a:
            case PersistTask() | RecordEvidence():
                return
            case Alert():
                env.alert(a)
            case CancelProof(vm, host, attempt):
                task = self.inflight.pop(("prove", vm), None)
                if task is not None:
                    task.cancel()
                    # The core waits for the end of the cancelled proof: tell it. A proof no longer in
                    # flight has ended already, and its result was fed back.
                    env.result(ProofRefused(vm, host, attempt, "cancelled: the host came back"))
            case Prove(vm, host, methods, attempt, timeout):
                self._spawn(("prove", vm), self._prove(vm, host, methods, attempt, timeout or self.proof_timeout))
            case ReleaseProof(vm, _host, _proof):
                self._spawn(("vm", vm), self._vm_step(vm, Step.RELEASE, self._release(vm)))
            case DropProof(vm, _host):
                self._spawn(("drop", vm), self._drop(vm))
            case Evacuate(vm, source, dest, proof):
                self._spawn(("vm", vm), self._vm_step(vm, Step.EVACUATE, env.evacuate(vm, source, dest, proof)))
            case LiveMigrate(vm, source, dest):
                self._spawn(("vm", vm), self._vm_step(vm, Step.MIGRATE, env.migrate(vm, source, dest)))
            case DisableHost(host, reason):
                self._spawn(("disable", host), self._host_op(host, HostOp.DISABLE, env.disable(host, reason)))
            case MarkHostDown(host):
                self._spawn(("mark-down", host), self._host_op(host, HostOp.MARK_DOWN, env.mark_down(host)))
            case EnableHost(host, _reason):
                self._spawn(("enable", host), self._host_op(host, HostOp.ENABLE, env.enable(host)))
            case CheckRejoin(host, vms):
                self._spawn(("rejoin", host), self._check_rejoin(host, vms))
            case QuarantineHost(host, reason):
                self._spawn(("quarantine", host), self._quarantine(host, reason))

    def _spawn(self, key: tuple[str, str], coro: Coroutine[Any, Any, None]) -> None:
        old = self.inflight.pop(key, None)
        if old is not None and not old.done():
            # The core never asks twice for a step in flight; if it does, the newest request wins.
            log.warning("%s %s still in flight; superseded", *key)
            old.cancel()
        started: list[Running] = []  # the action, once spawned (an Env may run it to its end at once)

        async def run() -> None:
            try:
                await coro
            finally:
                if started and self.inflight.get(key) is started[0]:
                    del self.inflight[key]

        task = self.env.spawn(f"{key[0]} {key[1]}", run())
        if not task.done():
            started.append(task)
            self.inflight[key] = task

    def cancel_all(self) -> list[Running]:
        """The term ended: every action in flight cancelled (returned, to wait for their ends)."""
        self.over = True
        tasks = list(self.inflight.values())
        self.inflight.clear()
        for t in tasks:
            t.cancel()
        return tasks

    # -- action bodies: run the call, feed the result back ----------------------------------------

    async def _prove(self, vm: str, host: str, methods: Sequence[ProofMethod], attempt: Attempt,
                     timeout: float) -> None:
        try:
            proof = await self.env.prove(vm, host, methods, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure to prove is a refusal; the text is the evidence
            self.env.result(ProofRefused(vm, host, attempt, _reason(e), bool(getattr(e, "retryable", True)),
                                         str(getattr(e, "alert", ""))))
            return
        self.env.result(ProofObtained(proof, attempt))

    async def _release(self, vm: str) -> str:
        await self.env.release(vm)
        return ""

    async def _drop(self, vm: str) -> None:
        try:
            await self.env.release(vm)
        except asyncio.CancelledError:
            raise
        except Exception:  # the term's end releases every proof lease again
            log.exception("releasing the proof lease of vm %s failed", vm)

    async def _vm_step(self, vm: str, step: Step, call: Awaitable[str]) -> None:
        try:
            where = await call
        except asyncio.CancelledError:
            raise
        except DriverError as e:
            self.env.result(StepFailed(vm, step, _reason(e), e.retryable, e.retry_after))
            return
        except Exception as e:  # an unexpected driver bug must not kill the manager: retry it
            log.exception("%s of vm %s failed", step.value, vm)
            self.env.result(StepFailed(vm, step, _reason(e), True))
            return
        self.env.result(StepDone(vm, step, running_on=where or None))

    async def _host_op(self, host: str, op: HostOp, call: Awaitable[None]) -> None:
        try:
            await call
        except asyncio.CancelledError:
            raise
        except TermOver:
            return
        except DriverError as e:
            self.env.result(HostOpFailed(host, op, _reason(e), e.retryable))
            return
        except Exception as e:  # an unexpected driver bug must not kill the manager: retry it
            log.exception("%s of host %s failed", op.value, host)
            self.env.result(HostOpFailed(host, op, _reason(e), True))
            return
        self.env.result(HostOpDone(host, op))

    async def _check_rejoin(self, host: str, vms: Sequence[str]) -> None:
        try:
            evidence = await self.env.check_rejoin(host, vms)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed or refused check keeps the host out; the core retries later
            self.env.result(RejoinChecked(host, False, _reason(e)))
            return
        self.env.result(RejoinChecked(host, True, evidence))

    async def _quarantine(self, host: str, reason: str) -> None:
        """A write no result depends on; a term that ends first leaves it to the next leader."""
        with contextlib.suppress(TermOver):
            await self.env.quarantine(host, reason)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


__all__ = ["Inbox", "Loop", "coalesce", "run_now"]
