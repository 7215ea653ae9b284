"""A manager CLI command with one etcd member down starts over on the next endpoint, and stops
trying once every endpoint has failed (`vmha host enable` failed in the lab with the first member
crashed)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from vmha.etcd.client import EtcdClient, EtcdUnavailable
from vmha.etcd.keys import Keys
from vmha.manager.cli import _with_etcd

CONFIG = """[cluster]
name = "c1"
[etcd]
insecure = true
[planes.management]
endpoints = ["http://198.18.1.2:2379", "http://198.18.1.3:2379", "http://198.18.1.4:2379"]
[planes.storage]
endpoints = ["http://198.18.2.2:2379"]
[planes.service]
endpoints = ["http://198.18.3.2:2379"]
"""


def _config(tmp_path: Path) -> str:
    path = tmp_path / "vmha.toml"
    path.write_text(CONFIG)
    return str(path)


def test_a_member_down_the_command_runs_on_the_next(tmp_path: Path) -> None:
    tried: list[int] = []

    async def body(_cfg: object, client: EtcdClient, _keys: Keys) -> str:
        tried.append(len(tried))
        if len(tried) < 3:
            raise EtcdUnavailable("refused")
        return "done"

    assert _with_etcd(_config(tmp_path), body) == "done"
    assert tried == [0, 1, 2]


def test_every_member_down_is_a_clear_error(tmp_path: Path) -> None:
    tried: list[int] = []

    async def body(_cfg: object, client: EtcdClient, _keys: Keys) -> str:
        tried.append(len(tried))
        raise EtcdUnavailable("refused")

    with pytest.raises(click.ClickException, match="etcd: refused"):
        _with_etcd(_config(tmp_path), body)
    assert len(tried) == 3
