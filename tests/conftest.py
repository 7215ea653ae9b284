"""Fixtures shared by every test folder: a real etcd per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
