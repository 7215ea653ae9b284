"""The leader's keepalive (Election._keep) on a fake clock: it rides out an etcd leader election
(issue 14: a term lost on every etcd leader crash) and still stops acting before its lease can
expire in etcd when no member answers. The real-etcd side is tests/integration/manager/test_election.py."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from vmha.etcd.client import KV, EtcdClient, EtcdUnavailable
from vmha.etcd.election import MARGIN, REFRESHES, Election, Leadership, ride_out

KEY = "/vmha/t/manager/leader"
TOKEN = b'{"name": "mgr-a", "lease": "1"}'


class Clock:
    """Virtual time: sleeping moves it, nothing waits for real."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Etcd:
    """refresh/get as EtcdClient answers them, on the virtual clock, with an outage [start, end).

    During the outage a keepalive either waits for the new etcd leader until its timeout (a surviving
    follower holds it: `waits`) or fails at once (a crashed member, or one answering "no leader")."""

    def __init__(self, clock: Clock, ttl: int, start: float, end: float, waits: bool, slow: float = 0.0) -> None:
        self.clock, self.ttl, self.start, self.end, self.waits = clock, ttl, start, end, waits
        self.slow = slow  # seconds a successful keepalive takes to be answered (a busy etcd)
        self.answered: list[float] = []  # send times of the successful keepalives

    async def refresh(self, lease: int, timeout: float | None = None) -> int:
        sent = self.clock.now
        assert timeout is not None and timeout > 0
        await asyncio.sleep(0)
        if self.start <= sent < self.end:
            if not self.waits or sent + timeout < self.end:
                self.clock.now += timeout if self.waits else 0.002
                raise EtcdUnavailable("etcd: no answer")
            self.clock.now = self.end  # the new leader answers the forwarded keepalive
        self.clock.now += self.slow
        self.answered.append(sent)
        return self.ttl

    async def get(self, key: str, timeout: float | None = None) -> KV:
        return KV(key, TOKEN, 1, 1, 1, 1)


async def keep(ttl: int, phase: float, outage: float, waits: bool) -> tuple[Leadership, Etcd]:
    """Run the keepalive of a term elected now, an etcd outage of `outage` s starting `phase` (a fraction
    of the keepalive interval) after the keepalive due at 3 TTL; until the term ends or 3 TTL after."""
    clock = Clock()
    start = clock.now + 3 * ttl + phase * ttl / REFRESHES
    etcd = Etcd(clock, ttl, start, start + outage, waits)
    election = Election(cast(EtcdClient, etcd), KEY, "mgr-a", ttl, clock=clock, sleep=clock.sleep)
    lead = Leadership("mgr-a", KEY, 1, TOKEN, clock.now)
    task = asyncio.create_task(election._keep(lead))
    while not task.done() and clock.now < start + outage + 3 * ttl:
        await asyncio.sleep(0)
    lead.end("test over", resigned=True)
    await task
    return lead, etcd


# The worst phase is the last: the outage begins just before a keepalive is due, the last success is
# then a whole interval (ttl/6) old.
PHASES = [0.02, 0.5, 0.98]


@pytest.mark.parametrize("waits", [True, False], ids=["follower-waits", "fails-at-once"])
@pytest.mark.parametrize("phase", PHASES)
async def test_the_default_term_outlasts_an_etcd_election_of_twice_its_timeout(phase: float, waits: bool) -> None:
    # etcd's default election timeout is 1 s; raft draws it between 1 and 2 s.
    lead, etcd = await keep(3, phase, 2.0, waits)
    assert lead.reason == "test over", f"term lost: {lead.reason}"
    outage_end = etcd.start + 2.0
    first_after = min(t for t in etcd.answered if t >= etcd.start)
    assert first_after - outage_end < 0.1, "the first keepalive after the election came late"


@pytest.mark.parametrize("ttl", [2, 3, 5, 10])
async def test_any_outage_shorter_than_ride_out_is_ridden_out(ttl: int) -> None:
    for phase in PHASES:
        lead, _ = await keep(ttl, phase, ride_out(ttl) - 0.1, waits=False)
        assert lead.reason == "test over", f"ttl {ttl}, phase {phase}: {lead.reason}"


@pytest.mark.parametrize("waits", [True, False], ids=["follower-waits", "fails-at-once"])
@pytest.mark.parametrize("phase", PHASES)
async def test_no_answer_ends_the_term_before_the_lease_can_expire(phase: float, waits: bool) -> None:
    """Safety: etcd expires the lease TTL after it RECEIVED the last keepalive, which is after we sent
    it: with no answer at all (a majority we cannot reach may have a leader) the term ends by then,
    with the margin in hand. The answers before the outage are slow: the deadline counts from the
    send, not from the answer."""
    ended: list[float] = []
    clock = Clock()
    ttl = 3
    start = clock.now + 3 * ttl + phase * ttl / REFRESHES
    etcd = Etcd(clock, ttl, start, float("inf"), waits, slow=0.3)
    election = Election(cast(EtcdClient, etcd), KEY, "mgr-a", ttl, clock=clock, sleep=clock.sleep,
                        on_lost=lambda _: ended.append(clock.now))  # fmt: skip
    lead = Leadership("mgr-a", KEY, 1, TOKEN, clock.now, on_lost=election.on_lost)
    await asyncio.wait_for(election._keep(lead), 5)
    assert ended, "the term never ended"
    assert lead.reason.startswith("no keepalive answered")
    assert ended[0] <= max(etcd.answered) + ttl * (1 - MARGIN) + 1e-9


async def test_an_expired_lease_ends_the_term_at_once() -> None:
    clock = Clock()
    etcd = Etcd(clock, 0, 0, 0, False)  # etcd answers TTL 0: the lease is gone
    election = Election(cast(EtcdClient, etcd), KEY, "mgr-a", 3, clock=clock, sleep=clock.sleep)
    lead = Leadership("mgr-a", KEY, 1, TOKEN, clock.now)
    await asyncio.wait_for(election._keep(lead), 5)
    assert lead.reason == "lease expired in etcd"
