"""HealthMonitor: the manager's detection loop, feeding the pure HealthCore (vmha.runtime.health).

It lists, then watches (resuming from the last revision), the host registrations and the heartbeat
keys, and turns them into core events:

    hosts/<h> put        -> HostSeen(h, domain)        hosts/<h> delete -> HostGone(h)
                            (and the agent's clean-stop mark, published as AgentStopped)
    hb/<h>/<p> put       -> Heartbeat(h, p, seq, t, mod_revision, lease)
    hb/<h>/<p> delete    -> LeaseGone(h, p, revision)  (also: key absent from a listing)
    own etcd probe       -> EtcdStatus(ok)             (only when it changes)
    core.next_deadline() -> HealthTick()

Heartbeats are applied in batches (one feed step, at most batch_window = 50 ms late): one core step
and one round of output handling per batch instead of per heartbeat (3000 heartbeats/s at 500 hosts).
The core indexes its deadlines, so a heartbeat costs it O(log hosts): 5 to 9 us a step at 500 or
2000 hosts, against 2.4 ms at 500 hosts when every step scanned every host. Every other event flushes
the batch first, so the order of events is kept.

Each core output is handled at once: log lines go to the "vmha.health" logger, changes to every
subscriber, then the recovery core's events of it (the feed's HealthUpdate, FabricUpdate: the
daemon's term puts them in its runtime loop's inbox), and the hosts whose view changed are persisted
in etcd by a separate writer task (health_store), so a slow etcd write never delays detection.

The core's clock is monotonic, offset to unix time at start: immune to wall-clock steps, yet the
persisted `since` times are comparable with other machines' clocks for `vmha status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from vmha import metrics
from vmha.core.events import AgentStopped, FabricUpdate, HealthUpdate
from vmha.core.health import (
    EtcdStatus,
    FabricChange,
    HealthChange,
    HealthEvent,
    HealthOutput,
    HealthTick,
    HealthTimings,
    Heartbeat,
    HostGone,
    HostHealth,
    HostSeen,
    LeaseGone,
)
from vmha.core.log import Level
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd import health_store, values
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.registry import parse_host
from vmha.etcd.values import refused
from vmha.etcd.watch import Delete, Put, Snapshot, watch_prefix
from vmha.runtime.health import HealthFeed

log = logging.getLogger("vmha.health")

# AgentStopped is the recovery core's event: the mark is not health (the planes go DOWN as the
# leases run out), it tells recovery why. It travels here because it lives in the host records
# this monitor watches anyway.


@dataclass(frozen=True, slots=True)
class LocksRefused:
    """A host's agent refuses to protect it (registry.LOCKS_REFUSED: libvirt's lock settings are
    wrong): why, or None once it protects the host. The manager alerts it; recovery is unchanged (a VM
    of that host holds no lease, so its proofs are refused as never held)."""

    host: str
    why: str | None


Change = HealthChange | FabricChange | HealthUpdate | FabricUpdate | AgentStopped | LocksRefused

_LEVELS = {Level.INFO: logging.INFO, Level.WARN: logging.WARNING, Level.ERROR: logging.ERROR}


def unix_monotonic() -> Callable[[], float]:
    """A monotonic clock that reads as unix time (offset fixed when created)."""
    offset = time.time() - time.monotonic()
    return lambda: time.monotonic() + offset


class HealthMonitor:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        timings: HealthTimings,
        *,
        name: str = "manager",
        probe_interval: float = 0.5,
        probe_timeout: float = 1.0,
        batch_window: float = 0.05,
        persist: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.feed = HealthFeed(timings, self._hand, self._observe)
        self.core = self.feed.core  # its queries (view, hosts, last_seen); stepped through the feed only
        self.name = name
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.batch_window = batch_window
        self._pending: list[HealthEvent] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.persist = persist
        self.clock = clock or unix_monotonic()
        self.ready = asyncio.Event()  # set once hosts and heartbeats have been listed
        self._subscribers: list[asyncio.Queue[Change]] = []
        self._wake = asyncio.Event()  # the ticker recomputes its deadline
        self._dirty = asyncio.Event()  # the writer has work
        self._dirty_hosts: dict[str, HostHealth | None] = {}  # None: delete the record
        self._dirty_fabric: list[FabricChange] = []
        self._hosts_listed = asyncio.Event()
        self._agent_stopped: dict[str, float] = {}  # host -> when its agent stopped cleanly
        self._locks_refused: dict[str, str] = {}  # host -> why its agent refuses to protect it
        self._etcd_ok = True
        self._leases: dict[tuple[str, Plane], int] = {}  # lease of the last heartbeat counted per plane
        self._checks: set[asyncio.Task[None]] = set()  # lease checks of deleted heartbeat keys
        # The lease before the current one per plane, to see heartbeats alternate between two leases
        # (two machines beating under one host name); and what was alerted once already.
        self._prev_leases: dict[tuple[str, Plane], int] = {}
        self._alerted: set[tuple[str, str, Plane]] = set()
        # Running totals for benchmarks and operators: heartbeat events received, core steps taken
        # (single events and heartbeat batches), writes of the health view to etcd and host records in them.
        self.counters: dict[str, int] = {"heartbeats": 0, "steps": 0, "batches": 0, "health_writes": 0,
                                         "health_records": 0}  # fmt: skip

    # -- what the rest of the manager uses -------------------------------------------------------

    def view(self) -> dict[str, HostHealth]:
        return self.core.view()

    def fabric_outages(self) -> list[FabricChange]:
        return self.core.fabric_outages()

    def agent_marks(self) -> dict[str, float]:
        """Hosts whose agent stopped cleanly (registry.AGENT_STOPPED), and since when."""
        return dict(self._agent_stopped)

    def locks_refused(self) -> dict[str, str]:
        """Hosts whose agent refuses to protect them (registry.LOCKS_REFUSED), and why."""
        return dict(self._locks_refused)

    def subscribe(self) -> AsyncIterator[Change]:
        """Every Change from now on, in order (an unbounded queue: the consumer never slows detection
        down). A core output's HealthChanges and FabricChanges come first, then its events for the
        recovery core (HealthUpdate, FabricUpdate: vmha.runtime.health)."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.append(queue)

        async def changes() -> AsyncIterator[Change]:
            try:
                while True:
                    yield await queue.get()
            finally:
                self._subscribers.remove(queue)

        return changes()

    async def run(self) -> None:
        """Run until cancelled."""
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "hosts": self._watch_hosts,
            "heartbeats": self._watch_heartbeats,
            "etcd probe": self._probe,
            "ticker": self._tick,
        }
        if self.persist:
            loops["writer"] = self._write
        tasks = {asyncio.create_task(f(), name=f"health: {n}"): n for n, f in loops.items()}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    # These loops never end by themselves: one that did hit a bug (ours or a
                    # library's). Say so loudly, and restart it rather than run half-blind.
                    name = tasks.pop(t)
                    exc = None if t.cancelled() else t.exception()
                    log.error("health monitor loop %r ended (%r); restarting it in 1s", name, exc, exc_info=exc)
                    await asyncio.sleep(1.0)
                    tasks[asyncio.create_task(loops[name](), name=f"health: {name}")] = name
        finally:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            for t in tasks:
                t.cancel()
            # Bounded: a task stuck in a library's cleanup must not keep the manager from stopping.
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for t in stuck:
                log.warning("health monitor task %s did not stop within 5s", t.get_name())

    # -- feeding the core ------------------------------------------------------------------------

    def step(self, event: HealthEvent) -> None:
        """Feed one event now (heartbeats waiting in the batch go first, to keep the order)."""
        self._flush()
        self.counters["steps"] += 1
        # Anything but a HealthTick may bring a deadline closer (a lease gone, a new host, etcd back).
        self._woken(self.feed.step([event], self.clock()), wake=not isinstance(event, HealthTick))

    def _heartbeat_event(self, hb: Heartbeat) -> None:
        # Heartbeats arrive by thousands a second at scale: applied in batches, at most batch_window
        # late, so the per-step work here (output handling, waking the ticker) is paid per batch.
        self._pending.append(hb)
        self.counters["heartbeats"] += 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self.batch_window, self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pending:
            events, self._pending = self._pending, []
            self.counters["batches"] += 1
            # Heartbeats only move deadlines later, unless the core said something (a plane changed
            # state, a new host, staleness counting again after a silence): _woken wakes the ticker then.
            self._woken(self.feed.step(events, self.clock()), wake=False)

    def _observe(self, out: HealthOutput) -> None:
        """The monitor's own use of a core output, before its recovery events are published."""
        for line in out.log:
            level = _LEVELS.get(line.level, logging.INFO)
            if log.isEnabledFor(level):  # rendering costs, and a storm of changes has thousands of lines
                log.log(level, line.render())
        for change in out.changes:
            self._dirty_hosts[change.host] = change.health
            metrics.plane_state(change.host, change.plane, change.new)
            if change.new == PlaneState.DOWN:
                metrics.detected(change.plane, self.core.last_seen(change.host, change.plane),
                                 change.health.planes[change.plane].since)
            self._publish(change)
        for fabric in out.fabric:
            self._dirty_fabric.append(fabric)
            self._publish(fabric)
        if out.changes or out.fabric:
            self._dirty.set()

    def _hand(self, events: Sequence[HealthUpdate | FabricUpdate]) -> None:
        for event in events:
            self._publish(event)

    def _woken(self, out: HealthOutput, wake: bool) -> None:
        if wake or out.changes or out.log:
            self._wake.set()

    def _publish(self, change: Change) -> None:
        for q in self._subscribers:
            q.put_nowait(change)

    def _set_etcd(self, ok: bool) -> None:
        if ok != self._etcd_ok:
            self._etcd_ok = ok
            self.step(EtcdStatus(ok))

    def _host_put(self, key: str, value: Any, kv: Any) -> None:
        try:
            rec = parse_host(self.keys, kv, value)
        except BadValue as e:
            refused(e, kv, "host record skipped")
            return
        self.step(HostSeen(rec.host, rec.domain))
        self._set_mark(rec.host, rec.agent_stopped)
        self._set_refused(rec.host, rec.locks_refused)

    def _set_refused(self, host: str, why: str | None) -> None:
        if self._locks_refused.get(host) == why:
            return
        if why is None:
            del self._locks_refused[host]
        else:
            self._locks_refused[host] = why
        self._publish(LocksRefused(host, why))

    def _set_mark(self, host: str, since: float | None) -> None:
        if self._agent_stopped.get(host) == since:
            return
        if since is None:
            del self._agent_stopped[host]
        else:
            self._agent_stopped[host] = since
        self._publish(AgentStopped(host, since))

    def _host_delete(self, key: str) -> None:
        host = key[len(self.keys.hosts_prefix) :]
        if host in self._agent_stopped:
            self._set_mark(host, None)
        if host in self._locks_refused:
            self._set_refused(host, None)
        if self.core.has_host(host):
            self.step(HostGone(host))
            metrics.forget_host(host)
            self._dirty_hosts[host] = None
            self._dirty.set()

    async def _watch_hosts(self) -> None:
        async for ev in watch_prefix(self.client, self.keys.hosts_prefix, on_error=self._watch_error):
            match ev:
                case Snapshot(items, _, broken):
                    # A host whose record became unreadable stays (with its last domain): an
                    # overwritten record must not make the manager forget a host.
                    listed = {kv.key for kv in broken}
                    for kv, value in items:
                        listed.add(kv.key)
                        self._host_put(kv.key, value, kv)
                    for host in self.core.hosts():
                        if self.keys.host(host) not in listed:
                            self._host_delete(self.keys.host(host))
                    self._hosts_listed.set()
                case Put(key, value, kv):
                    self._host_put(key, value, kv)
                case Delete(key):
                    self._host_delete(key)

    def _heartbeat(self, kv: KV, value: Any) -> None:
        try:
            parsed = self.keys.parse_heartbeat(kv.key)
            if parsed is None:
                raise BadValue(kv.key, "not a heartbeat key (hb/<host>/<plane>)")
            host, plane = parsed
            hb = values.parse(values.HeartbeatValue, kv, value)
            if (hb.host, hb.plane) != (host, plane):
                raise BadValue(kv.key, f"the value names {hb.host}/{hb.plane.value}")
            if not kv.lease:
                raise BadValue(kv.key, "a heartbeat on no lease (its expiry would never be seen)")
        except BadValue as e:
            refused(e, kv, "heartbeat skipped")
            return
        if not self.core.has_host(host):
            # A key anyone may write: an unregistered host must not count (in the fabric guard's
            # share of hosts, for one). Its agent registers before it beats: the next beat counts.
            # Alerted once per host and plane, not at every beat.
            if ("ghost", host, plane) not in self._alerted:
                self._alerted.add(("ghost", host, plane))
                refused(BadValue(kv.key, f"heartbeat of host {host}, which is not registered"), kv, "not counted")
            return
        last = self._leases.get((host, plane))
        if last is not None and last != kv.lease:
            if self._prev_leases.get((host, plane)) == kv.lease and ("flip", host, plane) not in self._alerted:
                # An agent restart moves to a new lease for good; coming back to the one before means
                # two writers under one name (two machines called alike, or a forger).
                self._alerted.add(("flip", host, plane))
                log.error("ALERT host %s plane %s: heartbeats alternate between leases %x and %x: two machines "
                          "beat under one host name (or someone writes its key)", host, plane.value, last, kv.lease)
            self._prev_leases[(host, plane)] = last
        self._leases[(host, plane)] = kv.lease
        self._heartbeat_event(Heartbeat(host, plane, hb.seq, hb.t, kv.mod_revision, kv.lease))

    async def _heartbeat_deleted(self, host: str, plane: Plane, revision: int) -> None:
        """A heartbeat key was deleted: a lease expiry (or the agent's revoke) only if etcd says the
        lease is gone. A key deleted under a live lease is someone else's delete (etcdctl del, an
        attacker): alert, and wait for the lease itself to go or for the next heartbeat."""
        lease = self._leases.pop((host, plane), None)
        alerted = False
        while lease is not None and (host, plane) not in self._leases:
            try:
                ttl = await self.client.time_to_live(lease)
            except EtcdError as e:
                log.info("host %s plane %s: heartbeat key deleted; lease %x unknown yet (%s)",
                         host, plane.value, lease, e)  # fmt: skip
                await self.client.wait_backoff()
                continue
            if ttl <= 0:
                break
            if not alerted:
                alerted = True
                log.error("ALERT host %s plane %s: heartbeat key deleted while its lease %x lives (%d s "
                          "left): not a lease expiry; someone deleted it by hand", host, plane.value, lease, ttl)
            await asyncio.sleep(min(float(ttl), self.core.t.keepalive_interval))
        if (host, plane) not in self._leases:  # no heartbeat came back meanwhile
            self.step(LeaseGone(host, plane, revision))

    async def _watch_heartbeats(self) -> None:
        await self._hosts_listed.wait()
        async for ev in watch_prefix(self.client, self.keys.heartbeat_prefix, on_error=self._watch_error):
            match ev:
                case Snapshot(items, revision):
                    present: set[tuple[str, Plane]] = set()
                    for kv, value in items:
                        parsed = self.keys.parse_heartbeat(kv.key)
                        if parsed is not None:
                            present.add(parsed)
                        self._heartbeat(kv, value)
                    # A registered host's missing key is a lease that expired while we were not looking.
                    for host in self.core.hosts():
                        for plane in PLANES:
                            if (host, plane) not in present:
                                self.step(LeaseGone(host, plane, revision))
                    self.ready.set()
                case Put(_, value, kv):
                    self._heartbeat(kv, value)
                case Delete(key, kv):
                    parsed = self.keys.parse_heartbeat(key)
                    if parsed is not None:
                        task = asyncio.create_task(self._heartbeat_deleted(*parsed, kv.mod_revision))
                        self._checks.add(task)
                        task.add_done_callback(self._checks.discard)

    def _watch_error(self, e: EtcdError) -> None:
        self._set_etcd(False)

    async def _probe(self) -> None:
        """Our own reachability of etcd: while we cannot reach it, stale heartbeats mean nothing.
        On a connection of its own: a probe that times out drops its connection, and on the shared one
        that broke the heartbeat watch, whose resume from an old revision loaded etcd further (seen at
        500 hosts: a busy etcd, probes timing out, the watch restarting every few seconds)."""
        async with EtcdClient(self.client.urls, timeout=self.probe_timeout, name=f"{self.name}/probe",
                              tls=self.client.tls) as c:
            await self._probe_with(c)

    async def _probe_with(self, client: EtcdClient) -> None:
        while True:
            try:
                await client.revision(timeout=self.probe_timeout)
            except EtcdError as e:
                if self._etcd_ok:
                    log.warning("etcd probe failed: %s", e)
                self._set_etcd(False)
            else:
                self._set_etcd(True)
            await asyncio.sleep(self.probe_interval)

    async def _tick(self) -> None:
        ticked: float | None = None
        while True:
            deadline = self.core.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - self.clock())
            if delay is not None and deadline == ticked:
                delay = max(delay, 0.05)  # a deadline a HealthTick did not clear: never spin on it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if deadline is not None and self.clock() >= deadline:
                self.step(HealthTick())
                ticked = deadline

    async def _write(self) -> None:
        """Persist the changed hosts and fabric outages; latest view wins, retried until written.
        On a connection of its own: a slow write must not break the watch streams."""
        async with EtcdClient(self.client.urls, timeout=self.client.timeout, name=f"{self.name}/health",
                              tls=self.client.tls) as c:
            await self._write_with(c)

    async def _write_with(self, client: EtcdClient) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            hosts, self._dirty_hosts = self._dirty_hosts, {}
            fabric, self._dirty_fabric = self._dirty_fabric, []
            now = self.clock()
            try:
                while fabric:
                    await health_store.save_fabric(client, self.keys, fabric[0])
                    del fabric[0]
                # Batched: in a storm of changes (hundreds of hosts a second) one write per host
                # made etcd, already the busiest part, busier still.
                saves = [h for _, h in sorted(hosts.items()) if h is not None]
                for i in range(0, len(saves), health_store.MAX_HOSTS_PER_WRITE):
                    batch = saves[i : i + health_store.MAX_HOSTS_PER_WRITE]
                    await health_store.save_hosts(client, self.keys, batch, now, self.name)
                    self.counters["health_writes"] += 1
                    self.counters["health_records"] += len(batch)
                    for health in batch:
                        del hosts[health.host]
                for host in sorted(hosts):  # what is left: records to delete
                    await health_store.delete_host(client, self.keys, host)
                    self.counters["health_writes"] += 1
                    del hosts[host]
            except EtcdError as e:
                log.warning("could not persist the health view (%s); retrying", e)
                # Put back what was not written, unless a newer view arrived meanwhile.
                self._dirty_fabric[:0] = fabric
                self._dirty_hosts = {**hosts, **self._dirty_hosts}
                self._dirty.set()
                await client.wait_backoff()


__all__ = ["Change", "HealthMonitor", "unix_monotonic"]
