"""The agent's membership in the lockspace: its cluster-unique host_id, read from etcd (managers
allocate them: etcd/hostids.py), then join; leave at clean stop.

The local sanlock daemon should run with the host's vmha name as its host name (sanlock.conf
`our_host_name = <host>`, or -e): a fixed name makes a restarted daemon rejoin in seconds, and
`vmha locks status` shows host names read from the lockspace itself.
"""

from __future__ import annotations

import asyncio

from vmha.etcd import hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.locks.space import LockError, LockSpace


class NoHostId(LockError):
    """No manager has allocated this host's host_id yet (it does once the host is registered)."""


async def allocated_host_id(client: EtcdClient, keys: Keys, host: str) -> int:
    """The host's host_id as a manager allocated it; NoHostId while there is none."""
    n = await hostids.lookup(client, keys, host)
    if n is None:
        raise NoHostId(f"host {host} has no sanlock host_id in etcd yet: the leading manager allocates it once "
                       "the host is registered")
    return n


async def join(space: LockSpace, client: EtcdClient, keys: Keys, host: str, *, timeout: float | None = None) -> int:
    """Joins the lockspace with the host_id a manager allocated to the host; returns it. Raises NoHostId
    (none yet), LeaseAreaError / IoTimeoutMismatch / HostIdCollision with the fix."""
    n = await allocated_host_id(client, keys, host)
    await asyncio.to_thread(space.join, n, host, timeout=timeout)
    return n


async def leave(space: LockSpace, host_id: int) -> None:
    """Leaves the lockspace (clean stop, after the host's VMs released their leases)."""
    await asyncio.to_thread(space.leave, host_id)
