"""The manager tests' etcd."""

from __future__ import annotations

import pytest

from vmha.testing.etcd import EtcdProcess


@pytest.fixture
def etcd(etcd_plain: EtcdProcess) -> EtcdProcess:
    """Plaintext here: these tests and their configs are not yet moved to TLS (tests/conftest.py)."""
    return etcd_plain
