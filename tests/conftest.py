"""Fixtures shared by every test folder: a real etcd per test, and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmha.etcd.client import EtcdClient
from vmha.testing.etcd import EtcdProcess


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """A fresh single-member etcd on 127.0.0.1 (free ports), stopped and removed after the test."""
    proc = EtcdProcess(tmp_path / "etcd")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def client(etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    c = EtcdClient(etcd.client_urls)
    yield c
    await c.close()
