"""Which etcd member a client uses: hosts' heartbeats spread over the members, and a client that
loses its member moves to another one drawn at random (test_lab_etcd.py saw every host's storage
heartbeat on one member: cutting that member's storage NIC stalled them all at once, and the
manager raised a false storage fabric outage)."""

from __future__ import annotations

import asyncio
from collections import Counter

from vmha.core.planes import Plane
from vmha.etcd.client import EtcdClient
from vmha.etcd.heartbeat import PlaneHeartbeat
from vmha.etcd.keys import Keys

MEMBERS = ["http://198.18.2.2:2379", "http://198.18.2.3:2379", "http://198.18.2.4:2379"]


def test_hosts_heartbeats_start_on_different_members() -> None:
    first = {h: PlaneHeartbeat(Keys("lab"), h, Plane.STORAGE, MEMBERS, ttl=2, interval=0.5).client.endpoint
             for h in ("h1", "h2", "h3", "h4", "h5", "h6")}
    assert set(first.values()) == set(MEMBERS), first
    assert first["h1"] != first["h2"] != first["h3"] != first["h1"], first  # the lab's three hosts


def test_a_client_that_loses_its_member_moves_to_another_drawn_at_random() -> None:
    async def moves_from(first: int) -> str:
        c = EtcdClient(MEMBERS, first=first)
        await c.reset("member gone")
        return c.endpoint

    seen = Counter(asyncio.run(moves_from(0)) for _ in range(40))
    assert MEMBERS[0] not in seen and set(seen) == set(MEMBERS[1:]), seen
    assert EtcdClient(MEMBERS, first=4).endpoint == MEMBERS[1]
    assert EtcdClient(MEMBERS).endpoint == MEMBERS[0]
