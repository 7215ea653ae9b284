"""The manager's health view, persisted in etcd for `vmha status` and for the next leader.

    health/<host>            {"host", "domain", "planes": {plane: {"state", "since", "evidence"}},
                              "updated": unix time, "manager": name}
    fabric/<plane>[/<dom>]   {"plane", "domain", "active", "hosts", "since"} while the outage lasts

Times are unix seconds: the monitor runs its core on a monotonic clock offset to unix time, so a
reader on another machine can compute ages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vmha.core.health import FabricChange, HostHealth
from vmha.core.planes import Plane
from vmha.etcd.client import BadValue, EtcdClient
from vmha.etcd.keys import Keys

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


async def delete_host(client: EtcdClient, keys: Keys, host: str) -> None:
    await client.delete(keys.health(host))


async def save_fabric(client: EtcdClient, keys: Keys, change: FabricChange) -> None:
    """An active outage is stored; an outage that ended is removed."""
    key = keys.fabric(change.plane, change.domain)
    if change.active:
        await client.put_json(key, change.to_dict())
    else:
        await client.delete(key)


def _fabric(key: str, value: Any) -> FabricChange:
    try:
        return FabricChange(
            plane=Plane(value["plane"]),
            domain=value["domain"],
            active=bool(value["active"]),
            hosts=tuple(str(h) for h in value["hosts"]),
            since=float(value["since"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadValue(key, f"not a fabric outage record: {e!r}") from None


async def load(client: EtcdClient, keys: Keys) -> HealthView:
    """The persisted view; broken records are logged and left out."""
    hosts: dict[str, StoredHealth] = {}
    kvs, _ = await client.get_prefix(keys.health_prefix)
    for kv in kvs:
        try:
            value = kv.json()
            hosts[str(value["host"])] = StoredHealth(
                HostHealth.from_dict(value), float(value.get("updated", 0.0)), str(value.get("manager", ""))
            )
        except (BadValue, KeyError, TypeError, ValueError) as e:
            log.warning("%s: skipped (%s)", kv.key, e)
    fabric: list[FabricChange] = []
    kvs, _ = await client.get_prefix(keys.fabric_prefix)
    for kv in kvs:
        try:
            fabric.append(_fabric(kv.key, kv.json()))
        except BadValue as e:
            log.warning("%s (skipped)", e)
    return HealthView(hosts, fabric)


__all__ = ["HealthView", "StoredHealth", "delete_host", "health_value", "load", "save_fabric", "save_host"]
