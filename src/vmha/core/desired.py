"""Desired state: every protected VM runs somewhere (pure; RecoveryCore asks it which VMs to restart).

The inventory says where each VM is placed and whether a copy of it runs there. A protected VM seen
"stopped" (the driver's word for: no copy runs; a driver that cannot tell says something else) in
two inventories at least `restart_after` seconds apart, with no recovery in flight, is due for a
restart. Two snapshots, not one: a snapshot taken before one of our own moves and delivered after it
shows the VM stopped on its old host; the next one shows it running again.

The restart itself is an ordinary recovery task (RecoveryCore), whose proof uses only the methods
that *observe* a death (`observing_methods`): a restart never ends a running copy, so an inventory
that was wrong costs a refused proof, never a VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmha.core.fencing import ProofMethod
from vmha.core.planes import Plane, PlaneState

# The driver's state word for a VM no copy of which runs (drivers.base.VmInfo.state).
STOPPED = "stopped"
# The policy row of a restart task (Task.row) and its action (Task.action).
STOPPED_KEY = "vm-stopped"
RESTART = "restart"


def observing_methods(states: Mapping[Plane, PlaneState]) -> tuple[ProofMethod, ...]:
    """The proof methods that only observe that a copy is gone: its lease free (lease-taken), or its
    host dead on the shared storage (host-dead, pointless while the host's storage plane is up).
    Never request-force or power, which would end a copy that still runs."""
    if states.get(Plane.STORAGE) in (PlaneState.UP, PlaneState.SUSPECT):
        return (ProofMethod.LEASE_TAKEN,)
    return (ProofMethod.LEASE_TAKEN, ProofMethod.HOST_DEAD)


@dataclass(slots=True)
class _Seen:
    first: float  # first inventory that showed the VM stopped (since the last one that did not)
    last: float  # the latest such inventory


class StoppedVms:
    """Protected VMs the inventory shows stopped, and those left to the operator (their recovery
    FAILED) until an inventory shows them running again."""

    def __init__(self, restart_after: float) -> None:
        self.restart_after = restart_after
        self._seen: dict[str, _Seen] = {}
        self._given_up: set[str] = set()

    def inventory(self, stopped: Mapping[str, bool], now: float) -> None:
        """One inventory: each protected VM placed on a host, with no recovery in flight -> whether it
        is stopped."""
        for vm, down in stopped.items():
            if not down:
                self._seen.pop(vm, None)
                self._given_up.discard(vm)
            elif vm in self._seen:
                self._seen[vm].last = now
            else:
                self._seen[vm] = _Seen(now, now)
        for vm in set(self._seen) - set(stopped):
            del self._seen[vm]  # no longer protected, placed nowhere, or a recovery began

    def forget(self, vm: str) -> None:
        """A task for the VM began or ended: its state is counted afresh from the next inventory."""
        self._seen.pop(vm, None)

    def give_up(self, vm: str) -> None:
        """The VM's recovery FAILED: the operator was alerted; it is not restarted until seen running."""
        self._given_up.add(vm)
        self._seen.pop(vm, None)

    def due(self) -> list[tuple[str, float]]:
        """(vm, stopped since) of the VMs seen stopped long enough, sorted by VM."""
        if not self.restart_after:
            return []
        return [(vm, s.first) for vm, s in sorted(self._seen.items())
                if s.last - s.first >= self.restart_after and vm not in self._given_up]

    def __bool__(self) -> bool:
        return bool(self._seen)


__all__ = ["RESTART", "STOPPED", "STOPPED_KEY", "StoppedVms", "observing_methods"]
