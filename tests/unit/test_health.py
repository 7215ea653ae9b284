"""The health core, event by event, with an explicit clock."""

from __future__ import annotations

import random

from vmha.core.health import (
    EtcdStatus,
    FabricChange,
    HealthCore,
    HealthTick,
    HealthTimings,
    Heartbeat,
    HostGone,
    HostHealth,
    HostSeen,
    LeaseGone,
    fabric_not_isolation,
)
from vmha.core.planes import PLANES, Plane, PlaneState

M, S, V = Plane.MANAGEMENT, Plane.STORAGE, Plane.SERVICE
T = HealthTimings(
    lease_ttl=2,
    keepalive_interval=0.5,
    suspect_after=1.2,
    down_grace=0.5,
    fabric_window=5.0,
    fabric_fraction=0.5,
    fabric_min_hosts=3,
)


class Cluster:
    """Feeds a HealthCore like the manager adapter does and records every change."""

    def __init__(self, hosts: dict[str, str], timings: HealthTimings = T) -> None:
        self.core = HealthCore(timings)
        self.seq: dict[tuple[str, Plane], int] = {}
        self.changes: list[tuple[float, str, str, str]] = []
        self.fabric: list[FabricChange] = []
        self.log: list[str] = []
        for h, d in hosts.items():
            self.step(HostSeen(h, d), 0.0)

    def step(self, event: object, now: float) -> None:
        out = self.core.step(event, now)  # type: ignore[arg-type]
        self.changes += [(now, c.host, c.plane.value, c.new.value) for c in out.changes]
        self.fabric += out.fabric
        self.log += [line.render() for line in out.log]

    def beat(self, host: str, plane: Plane, now: float) -> None:
        n = self.seq.get((host, plane), 0) + 1
        self.seq[(host, plane)] = n
        self.step(Heartbeat(host, plane, n, 1000.0 + now, n, 7), now)

    def beat_all(self, now: float, skip: set[tuple[str, Plane]] = frozenset()) -> None:  # type: ignore[assignment]
        for h in sorted(self.core.view()):
            for p in PLANES:
                if (h, p) not in skip:
                    self.beat(h, p, now)

    def state(self, host: str, plane: Plane) -> PlaneState:
        return self.core.view()[host].planes[plane].state

    def run(
        self, start: float, end: float, skip: set[tuple[str, Plane]], gone_at: dict[tuple[str, Plane], float]
    ) -> None:
        """Heartbeats every 0.5 s except `skip`; LeaseGone at the given times; ticks in between."""
        t = start
        pending = dict(gone_at)
        while t <= end + 1e-9:
            for key, when in sorted(pending.items(), key=lambda kv: kv[1]):
                if when <= t:
                    self.step(LeaseGone(key[0], key[1], 99), when)
                    del pending[key]
            self.beat_all(t, skip)
            self.step(HealthTick(), t)
            t = round(t + 0.1, 6)


def healthy(hosts: dict[str, str]) -> Cluster:
    c = Cluster(hosts)
    c.beat_all(0.0)
    c.changes.clear()
    return c


def test_heartbeats_make_planes_up_and_registration_is_logged() -> None:
    c = Cluster({"h1": "r1"})
    assert c.state("h1", M) == PlaneState.UNKNOWN
    c.beat_all(0.0)
    assert {c.state("h1", p) for p in PLANES} == {PlaneState.UP}
    assert any("host 'h1' registered (domain r1)" in line for line in c.log)


def test_single_plane_down_only_that_plane() -> None:
    hosts = {f"h{i}": "r1" for i in range(1, 6)}
    c = healthy(hosts)
    cut = {("h2", S)}
    # Last keepalive at 0.0; lease expiry observed at 2.3 s.
    c.run(0.5, 6.0, cut, {("h2", S): 2.3})
    assert c.state("h2", S) == PlaneState.DOWN
    assert [x for x in c.changes if x[3] == "down"] == [(2.8, "h2", "storage", "down")]
    assert {(h, p.value) for h in hosts for p in PLANES if c.state(h, p) != PlaneState.UP} == {("h2", "storage")}
    # SUSPECT came first, from staleness, before the lease expired.
    assert c.changes[0] == (1.2, "h2", "storage", "suspect")
    assert c.core.view()["h2"].failed() == frozenset({S})


def test_flapping_link_never_goes_down_while_the_lease_lives() -> None:
    c = healthy({"h1": "r1", "h2": "r1", "h3": "r1"})
    t = 0.0
    # Keepalives for h1/service arrive every 1.5 s (two of three lost): SUSPECT, UP, SUSPECT... never DOWN.
    for _ in range(10):
        for k in range(15):
            now = round(t + k * 0.1, 6)
            if k % 5 == 0:
                c.beat_all(now, {("h1", V)})
            c.step(HealthTick(), now)
        t = round(t + 1.5, 6)
        c.beat("h1", V, t)
    states = {x[3] for x in c.changes if x[1] == "h1"}
    assert states == {"suspect", "up"}
    assert c.state("h1", V) == PlaneState.UP


def test_lease_back_within_grace_is_no_down() -> None:
    c = healthy({"h1": "r1"})
    c.step(LeaseGone("h1", M, 5), 1.0)
    assert c.state("h1", M) == PlaneState.SUSPECT
    c.step(HealthTick(), 1.3)
    c.beat("h1", M, 1.4)  # re-granted lease, new value
    c.step(HealthTick(), 2.0)
    assert c.state("h1", M) == PlaneState.UP
    assert [x[3] for x in c.changes if x[2] == "management"] == ["suspect", "up"]


def test_leader_change_freezes_staleness_and_does_not_flap() -> None:
    hosts = {f"h{i}": "r1" for i in range(1, 5)}
    c = healthy(hosts)
    # etcd election: the manager loses etcd at 0.2 s; no heartbeat moves for 8 s; leases are extended
    # by etcd (TTL + 1 s) so no key is deleted.
    c.step(EtcdStatus(False), 0.2)
    for k in range(3, 80):
        c.step(HealthTick(), k * 0.1)
    c.step(EtcdStatus(True), 8.0)
    c.beat_all(8.3)
    c.step(HealthTick(), 8.4)
    assert c.changes == []
    assert any("etcd unreachable" in line for line in c.log)


def test_all_planes_down_single_host() -> None:
    hosts = {f"h{i}": "r1" for i in range(1, 6)}
    c = healthy(hosts)
    cut = {("h3", p) for p in PLANES}
    c.run(0.5, 5.0, cut, {("h3", p): 2.3 + 0.1 * i for i, p in enumerate(PLANES)})
    assert c.core.view()["h3"].failed() == frozenset(PLANES)
    assert c.fabric == []


def test_fabric_outage_over_the_cluster() -> None:
    hosts = {f"h{i}": "r1" if i <= 2 else "r2" for i in range(1, 5)}
    c = healthy(hosts)
    cut = {(h, M) for h in hosts}
    c.run(0.5, 6.0, cut, {(h, M): 2.2 + 0.1 * i for i, h in enumerate(sorted(hosts))})
    assert {c.state(h, M) for h in hosts} == {PlaneState.FABRIC}
    assert not any(x[3] == "down" for x in c.changes)
    active = [f for f in c.fabric if f.active]
    assert [(f.plane, f.domain) for f in active] == [(M, None)]
    assert c.core.fabric_outages()[0].hosts == tuple(sorted(hosts))
    # The fabric comes back: every host UP, the outage ends, nobody was ever DOWN.
    c.run(6.1, 8.0, set(), {})
    assert {c.state(h, M) for h in hosts} == {PlaneState.UP}
    assert [f.active for f in c.fabric] == [True, False]
    assert c.core.fabric_outages() == []


def test_fabric_outage_of_one_domain() -> None:
    hosts = {**{f"a{i}": "rackA" for i in range(1, 5)}, **{f"b{i}": "rackB" for i in range(1, 7)}}
    c = healthy(hosts)
    lost = {f"a{i}" for i in range(1, 4)}  # 3 of 4 in rackA, 3 of 10 overall
    cut = {(h, V) for h in lost}
    c.run(0.5, 6.0, cut, {(h, V): 2.3 for h in lost})
    assert {c.state(h, V) for h in lost} == {PlaneState.FABRIC}
    assert c.state("a4", V) == PlaneState.UP
    assert [(f.plane, f.domain, f.active) for f in c.fabric] == [(V, "rackA", True)]
    # a4 loses service during the outage: FABRIC at once, never DOWN.
    c.run(6.1, 10.0, cut | {("a4", V)}, {("a4", V): 8.4})
    assert c.state("a4", V) == PlaneState.FABRIC
    assert not any(x[3] == "down" for x in c.changes)


def test_too_few_hosts_is_no_fabric_outage() -> None:
    c = healthy({"h1": "r1", "h2": "r1"})
    cut = {("h1", S), ("h2", S)}
    c.run(0.5, 5.0, cut, {("h1", S): 2.3, ("h2", S): 2.3})
    assert {c.state("h1", S), c.state("h2", S)} == {PlaneState.DOWN}
    assert c.fabric == []


def test_host_dead_before_fabric_keeps_down_but_losses_in_window_turn_fabric() -> None:
    hosts = {f"h{i}": "r1" for i in range(1, 5)}
    c = healthy(hosts)
    # h1 dies at 0 (DOWN at 2.8). 60 s later the storage fabric fails for h2..h4.
    c.run(0.5, 60.0, {("h1", p) for p in PLANES}, {("h1", p): 2.3 for p in PLANES})
    assert c.core.view()["h1"].failed() == frozenset(PLANES)
    cut = {("h1", p) for p in PLANES} | {(h, S) for h in ("h2", "h3", "h4")}
    c.run(60.1, 66.0, cut, {(h, S): 62.4 for h in ("h2", "h3", "h4")})
    assert c.state("h1", S) == PlaneState.DOWN  # lost long before: an individual failure
    assert {c.state(h, S) for h in ("h2", "h3", "h4")} == {PlaneState.FABRIC}


def test_fabric_end_leaves_stragglers_suspect_for_a_window() -> None:
    hosts = {f"h{i}": "r1" for i in range(1, 5)}
    c = healthy(hosts)
    cut = {(h, M) for h in hosts}
    c.run(0.5, 6.0, cut, {(h, M): 2.3 for h in hosts})
    # Three come back, h4 does not (its NIC is really broken).
    c.run(6.1, 8.0, {("h4", M)}, {})
    assert c.state("h4", M) == PlaneState.SUSPECT
    c.run(8.1, 12.0, {("h4", M)}, {})
    assert c.state("h4", M) == PlaneState.DOWN  # fabric_window after the outage ended
    down_at = [x[0] for x in c.changes if x[3] == "down"]
    assert len(down_at) == 1 and down_at[0] >= 6.1 + T.fabric_window - 0.2


def test_host_gone_and_persisted_view_roundtrip() -> None:
    c = healthy({"h1": "r1", "h2": "r2"})
    view = c.core.view()["h2"]
    assert HostHealth.from_dict(view.to_dict()) == view
    c.step(HostGone("h2"), 1.0)
    assert sorted(c.core.view()) == ["h1"]


def test_next_deadline_tells_when_to_tick() -> None:
    c = healthy({"h1": "r1"})
    assert c.core.next_deadline() == T.suspect_after
    c.step(LeaseGone("h1", S, 3), 0.7)
    assert c.core.next_deadline() == 0.7 + T.down_grace


def test_repeated_value_is_no_news() -> None:
    # h2 keeps beating: with no heartbeat from anyone, staleness would be suspended (a stalled view).
    c = healthy({"h1": "r1", "h2": "r1"})
    n = c.seq[("h1", M)]
    for t in (0.5, 1.0):
        for p in PLANES:
            c.beat("h2", p, t)
    c.step(Heartbeat("h1", M, n, 1000.0, n, 7), 1.0)  # re-delivered after a watch resume
    c.step(HealthTick(), 1.3)
    assert c.state("h1", M) == PlaneState.SUSPECT


def test_overlapping_domain_and_cluster_outages_do_not_flip() -> None:
    hosts = {**{f"h{i}": "rack1" for i in (1, 2, 3)}, **{f"h{i}": "rack2" for i in (4, 5, 6)}}
    c = healthy(hosts)
    rack2 = {(h, V) for h in ("h4", "h5", "h6")}
    c.run(0.5, 10.0, rack2, {k: 2.3 for k in rack2})
    assert [(f.domain, f.active) for f in c.fabric] == [("rack2", True)]
    # h1 loses service too: 4 of 6 hosts, the cluster rule holds while rack2 is out.
    c.run(10.1, 20.0, rack2 | {("h1", V)}, {("h1", V): 12.3})
    assert [(f.domain, f.active) for f in c.fabric] == [("rack2", True), (None, True)]
    assert c.state("h1", V) == PlaneState.FABRIC
    # rack2 comes back: both outages end once; h1, still lost, becomes DOWN after the window.
    c.run(20.1, 30.0, {("h1", V)}, {})
    assert sorted((f.domain or "", f.active) for f in c.fabric[2:]) == [("", False), ("rack2", False)]
    assert c.state("h1", V) == PlaneState.DOWN


def test_suspect_exactly_at_the_deadline() -> None:
    c = healthy({"h1": "r1", "h2": "r1"})
    c.run(0.5, 9.0, set(), {})
    c.beat("h1", M, 9.5)
    for t in (9.5, 10.0, 10.5):  # heartbeats still flow: staleness counts
        c.beat("h2", M, t)
    c.step(HealthTick(), 10.7)  # 10.7 - 9.5 < 1.2 in floating point
    assert c.state("h1", M) == PlaneState.SUSPECT


def test_a_stalled_view_is_no_fabric_outage_and_a_real_loss_still_goes_down() -> None:
    # The manager receives nothing for 3 s (its process or its watch stream stalled), then the
    # backlog arrives in revision order: the others' heartbeats, then the deletion of h3's management
    # key, whose lease expired meanwhile. Before, every plane went SUSPECT at once during the gap: a
    # fabric outage of all three planes, under which h3's real loss was FABRIC instead of DOWN.
    hosts = {f"h{i}": "r1" for i in range(1, 11)}
    c = healthy(hosts)
    c.run(0.5, 5.0, set(), {})
    cut = {("h3", M)}
    t = 5.1
    while t < 8.0:  # the stall: nothing arrives, the ticker still runs
        c.step(HealthTick(), t)
        t = round(t + 0.1, 6)
    c.beat_all(8.0, cut)
    c.step(LeaseGone("h3", M, 99), 8.0)
    c.run(8.1, 12.0, cut, {})
    assert c.fabric == []
    assert c.changes == [(8.0, "h3", "management", "suspect"), (8.5, "h3", "management", "down")]
    assert any("no heartbeat from any host for 1.2s" in line for line in c.log)
    assert any("heartbeats flow again after 3.0s" in line for line in c.log)


def test_a_stall_after_a_loss_keeps_the_lost_planes_last_sign_of_life() -> None:
    # h2's storage is cut at 3.0 and DOWN by 4.7; then the manager's view stalls for 2 s. The
    # staleness restart after the stall must not move h2 storage's last heartbeat to the stall's end:
    # the detect phase of its recoveries is measured from it (a moved one is later than the verdict,
    # and the phase went unobserved: the metrics test's failure in session 9's dry run).
    c = healthy({"h1": "r1", "h2": "r1", "h3": "r1"})
    cut = {("h2", S)}
    c.run(0.5, 2.5, set(), {})
    c.run(3.0, 5.0, cut, {("h2", S): 4.2})
    assert c.state("h2", S) == PlaneState.DOWN
    before = c.core.last_seen("h2", S)
    assert before == 2.5
    t = 5.1
    while t < 7.0:  # the stall
        c.step(HealthTick(), t)
        t = round(t + 0.1, 6)
    c.run(7.0, 8.0, cut, {})
    assert any("heartbeats flow again" in line for line in c.log)
    assert c.core.last_seen("h2", S) == before
    assert c.core.last_seen("h1", S) == 8.0


def test_staleness_still_counts_while_other_hosts_beat() -> None:
    # The silence rule needs silence from every host: one host's heartbeats stopping is staleness.
    c = healthy({"h1": "r1", "h2": "r1", "h3": "r1"})
    c.run(0.5, 3.0, {("h2", p) for p in PLANES}, {})
    assert {c.state("h2", p) for p in PLANES} == {PlaneState.SUSPECT}
    assert not any("no heartbeat from any host" in line for line in c.log)


def test_the_deadline_index_matches_a_scan_of_every_plane() -> None:
    # The core indexes deadlines (a heap) instead of scanning every plane on every step. Random
    # traffic on 12 hosts in 3 domains: after every step, the next deadline is the one a full scan
    # finds, and nothing due is left behind.
    rng = random.Random(7)
    hosts = {f"h{i:02d}": f"r{i % 3}" for i in range(12)}
    c = healthy(hosts)
    t = 0.0
    for _ in range(3000):
        t = round(t + rng.choice((0.05, 0.1, 0.3)), 6)
        r = rng.random()
        if r < 0.7:
            h, p = rng.choice(sorted(hosts)), rng.choice(PLANES)
            if rng.random() < 0.8:
                c.beat(h, p, t)
            else:
                c.step(LeaseGone(h, p, 1), t)
        elif r < 0.72:
            c.step(EtcdStatus(rng.random() < 0.7), t)
        else:
            c.step(HealthTick(), t)
        core = c.core
        scan = [
            d for h in core._hosts.values() for tr in h.planes.values() if (d := core._deadline(tr)) is not None
        ]
        assert core.next_deadline() == (min(scan) if scan else None)
        assert core.next_deadline() is None or core.next_deadline() > t  # type: ignore[operator]


def test_a_stall_ended_by_part_of_the_backlog_makes_nobody_suspect() -> None:
    # The first thing the manager processes after a 2 s stall is a batch holding only half of the
    # backlog (no HealthTick ran during the stall); the other half follows 0.3 s later. Counted from the
    # first batch, the other half was "stale" and, with more than half of all hosts, a fabric outage.
    hosts = {f"h{i:02d}": "r1" for i in range(10)}
    c = healthy(hosts)
    c.run(0.5, 5.0, set(), {})
    n = 1000
    for part, t in ((sorted(hosts)[:5], 7.0), (sorted(hosts)[5:], 7.3)):
        batch = []
        for h in part:
            for p in PLANES:
                n += 1
                batch.append(Heartbeat(h, p, n, 1000.0 + t, n, 7))
        out = c.core.step_many(batch, t)
        c.changes += [(t, ch.host, ch.plane.value, ch.new.value) for ch in out.changes]
        c.fabric += out.fabric
        c.log += [line.render() for line in out.log]
    c.run(7.5, 10.0, set(), {})
    assert c.changes == []
    assert c.fabric == []
    assert any("heartbeats flow again after 2.0s without any" in line for line in c.log)


def test_every_host_cut_off_is_a_fabric_outage_not_a_stall() -> None:
    # Every plane of every host goes silent at 5.0 (the whole network is gone): the silence suspends
    # staleness like a stall would, but the first lease expiry shows it is real; every plane is
    # FABRIC at once and no lease-expired plane becomes DOWN.
    hosts = {f"h{i:02d}": "r1" for i in range(10)}
    c = healthy(hosts)
    c.run(0.5, 5.0, set(), {})
    everything = {(h, p) for h in hosts for p in PLANES}
    # The leases expire over 1.5 s (their last keepalives were spread over an interval, and etcd checks
    # for expired leases every 0.5 s): longer than down_grace.
    c.run(5.1, 12.0, everything, {hp: 7.2 + 0.05 * i for i, hp in enumerate(sorted(everything))})
    assert any("expired during the silence: it is real" in line for line in c.log)
    assert sorted(f.plane.value for f in c.fabric if f.active) == ["management", "service", "storage"]
    assert {c.state(h, p) for h, p in everything} == {PlaneState.FABRIC}
    assert not [x for x in c.changes if x[3] == "down"]


# -- the agent's isolation check: its own isolation, or a fabric outage? ----------------------------


def test_fabric_not_isolation_over_the_cluster_and_the_domain() -> None:
    t = HealthTimings()  # fabric_fraction 0.5, fabric_min_hosts 3
    domains = {f"h{i}": ("r1" if i <= 4 else "r2") for i in range(1, 9)}
    # Alone (or with one other host): this host's isolation.
    assert fabric_not_isolation("h1", domains, {"h1"}, t) == ""
    assert fabric_not_isolation("h1", domains, {"h1", "h5"}, t) == ""
    # Three of the four hosts of its rack: a fabric outage in the domain, not in the cluster.
    assert fabric_not_isolation("h1", domains, {"h1", "h2", "h3"}, t) == "3 of the 4 hosts of domain r1 lost them too"
    # Five of eight: the cluster's fabric.
    assert fabric_not_isolation("h5", domains, {"h1", "h2", "h5", "h6", "h7"}, t) == (
        "5 of the 8 hosts of the cluster lost them too")
    # A small cluster stays sane: two hosts of two are below fabric_min_hosts.
    assert fabric_not_isolation("h1", {"h1": "r1", "h2": "r1"}, {"h1", "h2"}, t) == ""
