"""The detection benchmark's load generator against a real etcd (TLS, client certificates): its
hand-written gRPC client (RawGrpcConnection) must produce exactly an agent's traffic, one connection
per (host, plane)."""

from __future__ import annotations

import psutil
import pytest

from vmha.bench.grpc_raw import CallFailed, RawGrpcConnection, client_context, pb_bytes, pb_fields, pb_int, pb_int_field
from vmha.bench.heartbeat_load import HeartbeatLoad
from vmha.core.planes import PLANES, Plane
from vmha.etcd.client import EtcdClient, parse_endpoint
from vmha.etcd.keys import Keys
from vmha.testing.etcd import EtcdProcess
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

K = Keys("t")


async def _values(client: EtcdClient) -> dict[str, tuple[int, int]]:
    """key -> (seq, lease) of every heartbeat key."""
    kvs, _ = await client.get_prefix(K.heartbeat_prefix)
    return {kv.key: (kv.json()["seq"], kv.lease) for kv in kvs}


async def test_raw_calls_and_errors(etcd: EtcdProcess, client: EtcdClient) -> None:
    host, port = parse_endpoint(etcd.client_urls[0])
    tls = etcd.tls()
    assert tls is not None
    conn = await RawGrpcConnection.open(host, port, tls=client_context(tls))  # TLS as root, auth off
    try:
        lease = pb_int_field(pb_fields(await conn.unary("/etcdserverpb.Lease/LeaseGrant", pb_int(1, 5))), 2)
        assert lease > 0 and await client.refresh(lease) > 0  # etcd knows the lease we granted
        put = pb_bytes(1, b"/t/raw") + pb_bytes(2, b'{"a":1}') + pb_int(3, lease)
        await conn.unary("/etcdserverpb.KV/Put", put)
        got = await client.get("/t/raw")
        assert got is not None and got.json() == {"a": 1} and got.lease == lease
        # A gRPC error (no such lease) comes back as trailers only: the call fails.
        with pytest.raises(CallFailed):
            await conn.unary("/etcdserverpb.KV/Put", pb_bytes(1, b"/t/raw") + pb_int(3, lease + 12345))
        # Many calls on one connection: more requests than a default HTTP/2 window holds, so the
        # send window must follow the server's WINDOW_UPDATEs. (Streams run concurrently in etcd:
        # the calls complete in any order.)
        replies: list[bytes | None] = []
        for batch in range(10):  # 6,000 requests of 20 bytes each: twice the initial window
            for i in range(600):
                msg = pb_bytes(1, b"/t/many") + pb_bytes(2, b"%04d" % (batch * 600 + i))
                conn.call("/etcdserverpb.KV/Put", msg, replies.append)

            async def batch_replied(n: int = 600 * (batch + 1)) -> bool:
                return len(replies) == n

            await until(batch_replied, "every reply of the batch", timeout=20.0)
        assert None not in replies
        got = await client.get("/t/many")
        assert got is not None and got.version == 6000
    finally:
        conn.close()


async def test_load_beats_cut_restore_close(etcd: EtcdProcess, client: EtcdClient) -> None:
    hosts = ["h1", "h2"]
    # Auth on, as in the benchmark's TLS runs: each host's connections present its own certificate.
    await etcd.setup_auth("t", hosts)
    assert etcd.pki is not None
    load = HeartbeatLoad(etcd.client_urls[0], K, [(h, p) for h in hosts for p in PLANES], ttl=2, interval=0.5,
                         tls=etcd.pki.issue)
    await load.start()
    try:

        await until(lambda: load.beating() == 6, "the generator beating on all 6", timeout=3.0)

        # Asserted on etcd's keys, so waited for on them (the generator counts a beat before its put lands).
        async def six_keys() -> dict[str, tuple[int, int]] | None:
            v = await _values(client)
            return v if len(v) == 6 else None

        first = await until(six_keys, "6 heartbeat keys", timeout=3.0, interval=0.1)
        # Every (host, plane) beats on its own lease, its value changing.
        assert len({lease for _, lease in first.values()}) == 6

        async def all_changed() -> bool:
            later = await _values(client)
            return all(k in later and later[k][0] > first[k][0] for k in first)

        await until(all_changed, "every heartbeat value changing", timeout=3.0, interval=0.1)
        # ... over its own TCP connection to etcd.
        port = parse_endpoint(etcd.client_urls[0])[1]
        mine = [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]
        assert len(mine) >= 6

        # A cut: the key goes when its lease expires (TTL 2 s), the others beat on.
        cut_key = K.heartbeat("h1", Plane.STORAGE)
        load.cut("h1", Plane.STORAGE)

        async def cut_gone() -> bool:
            return cut_key not in await _values(client)

        await until(cut_gone, "the cut key expired", timeout=5.0, interval=0.1)
        assert set(await _values(client)) == set(first) - {cut_key}

        # A restore: a new lease, beating again from seq 1.
        await load.restore("h1", Plane.STORAGE)

        async def back() -> bool:
            v = await _values(client)
            return cut_key in v and v[cut_key][1] != first[cut_key][1]

        await until(back, "the cut key back on a new lease", timeout=3.0, interval=0.1)
        assert load.stats.errors == 0 and load.stats.puts > 0 and load.stats.acks > 0
    finally:
        await load.close(revoke=True)
    assert await _values(client) == {}  # revoked at once, not left to the TTL
