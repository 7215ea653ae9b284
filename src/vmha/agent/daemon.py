"""The agent of one compute host.

- Registers the host (keys.host(h): {"host", "domain", ...}) through the management plane,
  retrying in the background: registration never delays the heartbeats.
- Runs one PlaneHeartbeat per plane, each on that plane's endpoints (independent tasks).
- Keeps its own view of the planes it cannot reach and writes it, atomically, to a JSON status file.
- Isolation hook: management and service both unreachable for agent.isolation_after seconds while
  storage is reachable, all that time (etcd losing quorum fails every plane: no isolation)
  -> ``await on_isolated()`` once; armed again when the condition clears.
  Unless it is a fabric outage: read over the storage plane, the other hosts' management and service
  heartbeats are gone too (the fabric guard's rule). Then the VMs are left running, as the manager,
  seeing FABRIC, recovers nothing: stopped, they would stay stopped after the fabric came back.
- A clean stop (SIGTERM) first marks the host record "agent stopped" (registry.AGENT_STOPPED), then
  ends the heartbeats WITHOUT revoking their leases: the keys go when the TTL runs out, and the
  manager, seeing the mark, only alerts (an agent restart or upgrade must never fence a healthy host;
  a restart within the TTL is not even seen). The next run clears the mark once its heartbeats beat.
  While the mark holds, the host is not protected: the manager recovers nothing from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmha import metrics
from vmha.config import Config
from vmha.core.health import fabric_not_isolation
from vmha.core.planes import PLANES, Plane
from vmha.etcd.client import EtcdClient, EtcdError, redact_url
from vmha.etcd.heartbeat import PlaneHeartbeat, PlaneReach
from vmha.etcd.keys import Keys
from vmha.etcd.registry import AGENT_STOPPED, list_hosts, register

log = logging.getLogger("vmha.agent")

OnIsolated = Callable[[], Awaitable[None]]
STOP_MARK_TIMEOUT = 1.0  # seconds the clean-stop mark may take; the heartbeats still run meanwhile
PEER_READ_TIMEOUT = 2.0  # seconds the isolation check may take to read the other hosts over storage
# systemd: READY waits this long for every plane to beat, then settles for one (a plane cut at boot is
# what the agent is there to report, not a reason to fail its start).
READY_WAIT = 30.0


def default_status_path(host: str) -> Path:
    return Path("/run/vmha") / f"agent-{host}.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one (write a temp file, rename it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def isolated(reach: dict[Plane, PlaneReach], now: float, after: float) -> bool:
    """Management and service unreachable for at least ``after`` seconds while storage was reachable.
    Counted from the latest of the three changes: when etcd itself fails (quorum lost, every plane's
    call answered with an error), storage fails too, and when quorum returns storage may beat again a
    backoff before the others do; that is etcd's trouble, not this host's isolation."""
    m, v, s = reach[Plane.MANAGEMENT], reach[Plane.SERVICE], reach[Plane.STORAGE]
    return s.reachable and not m.reachable and not v.reachable and now - max(m.since, v.since, s.since) >= after


class Agent:
    def __init__(
        self,
        cfg: Config,
        *,
        status_path: Path | None = None,
        on_isolated: OnIsolated | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        host = cfg.require_host()
        self.cfg = cfg
        self.host = host.name
        self.domain = host.domain
        self.keys = Keys(cfg.cluster.name)
        self.status_path = status_path or default_status_path(self.host)
        self.on_isolated = on_isolated
        self.clock = clock
        t = cfg.timings
        self.planes = {
            p: PlaneHeartbeat(
                self.keys,
                self.host,
                p,
                cfg.planes.endpoints(p),
                ttl=t.lease_ttl,
                interval=t.keepalive_interval,
                clock=clock,
                tls=cfg.etcd.tls(),
            )
            for p in PLANES
        }
        self.registered = False
        self.isolation_fired = False
        self.isolation_withheld = ""  # the fabric evidence while the isolation response is withheld
        self._recheck_at = 0.0  # when to read the other hosts again while withheld
        self.started = clock()

    def reach(self) -> dict[Plane, PlaneReach]:
        return {p: hb.reach() for p, hb in self.planes.items()}

    def status(self) -> dict[str, Any]:
        now = self.clock()
        reach = self.reach()
        return {
            "host": self.host,
            "domain": self.domain,
            "cluster": self.cfg.cluster.name,
            "pid": os.getpid(),
            "time": round(time.time(), 3),
            "uptime": round(now - self.started, 3),
            "registered": self.registered,
            "unreachable": [p.value for p in PLANES if not reach[p].reachable],
            "isolated": self.isolation_fired,
            "isolation_withheld": self.isolation_withheld or None,  # why, in a fabric outage
            "planes": {p.value: reach[p].to_dict(now) for p in PLANES},
        }

    def readiness(self) -> str | None:
        """For systemd (vmha.sdnotify): None until the heartbeats beat on every plane (or, after
        READY_WAIT, on at least one), then a one-line status naming the unreachable planes."""
        reach = self.reach()
        beaten = [p for p in PLANES if self.planes[p].seq > 0]
        if not beaten or (len(beaten) < len(PLANES) and self.clock() - self.started < READY_WAIT):
            return None
        down = [p.value for p in PLANES if not reach[p].reachable]
        isolation = " (isolated)" if self.isolation_fired else ""
        return f"host {self.host}: heartbeats on {len(PLANES) - len(down)}/{len(PLANES)} planes" + (
            f"; unreachable: {', '.join(down)}" if down else "") + isolation

    async def _register(self) -> None:
        # Through the management plane, on a connection of its own (the heartbeat's stays dedicated).
        async with EtcdClient(self.cfg.planes.endpoints(Plane.MANAGEMENT), name=f"{self.host}/register",
                              tls=self.cfg.etcd.tls()) as c:
            await self._write_record(c, "registration")
            self.registered = True
            log.info("host %s registered (domain %s)", self.host, self.domain)
            # Clear a stop mark once the heartbeats are back: cleared earlier, the manager would act on
            # planes still DOWN from the stop. A plane that cannot beat delays it by one TTL at most.
            deadline = self.clock() + self.cfg.timings.lease_ttl
            while self.clock() < deadline and not all(hb.seq > 0 for hb in self.planes.values()):
                await asyncio.sleep(0.05)
            await self._write_record(c, "clearing the stop mark", **{AGENT_STOPPED: None})

    async def _write_record(self, c: EtcdClient, what: str, **fields: Any) -> None:
        """Merge `fields` into the host record, retrying until etcd takes it."""
        while True:
            try:
                await register(c, self.keys, self.host, self.domain, **fields)
                return
            except EtcdError as e:
                log.warning("host %s: %s failed (%s); retrying", self.host, what, e)
                await c.wait_backoff()

    async def _mark_stopped(self) -> None:
        """Mark the host record before the heartbeats end (bounded: a stop must not hang)."""
        endpoints = self.cfg.planes.endpoints(Plane.MANAGEMENT)
        try:
            async with EtcdClient(endpoints, timeout=STOP_MARK_TIMEOUT, name=f"{self.host}/stop",
                                  tls=self.cfg.etcd.tls()) as c:
                await register(c, self.keys, self.host, self.domain, **{AGENT_STOPPED: round(time.time(), 3)})
        except EtcdError as e:
            log.error("host %s: could not mark the clean stop (%s): the manager will see the expiring "
                      "heartbeats as a host failure", self.host, e)  # fmt: skip
            return
        log.info("host %s: marked as stopped cleanly; heartbeats end, their leases expire in %ss",
                 self.host, self.cfg.timings.lease_ttl)  # fmt: skip

    async def _watch_isolation(self) -> None:
        after = self.cfg.agent.isolation_after
        interval = self.cfg.timings.keepalive_interval
        while True:
            now = self.clock()
            reach = self.reach()
            if isolated(reach, now, after):
                if self.isolation_withheld and now < self._recheck_at:
                    pass  # a fabric outage: looked again every fabric_window, not every keepalive
                elif not self.isolation_fired and (fabric := await self._others_lost_them_too(reach)):
                    self._recheck_at = self.clock() + self.cfg.timings.fabric_window
                    if fabric != self.isolation_withheld:
                        log.warning(
                            "host %s: management and service unreachable, storage reachable, but %s (read "
                            "over storage): a fabric outage, not this host's isolation; isolation response "
                            "withheld, VMs left running", self.host, fabric,
                        )  # fmt: skip
                    self.isolation_withheld = fabric
                elif not self.isolation_fired:
                    self.isolation_fired = True
                    self.isolation_withheld = ""
                    log.error(
                        "host %s isolated: management and service unreachable for %.1fs, storage "
                        "reachable (management: %s; service: %s); isolation response",
                        self.host, after, reach[Plane.MANAGEMENT].last_error, reach[Plane.SERVICE].last_error,
                    )  # fmt: skip
                    self.write_status()
                    if self.on_isolated is not None:
                        await self.on_isolated()
            elif self.isolation_fired and (reach[Plane.MANAGEMENT].reachable or reach[Plane.SERVICE].reachable):
                self.isolation_fired = False
                log.info("host %s no longer isolated: isolation response armed again", self.host)
            else:
                self.isolation_withheld = ""
            self.write_status()
            metrics.agent_planes({p: r.reachable for p, r in reach.items()}, self.isolation_fired)
            await asyncio.sleep(interval)

    async def _others_lost_them_too(self, reach: dict[Plane, PlaneReach]) -> str:
        """Read over the storage plane, the one this host still reaches: have so many other hosts lost
        management and service as well (no heartbeat key left on either) that the fabric guard's rule
        holds? Its evidence, or '' (also when etcd cannot be read: then this host counts as isolated)."""
        # Another host's keys go when its leases expire, up to a TTL (+ etcd's 0.5 s expiry check)
        # after the loss: read no earlier than that.
        lost = max(reach[Plane.MANAGEMENT].since, reach[Plane.SERVICE].since)
        await asyncio.sleep(max(0.0, lost + self.cfg.timings.lease_ttl + 1.0 - self.clock()))
        try:
            async with EtcdClient(self.cfg.planes.endpoints(Plane.STORAGE), timeout=PEER_READ_TIMEOUT,
                                  name=f"{self.host}/isolation-check", tls=self.cfg.etcd.tls()) as c:  # fmt: skip
                hosts = await list_hosts(c, self.keys)
                kvs, _ = await c.get_prefix(self.keys.heartbeat_prefix)
        except EtcdError as e:
            log.warning("host %s: cannot read the other hosts' heartbeats over storage (%s): taken as this "
                        "host's isolation", self.host, e)  # fmt: skip
            return ""
        beating = {hp for kv in kvs if (hp := self.keys.parse_heartbeat(kv.key)) is not None}
        # An agent stopped cleanly beats on no plane: it says nothing about the fabric.
        domains = {h: r.domain for h, r in hosts.items() if r.fields.get(AGENT_STOPPED) is None}
        domains[self.host] = self.domain
        cut = {h for h in domains if h == self.host
               or not any((h, p) in beating for p in (Plane.MANAGEMENT, Plane.SERVICE))}  # fmt: skip
        return fabric_not_isolation(self.host, domains, cut, self.cfg.timings.health())

    def write_status(self) -> None:
        try:
            write_json_atomic(self.status_path, self.status())
        except OSError as e:
            log.warning("host %s: cannot write status file %s: %s", self.host, self.status_path, e)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then mark the clean stop, end the heartbeats (their leases run
        out) and remove the status file."""
        log.info(
            "agent for host %s (domain %s, cluster %s) starting: %s",
            self.host, self.domain, self.cfg.cluster.name,
            ", ".join(f"{p.value}={','.join(map(redact_url, self.cfg.planes.endpoints(p)))}" for p in PLANES),
        )  # fmt: skip
        tasks = [asyncio.create_task(self._register(), name="register")]
        try:
            # Registered first, so the manager knows our failure domain before our first heartbeat;
            # but never waiting more than a TTL: without management the other planes must still beat.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tasks[0]), self.cfg.timings.lease_ttl)
            for hb in self.planes.values():
                hb.start()
            tasks.append(asyncio.create_task(self._watch_isolation(), name="isolation"))
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if any(hb.seq > 0 for hb in self.planes.values()):
                await self._mark_stopped()
            await asyncio.gather(*(hb.stop(revoke=False) for hb in self.planes.values()))
            with contextlib.suppress(FileNotFoundError):
                self.status_path.unlink()
            log.info("agent for host %s stopped", self.host)


__all__ = ["Agent", "OnIsolated", "default_status_path", "isolated", "write_json_atomic"]
