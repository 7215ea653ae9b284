"""`vmha fence test HOST`: ask HOST's configured fence agent ([power.HOST]) for the power status,
changing nothing, so a wrong BMC address, password or option shows before a fence needs it."""

from __future__ import annotations

import asyncio
import time

import click

from vmha import config
from vmha.config_cli import config_option
from vmha.locks.power import FenceAgentPower, PowerFenceError, fence_agents


@click.group("fence")
def fence() -> None:
    """Power fencing through fence-agents ([power.HOST] in the config)."""


@fence.command("test")
@config_option
@click.option("--timeout", default=30.0, show_default=True, help="seconds the agent may take")
@click.argument("host")
def test(config_path: str, timeout: float, host: str) -> None:
    """Run action=status through HOST's fence agent; exit 0 with its answer (ON or OFF), 1 if it fails."""
    cfg = config.load(config_path)
    if host not in cfg.power:
        configured = ", ".join(sorted(cfg.power)) or "none"
        raise click.ClickException(f"host {host}: no [power.{host}] in {config_path} (configured: {configured})")
    try:
        power = FenceAgentPower(fence_agents({host: cfg.power[host]}, f"{config_path} [power]"))
        started = time.monotonic()
        answer = asyncio.run(power.status(host, timeout))
    except PowerFenceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"host {host}: {answer} in {time.monotonic() - started:.1f} s")
    if not cfg.manager or not cfg.manager.power_fence:
        click.echo("note: manager.power_fence is not true in this config: the manager does not power-fence", err=True)
