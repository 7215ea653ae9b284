"""Host registration: keys.host(h) = {"host", "domain", ...}, written by the host's agent, no lease.

The record outlives the agent (a host whose agent died is still a member whose planes are DOWN).
A clean stop of the agent writes AGENT_STOPPED (the time) into it before the heartbeats end; the
agent clears it once it beats again. The manager alerts, and recovers nothing, for a marked host.
An agent that refuses to protect its host (libvirt's lock settings are wrong) writes LOCKS_REFUSED
(why), and clears it once it joins the lockspace; the manager alerts it.
register() merges its fields into whatever is stored (compare-and-swap on mod_revision), so fields
written by other parts of vmha, such as the sanlock host_id, survive an agent restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient
from vmha.etcd.keys import Keys
from vmha.etcd.values import refused

log = logging.getLogger("vmha.etcd.registry")

# The agent's clean-stop mark in its host record: unix time of the stop, null (None) once it runs again.
AGENT_STOPPED = "agent_stopped"
# The agent's refusal to protect its host: the reason (text), null (None) once it protects it.
LOCKS_REFUSED = "locks_refused"


@dataclass(frozen=True, slots=True)
class HostRecord:
    host: str
    domain: str
    fields: dict[str, Any] = field(default_factory=dict)  # the whole stored value

    agent_stopped: float | None = None  # when the agent stopped cleanly (unix time); None while it runs

    @property
    def locks_refused(self) -> str | None:
        """Why the host's agent refuses to protect it (a non-string value is shown as stored); None if not."""
        why = self.fields.get(LOCKS_REFUSED)
        return None if why is None else str(why)


def parse_host(keys: Keys, kv: KV, value: Any) -> HostRecord:
    """The record of a hosts/ key and its decoded value; BadValue if it is not a host record."""
    host = kv.key[len(keys.hosts_prefix) :]
    if not host or "/" in host:
        raise BadValue(kv.key, "not a host key")
    v = values.parse(values.HostValue, kv, value)
    if v.host is not None and v.host != host:
        raise BadValue(kv.key, f"the record names host {v.host!r}")
    return HostRecord(host, v.domain, dict(value), v.agent_stopped)


async def register(client: EtcdClient, keys: Keys, host: str, domain: str, **fields: Any) -> HostRecord:
    """Create or update the host's record with ``domain`` and ``fields``, keeping other fields."""
    key = keys.host(host)
    while True:
        current: dict[str, Any] = {}
        mod = 0
        try:
            got = await client.get_json(key)
        except BadValue as e:
            log.warning("%s: overwriting it", e)
            kv = await client.get(key)
            mod = 0 if kv is None else kv.mod_revision
        else:
            if got is not None:
                value, kv = got
                mod = kv.mod_revision
                if isinstance(value, dict):
                    current = value
        new = {**current, **fields, "host": host, "domain": domain}
        if new == current:
            return HostRecord(host, domain, new)
        if await client.cas(key, new, mod):
            return HostRecord(host, domain, new)
        # Someone wrote between our read and our write: read again and merge again.


async def list_hosts(client: EtcdClient, keys: Keys) -> dict[str, HostRecord]:
    """Every registered host; a broken record is logged and left out."""
    kvs, _ = await client.get_prefix(keys.hosts_prefix)
    hosts: dict[str, HostRecord] = {}
    for kv in kvs:
        try:
            rec = parse_host(keys, kv, kv.json())
        except BadValue as e:
            refused(e, kv)
            continue
        hosts[rec.host] = rec
    return hosts


async def unregister(client: EtcdClient, keys: Keys, host: str) -> bool:
    return await client.delete(keys.host(host))


__all__ = ["HostRecord", "list_hosts", "parse_host", "register", "unregister"]
