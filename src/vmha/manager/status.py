"""`vmha status`: the manager's persisted health view, hosts x planes, and the fabric outages.

Reads etcd only (health/ and fabric/ keys written by the active manager's HealthMonitor); works
from any machine that reaches etcd, while the manager runs or not (then `updated` grows old).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmha import config
from vmha.core.planes import PLANES, PlaneState
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient, EtcdError, redact_url
from vmha.etcd.keys import Keys
from vmha.etcd.tls import TlsFiles

COLOURS = {
    PlaneState.UP: "green",
    PlaneState.SUSPECT: "yellow",
    PlaneState.DOWN: "bold red",
    PlaneState.FABRIC: "magenta",
    PlaneState.UNKNOWN: "dim",
}


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def view_data(view: health_store.HealthView, now: float) -> dict[str, Any]:
    """The JSON form of the view (also what the grid shows)."""
    hosts = []
    for name in sorted(view.hosts):
        stored = view.hosts[name]
        h = stored.health
        hosts.append(
            {
                "host": h.host,
                "domain": h.domain,
                "updated": stored.updated,
                "manager": stored.manager,
                "failed": sorted(p.value for p in h.failed()),
                "planes": {
                    p.value: {**h.planes[p].to_dict(), "age": round(now - h.planes[p].since, 1)}
                    for p in PLANES
                    if p in h.planes
                },
            }
        )
    fabric = [{**f.to_dict(), "age": round(now - f.since, 1)} for f in view.fabric]
    return {"time": round(now, 3), "hosts": hosts, "fabric": fabric}


def render(data: dict[str, Any], console: Console) -> None:
    table = Table(title=f"vmha health ({len(data['hosts'])} hosts)", header_style="bold")
    table.add_column("host")
    table.add_column("domain")
    for p in PLANES:
        table.add_column(p.value)
    table.add_column("recorded", justify="right")
    for h in data["hosts"]:
        cells: list[Text | str] = [h["host"], h["domain"]]
        for p in PLANES:
            st = h["planes"].get(p.value)
            if st is None:
                cells.append(Text("-", style="dim"))
                continue
            state = PlaneState(st["state"])
            cells.append(Text(f"{state.value.upper()} {age(st['age'])}", style=COLOURS[state]))
        cells.append(age(data["time"] - h["updated"]))
        table.add_row(*cells)
    console.print(table)
    if data["fabric"]:
        for f in data["fabric"]:
            where = "whole cluster" if f["domain"] is None else f"domain {f['domain']}"
            console.print(
                Text(
                    f"FABRIC OUTAGE: plane {f['plane']} in {where} for {age(f['age'])}: "
                    f"hosts {', '.join(f['hosts'])} (no evacuation because of it)",
                    style="bold magenta",
                )
            )
    else:
        console.print(Text("no fabric outage", style="green"))


async def _load(endpoints: list[str], cluster: str, tls: TlsFiles | None) -> health_store.HealthView:
    async with EtcdClient(endpoints, timeout=3.0, name="status", tls=tls) as client:
        return await health_store.load(client, Keys(cluster))


@click.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar=config.CONFIG_ENV, show_envvar=True,
              help=f"vmha config file [default: {config.DEFAULT_PATH}, unless --endpoints and --cluster]")
@click.option("--endpoints", help="etcd URLs, comma-separated (instead of --config)")
@click.option("--cluster", help="cluster name (with --endpoints)")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path), help="etcd's CA (PEM; https:// --endpoints)")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path),
              help="client certificate (PEM; its CN is the etcd user, e.g. operator)")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="the client certificate's key (PEM)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the grid")
def status(config_path: str | None, endpoints: str | None, cluster: str | None, ca: Path | None, cert: Path | None,
           key: Path | None, as_json: bool) -> None:  # fmt: skip
    """Hosts x planes with state and age, and fabric outages, as the manager last recorded them."""
    tls = None
    if endpoints and cluster and not config_path:
        urls = [u.strip() for u in endpoints.split(",") if u.strip()]
        secure = all(u.startswith("https://") for u in urls)
        given = {"--ca": ca, "--cert": cert, "--key": key}
        missing = [opt for opt, v in given.items() if v is None]
        if secure and missing:
            raise click.UsageError(f"https:// --endpoints need {', '.join(missing)} (etcd requires a client "
                                   "certificate)")
        if not secure and len(missing) < len(given):
            raise click.UsageError("--ca/--cert/--key are for https:// --endpoints only")
        if ca is not None and cert is not None and key is not None:
            tls = TlsFiles(ca, cert, key)
    else:
        cfg = config.load(config_path or config.DEFAULT_PATH)
        tls = cfg.etcd.tls()
        urls = cfg.manager.endpoints if cfg.manager else cfg.planes.endpoints(PLANES[0])
        cluster = cluster or cfg.cluster.name
    try:
        view = asyncio.run(_load(urls, cluster, tls))
    except (EtcdError, ValueError) as e:
        raise click.ClickException(
            f"cannot read the health view from etcd ({', '.join(map(redact_url, urls))}): {e}") from None
    data = view_data(view, time.time())
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data, Console())
