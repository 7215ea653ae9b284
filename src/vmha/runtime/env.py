"""The environment the runtime loop acts on (pve-ha-manager's Env): everything the recovery core's
actions touch, and how the loop runs them. Three implement it: the manager daemon's term (etcd,
sanlock, the compute driver), the simulator (its model of the world, on a virtual clock) and the core
bench (instant answers).

A call's failure is an exception: its text is the reason the core logs; a `retryable` attribute False
gives up at once (DriverError's, or a prover refusal's); a proof refusal's `alert` attribute names a
cause the operator must fix. TermOver from any call: this manager no longer leads, nothing is fed back.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import RecoveryEvent
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.log import LogLine


class TermOver(Exception):
    """This manager's term ended (leadership lost, stopping): decide and start nothing more."""


class Running(Protocol):
    """An action started by Env.spawn (an asyncio.Task in the daemon)."""

    def cancel(self, msg: Any | None = None) -> bool: ...

    def done(self) -> bool: ...


class Env(Protocol):
    def now(self) -> float:
        """The time the core decides at (the manager's monotonic unix clock, the sim's virtual one)."""
        ...

    def log(self, lines: Sequence[LogLine]) -> None:
        """The core's decisions, one line each, as they are taken (before anything is persisted)."""
        ...

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        """Make durable, before any action of the same output starts: the tasks' new states (vm ->
        data, written with compare-and-swap), the finished recoveries' evidence, and the decision
        stream (the log lines and alerts)."""
        ...

    def alert(self, alert: Alert) -> None:
        """Tell the operator now (it is in the persisted decision stream already)."""
        ...

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        """A proof that the VM's copy on `host` can no longer write, or an exception saying why not."""
        ...

    async def release(self, vm: str) -> None:
        """Release the VM's lease a proof holds (before its restart, or for a failed recovery)."""
        ...

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        """Restart the VM away from its source, proven dead by `proof`; where it runs now ('' if
        unknown)."""
        ...

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        """Live-migrate the running VM; where it runs now ('' if unknown)."""
        ...

    async def disable(self, host: str, reason: str) -> None:
        """Take the host out of placement (and record that vmha did, for a later rejoin)."""
        ...

    async def mark_down(self, host: str) -> None:
        """Mark the proven-dead host down in the compute service (and record it)."""
        ...

    async def enable(self, host: str) -> None:
        """The host rejoins placement (and the record of what vmha did to it is removed)."""
        ...

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        """The evidence that the fenced host may rejoin, or an exception saying why not."""
        ...

    async def quarantine(self, host: str, reason: str) -> None:
        """Record that the host stays out until the operator enables it."""
        ...

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> Running:
        """Run an action concurrently with the loop."""
        ...

    def result(self, event: RecoveryEvent) -> None:
        """An action's result: stepped with the next batch of events."""
        ...


__all__ = ["Env", "Running", "TermOver"]
