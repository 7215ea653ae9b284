"""HeartbeatLoad: the etcd traffic of many agents' per-plane heartbeats, from one process, cheaply.

For benchmarks (`vmha bench detection`). Per (host, plane) it keeps what a real agent keeps: its
own lease of ``ttl`` seconds, refreshed every ``interval`` by one LeaseKeepAlive message, and its
own heartbeat key rewritten with a new {"host","plane","seq","t"} on that lease right after each
keepalive: etcd sees one keepalive and one Put per (host, plane) per interval, exactly the agents'
traffic. What it does not reproduce is one TCP connection per plane: the messages are multiplexed
over ``channels`` gRPC connections (one LeaseKeepAlive stream each), because a Python asyncio
client per plane costs this machine about 0.2 % CPU per host, which on 2 cores starves the measured
system (etcd and the manager). A real deployment pays that on each host, not on the manager's.

Beats are spread evenly over the interval (a fixed phase per plane) and sent on a fixed cadence;
``lag`` records how late the scheduler fired them, so an overloaded generator shows in its stats
rather than as false verdicts blamed on the monitor.

A cut stops one (host, plane)'s keepalives and writes without revoking its lease: etcd must find
out by lease expiry, as when the host's path on that plane fails. A restore grants a new lease and
beats at once, as an agent whose path came back does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aetcd import rpc
from aetcd.rpc import rpc_pb2_grpc

from vmha.core.planes import Plane
from vmha.etcd.client import encode_json, parse_endpoint
from vmha.etcd.keys import Keys

log = logging.getLogger("vmha.etcd.heartbeat_load")

# One connection per channel object (by default gRPC shares one between channels to one target).
_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(slots=True)
class _Slot:
    host: str
    plane: Plane
    key: bytes
    channel: int
    phase: float  # offset in the interval
    lease: int = 0
    seq: int = 0
    last_keepalive: float = 0.0  # monotonic time the last keepalive was sent
    active: bool = True  # False while cut
    regrant: bool = False  # etcd said the lease is gone: grant a new one before the next beat


@dataclass(slots=True)
class LoadStats:
    keepalives: int = 0  # keepalive messages sent
    acks: int = 0  # keepalive replies received
    puts: int = 0  # heartbeat writes acknowledged
    errors: int = 0  # failed writes, keepalive replies with TTL <= 0, failed grants
    grants: int = 0
    beats_late: int = 0  # beats fired more than 100 ms after their due time
    lag_max: float = 0.0  # worst scheduling delay of a beat (s)
    lag: list[float] = field(default_factory=list)  # per scheduler round, how late it ran (s)

    def to_dict(self) -> dict[str, Any]:
        lags = sorted(self.lag)
        p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0
        return {"keepalives": self.keepalives, "acks": self.acks, "puts": self.puts, "errors": self.errors,
                "grants": self.grants, "beats_late": self.beats_late, "lag_max": round(self.lag_max, 3),
                "lag_p99": round(p99, 3)}  # fmt: skip


class HeartbeatLoad:
    def __init__(
        self,
        url: str,
        keys: Keys,
        planes: list[tuple[str, Plane]],
        *,
        ttl: int,
        interval: float,
        channels: int = 4,
    ) -> None:
        host, port = parse_endpoint(url)
        self.target = f"{host}:{port}"
        self.ttl = ttl
        self.interval = interval
        self.stats = LoadStats()
        self._n = max(1, min(channels, len(planes)))
        step = interval / max(1, len(planes))
        order = list(planes)
        random.shuffle(order)  # hosts do not beat in lockstep, nor in name order
        self._slots = {
            (h, p): _Slot(h, p, keys.heartbeat(h, p).encode(), i % self._n, i * step) for i, (h, p) in enumerate(order)
        }
        self._by_phase = sorted(self._slots.values(), key=lambda s: s.phase)
        self._by_lease: dict[int, _Slot] = {}
        self._channels: list[Any] = []
        self._kv: list[Any] = []
        self._lease: list[Any] = []
        self._streams: list[Any] = []  # per channel: its LeaseKeepAlive stream
        self._readers: list[asyncio.Task[None] | None] = []  # per channel: the task reading its replies
        self._broken: set[int] = set()  # channels whose stream ended: reopened in the next round
        self._scheduler: asyncio.Task[None] | None = None
        self._urgent: list[_Slot] = []  # restored planes: beat in the scheduler's next round
        self._pending: set[asyncio.Task[None]] = set()  # rounds of Puts in flight (referenced until done)

    async def start(self, grant_concurrency: int = 64) -> None:
        for _ in range(self._n):
            ch = rpc.insecure_channel(self.target, options=_OPTIONS)
            self._channels.append(ch)
            self._kv.append(rpc_pb2_grpc.KVStub(ch))
            self._lease.append(rpc_pb2_grpc.LeaseStub(ch))
        sem = asyncio.Semaphore(grant_concurrency)

        async def grant(slot: _Slot) -> None:
            async with sem:
                await self._grant(slot)

        await asyncio.gather(*(grant(s) for s in self._slots.values()))
        for i in range(self._n):
            self._streams.append(None)
            self._readers.append(None)
            self._open_stream(i)
        self._scheduler = asyncio.create_task(self._schedule(), name="load scheduler")

    def _open_stream(self, i: int) -> None:
        """(Re)open channel i's keepalive stream and its reader, as an agent reconnects."""
        if (reader := self._readers[i]) is not None:
            reader.cancel()
        self._streams[i] = self._lease[i].LeaseKeepAlive()
        self._readers[i] = asyncio.create_task(self._read_acks(i), name=f"load acks {i}")
        self._broken.discard(i)

    async def _grant(self, slot: _Slot) -> None:
        r = await self._lease[slot.channel].LeaseGrant(rpc.LeaseGrantRequest(TTL=self.ttl), timeout=10)
        self._by_lease.pop(slot.lease, None)
        slot.lease, slot.regrant = int(r.ID), False
        self._by_lease[slot.lease] = slot
        self.stats.grants += 1

    async def _read_acks(self, i: int) -> None:
        try:
            async for reply in self._streams[i]:
                self.stats.acks += 1
                if reply.TTL <= 0 and (slot := self._by_lease.get(int(reply.ID))) is not None:
                    self.stats.errors += 1
                    slot.regrant = True
        except rpc.AioRpcError as e:
            # etcd ended the stream (seen: "request timed out, waiting for the applied index took too
            # long" when the machine was overloaded). The next round reopens it, as an agent would.
            log.warning("keepalive stream %d ended: %s: %s", i, e.code(), e.details())
        self.stats.errors += 1
        self._broken.add(i)

    async def _collect(self, calls: list[Any], slots: list[_Slot]) -> None:
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r, slot in zip(results, slots, strict=True):
            if not isinstance(r, BaseException):
                self.stats.puts += 1
                continue
            self.stats.errors += 1
            if isinstance(r, rpc.AioRpcError) and r.code() == rpc.StatusCode.NOT_FOUND:
                slot.regrant = True  # "requested lease not found": it expired; an agent grants a new one

    async def _beat(self, due: list[_Slot]) -> None:
        """One round: a keepalive, then a new value on the lease, per due (host, plane)."""
        regrants = [s for s in due if s.regrant]
        if regrants:
            results = await asyncio.gather(*(self._grant(s) for s in regrants), return_exceptions=True)
            self.stats.errors += sum(isinstance(r, BaseException) for r in results)
        for i in sorted(self._broken):
            self._open_stream(i)
        sent: list[_Slot] = []  # an agent whose keepalive failed writes nothing until the next one
        for s in due:
            if s.channel in self._broken:
                continue  # this round's keepalive is lost, like a failed request; the next goes out
            try:
                await self._streams[s.channel].write(rpc.LeaseKeepAliveRequest(ID=s.lease))
            except Exception as e:  # the stream ended under the write (AioRpcError, InvalidStateError)
                log.warning("keepalive stream %d: write failed: %r", s.channel, e)
                self.stats.errors += 1
                self._broken.add(s.channel)
                continue
            s.last_keepalive = time.monotonic()
            sent.append(s)
        self.stats.keepalives += len(sent)
        now = round(time.time(), 3)
        calls = []
        for s in sent:
            s.seq += 1
            value = encode_json({"host": s.host, "plane": s.plane.value, "seq": s.seq, "t": now})
            calls.append(self._kv[s.channel].Put(rpc.PutRequest(key=s.key, value=value, lease=s.lease), timeout=5))
        task = asyncio.create_task(self._collect(calls, sent))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _schedule(self, tick: float = 0.01) -> None:
        start = time.monotonic()
        cycle, i, n = 0, 0, len(self._by_phase)
        while True:
            now = time.monotonic()
            due: list[_Slot] = []
            worst = 0.0
            while n and start + cycle * self.interval + self._by_phase[i].phase <= now:
                slot = self._by_phase[i]
                late = now - (start + cycle * self.interval + slot.phase)
                worst = max(worst, late)
                if late > 0.1:
                    self.stats.beats_late += 1
                if slot.active:
                    due.append(slot)
                i += 1
                if i == n:
                    i, cycle = 0, cycle + 1
            if self._urgent:
                due += self._urgent
                self._urgent = []
            if due:
                self.stats.lag.append(worst)
                self.stats.lag_max = max(self.stats.lag_max, worst)
                try:
                    await self._beat(due)
                except Exception:
                    # Never let one bad round end every host's heartbeat (that would be a mass outage).
                    log.exception("load generator: a round of beats failed")
                    self.stats.errors += 1
            await asyncio.sleep(tick)

    def cut(self, host: str, plane: Plane) -> tuple[float, float]:
        """Stop the plane's keepalives and writes (the lease is left to expire). Returns the monotonic
        time of the cut and of the plane's last keepalive: etcd counts the TTL from the latter."""
        slot = self._slots[(host, plane)]
        slot.active = False
        return time.monotonic(), slot.last_keepalive

    async def restore(self, host: str, plane: Plane) -> float:
        """A new lease, a beat in the next round (the scheduler alone writes to the keepalive streams,
        which take one write at a time), then the normal cadence; the monotonic time."""
        slot = self._slots[(host, plane)]
        t = time.monotonic()
        try:
            await self._grant(slot)
        except rpc.AioRpcError as e:
            log.warning("restore %s/%s: grant failed (%s); the next round grants", host, plane.value, e.code())
            self.stats.errors += 1
            slot.regrant = True
        slot.seq = 0
        slot.active = True
        self._urgent.append(slot)
        return t

    def beating(self) -> int:
        return sum(s.seq >= 1 for s in self._slots.values())

    async def close(self, revoke: bool = True) -> None:
        tasks = [t for t in (self._scheduler, *self._readers) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, rpc.AioRpcError):
                await t
        if revoke:
            # The keys go at once, rather than by TTL after the run.
            sem = asyncio.Semaphore(64)

            async def revoke_one(lease: int) -> None:
                async with sem:
                    with contextlib.suppress(rpc.AioRpcError, TimeoutError):
                        await self._lease[0].LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=5)

            await asyncio.gather(*(revoke_one(s.lease) for s in self._slots.values() if s.lease))
        for ch in self._channels:
            await ch.close()


__all__ = ["HeartbeatLoad", "LoadStats"]
