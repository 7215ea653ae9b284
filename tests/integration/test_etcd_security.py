"""etcd connections are TLS on the wire, and one host's credentials write only that host's keys."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from vmha.core.planes import Plane
from vmha.etcd.attest import AttestResponse
from vmha.etcd.auth import OPERATOR
from vmha.etcd.client import EtcdClient, EtcdError, parse_endpoint
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register
from vmha.lab.pki import Pki
from vmha.testing.etcd import EtcdProcess

pytestmark = pytest.mark.integration

CLUSTER = "sec"
K = Keys(CLUSTER)


@contextlib.asynccontextmanager
async def recording_proxy(target: str, sent: bytearray) -> AsyncIterator[int]:
    """A TCP forwarder to ``target`` (an etcd URL) that keeps every byte clients send; yields its port."""
    host, port = parse_endpoint(target)
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if record:
                    sent.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, port)
        for t in (pump(reader, up_writer, True), pump(up_reader, writer, False)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()


async def test_the_bytes_on_the_wire_are_tls(etcd: EtcdProcess) -> None:
    sent = bytearray()
    async with recording_proxy(etcd.client_urls[0], sent) as port, \
            EtcdClient([f"https://127.0.0.1:{port}"], tls=etcd.tls("h1"), timeout=5.0) as c:  # fmt: skip
        await c.put_json(K.heartbeat("h1", Plane.STORAGE), {"secret-marker": 1})
        assert (await c.get_json(K.heartbeat("h1", Plane.STORAGE))) is not None
    # A TLS handshake record (0x16, version 3.x) opens the connection; HTTP/2's plaintext preface
    # (what aetcd's own insecure channel sends, whatever the URL) and the key and value never appear.
    assert sent[:2] == b"\x16\x03", bytes(sent[:40])
    assert b"PRI * HTTP/2.0" not in sent and b"secret-marker" not in sent and b"/vmha/sec/" not in sent


async def test_the_capture_sees_plaintext_when_there_is_some() -> None:
    # The check above can fail: the same capture on a plaintext etcd shows the preface and the key.
    sent = bytearray()
    with EtcdProcess() as plain:
        async with recording_proxy(plain.client_urls[0], sent) as port, \
                EtcdClient([f"http://127.0.0.1:{port}"], timeout=5.0) as c:  # fmt: skip
            await c.put_json(K.heartbeat("h1", Plane.STORAGE), {"secret-marker": 1})
    assert sent.startswith(b"PRI * HTTP/2.0") and b"secret-marker" in sent


async def test_a_client_without_the_clusters_ca_or_certificate_is_refused(etcd: EtcdProcess) -> None:
    stranger = Pki(etcd.base.parent / "stranger-pki")
    stranger.create([], ["h1"])  # a certificate named h1, signed by another CA
    async with EtcdClient(etcd.client_urls, tls=stranger.client("h1"), timeout=2.0) as c:
        with pytest.raises(EtcdError):
            await c.get(K.host("h1"))
    with pytest.raises(ValueError, match="https:// etcd endpoints need TLS files"):
        EtcdClient(etcd.client_urls)  # never plaintext to an https:// URL


async def denied(c: EtcdClient, key: str) -> bool:
    try:
        await c.put_json(key, {"forged": True})
    except EtcdError as e:
        return "permission denied" in str(e)
    return False


async def test_one_hosts_credentials_write_only_its_own_keys(etcd: EtcdProcess) -> None:
    await etcd.setup_auth(CLUSTER, ["h1", "h2", "h10"], ["m1"])
    async with EtcdClient(etcd.client_urls, tls=etcd.tls("h1"), timeout=3.0) as h1:
        # Its own keys: heartbeats on a lease, its host record, its attestation answers.
        lease = await h1.grant(5)
        await h1.put_json(K.heartbeat("h1", Plane.STORAGE), {"seq": 1}, lease=lease)
        assert await h1.refresh(lease) > 0
        await register(h1, K, "h1", "r1")
        await h1.put_json(K.attest_response("h1", "vm1"), AttestResponse("vm1", "h1", "n", True, "x", {}).to_dict())
        assert await h1.revision() > 0
        assert (await h1.get_json(K.host("h1"))) is not None  # it reads the cluster
        # Everything else is refused.
        others = [K.heartbeat("h2", Plane.STORAGE), K.heartbeat("h10", Plane.STORAGE), K.host("h2"), K.host("h10"),
                  K.attest_response("h2", "vm1"), K.attest_request("h1", "vm1"), K.task("vm1"), K.leader,
                  K.host_id(7), K.record("vm1", 1), K.health("h2"), K.disabled("h2"), "/elsewhere"]  # fmt: skip
        refused = [k for k in others if await denied(h1, k)]
        assert refused == others
        await h1.revoke(lease)
    async with EtcdClient(etcd.client_urls, tls=etcd.tls(OPERATOR), timeout=3.0) as op:
        assert (await op.get_json(K.host("h1"))) is not None
        assert await denied(op, K.task("vm1")) and await denied(op, K.host("h1"))
    async with EtcdClient(etcd.client_urls, tls=etcd.tls("m1"), timeout=3.0) as m1:
        await m1.put_json(K.task("vm1"), {"ok": True})  # the managers' role writes the cluster's keys
        assert await denied(m1, "/elsewhere")
    async with EtcdClient(etcd.client_urls, tls=etcd.tls("nobody"), timeout=3.0) as nobody:
        with pytest.raises(EtcdError, match="permission denied"):
            await nobody.get(K.host("h1"))  # a certificate of the CA, but no etcd user
