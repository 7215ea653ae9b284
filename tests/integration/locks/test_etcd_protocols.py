"""host_id allocation and the exit-attestation protocol against a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from vmha.etcd import hostids
from vmha.etcd.attest import AttestTimeout, request_attestation, serve_attestations
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys

pytestmark = pytest.mark.integration

K = Keys("vt2")


async def test_host_ids_are_unique_and_stable(client: EtcdClient) -> None:
    assert await hostids.allocate(client, K, "h1") == 1
    assert await hostids.allocate(client, K, "h2") == 2
    assert await hostids.allocate(client, K, "h1") == 1  # same host, same id
    await client.put(K.host_id(3), b"not json")  # a broken value is skipped, its id is not reused blindly
    # Five agents of one host racing: one id for the host in the end, never a shared one.
    got = await asyncio.gather(*(hostids.allocate(client, K, "h3") for _ in range(5)))
    ids = await hostids.host_ids(client, K)
    assert set(got) == {n for n, h in ids.items() if h == "h3"} and len(set(got)) == 1
    assert sorted(ids.values()).count("h3") == 1
    assert await hostids.lookup(client, K, "h3") == got[0]


async def test_host_ids_exhausted(client: EtcdClient) -> None:
    for h in ("a", "b"):
        await hostids.allocate(client, K, h, max_hosts=2)
    with pytest.raises(hostids.HostIdError, match=r"every sanlock host_id 1\.\.2 is allocated"):
        await hostids.allocate(client, K, "c", max_hosts=2)


@dataclass
class Result:
    ok: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def agent(client: EtcdClient, host: str, gone: asyncio.Event) -> AsyncIterator[list[str]]:
    """An agent whose check passes once `gone` is set; yields the VMs it was asked about."""
    asked: list[str] = []

    async def check(vm: str) -> Result:
        asked.append(vm)
        return Result(True, "gone", {"holders": "none"}) if gone.is_set() else Result(False, "holder alive")

    task = asyncio.create_task(serve_attestations(client, K, host, check, poll=0.05))
    try:
        yield asked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_attestation_waits_for_the_check_then_answers(client: EtcdClient) -> None:
    gone = asyncio.Event()
    async with agent(client, "h1", gone) as asked:
        await client.put_json(K.attest_request("h1", "junk"), {"nonce": 1})  # broken request: skipped
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, gone.set)
        resp = await request_attestation(client, K, "h1", "vm1", timeout=5.0, poll=0.05)
        assert resp.ok and resp.vm == "vm1" and resp.evidence == {"holders": "none"}
        assert "vm1" in asked and "junk" not in asked
        # The request is removed once answered.
        assert await client.get(K.attest_request("h1", "vm1")) is None


async def test_attestation_refused_when_check_never_passes(client: EtcdClient) -> None:
    async with agent(client, "h1", asyncio.Event()):
        resp = await request_attestation(client, K, "h1", "vm1", timeout=0.5, poll=0.05)
    assert not resp.ok and resp.reason == "holder alive"


async def test_attestation_times_out_without_agent(client: EtcdClient) -> None:
    with pytest.raises(AttestTimeout, match="host h9: no exit attestation for VM vm1"):
        await request_attestation(client, K, "h9", "vm1", timeout=0.3, poll=0.05)
