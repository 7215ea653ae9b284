"""Rebalancing (pure): which VMs to live-migrate so that the load evens out again once hosts return.

RecoveryCore runs one round at a time (`rebalance = true`, off by default): when a host became a
destination again (rejoined, enabled), no recovery is in flight and the cool-down since the last
round has passed. A round moves at most `max_moves` VMs, each from the most loaded eligible host to
the least loaded one, while the two differ by more than one VM; the lowest priority VMs move first
(a live migration has a short pause). The destinations are chosen by the ordinary placement (least
loaded), so the plan names only what moves and from where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# The policy row of a rebalancing task (Task.row).
REBALANCE_KEY = "rebalance"


def plan(loads: Mapping[str, int], movable: Mapping[str, Sequence[tuple[int, str]]], max_moves: int,
         capacity: int = 0) -> list[tuple[str, str]]:
    """(vm, source) of the moves of one round. loads: VMs per eligible host (every VM counts);
    movable: per host, its (priority, vm) that may move (protected, no task); capacity: VMs per
    host (0: unlimited)."""
    load = dict(loads)
    left = {h: sorted(vms) for h, vms in movable.items() if h in load}
    moves: list[tuple[str, str]] = []
    while len(moves) < max_moves and len(load) > 1:
        low = min(load, key=lambda h: (load[h], h))
        sources = [h for h in load if left.get(h)]
        if not sources:
            break
        high = max(sources, key=lambda h: (load[h], h))
        if load[high] - load[low] <= 1 or (capacity and load[low] >= capacity):
            break
        _, vm = left[high].pop(0)
        moves.append((vm, high))
        load[high] -= 1
        load[low] += 1
    return moves


__all__ = ["REBALANCE_KEY", "plan"]
