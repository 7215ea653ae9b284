"""`vmha config check FILE`: every error of a config file, before a daemon refuses to start on it."""

from __future__ import annotations

import sys

import click

from vmha import config


@click.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def check(path: str) -> None:
    """Check FILE as every daemon would (and the [power] options against the fence agents); exit 1
    naming every error, 0 if vmha can run with it."""
    from vmha.locks.power import PowerFenceError, fence_agents

    try:
        cfg = config.load(path)
        fence_agents(cfg.power, f"{path} [power]")
        if cfg.power_uncovered():
            raise config.ConfigError(f"config error in {path}: {cfg.power_uncovered()}")
    except (config.ConfigError, PowerFenceError) as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    roles = [r for r, section in (("agent", cfg.host), ("manager", cfg.manager), ("locks", cfg.locks)) if section]
    click.echo(f"{path}: ok (cluster {cfg.cluster.name}; sections for: {', '.join(roles) or 'commands only'})")
