"""Per host and plane health, from heartbeats and lease expiries, with the fabric-outage guard.

Inputs are events with the caller's clock (`now`); outputs are plane state changes, fabric outage
changes and log lines. The rules, per (host, plane):

- A heartbeat whose value changed (new seq) means the agent reached etcd through that plane: UP.
- The value unchanged for `suspect_after` seconds: SUSPECT. Staleness only counts while the manager
  itself reaches etcd (EtcdStatus ok): during an etcd election nobody's value changes and that says
  nothing about the hosts. Nor through a gap of over `keepalive_interval` with no heartbeat at all,
  from any host: then the manager's own view stalled (its process or its watch stream). Staleness is
  suspended during such a gap and counts from the first heartbeat after it, since the backlog can take
  a few batches to arrive. A lease expiry during the gap shows the silence is the hosts' own (every
  host cut off): staleness then counts as it was, and the fabric guard sees every lost host at once.
- The heartbeat key deleted (its lease expired): SUSPECT, then DOWN `down_grace` after the deletion
  unless a heartbeat returns. Only lease expiry, etcd's own verdict, makes a plane DOWN: a leader change
  extends every lease (TTL + 1 s) instead of expiring it, so it cannot cause a false DOWN.
- Fabric guard: when more than `fabric_fraction` of all hosts, or of the hosts of one failure
  domain, and at least `fabric_min_hosts` hosts, have lost the same plane within `fabric_window`,
  that is a fabric outage: those planes are FABRIC, not DOWN, and so are planes lost later while
  the outage lasts. The outage ends when too few hosts remain lost to meet the rule; hosts still
  lost then are SUSPECT again and get `fabric_window` before they may become DOWN, since a
  recovering fabric brings hosts back one keepalive at a time.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from vmha.core.log import Level, LogLine, evidence
from vmha.core.planes import PLANES, Plane, PlaneState

ACTOR = "health"
_PLANE_INDEX = {p: i for i, p in enumerate(PLANES)}


@dataclass(frozen=True, slots=True)
class HealthTimings:
    lease_ttl: int = 2
    keepalive_interval: float = 0.5
    suspect_after: float = 1.2
    down_grace: float = 0.3
    fabric_window: float = 5.0
    fabric_fraction: float = 0.5
    fabric_min_hosts: int = 3


# Events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSeen:
    """A host registered (or re-registered with another failure domain)."""

    host: str
    domain: str


@dataclass(frozen=True, slots=True)
class HostGone:
    """A host was removed from the cluster: forget it."""

    host: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    host: str
    plane: Plane
    seq: int
    sent: float  # the agent's clock when it wrote the value
    revision: int  # etcd mod_revision of the write
    lease: int


@dataclass(frozen=True, slots=True)
class LeaseGone:
    """The heartbeat key is gone (lease expired), or absent when the manager listed the keys."""

    host: str
    plane: Plane
    revision: int


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    ok: bool  # the manager itself reaches etcd


@dataclass(frozen=True, slots=True)
class HealthTick:
    """Time passed: staleness and grace deadlines that have come are judged."""


HealthEvent = HostSeen | HostGone | Heartbeat | LeaseGone | EtcdStatus | HealthTick


# Outputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaneStatus:
    state: PlaneState
    since: float
    evidence: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "since": self.since, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PlaneStatus:
        return cls(PlaneState(str(d["state"])), float(str(d["since"])), str(d.get("evidence", "")))


@dataclass(frozen=True, slots=True)
class HostHealth:
    host: str
    domain: str
    planes: Mapping[Plane, PlaneStatus]

    def failed(self) -> frozenset[Plane]:
        """Planes DOWN (FABRIC is not counted: it is no failure of this host)."""
        return frozenset(p for p, s in self.planes.items() if s.state == PlaneState.DOWN)

    def states(self) -> dict[Plane, PlaneState]:
        return {p: s.state for p, s in self.planes.items()}

    def to_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "domain": self.domain,
            "planes": {p.value: self.planes[p].to_dict() for p in PLANES if p in self.planes},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> HostHealth:
        planes = d["planes"]
        if not isinstance(planes, Mapping):
            raise ValueError("planes must be a mapping")
        return cls(
            host=str(d["host"]),
            domain=str(d["domain"]),
            planes={Plane(k): PlaneStatus.from_dict(v) for k, v in planes.items()},
        )


@dataclass(frozen=True, slots=True)
class HealthChange:
    host: str
    plane: Plane
    old: PlaneState
    new: PlaneState
    health: HostHealth  # the host's whole view after the change


@dataclass(frozen=True, slots=True)
class FabricChange:
    plane: Plane
    domain: str | None  # None: the whole cluster
    active: bool
    hosts: tuple[str, ...]
    since: float

    def to_dict(self) -> dict[str, object]:
        return {
            "plane": self.plane.value,
            "domain": self.domain,
            "active": self.active,
            "hosts": list(self.hosts),
            "since": self.since,
        }


@dataclass(slots=True)
class HealthOutput:
    changes: list[HealthChange] = field(default_factory=list)
    fabric: list[FabricChange] = field(default_factory=list)
    log: list[LogLine] = field(default_factory=list)


# State -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Track:
    state: PlaneState = PlaneState.UNKNOWN
    since: float = 0.0
    seq: int | None = None
    sent: float | None = None
    seen: float | None = None  # core time the value last changed
    lease: int | None = None
    revision: int | None = None
    lost_at: float | None = None  # core time the plane left UP
    gone_at: float | None = None  # core time the lease was seen gone
    hold_until: float = 0.0  # not DOWN before this (after a fabric outage ends)
    outage: tuple[Plane, str | None] | None = None
    reason: str = ""
    deadline: float | None = None  # the next time a check is due (indexed in HealthCore._deadlines)

    def evidence(self) -> str:
        return evidence(
            reason=self.reason or None,
            seq=self.seq,
            sent=None if self.sent is None else f"{self.sent:.3f}",
            seen=None if self.seen is None else f"{self.seen:.1f}",
            lease=None if self.lease is None else format(self.lease, "x"),
            rev=self.revision,
        )

    def lost(self) -> bool:
        return self.state in (PlaneState.SUSPECT, PlaneState.DOWN, PlaneState.FABRIC)


@dataclass(slots=True)
class _Host:
    domain: str
    planes: dict[Plane, _Track]


@dataclass(slots=True)
class _Outage:
    since: float
    hosts: set[str]


def fabric_rule(lost: int, total: int, t: HealthTimings) -> bool:
    """The fabric guard's rule: at least ``fabric_min_hosts`` hosts, and more than ``fabric_fraction``
    of the ``total`` (all hosts, or those of one failure domain), lost the same plane."""
    return lost >= t.fabric_min_hosts and lost > t.fabric_fraction * total


def fabric_not_isolation(host: str, domains: Mapping[str, str], cut: Collection[str], t: HealthTimings) -> str:
    """For an agent that lost some planes: did so many other hosts lose them too that it is a fabric
    outage rather than this host's isolation? ``domains``: every host of the cluster (agents stopped
    cleanly left out) -> its failure domain; ``cut``: those that lost the planes, this one included.
    The fabric guard's rule, over the cluster and over this host's domain; the evidence, or ''."""
    domain = domains.get(host)
    members = [h for h, d in domains.items() if d == domain]
    for group, where in ((list(domains), "the cluster"), (members, f"domain {domain}")):
        lost = sum(h in cut for h in group)
        if fabric_rule(lost, len(group), t):
            return f"{lost} of the {len(group)} hosts of {where} lost them too"
    return ""


class HealthCore:
    def __init__(self, timings: HealthTimings) -> None:
        self.t = timings
        self._hosts: dict[str, _Host] = {}
        self._outages: dict[tuple[Plane, str | None], _Outage] = {}
        self._etcd_ok = True
        # Staleness also needs heartbeats to flow: when none at all has arrived from any host for
        # longer than a keepalive interval, it is the manager's view that stalled (its process or its
        # watch stream), not every host at once. Counting staleness through such a gap made every plane
        # SUSPECT together: a false fabric outage, under which a real failure was FABRIC, not DOWN.
        self._last_beat: float | None = None  # core time of the last heartbeat from any host
        self._silent = False  # staleness suspended until heartbeats flow again
        self._silence_real = False  # a lease expired during the silence: the hosts are silent, not our view
        # Every track's next deadline, as (time, host, plane index), smallest first: a heartbeat costs
        # O(log n), and a step only visits the tracks that are due. Entries are not removed when a
        # deadline moves: an entry that no longer matches its track's `deadline` is skipped.
        self._deadlines: list[tuple[float, str, int]] = []
        # Planes whose fabric rule must be re-checked: the lost / FABRIC counts or the membership
        # changed. Nothing else can form or end an outage (counts only shrink as time passes).
        self._fabric_dirty: set[Plane] = set()
        self._lost: dict[Plane, set[str]] = {p: set() for p in PLANES}  # hosts whose plane is lost()
        self._domain_sizes: dict[str, int] = {}  # registered hosts per failure domain

    # -- queries ----------------------------------------------------------------------------------

    def view(self) -> dict[str, HostHealth]:
        return {h: self._snapshot(h) for h in sorted(self._hosts)}

    def hosts(self) -> list[str]:
        return sorted(self._hosts)

    def has_host(self, host: str) -> bool:
        return host in self._hosts

    def last_seen(self, host: str, plane: Plane) -> float | None:
        """When the host's heartbeat on the plane last changed (its last sign of life there), if ever."""
        h = self._hosts.get(host)
        return None if h is None else h.planes[plane].seen

    def fabric_outages(self) -> list[FabricChange]:
        return [
            FabricChange(plane, domain, True, tuple(sorted(o.hosts)), o.since)
            for (plane, domain), o in sorted(self._outages.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        ]

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # -- the step ---------------------------------------------------------------------------------

    def step(self, event: HealthEvent, now: float) -> HealthOutput:
        out = HealthOutput()
        self._apply(event, now, out)
        self._advance(now, out)
        return out

    def step_many(self, events: Sequence[HealthEvent], now: float) -> HealthOutput:
        """Several events of one instant: each applied as by step(), the time-driven checks run once
        at the end. The adapter batches heartbeats with it (thousands a second at scale)."""
        out = HealthOutput()
        for event in events:
            self._apply(event, now, out)
        self._advance(now, out)
        return out

    def _apply(self, event: HealthEvent, now: float, out: HealthOutput) -> None:
        match event:
            case HostSeen(host, domain):
                self._host_seen(host, domain, now, out)
            case HostGone(host):
                if (gone := self._hosts.pop(host, None)) is not None:
                    for o in self._outages.values():
                        o.hosts.discard(host)
                    for lost in self._lost.values():
                        lost.discard(host)
                    self._count_domain(gone.domain, -1)
                    out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}' removed from the cluster"))
            case Heartbeat():
                self._heartbeat(event, now, out)
            case LeaseGone(host, plane, revision):
                tr = self._track(host, plane, now, out)
                if tr.gone_at is None:
                    tr.gone_at = now
                    tr.revision = revision
                    tr.reason = "lease expired"
                    if tr.state in (PlaneState.UP, PlaneState.UNKNOWN):
                        self._leave_up(host, plane, tr, now, out)
                    self._reindex(host, plane, tr)
                    if self._silent:
                        # A stalled view delivers no lease expiry: this silence is the hosts'. Their
                        # staleness counts as it was, so a cluster-wide outage is FABRIC before any
                        # lease-expired plane may become DOWN.
                        self._silent, self._silence_real = False, True
                        text = f"lease of host '{host}' plane {plane.value} expired during the silence: it is real"
                        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
                        self._reindex_all()
            case EtcdStatus(ok):
                if ok != self._etcd_ok:
                    self._etcd_ok = ok
                    if ok:
                        # Staleness counts again from now: nobody could write while etcd was away.
                        # (That gap in the heartbeats is explained: it needs no silence rule.)
                        self._silent = self._silence_real = False
                        if self._last_beat is not None:
                            self._last_beat = max(self._last_beat, now)
                        self._restart_staleness(now)
                    else:
                        self._reindex_all()
                    text = "etcd reachable again" if ok else "etcd unreachable: plane verdicts frozen"
                    out.log.append(LogLine(Level.INFO if ok else Level.WARN, now, ACTOR, text))
            case HealthTick():
                pass

    # -- internals --------------------------------------------------------------------------------

    def _host_seen(self, host: str, domain: str, now: float, out: HealthOutput) -> None:
        h = self._hosts.get(host)
        if h is None:
            self._hosts[host] = _Host(domain, {p: _Track(since=now) for p in PLANES})
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}' registered (domain {domain})"))
            self._count_domain(domain, +1)
        elif h.domain != domain:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}' moved from domain {h.domain} to {domain}"))
            self._count_domain(h.domain, -1)
            h.domain = domain
            self._count_domain(domain, +1)

    def _count_domain(self, domain: str, delta: int) -> None:
        n = self._domain_sizes.get(domain, 0) + delta
        if n:
            self._domain_sizes[domain] = n
        else:
            del self._domain_sizes[domain]
        self._fabric_dirty.update(PLANES)  # the scopes' sizes changed

    def _track(self, host: str, plane: Plane, now: float, out: HealthOutput) -> _Track:
        if host not in self._hosts:
            # A heartbeat before the registration: keep it, in the default domain until it registers.
            self._host_seen(host, "default", now, out)
        return self._hosts[host].planes[plane]

    def _heartbeat(self, hb: Heartbeat, now: float, out: HealthOutput) -> None:
        tr = self._track(hb.host, hb.plane, now, out)
        if tr.seq == hb.seq and tr.sent == hb.sent and tr.gone_at is None:
            return  # same value: no news (a re-delivered event)
        if self._last_beat is not None and (self._silent or now - self._last_beat > self.t.keepalive_interval):
            # The first heartbeat after a gap: the rest of the backlog may take a few batches to
            # arrive, so everybody's staleness counts from now (or they would be SUSPECT meanwhile).
            self._silent = self._silence_real = False
            text = f"heartbeats flow again after {now - self._last_beat:.1f}s without any: staleness counts from now"
            out.log.append(LogLine(Level.INFO, now, ACTOR, text))
            self._restart_staleness(now)
        self._last_beat = now
        tr.seq, tr.sent, tr.seen, tr.lease, tr.revision = hb.seq, hb.sent, now, hb.lease, hb.revision
        tr.gone_at = None
        tr.reason = "heartbeat"
        if tr.state != PlaneState.UP:
            outage = tr.outage
            tr.lost_at = None
            tr.hold_until = 0.0
            tr.outage = None
            self._set(hb.host, hb.plane, tr, PlaneState.UP, now, out)
            if outage is not None and outage in self._outages:
                self._outages[outage].hosts.discard(hb.host)
        self._reindex(hb.host, hb.plane, tr)

    def _leave_up(self, host: str, plane: Plane, tr: _Track, now: float, out: HealthOutput) -> None:
        tr.lost_at = now
        outage = self._outage_covering(host, plane)
        if outage is not None:
            self._join_outage(outage, host, tr, now, out)
        else:
            self._set(host, plane, tr, PlaneState.SUSPECT, now, out)

    def _outage_covering(self, host: str, plane: Plane) -> tuple[Plane, str | None] | None:
        if (plane, None) in self._outages:
            return (plane, None)
        key = (plane, self._hosts[host].domain)
        return key if key in self._outages else None

    def _join_outage(self, key: tuple[Plane, str | None], host: str, tr: _Track, now: float, out: HealthOutput) -> None:
        self._outages[key].hosts.add(host)
        tr.outage = key
        tr.reason = "fabric outage" + ("" if key[1] is None else f" in domain {key[1]}")
        self._set(host, key[0], tr, PlaneState.FABRIC, now, out)

    def _deadline(self, tr: _Track) -> float | None:
        if tr.state == PlaneState.UP and tr.seen is not None and self._etcd_ok and not self._silent:
            return tr.seen + self.t.suspect_after
        if tr.state == PlaneState.SUSPECT and tr.gone_at is not None and tr.lost_at is not None:
            return max(tr.gone_at + self.t.down_grace, tr.hold_until)
        return None

    def _reindex(self, host: str, plane: Plane, tr: _Track) -> None:
        """Call after any change to a track: index its new deadline."""
        deadline = self._deadline(tr)
        if deadline != tr.deadline:
            tr.deadline = deadline
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, host, _PLANE_INDEX[plane]))

    def _reindex_all(self) -> None:
        for host, h in self._hosts.items():
            for plane, tr in h.planes.items():
                self._reindex(host, plane, tr)

    def _restart_staleness(self, now: float) -> None:
        # Only UP planes: a lost plane's `seen` is its last sign of life, which the detect phase
        # and the detection latency are measured from.
        for h in self._hosts.values():
            for tr in h.planes.values():
                if tr.state == PlaneState.UP and tr.seen is not None:
                    tr.seen = max(tr.seen, now)
        self._reindex_all()

    def _current(self, entry: tuple[float, str, int]) -> bool:
        h = self._hosts.get(entry[1])
        return h is not None and h.planes[PLANES[entry[2]]].deadline == entry[0]

    def _pop_due(self, now: float) -> list[tuple[str, Plane]]:
        """The tracks whose deadline has come, in (host, plane) order; their entries are consumed."""
        heap = self._deadlines
        due: list[tuple[str, Plane]] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._current(entry):
                plane = PLANES[entry[2]]
                self._hosts[entry[1]].planes[plane].deadline = None
                due.append((entry[1], plane))
        return sorted(due, key=lambda hp: (hp[0], _PLANE_INDEX[hp[1]]))

    def _advance(self, now: float, out: HealthOutput) -> None:
        # 1. Staleness: UP planes whose value stopped changing become SUSPECT.
        due = self._pop_due(now)
        stale = [(h, p) for h, p in due if self._hosts[h].planes[p].state == PlaneState.UP]
        if (
            stale
            and not self._silence_real
            and self._last_beat is not None
            and now - self._last_beat > self.t.keepalive_interval
        ):
            self._silent = True
            text = (
                f"no heartbeat from any host for {now - self._last_beat:.1f}s: the manager's view stalled; "
                "staleness suspended until heartbeats flow again"
            )
            out.log.append(LogLine(Level.WARN, now, ACTOR, text))
            self._reindex_all()
        for host, plane in due:
            tr = self._hosts[host].planes[plane]
            if tr.state == PlaneState.UP and tr.seen is not None and self._etcd_ok and not self._silent:
                tr.reason = f"no new heartbeat for {now - tr.seen:.1f}s"
                self._leave_up(host, plane, tr, now, out)
        # 2. Fabric outages form before anybody is declared DOWN, and end when too few hosts remain.
        for plane in PLANES:
            if plane in self._fabric_dirty:
                self._fabric_dirty.discard(plane)
                self._check_fabric(plane, now, out)
        # 3. SUSPECT planes whose lease is gone become DOWN after the grace.
        due = sorted({*due, *self._pop_due(now)}, key=lambda hp: (hp[0], _PLANE_INDEX[hp[1]]))
        for host, plane in due:
            h = self._hosts.get(host)
            if h is None:
                continue
            tr = h.planes[plane]
            if (
                tr.state == PlaneState.SUSPECT
                and tr.gone_at is not None
                and tr.lost_at is not None
                and now >= max(tr.gone_at + self.t.down_grace, tr.hold_until)
            ):
                tr.reason = f"lease expired, lost for {now - tr.lost_at:.1f}s"
                self._set(host, plane, tr, PlaneState.DOWN, now, out)
            # A consumed entry whose track is still due later (or again) goes back in the index.
            self._reindex(host, plane, tr)

    def _exceeds(self, lost: int, total: int) -> bool:
        return fabric_rule(lost, total, self.t)

    def _check_fabric(self, plane: Plane, now: float, out: HealthOutput) -> None:
        # Only the hosts that lost the plane are visited: O(lost + domains), not O(hosts).
        lost_in: dict[str | None, list[str]] = {None: sorted(self._lost[plane])}
        for h in lost_in[None]:
            lost_in.setdefault(self._hosts[h].domain, []).append(h)
        for domain in [None, *sorted(self._domain_sizes)]:
            lost = lost_in.get(domain, [])  # the scope's hosts that lost the plane
            size = len(self._hosts) if domain is None else self._domain_sizes[domain]
            key = (plane, domain)
            outage = self._outages.get(key)
            if outage is None:
                recent = [
                    h
                    for h in lost
                    if (tr := self._hosts[h].planes[plane]).state != PlaneState.FABRIC
                    and tr.lost_at is not None
                    and now - tr.lost_at <= self.t.fabric_window
                ]
                already = [h for h in lost if self._hosts[h].planes[plane].state == PlaneState.FABRIC]
                if self._exceeds(len(recent) + len(already), size) and recent:
                    self._outages[key] = _Outage(now, set())
                    where = "cluster" if domain is None else f"domain {domain}"
                    out.log.append(
                        LogLine(
                            Level.WARN,
                            now,
                            ACTOR,
                            f"fabric outage: plane {plane.value} lost by {len(recent) + len(already)} of "
                            f"{size} hosts in {where} within {self.t.fabric_window:g}s: "
                            f"hosts {', '.join(recent)} are FABRIC, not DOWN",
                        )
                    )
                    for h in recent:
                        self._join_outage(key, h, self._hosts[h].planes[plane], now, out)
                    out.fabric.append(FabricChange(plane, domain, True, tuple(sorted(self._outages[key].hosts)), now))
            elif not self._exceeds(
                # Count as the forming rule does: every FABRIC host of the scope, whichever outage it is
                # in, or an outage overlapping another (domain and cluster) would end and form at once.
                sum(1 for h in lost if self._hosts[h].planes[plane].state == PlaneState.FABRIC),
                size,
            ):
                del self._outages[key]
                where = "cluster" if domain is None else f"domain {domain}"
                left = sorted(outage.hosts)
                out.log.append(
                    LogLine(
                        Level.INFO,
                        now,
                        ACTOR,
                        f"fabric outage of plane {plane.value} in {where} over"
                        + (f"; still lost: {', '.join(left)}" if left else ""),
                    )
                )
                for h in left:
                    tr = self._hosts[h].planes[plane]
                    tr.outage = None
                    tr.lost_at = now
                    tr.hold_until = now + self.t.fabric_window
                    tr.reason = "still lost after the fabric outage"
                    self._set(h, plane, tr, PlaneState.SUSPECT, now, out)
                    self._reindex(h, plane, tr)
                out.fabric.append(FabricChange(plane, domain, False, tuple(left), outage.since))

    def _set(self, host: str, plane: Plane, tr: _Track, new: PlaneState, now: float, out: HealthOutput) -> None:
        old = tr.state
        if old == new:
            return
        tr.state, tr.since = new, now
        self._reindex(host, plane, tr)
        self._fabric_dirty.add(plane)
        if tr.lost():
            self._lost[plane].add(host)
        else:
            self._lost[plane].discard(host)
        level = Level.INFO if new == PlaneState.UP else Level.WARN
        out.log.append(
            LogLine(
                level,
                now,
                ACTOR,
                f"host '{host}' plane {plane.value}: {old.value} -> {new.value} ({tr.evidence()})",
            )
        )
        out.changes.append(HealthChange(host, plane, old, new, self._snapshot(host)))

    def _snapshot(self, host: str) -> HostHealth:
        h = self._hosts[host]
        return HostHealth(
            host, h.domain, {p: PlaneStatus(tr.state, tr.since, tr.evidence()) for p, tr in h.planes.items()}
        )
