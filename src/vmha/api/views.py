"""What the REST API shows, read from etcd through vmha.etcd and shaped as JSON.

Every value comes through the strict models (vmha.etcd.values): an unreadable one is logged by the
store that reads it and left out, or shown as what it is ("unreadable"), never trusted.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vmha.config import Config
from vmha.drivers.base import VmInfo
from vmha.etcd import health_store, values
from vmha.etcd.client import BadValue, EtcdClient
from vmha.etcd.election import leader_name
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog, RecordStore
from vmha.etcd.tasks import TaskStore
from vmha.manager.daemon import hosts_out
from vmha.manager.status import view_data

VmLister = Callable[[], Awaitable[Sequence[VmInfo]]]


async def pause_state(client: EtcdClient, keys: Keys) -> dict[str, Any]:
    """{"paused": bool, "t", "by", "why"}: an unreadable pause record still pauses (the leader says so too)."""
    kv = await client.get(keys.pause)
    if kv is None:
        return {"paused": False}
    try:
        v = values.read(values.PauseValue, kv)
    except BadValue as e:
        values.refused(e, kv, "recoveries stay paused while the key exists")
        return {"paused": True, "t": None, "by": "", "why": "unreadable pause record"}
    return {"paused": True, "t": v.t, "by": v.by, "why": v.why}


async def _maintenance(client: EtcdClient, keys: Keys) -> dict[str, float | None]:
    kvs, _ = await client.get_prefix(keys.maintenance_prefix)
    out: dict[str, float | None] = {}
    for kv in kvs:
        try:
            out[kv.key.removeprefix(keys.maintenance_prefix)] = values.read(values.MaintenanceValue, kv).t
        except BadValue as e:
            values.refused(e, kv, "the host is in maintenance all the same (the key exists)")
            out[kv.key.removeprefix(keys.maintenance_prefix)] = None
    return out


async def hosts(client: EtcdClient, keys: Keys) -> dict[str, Any]:
    """The manager's health view (as `vmha status --json`) with each host's operator states: taken
    out by vmha (disabled or marked down, quarantined and why), in maintenance since when."""
    now = time.time()
    data = view_data(await health_store.load(client, keys), now)
    out = {h.host: h for h in await hosts_out(client, keys)}
    maintenance = await _maintenance(client, keys)
    for h in data["hosts"]:
        taken = out.get(h["host"])
        h["out"] = taken.op.value if taken is not None else None
        h["quarantined"] = (taken.quarantine or None) if taken is not None else None
        h["maintenance"] = h["host"] in maintenance
        h["maintenance_since"] = maintenance.get(h["host"])
    data["leader"] = leader_name(await client.get(keys.leader))
    data["pause"] = await pause_state(client, keys)
    return data


async def vms(list_vms: VmLister | None) -> dict[str, Any]:
    if list_vms is None:
        return {"vms": [], "available": False}
    return {
        "available": True,
        "vms": [{"name": v.name, "host": v.host, "ha": v.ha, "priority": v.priority, "state": v.state}
                for v in sorted(await list_vms(), key=lambda v: v.name)],
    }


async def tasks(client: EtcdClient, keys: Keys) -> dict[str, Any]:
    store = TaskStore(client, keys)
    loaded = await store.load()
    return {"tasks": [t.to_dict() for t in loaded], "unreadable": store.unreadable}


async def recoveries(client: EtcdClient, keys: Keys, vm: str) -> dict[str, Any]:
    return {"vm": vm, "recoveries": [t.to_dict() for t in await RecordStore(client, keys).history(vm)]}


async def events(client: EtcdClient, keys: Keys, last: int) -> dict[str, Any]:
    shown, revision = await EventLog(client, keys).tail(last)
    return {"events": [e.to_dict() for e in shown], "revision": revision}


def policy(cfg: Config) -> dict[str, Any]:
    return {"rows": [{"failed": key, "action": action} for key, action in cfg.policy_table.render()]}


__all__ = ["VmLister", "events", "hosts", "pause_state", "policy", "recoveries", "tasks", "vms"]
