"""The agent of one compute host.

- Registers the host (keys.host(h): {"host", "domain", ...}) through the management plane,
  retrying in the background: registration never delays the heartbeats.
- Runs one PlaneHeartbeat per plane, each on that plane's endpoints (independent tasks).
- Keeps its own view of the planes it cannot reach and writes it, atomically, to a JSON status file.
- Isolation hook: management and service both unreachable for agent.isolation_after seconds while
  storage is reachable -> ``await on_isolated()`` once; armed again when the condition clears.
- stop(): cancels the heartbeats, revokes their leases (the manager sees the keys go at once).
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

from vmha.config import Config
from vmha.core.planes import PLANES, Plane
from vmha.etcd.client import EtcdClient, EtcdError
from vmha.etcd.heartbeat import PlaneHeartbeat, PlaneReach
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register

log = logging.getLogger("vmha.agent")

OnIsolated = Callable[[], Awaitable[None]]


def default_status_path(host: str) -> Path:
    return Path("/run/vmha") / f"agent-{host}.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one (write a temp file, rename it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def isolated(reach: dict[Plane, PlaneReach], now: float, after: float) -> bool:
    """Management and service unreachable for at least ``after`` seconds, storage reachable."""
    m, v, s = reach[Plane.MANAGEMENT], reach[Plane.SERVICE], reach[Plane.STORAGE]
    return s.reachable and not m.reachable and not v.reachable and now - m.since >= after and now - v.since >= after


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
            )
            for p in PLANES
        }
        self.registered = False
        self.isolation_fired = False
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
            "planes": {p.value: reach[p].to_dict(now) for p in PLANES},
        }

    async def _register(self) -> None:
        # Through the management plane, on a connection of its own (the heartbeat's stays dedicated).
        async with EtcdClient(self.cfg.planes.endpoints(Plane.MANAGEMENT), name=f"{self.host}/register") as c:
            while True:
                try:
                    await register(c, self.keys, self.host, self.domain)
                except EtcdError as e:
                    log.warning("host %s: registration failed (%s); retrying", self.host, e)
                    await c.wait_backoff()
                    continue
                self.registered = True
                log.info("host %s registered (domain %s)", self.host, self.domain)
                return

    async def _watch_isolation(self) -> None:
        after = self.cfg.agent.isolation_after
        interval = self.cfg.timings.keepalive_interval
        while True:
            now = self.clock()
            reach = self.reach()
            if isolated(reach, now, after):
                if not self.isolation_fired:
                    self.isolation_fired = True
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
            self.write_status()
            await asyncio.sleep(interval)

    def write_status(self) -> None:
        try:
            write_json_atomic(self.status_path, self.status())
        except OSError as e:
            log.warning("host %s: cannot write status file %s: %s", self.host, self.status_path, e)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then revoke the leases and remove the status file."""
        log.info(
            "agent for host %s (domain %s, cluster %s) starting: %s",
            self.host, self.domain, self.cfg.cluster.name,
            ", ".join(f"{p.value}={','.join(self.cfg.planes.endpoints(p))}" for p in PLANES),
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
            # In parallel: a plane that cannot be reached must not delay revoking on the others.
            await asyncio.gather(*(hb.stop(revoke=True) for hb in self.planes.values()))
            with contextlib.suppress(FileNotFoundError):
                self.status_path.unlink()
            log.info("agent for host %s stopped", self.host)


__all__ = ["Agent", "OnIsolated", "default_status_path", "isolated", "write_json_atomic"]
