"""The manager's commands: `vmha manager`, `vmha events`, `vmha recovery show VM`,
`vmha host enable HOST`, `vmha policy show` (src/vmha/cli.py maps the names here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from vmha import config, logsetup, metrics, sdnotify
from vmha.config_cli import config_option
from vmha.core.fencing import proof_methods
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import AGENT_STOPPED_KEY, MAINTENANCE_KEY, Action
from vmha.core.queue import TERMINAL, Task
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import DriverError
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient, EtcdError, EtcdUnavailable, redact_url
from vmha.etcd.keys import Keys
from vmha.etcd.records import Event, EventLog, RecordStore
from vmha.etcd.tasks import TaskStore
from vmha.manager import operations
from vmha.timefmt import when

T = TypeVar("T")
if TYPE_CHECKING:
    from vmha.api.auth import Tokens
    from vmha.api.keystone import KeystoneTokens
    from vmha.manager.daemon import Parts

    PartsFactory = Callable[[config.Config, EtcdClient], Awaitable[Parts]]



def _endpoints(cfg: config.Config) -> list[str]:
    """The manager's etcd endpoints, or the management plane's on a node without [manager]."""
    return cfg.manager.endpoints if cfg.manager is not None else cfg.planes.endpoints(PLANES[0])


def _with_etcd(config_path: str, body: Callable[[config.Config, EtcdClient, Keys], Awaitable[T]]) -> T:
    """Run `body` with a client of the configured etcd; etcd failures become a clear CLI error."""
    cfg = config.load(config_path)

    async def run() -> T:
        async with EtcdClient(_endpoints(cfg), timeout=3.0, name="vmha", tls=cfg.etcd.tls()) as client:
            # An etcd member down: the client moved on to another endpoint, and the command starts
            # over there (its reads and writes are idempotent), once per other endpoint.
            for _ in range(len(client.urls) - 1):
                with contextlib.suppress(EtcdUnavailable):
                    return await body(cfg, client, Keys(cfg.cluster.name))
            return await body(cfg, client, Keys(cfg.cluster.name))

    try:
        return asyncio.run(run())
    except EtcdError as e:
        raise click.ClickException(f"etcd: {e} (endpoints {', '.join(map(redact_url, _endpoints(cfg)))})") from None


# -- vmha manager -----------------------------------------------------------------------------------


def serve(cfg: config.Config, parts: PartsFactory | None = None, verbose: bool = False) -> None:
    """Run a manager with these parts (default: production_parts) until SIGTERM or SIGINT. The lab's
    and the tests' entry points call it with parts of their own."""
    from vmha.manager.daemon import Manager, production_parts

    cfg.require_manager()
    logsetup.configure(cfg.logging.format, verbose=verbose)
    api = _api_setup(cfg) if cfg.api is not None else None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        mgr = Manager(cfg, parts=parts or production_parts)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sdnotify.stop_handler(stop, f"manager {mgr.m.name}"))
        supervisor = asyncio.create_task(sdnotify.supervise(mgr.readiness), name="sdnotify")
        runner = None
        try:
            if api is not None and cfg.api is not None:
                from vmha.api import server

                try:
                    runner = await server.start(cfg, cfg.api, api[1], api[0], mgr.vms, api[2])
                except OSError as e:  # the port is taken: refused at start, like a bad config
                    raise config.ConfigError(f"[api] listen {cfg.api.listen}: {e.strerror or e}") from None
            await mgr.run(stop)
        finally:
            supervisor.cancel()
            if runner is not None:
                await runner.cleanup()

    with metrics.served(cfg, metrics.MANAGER):
        asyncio.run(run())


def _api_setup(cfg: config.Config) -> tuple[Tokens, ssl.SSLContext, KeystoneTokens | None]:
    """[api]'s tokens, TLS context and Keystone validation, checked before the manager starts: a bad
    one is a config error."""
    from vmha.api.auth import TokenError, load_tokens
    from vmha.api.keystone import KeystoneTokens
    from vmha.api.server import tls_context

    assert cfg.api is not None
    try:
        tokens = load_tokens(cfg.api.tokens_file)
    except TokenError as e:
        raise config.ConfigError(f"[api] tokens_file: {e}") from None
    try:
        tls = tls_context(cfg.api)
    except (OSError, ssl.SSLError) as e:
        raise config.ConfigError(f"[api] cert {cfg.api.cert} / key {cfg.api.key}: {e}") from None
    ks = cfg.api.keystone
    if ks is None:
        return tokens, tls, None
    try:
        return tokens, tls, KeystoneTokens.connect(ks, ks.cloud or cfg.nova.cloud)
    except DriverError as e:
        raise config.ConfigError(f"[api.keystone] cloud: {e}") from None


@click.command("manager")
@config_option
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def manager(config_path: str, verbose: bool) -> None:
    """Run the HA manager: campaign for leadership; as leader detect, decide and recover."""
    serve(config.load(config_path), verbose=verbose)


# -- vmha events ------------------------------------------------------------------------------------


def _show_event(ev: Event, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev.to_dict(), sort_keys=True))
        return
    at = when(ev.t, time.time(), ms=True)
    colour = {"warn": "yellow", "err": "red"}.get(ev.level)
    tag = "ALERT " if ev.kind == "alert" else ""
    click.secho(f"{ev.seq:>7} {at} {ev.level:<4} {ev.actor}: {tag}{ev.text}", fg=colour)


@click.command("events")
@config_option
@click.option("-n", "--last", "count", default=50, show_default=True, help="show this many past events")
@click.option("-f", "--follow", is_flag=True, help="keep streaming new events (Ctrl-C to stop)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def events(config_path: str, count: int, follow: bool, as_json: bool) -> None:
    """Stream the manager's decisions and alerts (newest last)."""

    async def body(cfg: config.Config, client: EtcdClient, keys: Keys) -> None:
        log = EventLog(client, keys)
        shown, revision = await log.tail(count)
        for ev in shown:
            _show_event(ev, as_json)
        if follow:
            async for ev in log.follow(revision):
                _show_event(ev, as_json)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow: not an error
        _with_etcd(config_path, body)


# -- vmha recovery show VM --------------------------------------------------------------------------


@click.group("recovery")
def recovery() -> None:
    """Recoveries and their evidence records."""


_ROW_MEANS = {
    None: "no plane of the host has failed: nothing to recover",
    Action.ALERT: "alert only: its VMs are left running",
    Action.DISABLE: "the host is disabled for new VMs; its VMs keep running and are never restarted for this row",
    Action.LIVE_MIGRATE: "the host is disabled for new VMs and its HA VMs are live-migrated away, without a "
    "restart (no fence proof needed)",
    Action.ISOLATE_EVACUATE: "its HA VMs are fenced through the storage plane, then restarted elsewhere",
    Action.FENCE_EVACUATE: "its HA VMs are restarted elsewhere once a fence proof exists",
}


def _proof_text(key: str, settings: RecoverySettings) -> str:
    """The fence proof methods the manager tries, in order, for a host in this row (its planes DOWN,
    the others UP): what 'fence' means for the row."""
    lost = set(key.split("+"))
    states = {p: PlaneState.DOWN if p.value in lost else PlaneState.UP for p in PLANES}
    methods = proof_methods(states, power_fence=settings.power_fence, allow_exit_attested=settings.allow_exit_attested)
    return ", then ".join(m.value for m in methods)


async def _why_not(cfg: config.Config, client: EtcdClient, keys: Keys, vm: str) -> str:
    """Why a VM without a recovery record was not restarted: where it runs, and its host's policy row."""
    from vmha.manager.daemon import compute_driver

    try:
        info = next((v for v in await compute_driver(cfg, client).vms() if v.name == vm), None)
    except DriverError as e:
        return f"vm '{vm}': no recovery recorded (the compute driver cannot tell where it runs: {e})"
    if info is None:
        return f"vm '{vm}': no recovery recorded, and the compute driver does not know this VM"
    if not info.ha:
        return f"vm '{vm}' on host '{info.host}': not HA-protected: vmha never restarts it"
    if info.host is None:
        return f"vm '{vm}': placed on no host; no recovery recorded"
    stored = (await health_store.load(client, keys)).hosts.get(info.host)
    if stored is None:
        return f"vm '{vm}' on host '{info.host}': the host is not in the manager's health view; no recovery"
    hh = stored.health
    planes = ", ".join(f"{p.value} {hh.planes[p].state.value}" for p in PLANES if p in hh.planes)
    decision = cfg.policy_table.decide(hh.states())
    row = f"row {decision.key}: {decision.action.value}" if decision.action else "no failed plane"
    return f"vm '{vm}' on host '{info.host}' ({planes}): {row}; {_ROW_MEANS[decision.action]}. No recovery recorded."


@recovery.command("show")
@config_option
@click.argument("vm")
@click.option("--all", "show_all", is_flag=True, help="every recorded recovery of the VM, not only the last")
@click.option("--json", "as_json", is_flag=True, help="the records as JSON")
def recovery_show(config_path: str, vm: str, show_all: bool, as_json: bool) -> None:
    """Why was, or wasn't, this VM restarted: its evidence record."""

    async def body(cfg: config.Config, client: EtcdClient, keys: Keys) -> tuple[list[Task], str]:
        ordered = await RecordStore(client, keys).history(vm)
        why_not = "" if ordered or as_json else await _why_not(cfg, client, keys, vm)
        return (ordered if show_all else ordered[-1:]), why_not

    ordered, why_not = _with_etcd(config_path, body)
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in ordered], indent=2, sort_keys=True))
        return
    if not ordered:
        click.echo(why_not)
        sys.exit(1)
    now = time.time()
    for t in ordered:
        state = "in progress" if t.state not in TERMINAL else "finished"
        click.echo(f"{t.describe(lambda at: when(at, now))}\n  ({state})")


@recovery.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="the tasks as JSON (the shape of the API's /v1/tasks)")
def recovery_list(config_path: str, as_json: bool) -> None:
    """The recovery queue: each VM's latest recovery task, its phase, proof and since when; an
    unreadable task is listed by its key with what is wrong with it."""
    from rich.console import Console
    from rich.table import Table

    async def body(cfg: config.Config, client: EtcdClient, keys: Keys) -> tuple[list[Task], dict[str, str]]:
        store = TaskStore(client, keys)
        return await store.load(), store.refused

    tasks, refused = _with_etcd(config_path, body)
    if as_json:
        click.echo(json.dumps({"tasks": [t.to_dict() for t in tasks], "unreadable": sorted(refused),
                               "unreadable_why": refused}, indent=2, sort_keys=True))  # fmt: skip
        return
    now = time.time()
    table = Table(title=f"vmha recoveries ({len(tasks)} task(s), {len(refused)} unreadable)")
    for column in ("vm", "from", "state", "action", "proof", "destination", "since", "last error"):
        table.add_column(column)
    for t in tasks:
        state = t.state.value + (f" -> {t.resume.value}" if t.resume is not None else "")
        retry = f"retry {when(t.retry_at, now)}" if t.retry_at is not None and t.state not in TERMINAL else ""
        place = f"runs on {t.running_on}" if t.running_on else (f"to {t.dest}" if t.dest else "-")
        table.add_row(t.vm, t.source, state, f"{t.kind.value} ({t.action})",
                      t.proof.method.value if t.proof is not None else "-", place, when(t.since or t.created, now),
                      "; ".join(x for x in (t.reason, retry) if x) or "-")  # fmt: skip
    for key, why in sorted(refused.items()):
        table.add_row(key, "?", "UNREADABLE", "-", "-", "-", "-", f"{why} (fix or delete the key)", style="red")
    Console().print(table)


# -- vmha host enable HOST --------------------------------------------------------------------------


@click.group("host")
def host() -> None:
    """Hosts: re-enable one vmha took out, or put one in maintenance."""


def _operation(config_path: str, op: Callable[[config.Config, EtcdClient, Keys], Awaitable[str]]) -> str:
    """Run an operator action (vmha.manager.operations, shared with the REST API); a refusal is a
    clear CLI error. Returns the leader's name."""

    async def body(cfg: config.Config, client: EtcdClient, keys: Keys) -> str:
        try:
            return await op(cfg, client, keys)
        except operations.OperationError as e:
            raise click.ClickException(str(e)) from None

    return _with_etcd(config_path, body)


@host.command("enable")
@config_option
@click.argument("name")
def host_enable(config_path: str, name: str) -> None:
    """Re-enable a repaired host, after checking it is clean: every plane UP in the manager's
    health view and no recovery from it still running."""
    leader = _operation(config_path, lambda cfg, c, k: operations.host_enable(cfg, c, k, name, by="cli"))
    click.echo(f"host '{name}' enabled (manager leader: {leader})")


@host.command("maintenance")
@config_option
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off"]))
def host_maintenance(config_path: str, name: str, state: str) -> None:
    """Maintenance on: the manager live-migrates the host's HA VMs away (priority order, within the
    concurrency limits), sends it none, and only alerts on its faults. Off: it returns to placement."""
    leader = _operation(config_path, lambda cfg, c, k: operations.host_maintenance(c, k, name, state == "on",
                                                                                   by="cli"))
    click.echo(f"host '{name}': maintenance {state} (manager leader: {leader})")


# -- vmha pause on|off ------------------------------------------------------------------------------


@click.command("pause")
@config_option
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--why", default="", help="the reason, shown in the alerts (e.g. 'upgrade to 1.4')")
def pause(config_path: str, state: str, why: str) -> None:
    """Pause (on) or resume (off) recoveries cluster-wide, e.g. for an upgrade: while paused the
    leader starts no new recovery and alerts instead; recoveries already started run to their end."""
    leader = _operation(config_path, lambda cfg, c, k: operations.pause(c, k, state == "on", by="cli", why=why))
    click.echo(f"recoveries {'paused' if state == 'on' else 'resumed'} (manager leader: {leader})")


# -- vmha policy show -------------------------------------------------------------------------------


@click.group("policy")
def policy() -> None:
    """The policy table: which action each combination of failed planes gets."""


@policy.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True)
def policy_show(config_path: str, as_json: bool) -> None:
    """Print the policy table in force (defaults merged with the config's [policy])."""
    from rich.console import Console
    from rich.table import Table

    cfg = config.load(config_path)
    rows = cfg.policy_table.render()
    if as_json:
        click.echo(json.dumps(dict(rows), indent=2))
        return
    settings = cfg.manager.recovery_settings() if cfg.manager is not None else RecoverySettings()
    table = Table(title=f"vmha policy ({cfg.cluster.name})")
    for column in ("failed planes", "action", "what happens", "fence proof, methods in order"):
        table.add_column(column)
    for key, action in rows:
        evacuates = Action(action) in (Action.ISOLATE_EVACUATE, Action.FENCE_EVACUATE)
        table.add_row(key, action, _ROW_MEANS[Action(action)], _proof_text(key, settings) if evacuates else "-")
    # Built in, not configurable: a planned agent stop or restart is no failure.
    table.add_row(AGENT_STOPPED_KEY, Action.ALERT.value, "the host's agent was stopped cleanly: alert only, "
                  "nothing is fenced or evacuated until it runs again (any planes)", "-")
    table.add_row(MAINTENANCE_KEY, Action.ALERT.value, "the host is in maintenance (`vmha host maintenance`): "
                  "alert only, its HA VMs are drained by live migration (any planes)", "-")
    Console().print(table)


__all__ = ["events", "host", "manager", "pause", "policy", "recovery"]
