"""`vmha config check [FILE]`: every error of a config file, before a daemon refuses to start on it;
and the `--config` option every command shares (default: $VMHA_CONFIG, else /etc/vmha/vmha.toml)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click

from vmha import config

F = TypeVar("F", bound=Callable[..., object])


def config_option(f: F) -> F:
    """`--config FILE`, resolved by click: the option, else $VMHA_CONFIG, else /etc/vmha/vmha.toml."""
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), envvar=config.CONFIG_ENV,
        default=str(config.DEFAULT_PATH), show_default=True, show_envvar=True, help="vmha config file",
    )(f)  # fmt: skip


@click.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
def check(path: str | None) -> None:
    """Check FILE (default: $VMHA_CONFIG, else /etc/vmha/vmha.toml) as every daemon would (and the
    [power] options against the fence agents); exit 1 naming every error, 0 if vmha can run with it."""
    from vmha.locks.power import PowerFenceError, fence_agents

    path = path or str(config.default_path())
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
