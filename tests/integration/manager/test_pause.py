"""The leader learns of `vmha pause on|off` (keys.pause) from a real etcd: daemon.pause_marks, fed by
the same operation the CLI and the API run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.manager import daemon, operations

pytestmark = pytest.mark.integration

KEYS = Keys("vpause")


async def test_pause_marks_follow_the_key(client: EtcdClient) -> None:
    await operations.pause(client, KEYS, True, by="cli", why="before the leader")
    marks: AsyncIterator[str | None] = daemon.pause_marks(client, KEYS)
    nxt = lambda: asyncio.wait_for(anext(marks), 5)  # noqa: E731
    assert await nxt() == "by cli: before the leader"  # the first listing: a new leader sees the pause
    await operations.pause(client, KEYS, False, by="cli", why="")
    assert await nxt() is None
    await client.put(KEYS.pause, b'{"t": "yesterday"}')  # not a pause record vmha writes
    assert await nxt() == "unreadable pause record"  # in doubt, still paused
    await client.put(KEYS.pause + "d-by-someone", b"{}")  # another key under the prefix: no pause
    await operations.pause(client, KEYS, True, by="api from 10.0.0.1", why="upgrade")
    assert await nxt() == "by api from 10.0.0.1: upgrade"
    await client.delete(KEYS.pause)
    assert await nxt() is None
    await marks.aclose()  # type: ignore[attr-defined]
