"""The manager's health view, persisted in etcd for `vmha status` and for the next leader.

    health/<host>            {"host", "domain", "planes": {plane: {"state", "since", "evidence"}},
                              "updated": unix time, "manager": name}
    fabric/<plane>[/<dom>]   {"plane", "domain", "active", "hosts", "since"} while the outage lasts

Times are unix seconds: the monitor runs its core on a monotonic clock offset to unix time, so a
reader on another machine can compute ages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd

from vmha.core.health import FabricChange, HostHealth, PlaneStatus
from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient, encode_json
from vmha.etcd.keys import Keys
from vmha.etcd.values import refused

log = logging.getLogger("vmha.etcd.health_store")


@dataclass(frozen=True, slots=True)
class StoredHealth:
    health: HostHealth
    updated: float
    manager: str


@dataclass(frozen=True, slots=True)
class HealthView:
    hosts: dict[str, StoredHealth]
    fabric: list[FabricChange]


def health_value(health: HostHealth, updated: float, manager: str) -> dict[str, Any]:
    return {**health.to_dict(), "updated": round(updated, 3), "manager": manager}


async def save_host(client: EtcdClient, keys: Keys, health: HostHealth, updated: float, manager: str) -> None:
    await client.put_json(keys.health(health.host), health_value(health, updated, manager))


# etcd refuses a transaction of more operations than --max-txn-ops (default 128).
MAX_HOSTS_PER_WRITE = 100


async def save_hosts(
    client: EtcdClient, keys: Keys, healths: Sequence[HostHealth], updated: float, manager: str
) -> None:
    """Several hosts' records (at most MAX_HOSTS_PER_WRITE) in one transaction: a storm of changes
    costs etcd one proposal per batch rather than one per host."""
    if len(healths) > MAX_HOSTS_PER_WRITE:
        raise ValueError(f"{len(healths)} host records in one write (at most {MAX_HOSTS_PER_WRITE})")
    values = [(keys.health(h.host).encode(), encode_json(health_value(h, updated, manager))) for h in healths]

    async def op(c: aetcd.Client) -> None:
        await c.transaction(compare=[], success=[c.transactions.put(k, v) for k, v in values], failure=[])

    await client.call(op)


async def delete_host(client: EtcdClient, keys: Keys, host: str) -> None:
    await client.delete(keys.health(host))


async def save_fabric(client: EtcdClient, keys: Keys, change: FabricChange) -> None:
    """An active outage is stored; an outage that ended is removed."""
    key = keys.fabric(change.plane, change.domain)
    if change.active:
        await client.put_json(key, change.to_dict())
    else:
        await client.delete(key)


def _fabric(kv: KV) -> FabricChange:
    v = values.read(values.FabricValue, kv)
    return FabricChange(plane=v.plane, domain=v.domain, active=v.active, hosts=tuple(v.hosts), since=v.since)


def _health(kv: KV) -> StoredHealth:
    v = values.read(values.HealthValue, kv)
    planes = {p: PlaneStatus(s.state, s.since, s.evidence) for p, s in v.planes.items()}
    return StoredHealth(HostHealth(v.host, v.domain, planes), v.updated, v.manager)


async def load(client: EtcdClient, keys: Keys) -> HealthView:
    """The persisted view; broken records are logged and left out."""
    hosts: dict[str, StoredHealth] = {}
    kvs, _ = await client.get_prefix(keys.health_prefix)
    for kv in kvs:
        try:
            stored = _health(kv)
        except BadValue as e:
            refused(e, kv)
            continue
        hosts[stored.health.host] = stored
    fabric: list[FabricChange] = []
    kvs, _ = await client.get_prefix(keys.fabric_prefix)
    for kv in kvs:
        try:
            fabric.append(_fabric(kv))
        except BadValue as e:
            refused(e, kv)
    return HealthView(hosts, fabric)


__all__ = [
    "MAX_HOSTS_PER_WRITE",
    "HealthView",
    "StoredHealth",
    "delete_host",
    "health_value",
    "load",
    "save_fabric",
    "save_host",
    "save_hosts",
]
