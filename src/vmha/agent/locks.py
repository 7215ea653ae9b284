"""The agent's part in split-brain protection (when the config has a [locks] section).

- Joins the sanlock lockspace with a cluster-unique host_id from etcd, retrying in the background
  (the heartbeats never wait for it). With a [libvirt] section, first checks libvirt's lock settings
  (vmha.agent.libvirt_locks) against that host_id: when they are wrong it does not join (so it holds
  nothing and attests nothing), logs the setting and file, marks the host record (LOCKS_REFUSED: the
  manager alerts) and checks again every REFUSED_RECHECK seconds until they are right.
- Answers the manager's exit-attestation requests over the management plane: "every process that
  held the VM's lease has exited and this host's lockspace is lost".
- Records every lease holder sanlock reports (every REJOIN_CHECK, and before each attestation), so
  that a QEMU whose lease libvirt acquired is still known, checked and stopped once the lockspace has
  failed and the daemon has forgotten it; prunes the records of holders that have exited.
- The isolation response (agent.isolation_response = "stop"): stops every local lease holder so
  their leases are free on storage and the manager's proof comes at once.
- At clean stop, leaves the lockspace only when no local process holds a lease: leaving makes
  sanlock kill the holders, and restarting an agent must never kill VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vmha.agent.libvirt_locks import LibvirtConfError, LockSettingsError, check_lock_settings
from vmha.config import Config
from vmha.core.planes import Plane
from vmha.etcd.attest import serve_attestations
from vmha.etcd.client import Backoff, EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.registry import LOCKS_REFUSED, register
from vmha.locks import Attestation, LockError, LockSpace, attest_exit, prune_records, stop_lease_holders
from vmha.locks.lease import live_holders, record_seen_holders
from vmha.locks.membership import NoHostId, allocated_host_id, join, leave

log = logging.getLogger("vmha.agent")

REJOIN_CHECK = 2.0  # seconds between checks that the lockspace is still joined
REFUSED_RECHECK = 10.0  # seconds between checks of libvirt's lock settings while they are wrong
JOIN_RETRY_CAP = 2.0  # seconds: the longest wait between two attempts to join the lockspace
NOT_CONFIGURED = ""  # AgentLocks.checked when this host has no qemu.conf (and libvirt.required is false)


class AgentLocks:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.host = cfg.require_host().name
        self.domain = cfg.require_host().domain
        # Why libvirt's lock settings refuse this host ('' when they do not; None before the first check,
        # which clears a mark an earlier run left).
        self.refused: str | None = None
        # What the last check found right: the settings' text, or NOT_CONFIGURED; None after a refusal
        # and before the first check. Logged when it changes, not at every join attempt.
        self.checked: str | None = None
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
        """Join, serve attestations, and rejoin when the lockspace is lost (a storage outage makes
        sanlock drop it); runs until cancelled."""
        async with EtcdClient(self.cfg.planes.endpoints(Plane.MANAGEMENT), name=f"{self.host}/locks",
                              tls=self.cfg.etcd.tls()) as client:
            await self._join(client)
            serving = asyncio.create_task(self._serve(client), name="attestations")
            try:
                while True:
                    await self._record_holders()
                    await asyncio.sleep(REJOIN_CHECK)
                    assert self.host_id is not None
                    try:
                        joined = await asyncio.to_thread(self.space.joined, self.host_id)
                    except LockError as e:
                        log.warning("host %s: cannot ask sanlock about lockspace %s: %s", self.host, self.space.name, e)
                        continue
                    if joined is False:
                        log.warning("host %s: lockspace %s lost (storage outage?): rejoining",
                                    self.host, self.space.name)  # fmt: skip
                        self.host_id = None
                        await self._join(client)
            finally:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    async def _record_holders(self) -> None:
        try:
            new = await asyncio.to_thread(record_seen_holders, self.space)
            pruned = await asyncio.to_thread(prune_records)
        except (LockError, OSError) as e:
            log.error("host %s: cannot record the lease holders sanlock reports: %s", self.host, e)
            return
        for h in new:
            log.info("host %s: lease holder vm=%s pid=%d recorded (seen through sanlock; acquired for it, "
                     "e.g. by libvirt's lock manager)", self.host, h.vm, h.pid)  # fmt: skip
        if pruned:
            log.info("host %s: forgot %d lease holder record(s) of exited processes", self.host, pruned)

    async def _settings_refuse(self, client: EtcdClient) -> bool:
        """Checks libvirt's lock settings (if configured): True while they refuse this host."""
        if self.cfg.libvirt is None:
            return False
        host_id = await allocated_host_id(client, self.keys, self.host)
        found, why = None, ""
        try:
            found = await asyncio.to_thread(check_lock_settings, self.cfg.libvirt, self.cfg.require_locks(),
                                          host_id)
        except (LockSettingsError, LibvirtConfError) as e:
            why = str(e)
        if why and why != self.refused:
            log.error("host %s NOT protected: libvirt's lock settings are wrong: %s; not joining lockspace %s, "
                      "checking again every %.0f s", self.host, why, self.space.name, REFUSED_RECHECK)  # fmt: skip
        text = found.text if found is not None else NOT_CONFIGURED
        if not why and text != self.checked:
            if found is not None:
                log.info("host %s: libvirt lock settings checked: %s", self.host, found.text)
            else:
                log.warning("host %s: no %s/qemu.conf: libvirt not configured here, its lock settings not checked "
                            "(libvirt.required = false)", self.host, self.cfg.libvirt.config_dir)  # fmt: skip
        self.checked = None if why else text
        if why != self.refused:
            await register(client, self.keys, self.host, self.domain, **{LOCKS_REFUSED: why or None})
        self.refused = why
        return bool(why)

    async def _join(self, client: EtcdClient) -> None:
        # Its own backoff: the etcd calls between two attempts succeed and reset the client's, and a
        # storage outage would otherwise be retried (and logged) ten times a second until it ends.
        backoff = Backoff(cap=JOIN_RETRY_CAP)
        failing = ""
        while self.host_id is None:
            try:
                if await self._settings_refuse(client):
                    await asyncio.sleep(REFUSED_RECHECK)
                    continue
                self.host_id = await join(self.space, client, self.keys, self.host)
                log.info("host %s joined lockspace %s as host_id %d", self.host, self.space.name, self.host_id)
            except NoHostId as e:  # hosts never allocate one (etcd refuses them hostid/): a manager does
                log.warning("host %s: not joining lockspace %s yet: %s; waiting", self.host, self.space.name, e)
                await asyncio.sleep(backoff.next())
            # OSError: the lease area on a storage mount still reconnecting (ENOTCONN, EIO) after an outage.
            except (EtcdError, LockError, OSError) as e:
                if str(e) != failing:  # once per distinct error, not once per attempt
                    log.error("host %s: cannot join lockspace %s: %s; retrying, at most %.0f s apart",
                              self.host, self.space.name, e, JOIN_RETRY_CAP)  # fmt: skip
                failing = str(e)
                await asyncio.sleep(backoff.next())

    async def _serve(self, client: EtcdClient) -> None:
        async def check(vm: str) -> Attestation:
            await self._record_holders()
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
