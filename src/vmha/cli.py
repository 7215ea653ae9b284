"""The `vmha` command. Each area owns its commands in its own module; this file only maps names
to them, imported on use so `vmha status` does not pay for the lab or Nova."""

from __future__ import annotations

import importlib
import sys

import click

from vmha.config import ConfigError

# name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "agent": "vmha.agent.cli:agent",
    "manager": "vmha.manager.cli:manager",
    "status": "vmha.manager.status:status",
    "events": "vmha.manager.cli:events",
    "recovery": "vmha.manager.cli:recovery",
    "host": "vmha.manager.cli:host",
    "pause": "vmha.manager.cli:pause",
    "policy": "vmha.manager.cli:policy",
    "locks": "vmha.locks.cli:locks",
    "fence": "vmha.locks.fence_cli:fence",
    "lab": "vmha.lab.cli:lab",
    "demo": "vmha.lab.cli:demo",
    "bench": "vmha.bench.cli:bench",
    "sim": "vmha.sim.cli:sim",
    "model": "vmha.model.cli:model",
    "config": "vmha.config_cli:config_group",
    "etcd": "vmha.etcd_cli:etcd_group",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from "module:attr" targets when used."""

    def __init__(self, *args: object, commands_map: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands_map = COMMANDS if commands_map is None else commands_map

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands_map)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.commands_map.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=LazyGroup)
@click.version_option(package_name="vmha")
def cli() -> None:
    """vmha: VM high availability with per-plane fault awareness and sanlock fence proofs."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
