"""`vmha locks init` and `vmha locks status`."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from vmha.config import load
from vmha.config_cli import config_option
from vmha.locks.space import LockError, LockSpace


def _space(config_path: str) -> LockSpace:
    return LockSpace.from_config(load(config_path).require_locks())


@click.group(name="locks")
def locks() -> None:
    """sanlock lockspace and per-VM leases (needs the local sanlock daemon)."""


@locks.command()
@config_option
@click.option("--vm", "vms", multiple=True, help="also create this VM's lease (repeatable)")
@click.option("--force", is_flag=True, help="rewrite an existing lockspace (only while every host has left it)")
def init(config_path: str, vms: tuple[str, ...], force: bool) -> None:
    """Initialise the lockspace (locks.path, locks.io_timeout) and the leases of the given VMs."""
    space = _space(config_path)
    try:
        space.init(force=force)
        click.echo(f"lockspace {space.name}: {space.ids_path} (io_timeout {space.io_timeout})")
        for vm in vms:
            click.echo(f"lease of VM {vm}: {space.create_lease(vm)}")
    except LockError as e:
        raise click.ClickException(str(e)) from None


@locks.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path: str, as_json: bool) -> None:
    """Hosts of the lockspace with their sanlock states, and every VM lease with its owner."""
    space = _space(config_path)
    try:
        space.check()
        stored = {d.host_id: d for d in space.delta_leases()}
        here = space.local_state()
        states = {h.host_id: h for h in space.hosts()} if here == "joined" else {}
        leases = {vm: space.owners(vm) for vm in space.leases()}
    except LockError as e:
        raise click.ClickException(str(e)) from None
    hosts = [
        {"host_id": n, "name": d.name, "generation": d.generation, "timestamp": d.timestamp,
         "state": states[n].state.value if n in states else ("free" if d.timestamp == 0 else "unknown")}
        for n, d in sorted(stored.items())
    ]
    owners = {
        vm: [{"host_id": o.host_id, "name": stored[o.host_id].name if o.host_id in stored else "?",
              "generation": o.generation, "state": o.state.value} for o in os]
        for vm, os in leases.items()
    }
    if as_json:
        click.echo(json.dumps({"lockspace": space.name, "path": str(space.ids_path), "io_timeout": space.io_timeout,
                               "this_host": here, "hosts": hosts, "leases": owners}, indent=2))
        return
    con = Console()
    note = "" if here == "joined" else " (this host has not joined: states unknown; run it on a member)"
    con.print(f"lockspace {space.name} at {space.ids_path}, io_timeout {space.io_timeout}{note}")
    # sanlock stamps a renewal with the renewing host's monotonic clock: its uptime, comparable only
    # with that host's own earlier stamps, not a time of day.
    t = Table("host_id", "host", "state", "generation", "last renewal (its uptime, s)")
    for h in hosts:
        t.add_row(str(h["host_id"]), str(h["name"]), str(h["state"]), str(h["generation"]), str(h["timestamp"]))
    con.print(t)
    t = Table("VM", "owner", "owner state")
    for vm, os in owners.items():
        t.add_row(vm, " ".join(f"{o['name']}(id {o['host_id']})" for o in os) or "-",
                  " ".join(str(o["state"]) for o in os) or "free")
    con.print(t)
