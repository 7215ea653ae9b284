"""`vmha agent [--config FILE]`: run the agent; `--status` prints the running agent's plane view."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import click

from vmha import config, logsetup, metrics, sdnotify
from vmha.agent.daemon import Agent, default_status_path
from vmha.agent.locks import AgentLocks
from vmha.config_cli import config_option


async def _serve(agent: Agent, locks: AgentLocks | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sdnotify.stop_handler(stop, f"agent of {agent.host}"))
    side = asyncio.create_task(locks.run(), name="locks") if locks is not None else None
    supervisor = asyncio.create_task(sdnotify.supervise(agent.readiness), name="sdnotify")
    try:
        await agent.run(stop)
    finally:
        supervisor.cancel()
        if side is not None and locks is not None:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
            await locks.stop()


@click.command("agent")
@config_option
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON status file [default: /run/vmha/agent-<host>.json]")  # fmt: skip
@click.option("--status", "show_status", is_flag=True, help="print the running agent's plane view and exit")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def agent(config_path: str, status_file: Path | None, show_status: bool, verbose: bool) -> None:
    """Run the per-host agent: per-plane etcd heartbeats and the host's own plane view."""
    cfg = config.load(config_path)
    host = cfg.require_host()
    path = status_file or default_status_path(host.name)
    if show_status:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise click.ClickException(f"no status file {path}: is the agent of {host.name} running?") from None
        except (OSError, ValueError) as e:
            raise click.ClickException(f"cannot read status file {path}: {e}") from None
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        # Exit 1 when a plane is unreachable, so scripts can test it.
        sys.exit(1 if data.get("unreachable") else 0)
    logsetup.configure(cfg.logging.format, verbose=verbose, defaults={"host": host.name})
    locks = AgentLocks(cfg) if cfg.locks is not None else None
    on_isolated = locks.on_isolated if locks is not None else None
    with metrics.served(cfg, metrics.AGENT):
        asyncio.run(_serve(Agent(cfg, status_path=path, on_isolated=on_isolated), locks))
