"""`vmha bench rto --trials K`: each fault class K times against the lab; p50 / p95 per phase
(detect, decide, prove, recover: seconds after the fault) and VM downtime per class.

Targets at io_timeout 1 (issue 5): isolation <= 10 s to every HA VM running elsewhere; storage
<= host-dead + 5 s, <= 18 s with exit attestation; power-off with the lab's power fence <= 10 s;
service: live migration, no restart; management and fabric: nothing moves. Prints numbers only.

--no-power-fence builds the lab without the managers' power fence: a power-off is then proven by
sanlock's host_dead (target: host-dead + 5 s, about 75 s at io_timeout 1).

The bench builds its own lab (prefix vb, directory BENCH_DIR) and removes it afterwards: it never
touches the lab of `vmha lab up` or `vmha demo` (prefix vl, the default lab directory).

--nova runs the lab with a real Nova (vmha.lab.novalab) and adds the phase "active": every server of
the host ACTIVE on another host in Nova's view, next to Masakari's defaults (it waits 180 s after
disabling the compute service, then evacuates with 3 threads, waiting up to 90 s per server).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from vmha.lab import cluster, scenario
from vmha.lab.net import LabError
from vmha.lab.scenario import Timeline

BENCH_DIR = Path("/var/tmp/vmha-lab/bench")
BENCH_PREFIX = "vb"
PHASES = ("detected", "decided", "proved", "recovered", "active")
MASAKARI_WAIT = 180  # s: Masakari's wait after disabling the service, before evacuating
MASAKARI_PER_VM = 90  # s: the most Masakari waits for one evacuated server


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


def _cell(v: object) -> str:
    if not isinstance(v, dict):
        return "-"
    return f"{v['p50']:.1f} / {v['p95']:.1f}"


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
@click.option("--no-power-fence", "no_power_fence", is_flag=True,
              help="the managers without the lab's power fence: power-off proven by sanlock's host_dead")
def rto(trials: int, classes: str, hosts: int, vms: int, as_json: bool, lab_dir: Path, prefix: str,
        nova: bool, no_power_fence: bool) -> None:
    """Fault to recovery, per phase and fault class, on a fresh lab (io_timeout 1)."""
    kinds = [k.strip() for k in classes.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in scenario.CLASSES]
    if unknown:
        raise click.BadParameter(f"unknown class(es) {unknown}; known: {', '.join(scenario.CLASSES)}")
    results: dict[str, list[Timeline]] = {k: [] for k in kinds}

    def echo(text: str) -> None:
        click.echo(f"  {text}", err=True)

    try:
        state = cluster.up(lab_dir, hosts, vms, 1, prefix=prefix, echo=echo, nova=nova,
                           power_fence=not no_power_fence)
        for n in range(trials):
            for kind in kinds:
                tl = scenario.run_fault(state, kind, scenario.busiest_host(state), echo)
                results[kind].append(tl)
                click.echo(f"trial {n + 1} {tl.line()}", err=True)
    except LabError as e:
        click.echo(f"bench stopped: {e}", err=True)
    finally:
        cluster.down(lab_dir, prefix=prefix)  # the prefix: also when up failed before recording the lab
    rows = table({k: v for k, v in results.items() if v})
    if as_json:
        click.echo(json.dumps({"rows": rows, "timelines": {k: [tl.to_dict() for tl in v] for k, v in results.items()}},
                              indent=2))
        return
    click.echo(f"RTO per fault class, seconds after the fault, p50 / p95 ({trials} trials, io_timeout 1, "
               f"{hosts} hosts, {vms} VMs{', through Nova' if nova else ''}"
               f"{', without power fence' if no_power_fence else ''})")
    nova_col = f" {'nova ACTIVE':>13}" if nova else ""
    click.echo(f"{'class':<11} {'ok':>5} {'detect':>13} {'decide':>13} {'prove':>13} {'recover':>13}{nova_col} "
               f"{'VM downtime':>13}  proofs")
    for r in rows:
        active = f" {_cell(r['active']):>13}" if nova else ""
        click.echo(f"{r['class']!s:<11} {r['ok']!s:>2}/{r['trials']!s:<2} {_cell(r['detected']):>13} "
                   f"{_cell(r['decided']):>13} {_cell(r['proved']):>13} {_cell(r['recovered']):>13}{active} "
                   f"{_cell(r['downtime']):>13}  {','.join(r['proofs']) if isinstance(r['proofs'], list) else ''}")
    if nova:
        per_host = max((len(tl.vms) for tls in results.values() for tl in tls), default=0)
        click.echo(f"Masakari defaults for comparison: {MASAKARI_WAIT} s wait after disabling the service, then up "
                   f"to {MASAKARI_PER_VM} s per server: {MASAKARI_WAIT} to "
                   f"{MASAKARI_WAIT + MASAKARI_PER_VM * per_host} s for a host of {per_host} servers, after "
                   "its own detection")
