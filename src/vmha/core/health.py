"""Per host and plane health, from heartbeats and lease expiries, with the fabric-outage guard.

Inputs are events with the caller's clock (`now`); outputs are plane state changes, fabric outage
changes and log lines. The rules, per (host, plane):

- A heartbeat whose value changed (new seq) means the agent reached etcd through that plane: UP.
- The value unchanged for `suspect_after` seconds: SUSPECT. Staleness only counts while the manager
  itself reaches etcd (EtcdStatus ok): during an etcd election nobody's value changes and that says
  nothing about the hosts.
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vmha.core.log import Level, LogLine, evidence
from vmha.core.planes import PLANES, Plane, PlaneState

ACTOR = "health"


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
class Tick:
    pass


HealthEvent = HostSeen | HostGone | Heartbeat | LeaseGone | EtcdStatus | Tick


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


class HealthCore:
    def __init__(self, timings: HealthTimings) -> None:
        self.t = timings
        self._hosts: dict[str, _Host] = {}
        self._outages: dict[tuple[Plane, str | None], _Outage] = {}
        self._etcd_ok = True

    # -- queries ----------------------------------------------------------------------------------

    def view(self) -> dict[str, HostHealth]:
        return {h: self._snapshot(h) for h in sorted(self._hosts)}

    def fabric_outages(self) -> list[FabricChange]:
        return [
            FabricChange(plane, domain, True, tuple(sorted(o.hosts)), o.since)
            for (plane, domain), o in sorted(self._outages.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        ]

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        for host in self._hosts.values():
            for tr in host.planes.values():
                if tr.state == PlaneState.UP and tr.seen is not None and self._etcd_ok:
                    deadlines.append(tr.seen + self.t.suspect_after)
                elif tr.state == PlaneState.SUSPECT and tr.gone_at is not None:
                    deadlines.append(max(tr.gone_at + self.t.down_grace, tr.hold_until))
        return min(deadlines) if deadlines else None

    # -- the step ---------------------------------------------------------------------------------

    def step(self, event: HealthEvent, now: float) -> HealthOutput:
        out = HealthOutput()
        self._apply(event, now, out)
        self._advance(now, out)
        return out

    def step_many(self, events: Sequence[HealthEvent], now: float) -> HealthOutput:
        """Several events of one instant: each applied as by step(), the time-driven checks run once
        at the end. The adapter batches heartbeats with it: those checks cost O(hosts), too much to
        run for each of thousands of heartbeats a second."""
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
                if self._hosts.pop(host, None) is not None:
                    for o in self._outages.values():
                        o.hosts.discard(host)
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
            case EtcdStatus(ok):
                if ok != self._etcd_ok:
                    self._etcd_ok = ok
                    if ok:
                        # Staleness counts again from now: nobody could write while etcd was away.
                        for h in self._hosts.values():
                            for tr in h.planes.values():
                                if tr.seen is not None:
                                    tr.seen = max(tr.seen, now)
                    text = "etcd reachable again" if ok else "etcd unreachable: plane verdicts frozen"
                    out.log.append(LogLine(Level.INFO if ok else Level.WARN, now, ACTOR, text))
            case Tick():
                pass

    # -- internals --------------------------------------------------------------------------------

    def _host_seen(self, host: str, domain: str, now: float, out: HealthOutput) -> None:
        h = self._hosts.get(host)
        if h is None:
            self._hosts[host] = _Host(domain, {p: _Track(since=now) for p in PLANES})
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}' registered (domain {domain})"))
        elif h.domain != domain:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}' moved from domain {h.domain} to {domain}"))
            h.domain = domain

    def _track(self, host: str, plane: Plane, now: float, out: HealthOutput) -> _Track:
        if host not in self._hosts:
            # A heartbeat before the registration: keep it, in the default domain until it registers.
            self._host_seen(host, "default", now, out)
        return self._hosts[host].planes[plane]

    def _heartbeat(self, hb: Heartbeat, now: float, out: HealthOutput) -> None:
        tr = self._track(hb.host, hb.plane, now, out)
        if tr.seq == hb.seq and tr.sent == hb.sent and tr.gone_at is None:
            return  # same value: no news (a re-delivered event)
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

    def _advance(self, now: float, out: HealthOutput) -> None:
        # 1. Staleness: UP planes whose value stopped changing become SUSPECT.
        if self._etcd_ok:
            for host in sorted(self._hosts):
                for plane, tr in self._hosts[host].planes.items():
                    if tr.state == PlaneState.UP and tr.seen is not None and now >= tr.seen + self.t.suspect_after:
                        tr.reason = f"no new heartbeat for {now - tr.seen:.1f}s"
                        self._leave_up(host, plane, tr, now, out)
        # 2. Fabric outages form before anybody is declared DOWN, and end when too few hosts remain.
        for plane in PLANES:
            self._check_fabric(plane, now, out)
        # 3. SUSPECT planes whose lease is gone become DOWN after the grace.
        for host in sorted(self._hosts):
            for plane, tr in self._hosts[host].planes.items():
                if (
                    tr.state == PlaneState.SUSPECT
                    and tr.gone_at is not None
                    and tr.lost_at is not None
                    and now >= max(tr.gone_at + self.t.down_grace, tr.hold_until)
                ):
                    tr.reason = f"lease expired, lost for {now - tr.lost_at:.1f}s"
                    self._set(host, plane, tr, PlaneState.DOWN, now, out)

    def _exceeds(self, lost: int, total: int) -> bool:
        return lost >= self.t.fabric_min_hosts and lost > self.t.fabric_fraction * total

    def _check_fabric(self, plane: Plane, now: float, out: HealthOutput) -> None:
        scopes: list[str | None] = [None, *sorted({h.domain for h in self._hosts.values()})]
        for domain in scopes:
            members = sorted(h for h, v in self._hosts.items() if domain is None or v.domain == domain)
            key = (plane, domain)
            outage = self._outages.get(key)
            if outage is None:
                recent = [
                    h
                    for h in members
                    if (tr := self._hosts[h].planes[plane]).lost()
                    and tr.state != PlaneState.FABRIC
                    and tr.lost_at is not None
                    and now - tr.lost_at <= self.t.fabric_window
                ]
                already = [h for h in members if self._hosts[h].planes[plane].state == PlaneState.FABRIC]
                if self._exceeds(len(recent) + len(already), len(members)) and recent:
                    self._outages[key] = _Outage(now, set())
                    where = "cluster" if domain is None else f"domain {domain}"
                    out.log.append(
                        LogLine(
                            Level.WARN,
                            now,
                            ACTOR,
                            f"fabric outage: plane {plane.value} lost by {len(recent) + len(already)} of "
                            f"{len(members)} hosts in {where} within {self.t.fabric_window:g}s: "
                            f"hosts {', '.join(recent)} are FABRIC, not DOWN",
                        )
                    )
                    for h in recent:
                        self._join_outage(key, h, self._hosts[h].planes[plane], now, out)
                    out.fabric.append(FabricChange(plane, domain, True, tuple(sorted(self._outages[key].hosts)), now))
            elif not self._exceeds(
                # Count as the forming rule does: every FABRIC host of the scope, whichever outage it is
                # in, or an outage overlapping another (domain and cluster) would end and form at once.
                sum(1 for h in members if self._hosts[h].planes[plane].state == PlaneState.FABRIC),
                len(members),
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
                out.fabric.append(FabricChange(plane, domain, False, tuple(left), outage.since))

    def _set(self, host: str, plane: Plane, tr: _Track, new: PlaneState, now: float, out: HealthOutput) -> None:
        old = tr.state
        if old == new:
            return
        tr.state, tr.since = new, now
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
