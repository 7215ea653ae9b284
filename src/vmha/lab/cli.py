"""`vmha lab ...` and `vmha demo`: the lab on one machine (root, Debian 12; scripts/setup.sh)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from vmha.lab import cluster, faults, scenario
from vmha.lab.net import LabError
from vmha.lab.report import verify_lab
from vmha.lab.state import DEFAULT_DIR, LabState

_dir_option = click.option(
    "--dir", "lab_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DIR,
    show_default=True, help="the lab's directory (state, logs, shared storage, etcd data)",
)


def _load(lab_dir: Path) -> LabState:
    try:
        return LabState.load(lab_dir)
    except LabError as e:
        raise click.ClickException(str(e)) from None


def _echo(text: str) -> None:
    click.echo(f"lab: {text}", err=True)


@click.group("lab")
def lab_group() -> None:
    """A cluster on this machine: network namespaces as hosts, real etcd, sanlock, agents, managers."""


@lab_group.command("up")
@click.option("--hosts", default=4, show_default=True, type=int)
@click.option("--vms", default=8, show_default=True, type=int)
@click.option("--io-timeout", default=1, show_default=True, type=int,
              help="sanlock io_timeout (host_dead = 8 x io + 60 s)")
@click.option("--nova", is_flag=True,
              help="a real Nova runs the VMs (needs scripts/setup-nova.sh); the managers use the nova driver")
@click.option("--guests", type=click.Choice(["process", "qemu"]), default="process", show_default=True,
              help="qemu: real QEMU guests under a libvirtd per host (scripts/build-guest.sh); the managers "
                   "use the libvirt driver (with --nova: Nova's, the guests in Nova's instance layout under "
                   "libvirt's disk leases). process: the quick vmha-vm stand-ins")
@click.option("--prefix", default="vl", show_default=True,
              help="network namespace prefix (another prefix: a second lab next to this one)")
@_dir_option
def up(hosts: int, vms: int, io_timeout: int, nova: bool, guests: str, prefix: str, lab_dir: Path) -> None:
    """Build the lab (or complete it) and return when every host is up and every VM writes."""
    try:
        state = cluster.up(lab_dir, hosts, vms, io_timeout, prefix=prefix, echo=_echo, nova=nova, guests=guests)
    except LabError as e:
        raise click.ClickException(f"{e}\n(`vmha lab down` removes what was built)") from None
    _print_status(cluster.status(state))
    click.echo(f"lab dir {state.dir}; `vmha lab status`, `vmha lab fault ...`, `vmha lab down`")


@lab_group.command("down")
@_dir_option
def down(lab_dir: Path) -> None:
    """Remove every namespace, bridge, mount and process of the lab (also after a crash)."""
    try:
        removed = cluster.down(lab_dir, echo=_echo)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"lab down: removed {len(removed)} namespaces" if removed else "lab down: nothing was running")


def _print_status(st: dict[str, object]) -> None:
    hosts = st["hosts"]
    vms = st["vms"]
    assert isinstance(hosts, list) and isinstance(vms, list)
    click.echo(f"{'host':<6} {'power':<6} {'management':<11} {'storage':<11} {'service':<11} VMs")
    for h in hosts:
        names = [v["name"] for v in vms if v["host"] == h["name"]]
        p = h["planes"]
        click.echo(f"{h['name']:<6} {h['power']:<6} {p['management']:<11} {p['storage']:<11} "
                   f"{p['service']:<11} {' '.join(names)}")
    stopped = [v["name"] for v in vms if v["host"] is None]
    if stopped:
        click.echo(f"not running: {' '.join(stopped)}")


@lab_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@_dir_option
def status(as_json: bool, lab_dir: Path) -> None:
    """Hosts' planes as the manager sees them, where each VM runs, the recovery tasks."""
    try:
        st = cluster.status(_load(lab_dir))
    except LabError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    else:
        _print_status(st)


@lab_group.command("verify")
@click.option("--json", "as_json", is_flag=True)
@_dir_option
def verify(as_json: bool, lab_dir: Path) -> None:
    """Split-brain, downtime and policy outcomes from the disks, fault log and evidence records.
    Exit 1 on any split-brain, 2 when a fault did not get its policy's action."""
    try:
        report = verify_lab(_load(lab_dir))
    except LabError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_verify(report)
    if report["split_brain"]:
        sys.exit(1)
    if not report["ok"]:
        sys.exit(2)


def _print_verify(report: dict[str, object]) -> None:
    sb = report["split_brain"]
    downtime = report["downtime"]
    assert isinstance(sb, list) and isinstance(downtime, dict)
    click.echo(f"split-brain: {'NONE' if not sb else ', '.join(sb)}")
    click.echo("downtime (s): " + " ".join(f"{vm}={d}" for vm, d in downtime.items()))
    fl = report["faults"]
    assert isinstance(fl, list)
    for f in fl:
        verdict = "ok" if f["ok"] else "WRONG: " + "; ".join(f["problems"])
        click.echo(f"fault {f['fault']:<20} on {f['target']:<7} row {f['row'] or '-':<20} "
                   f"expected {f['expected'] or 'nothing':<17} {verdict}")


@lab_group.command("fault")
@click.argument("target")
@click.argument("what")
@click.argument("updown", required=False)
@click.argument("plane_updown", required=False)
@_dir_option
def fault(target: str, what: str, updown: str | None, plane_updown: str | None, lab_dir: Path) -> None:
    """Inject or repair a fault:

    \b
      vmha lab fault HOST management|storage|service down|up
      vmha lab fault HOST power-off|power-on
      vmha lab fault fabric management|storage|service down|up
      vmha lab fault etcd e1|e2|e3|leader|quorum down|up
      vmha lab fault etcd e1|e2|e3 management|storage|service down|up
    """
    state = _load(lab_dir)
    try:
        if target == "etcd":
            if updown is None:
                raise LabError("usage: vmha lab fault etcd MEMBER|leader|quorum down|up, or etcd MEMBER PLANE down|up")
            rec = (faults.etcd(state, what, updown) if plane_updown is None
                   else faults.etcd_plane(state, what, updown, plane_updown))
        elif plane_updown is not None:
            raise LabError("too many arguments (four only for `etcd MEMBER PLANE down|up`)")
        elif what in ("power-off", "power-on"):
            if target == "fabric" or updown is not None:
                raise LabError(f"usage: vmha lab fault HOST {what}")
            rec = faults.power(state, target, what == "power-on")
        elif updown is None:
            raise LabError("usage: vmha lab fault HOST|fabric PLANE down|up")
        elif target == "fabric":
            rec = faults.fabric(state, what, updown)
        else:
            rec = faults.host_plane(state, target, what, updown)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(rec))


@lab_group.command("kill")
@click.argument("what", type=click.Choice(["manager"]))
@_dir_option
def kill(what: str, lab_dir: Path) -> None:
    """Kill the active (leading) manager with SIGKILL; the standby takes over."""
    try:
        rec = faults.kill_manager(_load(lab_dir))
    except LabError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(rec))
    click.echo("the standby takes over; `vmha lab up` (same sizes) starts the killed manager again", err=True)


DEMO_FAULTS = ("management", "service", "storage", "isolation", "power-off", "fabric")


@click.command("demo")
@click.option("--keep", is_flag=True, help="leave the lab up afterwards (`vmha lab down` removes it)")
@click.option("--guests", type=click.Choice(["process", "qemu"]), default="qemu", show_default=True,
              help="qemu: real QEMU guests under libvirt; process: the vmha-vm stand-ins (quicker)")
@_dir_option
def demo(keep: bool, guests: str, lab_dir: Path) -> None:
    """Lab up (4 hosts, 8 VMs), one fault of each class with its timeline, verify, lab down."""
    t0 = time.monotonic()
    ok = False
    try:
        state = cluster.up(lab_dir, 4, 8, 1, echo=_echo, guests=guests)
        _print_status(cluster.status(state))
        timelines = []
        for kind in DEMO_FAULTS:
            host = scenario.busiest_host(state)
            tl = scenario.run_fault(state, kind, host, _echo)
            timelines.append(tl)
            click.echo(tl.line())
        click.echo("\ntimeline (seconds after each fault):")
        for tl in timelines:
            click.echo("  " + tl.line())
        report = verify_lab(state)
        click.echo("")
        _print_verify(report)
        ok = not report["split_brain"] and report["ok"] and all(tl.ok for tl in timelines)
        click.echo(f"\nverdict: {'PASS' if ok else 'FAIL'}: no split-brain: {not report['split_brain']}, "
                   f"every fault got its policy's action: {report['ok'] and all(tl.ok for tl in timelines)} "
                   f"({time.monotonic() - t0:.0f} s)")
    except LabError as e:
        click.echo(f"demo stopped: {e}", err=True)
    finally:
        if not keep:
            cluster.down(lab_dir, echo=_echo)
    sys.exit(0 if ok else 1)


lab = lab_group  # the name cli.py's COMMANDS map points at ("vmha.lab.cli:lab")
