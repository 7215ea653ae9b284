"""sanlock host_ids, unique in the cluster: keys.host_id(n) = {"host": name}, created if absent.

A host keeps its id for life (its delta lease and every lease record refer to it): allocate()
returns the id already recorded for the host, or takes the lowest free one with a create-if-absent
transaction. Two allocations racing for the same host may both create a key; the loser sees the
lower id in its re-read and deletes its own, so the host ends with exactly one id.
"""

from __future__ import annotations

import logging

from vmha.etcd.client import KV, BadValue, EtcdClient
from vmha.etcd.keys import Keys

log = logging.getLogger("vmha.etcd.hostids")


class HostIdError(Exception):
    """No host_id could be allocated."""


def _parse(keys: Keys, kv: KV) -> tuple[int, str] | None:
    suffix = kv.key[len(keys.host_id_prefix) :]
    try:
        value = kv.json()
    except BadValue as e:
        log.warning("skipping %s", e)
        return None
    if not suffix.isdigit() or not isinstance(value, dict) or not isinstance(value.get("host"), str):
        log.warning('skipping etcd key %s: expected hostid/<n> = {"host": "<name>"}', kv.key)
        return None
    return int(suffix), value["host"]


async def _scan(client: EtcdClient, keys: Keys) -> tuple[dict[int, str], set[int]]:
    """(host_id -> host for readable keys, every id that has a key): a broken key still blocks its id."""
    kvs, _ = await client.get_prefix(keys.host_id_prefix)
    taken = {int(s) for kv in kvs if (s := kv.key[len(keys.host_id_prefix) :]).isdigit()}
    return dict(p for kv in kvs if (p := _parse(keys, kv)) is not None), taken


async def host_ids(client: EtcdClient, keys: Keys) -> dict[int, str]:
    """Every allocated host_id and its host (unreadable keys logged and left out)."""
    return (await _scan(client, keys))[0]


async def lookup(client: EtcdClient, keys: Keys, host: str) -> int | None:
    """The host's host_id, None if it has none."""
    ids = sorted(n for n, h in (await host_ids(client, keys)).items() if h == host)
    return ids[0] if ids else None


async def allocate(client: EtcdClient, keys: Keys, host: str, max_hosts: int = 2000) -> int:
    """The host's host_id: the recorded one, or the lowest free id in 1..max_hosts, taken atomically."""
    while True:
        ids, taken = await _scan(client, keys)
        mine = sorted(n for n, h in ids.items() if h == host)
        if mine:
            return mine[0]
        free = next((n for n in range(1, max_hosts + 1) if n not in taken), None)
        if free is None:
            raise HostIdError(f"host {host}: every sanlock host_id 1..{max_hosts} is allocated: remove the "
                              f"hostid/ keys of hosts that left the cluster (or raise locks.max_hosts)")
        if not await client.create(keys.host_id(free), {"host": host}):
            continue  # another host took it between our read and our write: read again
        ids = await host_ids(client, keys)
        mine = sorted(n for n, h in ids.items() if h == host)
        if mine and mine[0] != free:
            # A concurrent allocation for the same host won with a lower id: give ours back.
            await client.delete(keys.host_id(free))
            return mine[0]
        log.info("host %s: allocated sanlock host_id %d", host, free)
        return free

