"""Fixtures shared by every test folder: a real etcd per test, and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmha.etcd.client import EtcdClient
from vmha.lab.pki import Pki
from vmha.testing.etcd import EtcdProcess


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """A fresh single-member etcd on 127.0.0.1 (free ports), stopped and removed after the test. TLS
    only, client certificates required (etcd.tls(user) makes one); auth is off until a test turns
    it on (etcd.setup_auth, done by ProxiedHost.create for its host)."""
    with EtcdProcess(tmp_path / "etcd", pki=Pki(tmp_path / "pki")) as proc:
        yield proc


@pytest.fixture
async def client(etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    c = EtcdClient(etcd.client_urls, tls=etcd.tls())
    yield c
    await c.close()
