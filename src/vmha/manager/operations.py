"""The operator's actions, one function each, shared by the CLI (`vmha host enable`, `vmha host
maintenance`, `vmha pause`) and the REST API (vmha.api): both run the same checks and etcd writes.

Every action is an etcd write the leading manager watches (keys.disabled, keys.maintenance,
keys.pause): any manager, or any machine that reaches etcd, can make it; the leader acts on it.
A refused action raises OperationError with the operator's message (and whether the host is unknown).
"""

from __future__ import annotations

import logging
import time

from vmha.config import Config
from vmha.core.planes import PLANES, PlaneState
from vmha.core.queue import TERMINAL
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient
from vmha.etcd.election import leader_name
from vmha.etcd.keys import Keys
from vmha.etcd.tasks import TaskStore

log = logging.getLogger("vmha.manager.operations")


class OperationError(Exception):
    """The action is refused; str() says why. not_found: the host is unknown (HTTP 404, else 409)."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


async def _known_host(client: EtcdClient, keys: Keys, name: str) -> health_store.StoredHealth:
    stored = (await health_store.load(client, keys)).hosts.get(name)
    if stored is None:
        raise OperationError(f"host '{name}': not in the manager's health view (is it registered?)", not_found=True)
    return stored


async def _leader(client: EtcdClient, keys: Keys) -> str:
    return leader_name(await client.get(keys.leader)) or "none"


async def host_enable(cfg: Config, client: EtcdClient, keys: Keys, name: str, by: str) -> str:
    """Re-enable a repaired host, after checking it is clean: every plane UP in the manager's health
    view and no recovery from it still running. Returns the leader's name."""
    from vmha.manager.daemon import compute_driver

    stored = await _known_host(client, keys, name)
    states = {p: stored.health.planes[p].state if p in stored.health.planes else None for p in PLANES}
    not_up = [f"{p.value} {s.value if s else 'unknown'}" for p, s in states.items() if s != PlaneState.UP]
    if not_up:
        raise OperationError(f"host '{name}' is not clean: {', '.join(not_up)}; repair it first")
    store = TaskStore(client, keys)
    running = [t for t in await store.load() if t.source == name and t.state not in TERMINAL]
    if store.unreadable:  # any of them may be a recovery from this host: in doubt, refuse
        raise OperationError(f"unreadable task(s) {', '.join(store.unreadable)}: fix or delete them first")
    if running:
        vms = ", ".join(f"{t.vm} ({t.state.value})" for t in running)
        raise OperationError(f"host '{name}' still has recoveries running: {vms}; wait for them")
    await compute_driver(cfg, client).enable_host(name)
    await client.delete(keys.quarantined(name))
    await client.delete(keys.disabled(name))
    log.info("host %s: enabled by %s (every plane up, no recovery from it running)", name, by)
    return await _leader(client, keys)


async def host_maintenance(client: EtcdClient, keys: Keys, name: str, on: bool, by: str) -> str:
    """Maintenance on: the leader live-migrates the host's HA VMs away and only alerts on its faults;
    off: it returns to placement. Returns the leader's name."""
    await _known_host(client, keys, name)
    if on:
        await client.put_json(keys.maintenance(name), {"t": round(time.time(), 3)})
    else:
        await client.delete(keys.maintenance(name))
    log.info("host %s: maintenance %s by %s", name, "on" if on else "off", by)
    return await _leader(client, keys)


async def pause(client: EtcdClient, keys: Keys, on: bool, by: str, why: str) -> str:
    """Pause (on) or resume the recoveries cluster-wide: while paused the leader starts no new
    recovery (it alerts instead); those started run to their end. Returns the leader's name."""
    if on:
        await client.put_json(keys.pause, {"t": round(time.time(), 3), "by": by[:200], "why": why[:1000]})
    else:
        await client.delete(keys.pause)
    log.warning("recoveries %s cluster-wide by %s%s", "PAUSED" if on else "resumed", by, f": {why}" if why else "")
    return await _leader(client, keys)


__all__ = ["OperationError", "host_enable", "host_maintenance", "pause"]
