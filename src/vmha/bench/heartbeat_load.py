"""HeartbeatLoad: the etcd traffic of many agents' per-plane heartbeats, from one process, cheaply.

For benchmarks (`vmha bench detection`). Per (host, plane) it keeps what a real agent keeps: its
own TCP connection to etcd, its own lease of ``ttl`` seconds refreshed every ``interval`` by one
message on its LeaseKeepAlive stream, and its own heartbeat key rewritten with a new
{"host","plane","seq","t"} on that lease right after each keepalive: etcd sees one connection, one
keepalive and one Put per (host, plane) per interval, exactly the agents' traffic. The calls go
through RawGrpcConnection (gRPC over a hand-written minimal HTTP/2), because grpcio costs about ten
times as much CPU per call, which on 2 cores starves the measured system (etcd and the manager). A
real deployment pays its agent's cost on each host, not on the manager's.

Beats are spread evenly over the interval (a fixed phase per plane) and sent on a fixed cadence;
``lag`` records how late the scheduler fired them, so an overloaded generator shows in its stats
rather than as false verdicts blamed on the monitor.

A cut stops one (host, plane)'s keepalives and writes without revoking its lease: etcd must find
out by lease expiry, as when the host's path on that plane fails. A restore grants a new lease and
beats at once, as an agent whose path came back does. A connection that breaks is reopened (and a
new lease granted) before the plane's next beat, as an agent reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmha.bench.grpc_raw import CallFailed, RawGrpcConnection, client_context, pb_bytes, pb_fields, pb_int, pb_int_field
from vmha.core.planes import Plane
from vmha.etcd.client import encode_json, parse_endpoint
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles

log = logging.getLogger("vmha.bench.heartbeat_load")

_GRANT = "/etcdserverpb.Lease/LeaseGrant"
_REVOKE = "/etcdserverpb.Lease/LeaseRevoke"
_KEEPALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"
_PUT = "/etcdserverpb.KV/Put"


@dataclass(slots=True)
class _Slot:
    host: str
    plane: Plane
    key: bytes
    phase: float  # offset in the interval
    conn: RawGrpcConnection | None = None
    stream: int = 0  # its LeaseKeepAlive stream on conn
    lease: int = 0
    seq: int = 0
    last_keepalive: float = 0.0  # monotonic time the last keepalive was sent
    active: bool = True  # False while cut
    ready: bool = False  # connected, lease granted, stream open
    busy: bool = False  # (re)connecting or granting now: skip its beats meanwhile


@dataclass(slots=True)
class LoadStats:
    keepalives: int = 0  # keepalive messages sent
    acks: int = 0  # keepalive replies received
    puts: int = 0  # heartbeat writes acknowledged
    errors: int = 0  # failed writes, keepalive replies with TTL <= 0, failed grants, lost connections
    grants: int = 0
    connects: int = 0
    beats_late: int = 0  # beats fired more than 100 ms after their due time
    lag_max: float = 0.0  # worst scheduling delay of a beat (s)
    lag: list[float] = field(default_factory=list)  # per scheduler round, how late it ran (s)

    def to_dict(self) -> dict[str, Any]:
        lags = sorted(self.lag)
        p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0
        return {"keepalives": self.keepalives, "acks": self.acks, "puts": self.puts, "errors": self.errors,
                "grants": self.grants, "connects": self.connects, "beats_late": self.beats_late,
                "lag_max": round(self.lag_max, 3), "lag_p99": round(p99, 3)}  # fmt: skip


class HeartbeatLoad:
    def __init__(self, url: str, keys: Keys, planes: list[tuple[str, Plane]], *, ttl: int, interval: float,
                 tls: Callable[[str], TlsFiles] | None = None) -> None:  # fmt: skip
        """tls: host -> its TLS files; each host's connections then present its own certificate."""
        self.host, self.port = parse_endpoint(url)
        self._contexts = {h: client_context(tls(h)) for h in sorted({h for h, _ in planes})} if tls else {}
        self.ttl = ttl
        self.interval = interval
        self.stats = LoadStats()
        step = interval / max(1, len(planes))
        order = list(planes)
        random.shuffle(order)  # hosts do not beat in lockstep, nor in name order
        self._slots = {(h, p): _Slot(h, p, keys.heartbeat(h, p).encode(), i * step) for i, (h, p) in enumerate(order)}
        self._by_phase = sorted(self._slots.values(), key=lambda s: s.phase)
        self._scheduler: asyncio.Task[None] | None = None
        self._urgent: list[_Slot] = []  # restored planes: beat in the scheduler's next round
        self._setup: set[asyncio.Task[None]] = set()  # reconnects and grants in flight
        self._sem = asyncio.Semaphore(64)  # connection setups at once (a reconnect storm stays bounded)

    async def start(self) -> None:
        results = await asyncio.gather(*(self._prepare(s) for s in self._slots.values()), return_exceptions=True)
        if failed := [r for r in results if isinstance(r, BaseException)]:
            raise RuntimeError(f"{len(failed)} of {len(results)} planes could not connect: {failed[0]!r}")
        self._scheduler = asyncio.create_task(self._schedule(), name="load scheduler")

    async def _prepare(self, slot: _Slot) -> None:
        """Connect (if needed), grant a new lease, open the keepalive stream: what an agent does when
        it starts, reconnects, or finds its lease gone."""
        slot.ready, slot.busy = False, True
        try:
            async with self._sem:
                if slot.conn is None or slot.conn.closed:
                    slot.conn = await RawGrpcConnection.open(self.host, self.port, tls=self._contexts.get(slot.host))
                    slot.stream = 0
                    self.stats.connects += 1
                conn = slot.conn
                slot.lease = pb_int_field(pb_fields(await conn.unary(_GRANT, pb_int(1, self.ttl))), 2)
                self.stats.grants += 1
                if slot.stream == 0:
                    slot.stream = conn.open_stream(
                        _KEEPALIVE,
                        functools.partial(self._ack, slot),
                        functools.partial(self._stream_ended, slot, conn),
                    )
            slot.ready = True
        finally:
            slot.busy = False

    def _ack(self, slot: _Slot, msg: bytes) -> None:
        self.stats.acks += 1
        reply = pb_fields(msg)
        if pb_int_field(reply, 3) <= 0 and pb_int_field(reply, 2) == slot.lease:
            self.stats.errors += 1  # etcd says the lease is gone: an agent grants a new one
            slot.ready = False

    def _stream_ended(self, slot: _Slot, conn: RawGrpcConnection, _replied: bool) -> None:
        # etcd ended the keepalive stream, or the connection broke: reopen before the next beat.
        if slot.conn is conn:
            self.stats.errors += 1
            slot.ready, slot.stream = False, 0
            if conn.closed:
                slot.conn = None

    def _put_done(self, slot: _Slot, reply: bytes | None) -> None:
        if reply is not None:
            self.stats.puts += 1
        else:
            self.stats.errors += 1
            slot.ready = False  # mostly "requested lease not found": grant a new one

    def _repair(self, slot: _Slot) -> None:
        async def run() -> None:
            try:
                await self._prepare(slot)
            except (OSError, CallFailed, TimeoutError) as e:
                self.stats.errors += 1
                log.warning("%s/%s: reconnect or grant failed: %r", slot.host, slot.plane.value, e)

        task = asyncio.create_task(run())
        self._setup.add(task)
        task.add_done_callback(self._setup.discard)

    def _beat(self, due: list[_Slot]) -> None:
        """One round: a keepalive, then a new value on the lease, per due (host, plane)."""
        now = round(time.time(), 3)
        for s in due:
            if s.busy:
                continue  # this beat is lost, as an agent's while it reconnects
            if not s.ready or s.conn is None:
                self._repair(s)
                continue
            try:
                s.conn.send(s.stream, pb_int(1, s.lease))
                s.last_keepalive = time.monotonic()
                self.stats.keepalives += 1
                s.seq += 1
                value = encode_json({"host": s.host, "plane": s.plane.value, "seq": s.seq, "t": now})
                msg = pb_bytes(1, s.key) + pb_bytes(2, value) + pb_int(3, s.lease)
                s.conn.call(_PUT, msg, functools.partial(self._put_done, s))
            except CallFailed as e:
                log.warning("%s/%s: %s", s.host, s.plane.value, e)
                self.stats.errors += 1
                s.ready = False

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
                    self._beat(due)
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
        """A new lease, a beat in the scheduler's next round, then the normal cadence; the monotonic
        time of the restore."""
        slot = self._slots[(host, plane)]
        t = time.monotonic()
        try:
            await self._prepare(slot)
        except (OSError, CallFailed, TimeoutError) as e:
            log.warning("restore %s/%s: %r; the next beat tries again", host, plane.value, e)
            self.stats.errors += 1
        slot.seq = 0
        slot.active = True
        self._urgent.append(slot)
        return t

    def beating(self) -> int:
        return sum(s.seq >= 1 for s in self._slots.values())

    async def close(self, revoke: bool = True) -> None:
        tasks = [t for t in (self._scheduler, *self._setup) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if revoke:
            # The keys go at once, rather than by TTL after the run.
            async def revoke_one(slot: _Slot) -> None:
                if slot.conn is not None and slot.lease:
                    with contextlib.suppress(CallFailed, TimeoutError):
                        await slot.conn.unary(_REVOKE, pb_int(1, slot.lease), timeout=5)

            await asyncio.gather(*(revoke_one(s) for s in self._slots.values()))
        for s in self._slots.values():
            if s.conn is not None:
                s.conn.close()


__all__ = ["HeartbeatLoad", "LoadStats"]
