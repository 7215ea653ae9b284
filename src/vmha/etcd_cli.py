"""`vmha etcd setup-auth`: etcd users and roles for a vmha cluster (vmha.etcd.auth), then auth on."""

from __future__ import annotations

import asyncio

import click

from vmha import config
from vmha.config_cli import config_option
from vmha.core.planes import PLANES
from vmha.etcd.auth import setup_auth
from vmha.etcd.client import EtcdClient, EtcdError


@click.group("etcd")
def etcd_group() -> None:
    """etcd administration."""


@etcd_group.command("setup-auth")
@config_option  # a config whose [etcd] certificate has CN root (or etcd's auth still off)
@click.option("--host", "hosts", multiple=True, help="a compute host (its certificate's CN); repeat")
@click.option("--manager", "managers", multiple=True, help="a manager (its certificate's CN); repeat")
def setup_auth_command(config_path: str, hosts: tuple[str, ...], managers: tuple[str, ...]) -> None:
    """Create the users (named after certificate CNs: each host, each manager, operator, root) and
    roles (a host writes only its own keys, managers write everything, operator reads), allocate
    each host's sanlock host_id, and enable etcd auth. Running it again adds what is missing."""
    cfg = config.load(config_path)
    bad = [n for n in (*hosts, *managers) if not config.NAME.fullmatch(n)]
    if bad:
        raise click.UsageError(f"not a vmha host or manager name: {', '.join(map(repr, bad))}")
    if not hosts or not managers:
        raise click.UsageError("give every --host and every --manager of the cluster")
    endpoints = cfg.manager.endpoints if cfg.manager is not None else cfg.planes.endpoints(PLANES[0])

    async def run() -> list[str]:
        async with EtcdClient(endpoints, timeout=5.0, name="setup-auth", tls=cfg.etcd.tls()) as client:
            return await setup_auth(client, cfg.cluster.name, hosts, managers,
                                    cfg.locks.max_hosts if cfg.locks else 2000)  # fmt: skip

    try:
        lines = asyncio.run(run())
    except EtcdError as e:
        raise click.ClickException(f"etcd: {e}") from None
    for line in lines:
        click.echo(line)
    click.echo(f"etcd auth enabled for cluster {cfg.cluster.name}")
