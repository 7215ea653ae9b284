"""`vmha bench rto --trials K`: each fault class K times against the lab; p50 / p95 per phase
(detect, decide, prove, recover: seconds after the fault) and VM downtime per class.

Targets at io_timeout 1 (issue 5): isolation <= 10 s to every HA VM running elsewhere; storage
<= host-dead + 5 s, <= 18 s with exit attestation; power-off with the lab's power fence <= 10 s;
service: live migration, no restart; management and fabric: nothing moves. Prints numbers only.

--no-power-fence builds the lab without the managers' power fence: a power-off is then proven by
sanlock's host_dead (target: host-dead + 5 s, about 75 s at io_timeout 1).

The bench builds its own lab (prefix vb, directory BENCH_DIR) and removes it afterwards: it never
touches the lab of `vmha lab up` or `vmha demo` (prefix vl, the default lab directory).

--guests qemu runs the classes on real QEMU guests (libvirt driver; targets of issue 10, io_timeout 1:
isolation <= 12 s and power-off with the lab's power fence <= 12 s to the guest writing again
elsewhere, storage <= 20 s, service: live migration with at most 1 s without writes, management and
fabric: nothing moves), and reports each guest's boot (QEMU's start to its first disk record) and
QEMU's RSS. `--guests qemu,process` runs both, one lab after the other, and prints the ratio of their
recovery times. Downtime counts every gap longer than two write intervals (0.2 s).

--nova runs the lab with a real Nova (vmha.lab.novalab) and adds the phase "active": every server of
the host ACTIVE on another host in Nova's view, next to Masakari's defaults (it waits 180 s after
disabling the compute service, then evacuates with 3 threads, waiting up to 90 s per server).

--etcd healthy,member-down,leader-change runs the same classes and trials under each etcd condition in
one run (issue 14): member-down crashes an etcd follower before the fault and restarts it after the
repair; leader-change crashes the etcd leader LEADER_CRASH_BEFORE s before the fault (the fault lands
in the etcd election) and restarts it after. A table per condition, and detection p50 / p99 per
condition over every class.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from vmha.lab import cluster, etcdlab, faults, scenario
from vmha.lab.net import LabError
from vmha.lab.procs import vm_processes
from vmha.lab.rounds import run_rounds
from vmha.lab.scenario import Timeline
from vmha.lab.state import ETCD_MEMBERS, LabState
from vmha.lab.vm import disk_lines

BENCH_DIR = Path("/var/tmp/vmha-lab/bench")
BENCH_PREFIX = "vb"
PHASES = ("detected", "decided", "proved", "recovered", "active")
MASAKARI_WAIT = 180  # s: Masakari's wait after disabling the service, before evacuating
MASAKARI_PER_VM = 90  # s: the most Masakari waits for one evacuated server
ETCD_CONDITIONS = ("healthy", "member-down", "leader-change")
LEADER_CRASH_BEFORE = 0.5  # s: etcd leader crash to fault, so the fault lands in the 1-2 s etcd election


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def table(results: dict[str, list[Timeline]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for kind, tls in results.items():
        row: dict[str, object] = {"class": kind, "trials": len(tls), "ok": sum(tl.ok for tl in tls)}
        for phase in PHASES:
            vals = [v for tl in tls if (v := tl.rel(getattr(tl, phase))) is not None]
            row[phase] = (None if not vals else
                          {"p50": percentile(vals, 50), "p95": percentile(vals, 95), "n": len(vals)})
        downs = [d for tl in tls for d in tl.downtime.values()]
        row["downtime"] = None if not downs else {"p50": percentile(downs, 50), "p95": percentile(downs, 95),
                                                  "max": max(downs)}
        row["proofs"] = sorted({m for tl in tls for m in tl.proofs.values()})
        rows.append(row)
    return rows


def _cell(v: object, digits: int = 1) -> str:
    if not isinstance(v, dict):
        return "-"
    return f"{v['p50']:.{digits}f} / {v['p95']:.{digits}f}"


@click.command("rto")
@click.option("--trials", default=3, show_default=True, type=int, help="faults per class")
@click.option("--classes", default=",".join(scenario.CLASSES), show_default=True,
              help="comma-separated fault classes")
@click.option("--hosts", default=4, show_default=True, type=int)
@click.option("--vms", default=8, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="the table as JSON (and every timeline)")
@click.option("--dir", "lab_dir", type=click.Path(file_okay=False, path_type=Path), default=BENCH_DIR,
              show_default=True, help="the bench lab's directory (removed with the lab afterwards)")
@click.option("--prefix", default=BENCH_PREFIX, show_default=True, help="the bench lab's network namespace prefix")
@click.option("--nova", is_flag=True, help="the lab with a real Nova (needs scripts/setup-nova.sh)")
@click.option("--guests", default="process", show_default=True,
              help="process, qemu, or both (qemu,process: one lab each, and their ratio)")
@click.option("--no-power-fence", "no_power_fence", is_flag=True,
              help="the managers without the lab's power fence: power-off proven by sanlock's host_dead")
@click.option("--rounds", default=0, show_default=True, type=int,
              help="instead of trials: this many random fault rounds, every class mixed, no operator action "
                   "(vmha.lab.rounds), on a lab whose managers rebalance; the table is of their faults")
@click.option("--seed", type=int, default=None, help="the rounds' seed (default: drawn and printed)")
@click.option("--etcd", "etcd_conditions", default="", metavar="CONDITIONS",
              help=f"run every class under each etcd condition, comma-separated: {', '.join(ETCD_CONDITIONS)}")
def rto(trials: int, classes: str, hosts: int, vms: int, as_json: bool, lab_dir: Path, prefix: str,
        nova: bool, no_power_fence: bool, guests: str, rounds: int, seed: int | None, etcd_conditions: str) -> None:
    """Fault to recovery, per phase and fault class, on a fresh lab (io_timeout 1)."""
    conditions = _etcd_conditions(etcd_conditions, rounds)
    if rounds and rounds < len(scenario.CLASSES):
        raise click.BadParameter(f"--rounds {rounds}: at least {len(scenario.CLASSES)}, one per fault class")
    if seed is None:
        seed = random.randrange(1 << 32)
    kinds = [k.strip() for k in classes.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in scenario.CLASSES]
    if unknown:
        raise click.BadParameter(f"unknown class(es) {unknown}; known: {', '.join(scenario.CLASSES)}")
    kinds_of_guests = [g.strip() for g in guests.split(",") if g.strip()]
    if not kinds_of_guests or any(g not in ("process", "qemu") for g in kinds_of_guests):
        raise click.BadParameter(f"--guests {guests}: process, qemu, or both comma-separated")
    out: dict[str, object] = {}
    recovered: dict[str, dict[str, float]] = {}
    for g in kinds_of_guests:
        by_etcd = {c: EtcdTrials({k: [] for k in kinds}) for c in conditions}
        results, guest_stats, ran = _run(trials, kinds, hosts, vms, lab_dir, prefix, nova, no_power_fence, g,
                                         rounds, seed, by_etcd)
        rows = table({k: v for k, v in results.items() if v})
        recovered[g] = {str(r["class"]): float(r["recovered"]["p50"])
                        for r in rows if isinstance(r["recovered"], dict)}
        if as_json:
            out[g] = {"rows": rows, "guests": guest_stats,
                      "timelines": {k: [tl.to_dict() for tl in v] for k, v in results.items()},
                      **({"rounds": ran} if rounds else {}), **({"etcd": etcd_report(by_etcd)} if conditions else {})}
            continue
        _print(rows, results, trials, hosts, vms, nova, no_power_fence, g, guest_stats)
        if conditions:
            _print_etcd(by_etcd, trials, hosts, vms, nova, no_power_fence, g)
    if as_json:
        click.echo(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))
    elif {"qemu", "process"} <= set(recovered):
        click.echo("recovered p50, qemu / process:")
        for kind, q in recovered["qemu"].items():
            p = recovered["process"].get(kind)
            if p:
                click.echo(f"  {kind:<11} {q:.1f} / {p:.1f} s = {q / p:.2f}x")


@dataclass
class EtcdTrials:
    """The faults run under one etcd condition."""

    timelines: dict[str, list[Timeline]]  # by class
    crashed_before: list[float] = field(default_factory=list)  # s from the etcd member's crash to each fault

    def detection(self) -> dict[str, float] | None:
        """Detection p50 / p99 (seconds after the fault) over every class, and how many were detected."""
        vals = [v for tls in self.timelines.values() for tl in tls if (v := tl.rel(tl.detected)) is not None]
        return None if not vals else {"p50": percentile(vals, 50), "p99": percentile(vals, 99), "n": len(vals)}


def _run(trials: int, kinds: list[str], hosts: int, vms: int, lab_dir: Path, prefix: str, nova: bool,
         no_power_fence: bool, guests: str, rounds: int = 0, seed: int = 0,
         by_etcd: dict[str, EtcdTrials] | None = None,
         ) -> tuple[dict[str, list[Timeline]], dict[str, object], dict[str, object]]:
    """The timelines by class, the guests' figures, and the rounds' verdict (with `rounds`). With
    `by_etcd` (by condition), each trial runs every class under each etcd condition, recorded there too."""
    results: dict[str, list[Timeline]] = {k: [] for k in (scenario.CLASSES if rounds else kinds)}
    guest_stats: dict[str, object] = {}
    verdict: dict[str, object] = {}

    def echo(text: str) -> None:
        click.echo(f"  {text}", err=True)

    try:
        state = cluster.up(lab_dir, hosts, vms, 1, prefix=prefix, echo=echo, nova=nova,
                           power_fence=not no_power_fence, guests=guests, rebalance=bool(rounds))
        if guests == "qemu":
            guest_stats = guest_boot_and_rss(state)
            click.echo(f"guests: {guest_stats}", err=True)
        if rounds:
            ran = run_rounds(state, rounds, seed, echo)
            for tl in ran.timelines:
                results[tl.fault].append(tl)
            verdict = {"seed": seed, "ok": ran.ok, "problems": ran.problems, "placement": ran.placement}
            click.echo(f"rounds (seed {seed}): {'ok' if ran.ok else 'WRONG: ' + '; '.join(ran.problems)}", err=True)
            return results, guest_stats, verdict
        for n in range(trials):
            for condition in list(by_etcd or [""]):
                for kind in kinds:
                    if by_etcd:
                        tl = _under_etcd(state, condition, kind, by_etcd[condition], echo)
                    else:
                        tl = scenario.run_fault(state, kind, scenario.busiest_host(state), echo)
                    results[kind].append(tl)
                    click.echo(f"trial {n + 1} {f'etcd {condition}: ' if condition else ''}{tl.line()}", err=True)
    except LabError as e:
        click.echo(f"bench stopped: {e}", err=True)
    finally:
        cluster.down(lab_dir, prefix=prefix)  # the prefix: also when up failed before recording the lab
    return results, guest_stats, verdict


def _etcd_conditions(text: str, rounds: int) -> list[str]:
    conditions = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in ETCD_CONDITIONS]
    if unknown:
        raise click.BadParameter(f"--etcd: unknown condition(s) {unknown}; known: {', '.join(ETCD_CONDITIONS)}")
    if len(set(conditions)) != len(conditions):
        raise click.BadParameter(f"--etcd {text}: a condition twice")
    if conditions and rounds:
        raise click.BadParameter("--etcd runs trials: not with --rounds")
    return conditions


def _under_etcd(state: LabState, condition: str, kind: str, trials: EtcdTrials, echo: scenario.Echo) -> Timeline:
    """One fault of `kind` under the etcd `condition`, recorded in `trials`; the crashed member is
    restarted after the repair, and the lab is healthy again before the next fault."""
    host = scenario.busiest_host(state)
    if condition == "healthy":
        tl = scenario.run_fault(state, kind, host, echo)
        trials.timelines[kind].append(tl)
        return tl
    lead = etcdlab.leader(state)
    if lead is None:
        raise LabError("no etcd member says it leads: cannot set up an etcd condition")
    member = lead if condition == "leader-change" else next(m for m in ETCD_MEMBERS if m != lead)
    crashed = float(str(faults.etcd(state, member, "down")["t"]))
    try:
        if condition == "leader-change":
            time.sleep(max(0.0, crashed + LEADER_CRASH_BEFORE - time.time()))
        tl = scenario.run_fault(state, kind, host, echo)
    finally:
        faults.etcd(state, member, "up")
    trials.timelines[kind].append(tl)
    trials.crashed_before.append(round(tl.t0 - crashed, 2))
    echo(f"etcd {condition}: {member} crashed {tl.t0 - crashed:.2f} s before the fault, restarted after the repair")
    cluster.wait_healthy(state, echo)
    return tl


def etcd_report(by_etcd: dict[str, EtcdTrials]) -> dict[str, object]:
    """Per etcd condition: the table's rows, detection p50 / p99 over every class, the timelines."""
    out: dict[str, object] = {}
    for condition, trials in by_etcd.items():
        results = trials.timelines
        out[condition] = {
            "rows": table({k: v for k, v in results.items() if v}),
            "detected": trials.detection(),
            "crashed_before": trials.crashed_before,
            "timelines": {k: [tl.to_dict() for tl in v] for k, v in results.items()},
        }
    return {"leader_crash_before": LEADER_CRASH_BEFORE, "conditions": out}


def _print_etcd(by_etcd: dict[str, EtcdTrials], trials: int, hosts: int, vms: int, nova: bool,
                no_power_fence: bool, guests: str) -> None:
    for condition, runs in by_etcd.items():
        results = runs.timelines
        how = {"member-down": " (a follower crashed before each fault, restarted after)",
               "leader-change": f" (the leader crashed {LEADER_CRASH_BEFORE:g} s before each fault, restarted after)",
               }.get(condition, "")
        click.echo(f"\netcd {condition}{how}:")
        _print(table({k: v for k, v in results.items() if v}), results, trials, hosts, vms, nova, no_power_fence,
               guests, {})
    click.echo("\ndetection p50 / p99 per etcd condition, every class:")
    for condition, runs in by_etcd.items():
        d = runs.detection()
        click.echo(f"  {condition:<14} "
                   + ("-" if d is None else f"{d['p50']:.1f} / {d['p99']:.1f} s ({d['n']:g} faults)"))


def guest_boot_and_rss(state: LabState) -> dict[str, object]:
    """Each running guest's boot (its QEMU process's start to the first record on its fresh disk) and
    QEMU's resident memory, p50 and max."""
    boots, rss = [], []
    tick = os.sysconf("SC_CLK_TCK")
    booted = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    for p in vm_processes(state.prefix):
        try:
            stat = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        started = booted + int(stat[19]) / tick
        first = disk_lines(state.disk_on_controller(p.vm))[:1]
        if first:
            boots.append(float(json.loads(first[0])["t"]) - started)
        rss += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")]
    return {
        "boot_s": None if not boots else {"p50": round(percentile(boots, 50), 2), "max": round(max(boots), 2),
                                          "n": len(boots)},
        "qemu_rss_mb": None if not rss else {"p50": round(percentile(rss, 50)), "max": round(max(rss))},
    }


def _print(rows: list[dict[str, object]], results: dict[str, list[Timeline]], trials: int, hosts: int, vms: int,
           nova: bool, no_power_fence: bool, guests: str, guest_stats: dict[str, object]) -> None:
    click.echo(f"RTO per fault class, seconds after the fault, p50 / p95 ({trials} trials, io_timeout 1, "
               f"{hosts} hosts, {vms} VMs, {guests} guests{', through Nova' if nova else ''}"
               f"{', without power fence' if no_power_fence else ''})")
    if guest_stats:
        click.echo(f"guest boot (QEMU start to first disk record) {guest_stats['boot_s']}; QEMU RSS MB "
                   f"{guest_stats['qemu_rss_mb']}")
    nova_col = f" {'nova ACTIVE':>13}" if nova else ""
    click.echo(f"{'class':<11} {'ok':>5} {'detect':>13} {'decide':>13} {'prove':>13} {'recover':>13}{nova_col} "
               f"{'VM downtime':>13}  proofs")
    for r in rows:
        active = f" {_cell(r['active']):>13}" if nova else ""
        click.echo(f"{r['class']!s:<11} {r['ok']!s:>2}/{r['trials']!s:<2} {_cell(r['detected']):>13} "
                   f"{_cell(r['decided']):>13} {_cell(r['proved']):>13} {_cell(r['recovered']):>13}{active} "
                   f"{_cell(r['downtime'], 2):>13}  {','.join(r['proofs']) if isinstance(r['proofs'], list) else ''}")
    if nova:
        per_host = max((len(tl.vms) for tls in results.values() for tl in tls), default=0)
        click.echo(f"Masakari defaults for comparison: {MASAKARI_WAIT} s wait after disabling the service, then up "
                   f"to {MASAKARI_PER_VM} s per server: {MASAKARI_WAIT} to "
                   f"{MASAKARI_WAIT + MASAKARI_PER_VM * per_host} s for a host of {per_host} servers, after "
                   "its own detection")
