"""The agent's part in split-brain protection (when the config has a [locks] section).

- Joins the sanlock lockspace with a cluster-unique host_id from etcd, retrying in the background
  (the heartbeats never wait for it), after pruning the holder records of exited processes.
- Answers the manager's exit-attestation requests over the management plane: "every process that
  held the VM's lease has exited and this host's lockspace is lost".
- The isolation response (agent.isolation_response = "stop"): stops every local lease holder so
  their leases are free on storage and the manager's proof comes at once.
- At clean stop, leaves the lockspace only when no local process holds a lease: leaving makes
  sanlock kill the holders, and restarting an agent must never kill VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vmha.config import Config
from vmha.core.planes import Plane
from vmha.etcd.attest import serve_attestations
from vmha.etcd.client import EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.locks import Attestation, LockError, LockSpace, attest_exit, prune_records, stop_lease_holders
from vmha.locks.lease import live_holders
from vmha.locks.membership import join, leave

log = logging.getLogger("vmha.agent")


class AgentLocks:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.host = cfg.require_host().name
        self.keys = Keys(cfg.cluster.name)
        self.space = LockSpace.from_config(cfg.require_locks())
        self.host_id: int | None = None

    async def on_isolated(self) -> None:
        if self.cfg.agent.isolation_response != "stop":
            log.warning("host %s isolated: isolation_response=leave, HA VMs keep running", self.host)
            return
        result = await stop_lease_holders(self.space)
        log.warning(
            "host %s isolation response: %d lease holder(s) stopped by SIGTERM, %d by SIGKILL, %d survived",
            self.host, len(result.terminated), len(result.killed), len(result.survivors),
        )  # fmt: skip

    async def run(self) -> None:
        """Join, then serve attestations until cancelled; reconnects with backoff."""
        pruned = await asyncio.to_thread(prune_records)
        if pruned:
            log.info("host %s: forgot %d lease holder record(s) of exited processes", self.host, pruned)
        async with EtcdClient(self.cfg.planes.endpoints(Plane.MANAGEMENT), name=f"{self.host}/locks") as client:
            while self.host_id is None:
                try:
                    self.host_id = await join(self.space, client, self.keys, self.host)
                    log.info("host %s joined lockspace %s as host_id %d", self.host, self.space.name, self.host_id)
                except (EtcdError, LockError) as e:
                    log.error("host %s: cannot join lockspace %s: %s; retrying", self.host, self.space.name, e)
                    await client.wait_backoff()

            async def check(vm: str) -> Attestation:
                return await asyncio.to_thread(attest_exit, self.space, vm)

            while True:
                try:
                    await serve_attestations(client, self.keys, self.host, check)
                except EtcdError as e:
                    log.warning("host %s: attestation watch broken (%s); resuming", self.host, e)
                    await client.wait_backoff()

    async def stop(self) -> None:
        if self.host_id is None:
            return
        holders = await asyncio.to_thread(live_holders, self.space)
        if holders:
            log.info(
                "host %s: keeping lockspace %s joined: %d process(es) hold leases (%s)",
                self.host, self.space.name, len(holders), ", ".join(sorted({h.vm for h in holders})),
            )  # fmt: skip
            return
        with contextlib.suppress(LockError):
            await leave(self.space, self.host_id)
