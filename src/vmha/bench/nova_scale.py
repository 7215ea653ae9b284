"""`vmha bench nova --hosts H --fail F --vms N [--masakari]`: recovery at scale through a real Nova,
and Masakari running on the same failures (issue 14, items 3 and 4).

The rig (vmha.lab.nova.rig) runs H fake-driver computes; N HA servers (metadata HA_Enabled=True) are
booted spread evenly over them (`plan_servers`); F hosts, spread over the list (`pick_failed`), fail
at once: their nova-compute is SIGKILLed (the host loses power) at t=0.

vmha: the manager's own decision path runs. The HealthCore gets every live host's heartbeats; the
failed hosts' beats stop at t=0 and their leases expire so that the planes go DOWN at t=detection
(default: the detection p99 measured by `vmha bench detection`, BENCHMARKS.md); the RecoveryCore
(policy, decide_after, the recovery queue with the manager's limits) runs in the manager's runtime
loop (vmha.runtime.loop) against an environment (_NovaEnv) whose compute actions are the nova
driver's real calls (force down, disable, evacuate to the queue's chosen host, wait for ACTIVE) and
whose fence proofs are the one thing not real: the rig has no sanlock or BMC, so a proof answers
after --proof seconds (default: the production power fence's median through fence_ipmilan,
BENCHMARKS.md). Task persistence to etcd is not done (no etcd here).

--api-faults SPEC (vmha.lab.nova.faults): the vmha phase's driver talks to Nova through a proxy that
answers that fraction of its API calls 429 (Retry-After) or 503 without forwarding them, or 502 after
Nova acted (the answer lost): the queue's retries and the driver's idempotent steps, provoked. The
observer, the boots and the restore use their own connection, never faulted.

Masakari (--masakari, vmha.lab.nova.masakari): its API and engine, as shipped, on the same Nova; the
same hosts in one segment; at t=detection the bench POSTs for each failed host the notification
masakari-monitors' host monitor sends (STOPPED, host_status NORMAL: IPMI confirmed the power off).
Masakari gets vmha's detection time and no proof time: a generous comparison for Masakari, whose
own monitor polls Pacemaker every 60 s by default. Run twice: shipped defaults, then the shortest
waits its options allow.

For every phase the same servers' placement (the plan) and the same failed hosts; servers are booted
anew per phase. One observer polls Nova's server list every second and records when each server of a
failed host is first ACTIVE on another host with no task: the per-server and total figures of every
phase come from it. Prints numbers; nothing here passes or fails.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import keystoneauth1.exceptions as ks_exc
import openstack.exceptions as os_exc

from vmha.bench.rto import percentile
from vmha.config import NovaConfig
from vmha.core.actions import Alert, RecordEvidence
from vmha.core.events import HostOpFailed, Inventory, RecoveryEvent, StepFailed
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.health import HealthEvent, HealthOutput, HealthTimings, Heartbeat, HostSeen, LeaseGone
from vmha.core.log import LogLine
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import DEFAULT_POLICY, PolicyTable
from vmha.core.queue import TaskState
from vmha.core.recovery import RecoveryCore
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import DriverError
from vmha.drivers.nova import NovaDriver, connect
from vmha.lab.nova.faults import Fault, FaultProxy
from vmha.lab.nova.masakari import Masakari, MasakariSettings, host_failure_notification
from vmha.lab.nova.rig import FLAVOR, IMAGE_ID, NovaRig
from vmha.manager.daemon import INVENTORY_INTERVAL
from vmha.runtime.env import Running
from vmha.runtime.health import HealthFeed
from vmha.runtime.loop import Inbox, Loop

OBSERVE_EVERY = 1.0  # s between the observer's listings of every server
PHASE_TIMEOUT = 600.0  # s: a phase that has not recovered every server by then is reported as such

# -- pure parts --------------------------------------------------------------------------------------


def plan_servers(hosts: Sequence[str], n: int, prefix: str = "ha") -> dict[str, list[str]]:
    """`n` server names spread round-robin over `hosts`: host -> its names (counts differ by at most one)."""
    if not hosts:
        raise ValueError("plan_servers: no hosts")
    if n < 0:
        raise ValueError(f"plan_servers: n must be >= 0, got {n}")
    plan: dict[str, list[str]] = {h: [] for h in hosts}
    for i in range(n):
        plan[hosts[i % len(hosts)]].append(f"{prefix}-{i:04d}")
    return plan


def pick_failed(hosts: Sequence[str], n: int) -> list[str]:
    """`n` of `hosts`, spread evenly over the list (not a block: the survivors interleave)."""
    if not 0 < n < len(hosts):
        raise ValueError(f"--fail must be between 1 and the number of hosts - 1 ({len(hosts) - 1}), got {n}")
    return [hosts[i * len(hosts) // n] for i in range(n)]


@dataclass(frozen=True, slots=True)
class Spread:
    """Per-server times of one phase (seconds after the fault)."""

    n: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        v = list(values)
        return cls(len(v), percentile(v, 50), percentile(v, 99), max(v))

    def text(self) -> str:
        return f"p50 {self.p50:.1f} s, p99 {self.p99:.1f} s, max {self.max:.1f} s"


class InFlight:
    """Concurrent calls, overall and per key (destination host), with the most seen at once."""

    def __init__(self) -> None:
        self.now = 0
        self.per: dict[str, int] = collections.Counter()
        self.max = 0
        self.max_per: dict[str, int] = {}

    def enter(self, key: str) -> None:
        self.now += 1
        self.per[key] += 1
        self.max = max(self.max, self.now)
        self.max_per[key] = max(self.max_per.get(key, 0), self.per[key])

    def leave(self, key: str) -> None:
        if self.per[key] <= 0:
            raise ValueError(f"InFlight: leave({key!r}) without enter")
        self.now -= 1
        self.per[key] -= 1


@dataclass(slots=True)
class Phase:
    """What one recoverer did with one set of failures."""

    name: str
    servers: int  # HA servers on the failed hosts
    active: dict[str, float] = field(default_factory=dict)  # server id -> s after the fault
    first_evacuate: float | None = None  # s after the fault: the first evacuation asked of Nova
    notes: list[str] = field(default_factory=list)

    def total(self) -> float | None:
        """Fault to every server ACTIVE elsewhere (None: not all were)."""
        return max(self.active.values()) if len(self.active) == self.servers and self.active else None

    def rate(self) -> float | None:
        """Servers ACTIVE elsewhere per second, from the first to the last (the same for every recoverer)."""
        if self.total() is None or self.servers < 2:
            return None
        first, last = min(self.active.values()), max(self.active.values())
        return (self.servers - 1) / (last - first) if last > first else None

    def report(self) -> list[str]:
        spread = Spread.of(list(self.active.values()))
        total = self.total()
        head = (f"{self.name}: {len(self.active)}/{self.servers} servers ACTIVE elsewhere"
                + (f", all after {total:.1f} s" if total is not None else " (NOT all)"))
        lines = [head]
        if spread is not None:
            lines.append(f"  per server after the fault: {spread.text()}")
        rate = self.rate()
        if rate is not None:
            lines.append(f"  evacuations/s, first to last server ACTIVE: {rate:.2f}")
        if self.first_evacuate is not None:
            lines.append(f"  first evacuation asked of Nova at +{self.first_evacuate:.1f} s")
        lines += [f"  {n}" for n in self.notes]
        return lines


def ratio(theirs: float | None, ours: float | None) -> str:
    if theirs is None or ours is None or ours <= 0:
        return "n/a (a side did not recover every server)"
    return f"{theirs / ours:.1f}x"


# -- the rig: servers, the observer, restoring the failed hosts -------------------------------------


def _boot(conn: Any, plan: Mapping[str, list[str]], tag: str) -> dict[str, str]:
    """Boot the plan's servers on their hosts (HA_Enabled), wait until all are ACTIVE; id -> host."""
    flavor = conn.compute.find_flavor(FLAVOR, ignore_missing=False)

    def one(name: str, host: str) -> tuple[str, tuple[str, str]]:
        s = conn.compute.create_server(name=f"{tag}-{name}", image_id=IMAGE_ID, flavor_id=flavor.id,
                                       networks="none", host=host, metadata={"HA_Enabled": "True"})
        return str(s.id), (name, host)

    def boot(todo: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
        with ThreadPoolExecutor(8) as ex:
            return dict(ex.map(lambda nh: one(*nh), todo))

    booted = boot([(n, h) for h, names in plan.items() for n in names])
    rebooted = 0
    deadline = time.monotonic() + 600
    while True:
        states = {str(s.id): (s.status, s.compute_host) for s in conn.compute.servers(details=True, all_projects=True)}
        bad = [i for i in booted if states.get(i, ("", ""))[0] == "ERROR"]
        if bad:
            # A compute restarted by the previous phase is left out of placement's candidates until it
            # reports its resources again (NoValidHost meanwhile): boot those servers again, a bounded
            # number of times. Not timed: the phases measure recoveries, not boots.
            if rebooted >= 5 or time.monotonic() > deadline:
                raise RuntimeError(f"boot: {len(bad)} servers ended in ERROR (first {bad[0]}), {rebooted} retries")
            rebooted += 1
            again = [booted.pop(i) for i in bad]
            for i in bad:
                conn.compute.delete_server(i, force=True)
            time.sleep(10.0)
            booted |= boot(again)
            continue
        if all(states.get(i, ("", ""))[0] == "ACTIVE" for i in booted):
            wrong = [i for i, (_, h) in booted.items() if states[i][1] != h]
            if wrong:
                raise RuntimeError(f"boot: {len(wrong)} servers not on their planned host")
            return {i: h for i, (_, h) in booted.items()}
        if time.monotonic() > deadline:
            raise RuntimeError("boot: servers not ACTIVE after 600 s")
        time.sleep(1.0)


def _delete_all(conn: Any) -> None:
    servers = list(conn.compute.servers(all_projects=True))
    for s in servers:
        conn.compute.delete_server(s.id, force=True)
    deadline = time.monotonic() + 300
    while list(conn.compute.servers(all_projects=True)):
        if time.monotonic() > deadline:
            raise RuntimeError("servers not deleted after 300 s")
        time.sleep(1.0)


async def _observe(conn: Any, phase: Phase, sources: Mapping[str, str], t0: float,
                   settled: asyncio.Event | None = None) -> None:
    """Record when each server of a failed host is first ACTIVE on another host with no task; until
    all are, PHASE_TIMEOUT, or one listing after `settled` (the recoverer gave up or finished)."""
    deadline = t0 + PHASE_TIMEOUT
    last = False
    failed: list[str] = []
    while len(phase.active) < len(sources) and time.monotonic() < deadline and not last:
        last = settled is not None and settled.is_set()
        try:
            servers = await asyncio.to_thread(lambda: list(conn.compute.servers(details=True, all_projects=True)))
        except (os_exc.SDKException, ks_exc.ClientException) as e:
            # An overloaded API (both recoverers' evacuations share it) must not end the measurement: the
            # next listing sees what this one missed, a little later (times are upper bounds).
            failed.append(f"+{time.monotonic() - t0:.0f} s {type(e).__name__}")
            servers = []
        seen = time.monotonic() - t0
        for s in servers:
            sid = str(s.id)
            if (sid in sources and sid not in phase.active and s.status == "ACTIVE" and s.task_state is None
                    and s.compute_host not in (None, sources[sid])):
                phase.active[sid] = seen
        await asyncio.sleep(OBSERVE_EVERY)
    if failed:
        phase.notes.append(f"observer: {len(failed)} server listing(s) failed: {', '.join(failed)[:300]}")


async def _restore(rig: NovaRig, driver: NovaDriver, failed: Sequence[str]) -> None:
    """Failed hosts back (not timed): computes restarted, their evacuations cleaned up, un-forced and enabled."""
    for h in failed:
        rig.start_compute(h)
    for h in failed:
        # Nova shows a forced-down compute down until un-forced, which waits for its cleanup.
        await asyncio.to_thread(rig.wait_evacuations_completed, h, 300)
        await driver.enable_host(h)
    for h in failed:
        await asyncio.to_thread(rig.wait_compute, h, True, 180)


def _http_counter(conn: Any, seen: collections.Counter[str]) -> None:
    """Count every HTTP answer of 400 or more the connection gets, as 'METHOD /path-kind CODE'."""

    def hook(response: Any, *args: Any, **kwargs: Any) -> None:
        if response.status_code >= 400:
            # /v2.1/servers/<id>/action -> servers/action: the kind of call, not the server
            path = response.request.path_url.split("?")[0].split("/")[2:]
            kind = "/".join(p for p in path if p and not (p.isdigit() or len(p) >= 32)) or "/"
            seen[f"{response.request.method} {kind} {response.status_code}"] += 1

    conn.session.session.hooks["response"].append(hook)


# -- vmha: the manager's core and runtime loop, the nova driver's calls ------------------------------


class _NovaEnv:
    """The runtime loop's Env of this bench: the nova driver for real, proofs after `proof_delay`,
    no persistence (no etcd)."""

    def __init__(self, driver: NovaDriver, inbox: Inbox, proof_delay: float, t0: float) -> None:
        self.driver = driver
        self.inbox = inbox
        self.proof_delay = proof_delay
        self.t0 = t0
        self.inflight = InFlight()
        self.first_evacuate: float | None = None
        self.failures: list[str] = []  # step and host-op failures the queue retried or gave up
        self.lines: list[LogLine] = []

    def now(self) -> float:
        return time.monotonic()

    def log(self, lines: Sequence[LogLine]) -> None:
        self.lines += lines

    async def persist(self, tasks: Mapping[str, dict[str, object]], records: Sequence[RecordEvidence],
                      lines: Sequence[LogLine], alerts: Sequence[Alert]) -> None:
        pass

    def alert(self, alert: Alert) -> None:
        pass

    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        started = time.monotonic()
        await asyncio.sleep(self.proof_delay)
        method = ProofMethod.POWER if ProofMethod.POWER in methods else methods[-1]
        return FenceProof(vm, host, method, started, time.monotonic(), {"bench": f"after {self.proof_delay} s"})

    async def release(self, vm: str) -> None:
        pass  # no sanlock lease here

    async def evacuate(self, vm: str, source: str, dest: str | None, proof: FenceProof) -> str:
        if self.first_evacuate is None:
            self.first_evacuate = time.monotonic() - self.t0
        key = dest or "scheduler"
        self.inflight.enter(key)
        try:
            return await self.driver.evacuate(vm, source, dest)
        finally:
            self.inflight.leave(key)

    async def migrate(self, vm: str, source: str, dest: str | None) -> str:
        return await self.driver.live_migrate(vm, source, dest)

    async def disable(self, host: str, reason: str) -> None:
        await self.driver.disable_host(host, reason)

    async def mark_down(self, host: str) -> None:
        await self.driver.mark_host_down(host)

    async def enable(self, host: str) -> None:
        await self.driver.enable_host(host)

    async def check_rejoin(self, host: str, vms: Sequence[str]) -> str:
        raise DriverError("bench: the failed hosts rejoin after the measurement", retryable=False)

    async def quarantine(self, host: str, reason: str) -> None:
        pass

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> Running:
        return asyncio.create_task(coro, name=name)

    def result(self, event: RecoveryEvent) -> None:
        if isinstance(event, StepFailed | HostOpFailed):
            what = event.step.value if isinstance(event, StepFailed) else event.op.value
            who = event.vm if isinstance(event, StepFailed) else event.host
            self.failures.append(f"{what} {who}: {event.reason} (retryable={event.retryable})")
        self.inbox.put(event)


class _Heartbeats:
    """The HealthCore fed as the manager's monitor would be: every live plane beats each keepalive;
    a failed host's beats stop at the fault and its leases expire so that its planes are DOWN at
    `detection` after it."""

    def __init__(self, hosts: Sequence[str], timings: HealthTimings, inbox: Inbox) -> None:
        self.feed = HealthFeed(timings, inbox.put_all, self._observe)
        self.timings = timings
        self.hosts = list(hosts)
        self.silent: set[str] = set()
        self.rev = 0
        self.seq = 0
        self.down_at: dict[str, float] = {}

    def _observe(self, out: HealthOutput) -> None:
        for ch in out.changes:
            if ch.new == PlaneState.DOWN:
                self.down_at.setdefault(ch.host, ch.health.planes[ch.plane].since)

    def _step(self, events: Sequence[HealthEvent]) -> None:
        self.feed.step(events, time.monotonic())

    def beat(self) -> None:
        self.seq += 1
        events: list[HealthEvent] = []
        for i, h in enumerate(self.hosts):
            if h in self.silent:
                continue
            for j, p in enumerate(PLANES):
                self.rev += 1
                events.append(Heartbeat(h, p, self.seq, time.monotonic(), self.rev, 1 + 3 * i + j))
        self._step(events)

    async def run(self, fail: asyncio.Event, failed: Sequence[str], detection: float) -> None:
        self._step([HostSeen(h, "default") for h in self.hosts])
        next_beat = time.monotonic()
        expire_at: float | None = None
        while True:
            now = time.monotonic()
            if fail.is_set() and expire_at is None:
                self.silent |= set(failed)
                expire_at = now + max(0.0, detection - self.timings.down_grace)
            if expire_at is not None and now >= expire_at:
                # etcd expired the silent hosts' leases: one batch of key deletions, as the watch delivers
                gone: list[HealthEvent] = []
                for h in failed:
                    for p in PLANES:
                        self.rev += 1
                        gone.append(LeaseGone(h, p, self.rev))
                self._step(gone)
                expire_at = math.inf
            if now >= next_beat:
                self.beat()
                next_beat = now + self.timings.keepalive_interval
            self.feed.tick(time.monotonic())
            await asyncio.sleep(0.05)


async def _inventory(driver: NovaDriver, inbox: Inbox, taken: asyncio.Event) -> None:
    """As the manager: a snapshot of hosts and VMs every INVENTORY_INTERVAL (`taken` set at the first)."""
    while True:
        try:
            inbox.put(Inventory(tuple(await driver.hosts()), tuple(await driver.vms())))
            taken.set()
        except DriverError as e:
            print(f"  inventory failed: {e}")
        await asyncio.sleep(INVENTORY_INTERVAL)


class Manager:
    """The manager's decision path for the bench: HealthCore (_Heartbeats), inventory, and the
    RecoveryCore in the runtime loop, acting through `driver` (_NovaEnv)."""

    def __init__(self, driver: NovaDriver, hosts: Sequence[str], settings: RecoverySettings,
                 detection: float, proof: float, timings: HealthTimings | None = None) -> None:
        self.inbox = Inbox()
        self.health = _Heartbeats(hosts, timings or HealthTimings(), self.inbox)
        self.env = _NovaEnv(driver, self.inbox, proof, time.monotonic())
        self.core = RecoveryCore(PolicyTable.parse(DEFAULT_POLICY), settings)
        self.loop = Loop(self.core, self.env, proof_timeout=60.0)
        self.settings = settings
        self.driver = driver
        self.detection = detection
        self.failing = asyncio.Event()
        self.failed: list[str] = []
        self.inventoried = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(c) for c in (
            self.health.run(self.failing, self.failed, self.detection),
            _inventory(self.driver, self.inbox, self.inventoried),
            self.loop.run(self.inbox))]  # fmt: skip

    async def ready(self, timeout: float = 60.0) -> None:
        """Until the first inventory is in and every plane of every host is UP: a fault from then on
        is a host failure with the servers known."""
        async def up() -> None:
            await self.inventoried.wait()
            while not all(s.state == PlaneState.UP for h in self.health.feed.core.view().values()
                          for s in h.planes.values()):  # fmt: skip
                await asyncio.sleep(0.05)

        await asyncio.wait_for(up(), timeout)

    def fault(self, failed: Sequence[str]) -> float:
        """The hosts failed now (the caller has killed them): their beats stop. Returns t0."""
        self.failed[:] = failed
        self.env.t0 = time.monotonic()
        self.failing.set()
        return self.env.t0

    async def stop(self) -> None:
        running = [t for t in self.loop.cancel_all() if isinstance(t, asyncio.Task)]
        for t in [*running, *self.tasks]:
            t.cancel()
        await asyncio.gather(*running, *self.tasks, return_exceptions=True)

    def notes(self, http: Mapping[str, int]) -> list[str]:
        t0, env, settings = self.env.t0, self.env, self.settings
        downs = sorted(t - t0 for t in self.health.down_at.values())
        states = collections.Counter(t.state.value for t in self.core.tasks())
        notes = [
            f"planes DOWN (HealthCore) at +{downs[0]:.2f} to +{downs[-1]:.2f} s; fence proofs answered after "
            f"{env.proof_delay} s each (not measured here)" if downs else "planes never DOWN",
            f"queue: {dict(sorted(states.items()))}; limits max_parallel={settings.max_parallel} "
            f"max_per_host={settings.max_per_host}; evacuations in flight at most {env.inflight.max} overall, "
            f"{max(env.inflight.max_per.values(), default=0)} towards one host",
            f"Nova API answers >= 400 on the driver's connection: {dict(sorted(http.items())) or 'none'} "
            f"(429 rate limits: {sum(n for k, n in http.items() if k.endswith(' 429'))})",
            f"step failures fed back to the queue (retried with backoff unless retryable=False): {len(env.failures)}",
            *[f"  {f}" for f in env.failures[:10]],
        ]
        failed = [f"{t.vm}: {t.reason}" for t in self.core.tasks() if t.state == TaskState.FAILED]
        if failed:
            notes.append(f"FAILED tasks ({len(failed)}): " + "; ".join(failed)[:500])
        return notes


async def vmha_phase(rig: NovaRig, conn: Any, settings: RecoverySettings, sources: Mapping[str, str],
                     failed: Sequence[str], detection: float, proof: float,
                     api_faults: Sequence[Fault] = ()) -> Phase:
    phase = Phase("vmha", len(sources))
    proxy = FaultProxy(rig.nova_url, list(api_faults)).start() if api_faults else None
    try:
        # The manager's construction of the driver (manager/daemon.py), on its own connection.
        options = rig.connect_options() | ({"compute_endpoint_override": proxy.url} if proxy else {})
        driver_conn = connect(**options)
        http: collections.Counter[str] = collections.Counter()
        _http_counter(driver_conn, http)
        manager = Manager(NovaDriver(NovaConfig(), connection=driver_conn), rig.hosts, settings, detection, proof)
        manager.start()
        try:
            await manager.ready()
            for h in failed:
                rig.kill_compute(h)
            t0 = manager.fault(failed)
            await _observe(conn, phase, sources, t0)
        finally:
            await manager.stop()
    finally:
        if proxy is not None:
            proxy.close()
    phase.first_evacuate = manager.env.first_evacuate
    phase.notes += manager.notes(http)
    if proxy is not None:
        phase.notes.append(_proxy_note(proxy))
    return phase


def _proxy_note(proxy: FaultProxy) -> str:
    """What the fault proxy did: requests, faults answered, answers lost after Nova acted."""
    answers = list(proxy.answers)
    faulted = collections.Counter(code for _, _, code, fwd in answers if not fwd)
    lost = collections.Counter(f"{m} {p.split('/')[-1]}" for m, p, code, fwd in answers if fwd and code == 502)
    return (f"fault proxy: {len(answers)} driver requests; answered without forwarding "
            f"{dict(sorted(faulted.items())) or 'none'}; forwarded, answer replaced by 502: {sum(lost.values())} "
            f"({dict(sorted(lost.items())) or 'none'})")


# -- Masakari ---------------------------------------------------------------------------------------


async def masakari_phase(rig: NovaRig, conn: Any, m: Masakari, sources: Mapping[str, str],
                         failed: Sequence[str], detection: float) -> Phase:
    phase = Phase(f"Masakari ({m.settings.label()})", len(sources))
    log = rig.dir / "logs" / "masakari-engine.log"
    log_from = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    for h in failed:
        rig.kill_compute(h)
    settled = asyncio.Event()
    observer = asyncio.create_task(_observe(conn, phase, sources, t0, settled))
    await asyncio.sleep(detection)
    sent = time.monotonic() - t0
    # All at once, as each host's failure is seen: the API's random pre-record delays overlap.
    uuids = await asyncio.gather(*(asyncio.to_thread(m.notify, host_failure_notification(h, datetime.now(UTC)))
                                   for h in failed))
    statuses: collections.Counter[str] = collections.Counter()
    while not observer.done():
        statuses = collections.Counter([str((await asyncio.to_thread(m.notification, u))["status"]) for u in uuids])
        if set(statuses) <= {"finished", "failed", "ignored"}:
            settled.set()  # Masakari is done with them: one more listing, then the phase ends
        await asyncio.sleep(2.0)
    await observer
    phase.notes.append(f"{len(uuids)} notifications (STOPPED, host_status NORMAL) POSTed at +{sent:.2f} s; "
                       f"their status at the end: {dict(sorted(statuses.items()))}")
    text = log.read_text(errors="replace")[log_from:] if log.exists() else ""
    phase.notes.append(
        f"engine log: {text.count('Call evacuate command')} evacuate calls, "
        f"{text.count('still in use')} refused as the source compute service still in use (400), "
        f"{text.count('Failed to process notification')} notification attempts failed"
    )
    return phase


# -- the run --------------------------------------------------------------------------------------------


async def run(hosts: int, fail: int, vms: int, masakari: bool, settings: RecoverySettings, detection: float,
              proof: float, workdir: str | None, api_faults: Sequence[Fault] = ()) -> None:
    names = [f"cmp{i:02d}" for i in range(1, hosts + 1)]
    failed = pick_failed(names, fail)
    plan = plan_servers(names, vms)
    on_failed = sum(len(plan[h]) for h in failed)
    phases: list[Phase] = []
    with NovaRig(hosts=names, workdir=workdir) as rig:
        print(f"rig: {hosts} computes up in {rig.timings['total']} s; {vms} HA servers, {on_failed} on the "
              f"{fail} failed hosts ({', '.join(failed)}); detection {detection} s, proof {proof} s")
        conn = connect(**rig.connect_options())
        driver = NovaDriver(NovaConfig(), connection=conn)  # restores the failed hosts between phases

        async def once(tag: str) -> dict[str, str]:
            t = time.monotonic()
            placed = await asyncio.to_thread(_boot, conn, plan, tag)
            print(f"{tag}: {len(placed)} servers booted in {time.monotonic() - t:.0f} s")
            return {sid: h for sid, h in placed.items() if h in failed}

        sources = await once("vmha")
        phases.append(await vmha_phase(rig, conn, settings, sources, failed, detection, proof, api_faults))
        print("\n".join(phases[-1].report()), flush=True)
        await _restore(rig, driver, failed)
        await asyncio.to_thread(_delete_all, conn)
        if masakari:
            for ms in (MasakariSettings(), MasakariSettings.shortest()):
                with Masakari(rig, ms) as m:
                    await asyncio.to_thread(m.segment, "bench", names)
                    sources = await once("masakari")
                    phases.append(await masakari_phase(rig, conn, m, sources, failed, detection))
                    print("\n".join(phases[-1].report()), flush=True)
                    await _restore(rig, driver, failed)
                    await asyncio.to_thread(_delete_all, conn)
    ours = phases[0].total()
    print(f"\nfault -> every HA server ACTIVE elsewhere ({on_failed} servers, {fail} of {hosts} hosts failed):")
    for p in phases:
        total = p.total()
        print(f"  {p.name}: {'not all' if total is None else f'{total:.1f} s'}"
              + ("" if p is phases[0] else f"; ratio to vmha {ratio(total, ours)}"))
