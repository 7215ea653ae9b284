"""The lab's manager entry point: `python -m vmha.lab.manager --config FILE --lab-dir DIR`.

A production manager (`vmha manager`) runs the parts its config names and nothing else. The lab's
managers are started here instead (vmha.lab.controller), with the lab's parts injected: the lab's
power fence (it kills every process of a host's namespace) when power_fence is on without a
[power] table, and the lab compute driver bound to this lab's directory.
"""

from __future__ import annotations

from pathlib import Path

import click

from vmha import config
from vmha.drivers.lab import LabDriver
from vmha.etcd.client import EtcdClient
from vmha.etcd.keys import Keys
from vmha.lab.power import LabPowerFence
from vmha.manager.cli import serve
from vmha.manager.daemon import Parts, production_parts


async def lab_parts(cfg: config.Config, client: EtcdClient, lab_dir: Path) -> Parts:
    m = cfg.require_manager()
    power = LabPowerFence(lab_dir, who=m.name) if m.power_fence and not cfg.power else None
    parts = await production_parts(cfg, client, power=power)
    if m.driver == "lab":
        parts.driver = LabDriver(client, Keys(cfg.cluster.name), lab_dir)
    return parts


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="vmha config file")
@click.option("--lab-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="the lab's --dir")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(config_path: str, lab_dir: Path, verbose: bool) -> None:
    """Run a manager of the lab in `lab_dir`."""

    async def parts(cfg: config.Config, client: EtcdClient) -> Parts:
        return await lab_parts(cfg, client, lab_dir)

    try:
        serve(config.load(config_path), parts, verbose)
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
