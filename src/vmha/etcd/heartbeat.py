"""Per-plane heartbeats: the agent's proof, plane by plane, that it reaches etcd through that network.

One PlaneHeartbeat per plane, each with its own EtcdClient on that plane's endpoints, its own lease
and its own task, so one plane's trouble (a hung connection, a timeout) never delays another.
Every ``keepalive_interval`` it refreshes the lease and rewrites keys.heartbeat(host, plane) with a
new value {"host","plane","seq","t"}: the manager sees a *changing* value, a stronger sign of life
than a key that merely still exists (an etcd leader change extends every lease). A lease that etcd
reports gone (TTL <= 0), or that has not been refreshed for a whole TTL, is granted again.

Hosts start on different etcd members (by their name's hash) and a failure moves a heartbeat to
another member drawn at random; once its first member answers again, it returns there (HOME_EVERY).

Each heartbeat also keeps the agent's own view of the plane (PlaneReach): reachable or not since
when, last success, last error. The agent's isolation check and status file read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from vmha.core.planes import Plane
from vmha.etcd.client import EtcdClient, EtcdError, EtcdUnavailable
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles

log = logging.getLogger("vmha.agent")

# While a failure keeps a plane's heartbeat on another member than its first, this often it checks
# (on a connection of its own) whether the first answers again, and then returns to it: otherwise a
# member lost and restarted leaves every host on the members left, all at once on one after a lost
# quorum, and the next loss of that one stalls every host's heartbeat together.
HOME_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class PlaneReach:
    """The agent's own view of one plane."""

    plane: Plane
    endpoint: str
    reachable: bool
    since: float  # monotonic time `reachable` last changed
    last_ok: float | None  # monotonic time of the last successful keepalive + write
    last_error: str | None
    seq: int
    lease: int | None

    def to_dict(self, now: float) -> dict[str, object]:
        """JSON for the status file; times become ages in seconds (monotonic times mean nothing
        outside this process)."""
        return {
            "plane": self.plane.value,
            "endpoint": self.endpoint,
            "reachable": self.reachable,
            "for": round(now - self.since, 3),
            "last_ok_age": None if self.last_ok is None else round(now - self.last_ok, 3),
            "last_error": self.last_error,
            "seq": self.seq,
            "lease": None if self.lease is None else format(self.lease, "x"),
        }


class PlaneHeartbeat:
    def __init__(
        self,
        keys: Keys,
        host: str,
        plane: Plane,
        endpoints: list[str],
        *,
        ttl: int,
        interval: float,
        timeout: float | None = None,
        client: EtcdClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsFiles | None = None,
    ) -> None:
        self.key = keys.heartbeat(host, plane)
        self.host = host
        self.plane = plane
        self.ttl = ttl
        self.interval = interval
        # Long enough for a loaded etcd, short enough that a dead path is noticed well inside the TTL.
        self.timeout = timeout if timeout is not None else max(interval, ttl / 2)
        # Hosts start on different members: a silent member (or its NIC on this plane) then stalls a
        # share of the heartbeats, not every host's at once, which the fabric guard would read as a
        # fabric outage of the plane (a false alert; tests/e2e/test_lab_etcd.py saw it).
        self.client = client or EtcdClient(endpoints, timeout=self.timeout, name=f"{host}/{plane.value}", tls=tls,
                                           first=zlib.crc32(host.encode()))
        self.clock = clock
        self.lease: int | None = None
        self.lease_refreshed: float | None = None
        self.seq = 0
        self._reachable = False
        self._since = clock()
        self._task: asyncio.Task[None] | None = None

    # -- the agent's view ------------------------------------------------------------------------

    def reach(self) -> PlaneReach:
        return PlaneReach(
            plane=self.plane,
            endpoint=self.client.endpoint,
            reachable=self._reachable,
            since=self._since,
            last_ok=self.client.last_ok,
            last_error=self.client.last_error,
            seq=self.seq,
            lease=self.lease,
        )

    def _mark(self, reachable: bool, why: str) -> None:
        if reachable != self._reachable:
            self._reachable = reachable
            self._since = self.clock()
            if reachable:
                log.info("host %s plane %s: etcd reachable (%s)", self.host, self.plane.value, why)
            else:
                log.warning("host %s plane %s: etcd unreachable (%s)", self.host, self.plane.value, why)

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"heartbeat {self.host}/{self.plane.value}")
        return self._task

    async def beat(self) -> None:
        """One keepalive: (re-)grant the lease if needed, refresh it, write a new value on it."""
        now = self.clock()
        if self.lease is not None and (self.lease_refreshed is None or now - self.lease_refreshed >= self.ttl):
            # Not refreshed for a whole TTL: etcd has dropped it (or will before we could use it).
            log.info("host %s plane %s: lease %x not refreshed for %ss, granting a new one",
                     self.host, self.plane.value, self.lease, self.ttl)  # fmt: skip
            self.lease = None
        if self.lease is None:
            self.lease = await self.client.grant(self.ttl)
            self.lease_refreshed = self.clock()
        else:
            ttl = await self.client.refresh(self.lease)
            if ttl <= 0:
                log.warning("host %s plane %s: lease %x expired in etcd, granting a new one",
                            self.host, self.plane.value, self.lease)  # fmt: skip
                self.lease = await self.client.grant(self.ttl)
            self.lease_refreshed = self.clock()
        self.seq += 1
        value = {"host": self.host, "plane": self.plane.value, "seq": self.seq, "t": round(time.time(), 3)}
        await self.client.put_json(self.key, value, lease=self.lease)

    async def run(self) -> None:
        next_at = self.clock()
        homing: asyncio.Task[bool] | None = None  # the check that the first member answers again
        home_check = self.clock() + HOME_EVERY
        try:
            while True:
                if homing is not None and homing.done():
                    # Any failure of the check (a bug included) keeps this member: only a sure answer moves.
                    failed = None if homing.cancelled() else homing.exception()
                    if failed is not None:
                        log.warning("host %s plane %s: checking its first etcd member failed: %r",
                                    self.host, self.plane.value, failed)  # fmt: skip
                    answered = not homing.cancelled() and failed is None and homing.result()
                    if answered and self.client.away:
                        await self.client.back_to_first()
                        log.info("host %s plane %s: back on its first etcd member %s",
                                 self.host, self.plane.value, self.client.endpoint)  # fmt: skip
                    homing = None
                elif homing is None and self.client.away and self.clock() >= home_check:
                    home_check = self.clock() + HOME_EVERY
                    homing = asyncio.create_task(self.client.first_answers(self.timeout))
                next_at = await self._beat_once(next_at)
        finally:
            if homing is not None:
                homing.cancel()

    async def _beat_once(self, next_at: float) -> float:
        """One beat, then the wait for the next one; when the one after is due."""
        try:
            await self.beat()
            self._mark(True, f"lease {self.lease:x} seq {self.seq}")
        except EtcdUnavailable as e:
            self._mark(False, str(e))
            await self.client.wait_backoff()
            return self.clock()
        except EtcdError as e:
            # A refused request, e.g. "lease not found" on the put: start over with a new lease.
            self._mark(False, str(e))
            self.lease = None
            await self.client.wait_backoff()
            return self.clock()
        except Exception as e:
            # A bug in a library or here must not end this plane's heartbeat for good (the
            # manager would see the plane DOWN while the path works): log it, start over.
            log.exception("host %s plane %s: unexpected error in the heartbeat", self.host, self.plane.value)
            self._mark(False, repr(e))
            self.lease = None
            await self.client.reset(repr(e))
            await self.client.wait_backoff()
            return self.clock()
        # A fixed cadence (not interval-after-work), so a slow call does not stretch the period.
        next_at += self.interval
        delay = next_at - self.clock()
        if delay < 0:
            next_at = self.clock()
            delay = 0
        await asyncio.sleep(delay)
        return next_at

    async def stop(self, revoke: bool = True) -> None:
        """Stop beating; revoke the lease (the key disappears at once) and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke and self.lease is not None:
            try:
                await self.client.revoke(self.lease, timeout=1.0)
            except EtcdError as e:
                log.warning("host %s plane %s: could not revoke lease %x: %s",
                            self.host, self.plane.value, self.lease, e)  # fmt: skip
            self.lease = None
        await self.client.close()


__all__ = ["PlaneHeartbeat", "PlaneReach"]
