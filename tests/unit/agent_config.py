"""The agent of host h1 from a minimal config (insecure etcd, leases under tmp_path), for unit tests."""

from __future__ import annotations

from pathlib import Path

from vmha import config
from vmha.agent.locks import AgentLocks


def agent_locks_for(tmp_path: Path, **sections: object) -> AgentLocks:
    """AgentLocks of h1; `sections` are added to the config (agent=..., libvirt=...)."""
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    return AgentLocks(config.parse({
        "cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
        "etcd": {"insecure": True}, "host": {"name": "h1", "domain": "rack1"},
        "locks": {"path": str(tmp_path / "leases")}, **sections,
    }, "test.toml"))  # fmt: skip
