"""`vmha status`: the cluster's verdict for people and monitors (vmha.manager.assess: exit 0 OK,
1 DEGRADED, 2 CRITICAL, 3 UNKNOWN), then the manager's persisted health view, hosts x planes, and
the fabric outages.

Reads etcd only (health/ and fabric/ keys written by the active manager's HealthMonitor, the leader,
operator states, tasks) and asks each etcd member its own status; works from any machine that
reaches etcd, while the manager runs or not (then `updated` grows old).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmha import config
from vmha.core.planes import PLANES, PlaneState
from vmha.core.queue import Task
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient, EtcdError, redact_url
from vmha.etcd.keys import Keys
from vmha.etcd.quorum import Answer, ask_members
from vmha.etcd.tasks import TaskStore
from vmha.etcd.tls import TlsFiles
from vmha.manager.assess import FAILED_WINDOW, Verdict, assess, cannot_read
from vmha.timefmt import when

COLOURS = {
    PlaneState.UP: "green",
    PlaneState.SUSPECT: "yellow",
    PlaneState.DOWN: "bold red",
    PlaneState.FABRIC: "magenta",
    PlaneState.UNKNOWN: "dim",
}


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
            cells.append(Text(f"{state.value.upper()}\n{when(st['since'], data['time'])}", style=COLOURS[state]))
        cells.append(when(h["updated"], data["time"]))
        table.add_row(*cells)
    console.print(table)
    if data["fabric"]:
        for f in data["fabric"]:
            where = "whole cluster" if f["domain"] is None else f"domain {f['domain']}"
            console.print(
                Text(
                    f"FABRIC OUTAGE: plane {f['plane']} in {where} since {when(f['since'], data['time'])}: "
                    f"hosts {', '.join(f['hosts'])} (no evacuation because of it)",
                    style="bold magenta",
                )
            )
    else:
        console.print(Text("no fabric outage", style="green"))


async def _load(urls: list[str], cluster: str, tls: TlsFiles | None) -> tuple[dict[str, Any], list[Task],
                                                                           dict[str, str]]:  # fmt: skip
    """What `vmha status` judges, through the API's own readers: the hosts (health view, operator
    states, leader, pause) and the recovery tasks with the unreadable ones (key -> why)."""
    from vmha.api import views  # here: views imports this module's view_data

    keys = Keys(cluster)
    async with EtcdClient(urls, timeout=3.0, name="status", tls=tls) as client:
        hosts = await views.hosts(client, keys)
        store = TaskStore(client, keys)
        tasks = await store.load()
        return hosts, tasks, store.refused


async def _judge(urls: list[str], cluster: str, tls: TlsFiles | None,
                 failed_window: float) -> tuple[Verdict, dict[str, Any] | None]:  # fmt: skip
    """The verdict and the hosts' data it judged (None when etcd could not be read)."""
    members: asyncio.Task[dict[str, Answer]] = asyncio.create_task(ask_members(urls, tls, 3.0, "status"))
    try:
        hosts, tasks, unreadable = await _load(urls, cluster, tls)
    except (EtcdError, ValueError) as e:
        return cannot_read(f"cannot read etcd ({', '.join(map(redact_url, urls))}): {e}", await members), None
    return assess(hosts, tasks, unreadable, await members, time.time(), failed_window), hosts


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
@click.option("--failed-window", type=click.FloatRange(min=0), default=FAILED_WINDOW, show_default=True,
              help="seconds a FAILED recovery counts as critical")
def status(config_path: str | None, endpoints: str | None, cluster: str | None, ca: Path | None, cert: Path | None,
           key: Path | None, as_json: bool, failed_window: float) -> None:  # fmt: skip
    """The cluster's state for people and monitors (Nagios plugin exit codes: 0 OK, 1 DEGRADED,
    2 CRITICAL, 3 UNKNOWN), each problem with its evidence, then hosts x planes with state and
    since when, and fabric outages, as the manager last recorded them."""
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
        try:
            cfg = config.load(config_path or config.DEFAULT_PATH)
        except config.ConfigError as e:  # nothing can be read: the monitor's UNKNOWN, not a CRITICAL
            _show(cannot_read(str(e).splitlines()[0], {}), None, as_json)
        tls = cfg.etcd.tls()
        urls = cfg.manager.endpoints if cfg.manager else cfg.planes.endpoints(PLANES[0])
        cluster = cluster or cfg.cluster.name
    verdict, hosts = asyncio.run(_judge(urls, cluster, tls, failed_window))
    _show(verdict, hosts, as_json)


def _show(verdict: Verdict, hosts: dict[str, Any] | None, as_json: bool) -> NoReturn:
    """Print the verdict (first line: its summary) and the hosts, and exit with its code."""
    if as_json:
        data = hosts if hosts is not None else {"time": round(time.time(), 3)}
        click.echo(json.dumps({**data, "status": verdict.to_dict()}, indent=2, sort_keys=True))
    else:
        click.echo(verdict.summary)
        for p in verdict.problems:
            if p.text not in verdict.summary:  # UNKNOWN's reason is its summary already
                click.echo(f"  {p.level.name:<8} {p.text}")
        if hosts is not None:
            render(hosts, Console())
    sys.exit(int(verdict.level))
