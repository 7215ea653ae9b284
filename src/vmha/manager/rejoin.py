"""The rejoin check of a fenced host (CheckRejoin): what the core cannot see, read on the shared storage.

The core sees a host's planes UP again (its agent beats on new leases) and asks, before the host may
receive VMs again: does the host renew its sanlock lockspace (its delta lease's timestamp moves, read
from the storage itself), and does it hold the lease of none of the VMs recovered from it (no copy of
a VM that runs elsewhere survived there)? A lease owned by an older generation of the host's host_id
belongs to a finished instance and does not count. In doubt (unreadable storage, unknown host_id) the
check fails: the host stays out and is checked again later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from vmha.locks.space import LeaseMissing, LockError, LockSpace


class RejoinRefused(Exception):
    """The host may not rejoin yet; str() says why (the evidence)."""


async def check_rejoin(space: LockSpace, host_id_of: Callable[[str], Awaitable[int | None]], host: str,
                       vms: Sequence[str]) -> str:
    """The evidence that `host` may rejoin; RejoinRefused if it may not."""
    host_id = await host_id_of(host)
    if host_id is None:
        raise RejoinRefused(f"no sanlock host_id registered for '{host}'")
    try:
        renewed = await asyncio.to_thread(space.renews, host_id)
    except LockError as e:
        raise RejoinRefused(f"its lockspace delta lease (host_id {host_id}) unreadable: {e}") from None
    if renewed is None:
        raise RejoinRefused(f"its lockspace delta lease (host_id {host_id}) is not renewed")
    held: list[str] = []
    for vm in vms:
        try:
            owners = await asyncio.to_thread(space.owners, vm)
        except LeaseMissing:
            continue  # no lease, nothing to hold
        except LockError as e:
            raise RejoinRefused(f"the lease of {vm} unreadable: {e}") from None
        if any(o.host_id == host_id and o.generation >= renewed.generation for o in owners):
            held.append(vm)
    if held:
        raise RejoinRefused(f"it holds the lease of {', '.join(held)}, recovered elsewhere")
    return (f"lockspace renewed (host_id {host_id} gen {renewed.generation})"
            + (f", holds none of the leases of {', '.join(vms)}" if vms else ""))


__all__ = ["RejoinRefused", "check_rejoin"]
