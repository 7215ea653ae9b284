"""sanlock host_ids, unique in the cluster: keys.host_id(n) = {"host": name}, created if absent.

A host keeps its id for life (its delta lease and every lease record refer to it): allocate()
returns the id already recorded for the host, or takes the lowest free one with a create-if-absent
transaction. Two allocations racing for the same host may both create a key; the loser sees the
lower id in its re-read and deletes its own, so the host ends with exactly one id.
"""

from __future__ import annotations

import logging

from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.values import refused

log = logging.getLogger("vmha.etcd.hostids")


MAX_HOST_ID = 2000  # sanlock's host_id range is 1..2000


class HostIdError(Exception):
    """No host_id could be allocated."""


def _number(keys: Keys, kv: KV) -> int | None:
    """The n of hostid/<n> as vmha writes it (1..2000, no leading zero); None for any other key."""
    suffix = kv.key[len(keys.host_id_prefix) :]
    if not suffix.isdigit() or suffix != str(int(suffix)) or not 1 <= int(suffix) <= MAX_HOST_ID:
        return None
    return int(suffix)


def _parse(keys: Keys, kv: KV) -> tuple[int, str] | None:
    try:
        n = _number(keys, kv)
        if n is None:  # sanlock's host_ids are 1..2000: hostid/0 or hostid/007 is no allocation
            raise BadValue(kv.key, f"not a host_id key (hostid/<n>, n in 1..{MAX_HOST_ID})")
        return n, values.read(values.HostIdValue, kv).host
    except BadValue as e:
        refused(e, kv)
        return None


async def _scan(client: EtcdClient, keys: Keys) -> tuple[dict[int, str], set[int]]:
    """(host_id -> host for readable keys, every id that has a key): a broken key still blocks its id."""
    kvs, _ = await client.get_prefix(keys.host_id_prefix)
    taken = {n for kv in kvs if (n := _number(keys, kv)) is not None}
    return dict(p for kv in kvs if (p := _parse(keys, kv)) is not None), taken


async def host_ids(client: EtcdClient, keys: Keys) -> dict[int, str]:
    """Every allocated host_id and its host (unreadable keys logged and left out)."""
    return (await _scan(client, keys))[0]


async def lookup(client: EtcdClient, keys: Keys, host: str) -> int | None:
    """The host's host_id, None if it has none. BadValue if several ids name the host: which of
    them sanlock knows the host by cannot be told from etcd (a forged key, or an allocation race
    not settled yet), and a decision on the wrong one could fence a live host."""
    ids = sorted(n for n, h in (await host_ids(client, keys)).items() if h == host)
    if len(ids) > 1:
        raise BadValue(keys.host_id_prefix, f"host {host} has several host_ids {ids}: refused")
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

