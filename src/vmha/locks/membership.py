"""The agent's membership in the lockspace: a cluster-unique host_id from etcd, then join; leave at
clean stop.

The local sanlock daemon should run with the host's vmha name as its host name (sanlock.conf
`our_host_name = <host>`, or -e): a fixed name makes a restarted daemon rejoin in seconds, and
`vmha locks status` shows host names read from the lockspace itself.
"""

from __future__ import annotations

import asyncio

from vmha.etcd import hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.locks.space import LockSpace


async def join(space: LockSpace, client: EtcdClient, keys: Keys, host: str, *, timeout: float | None = None) -> int:
    """Allocates (or finds) the host's sanlock host_id in etcd and joins the lockspace with it; returns
    the host_id. Raises LeaseAreaError / IoTimeoutMismatch / HostIdCollision with the fix."""
    host_id = await hostids.allocate(client, keys, host, space.max_hosts)
    await asyncio.to_thread(space.join, host_id, host, timeout=timeout)
    return host_id


async def leave(space: LockSpace, host_id: int) -> None:
    """Leaves the lockspace (clean stop, after the host's VMs released their leases)."""
    await asyncio.to_thread(space.leave, host_id)
