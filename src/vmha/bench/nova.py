"""`vmha bench nova --vms N --rounds R`: fault (nova-compute killed) to servers ACTIVE elsewhere,
through vmha's nova driver against a real Nova (the rig: vmha.lab.nova.rig), next to Masakari's
defaults.

Each round: N HA servers (metadata HA_Enabled=True) are booted on one compute host; at t=0 its
nova-compute is SIGKILLed (the host loses power); then the driver does what the manager does once
it holds fence proofs: force the service down, disable it, list the host's HA servers and evacuate
them (scheduler's choice, `--parallel` at once), each waited for until ACTIVE on another host.
The host is then restarted, its evacuations cleaned up and the host enabled for the next round.

Not included, so add them from the other benchmarks: vmha's detection (a plane DOWN, `vmha bench
detection`) and the fence proof (`vmha bench locks`); the rig has neither etcd nor sanlock.
Masakari, for comparison (defaults): after its own detection it disables the service, sleeps
180 s, then evacuates with 3 threads, polling each server up to 90 s.

Needs scripts/setup-nova.sh. Prints numbers only; nothing here passes or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import statistics
import time
from typing import Any

import click
import psutil

from vmha.config import NovaConfig
from vmha.core.settings import RecoverySettings
from vmha.drivers.base import DriverError
from vmha.drivers.nova import NovaDriver, connect
from vmha.lab.nova.faults import parse_spec
from vmha.lab.nova.rig import FLAVOR, IMAGE_ID, NovaRig

MASAKARI_WAIT = 180.0  # wait_period_after_service_update
MASAKARI_THREADS = 3  # host_failure_recovery_threads
MASAKARI_POLL = 90.0  # per-server wait for the evacuation
# BENCHMARKS.md figures the scale run adds for what the rig lacks (etcd, sanlock, a BMC):
DETECTION_P99 = 2.47  # s, `vmha bench detection --hosts 500`, defaults (issue 2, 20:04 run)
POWER_PROOF = 2.21  # s, FenceAgentPower through fence_ipmilan against ipmi_sim, median (issue 3)


def _rig_rss_mib(rig: NovaRig) -> float:
    groups = set(rig.pids())
    total = 0
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) in groups:
                total += p.memory_info().rss
    return total / 2**20


def _boot(conn: Any, host: str, n: int, tag: str) -> list[str]:
    flavor = conn.compute.find_flavor(FLAVOR, ignore_missing=False)
    servers = [
        conn.compute.create_server(
            name=f"{tag}-{i}",
            image_id=IMAGE_ID,
            flavor_id=flavor.id,
            networks="none",
            host=host,
            metadata={"HA_Enabled": "True"},
        )
        for i in range(n)
    ]
    for s in servers:
        conn.compute.wait_for_server(s, status="ACTIVE", interval=0.3, wait=120)
    return [s.id for s in servers]


async def _round(
    rig: NovaRig, driver: NovaDriver, conn: Any, host: str, n: int, parallel: int, r: int
) -> dict[str, Any]:
    ids = await asyncio.to_thread(_boot, conn, host, n, f"bench{r}")
    t0 = time.monotonic()
    rig.kill_compute(host)
    marks: dict[str, float] = {"killed": 0.0}
    await driver.mark_host_down(host)
    marks["forced_down"] = time.monotonic() - t0
    await driver.disable_host(host, "bench: compute killed")
    marks["disabled"] = time.monotonic() - t0
    ha = [v for v in await driver.vms(host) if v.ha]
    marks["listed"] = time.monotonic() - t0
    sem = asyncio.Semaphore(parallel)
    done: dict[str, float] = {}
    took: list[float] = []

    retries: list[str] = []

    async def one(vm: str) -> None:
        async with sem:
            t = time.monotonic()
            for attempt in range(1, 4):  # what the recovery queue does with a retryable failure
                try:
                    await driver.evacuate(vm, host, None)
                    break
                except DriverError as e:
                    if not e.retryable or attempt == 3:
                        raise
                    retries.append(str(e))
                    await asyncio.sleep(1.0)
            done[vm] = time.monotonic() - t0
            took.append(time.monotonic() - t)

    await asyncio.gather(*(one(v.name) for v in sorted(ha, key=lambda v: -v.priority)))
    # Put the host back for the next round (not timed).
    rig.start_compute(host)
    await asyncio.to_thread(rig.wait_evacuations_completed, host, 120)
    await driver.enable_host(host)
    for vm in ids:
        await asyncio.to_thread(conn.compute.delete_server, vm, force=True)
    return {
        "host": host,
        "n": len(ha),
        "marks": marks,
        "active": sorted(done.values()),
        "took": took,
        "retries": retries,
    }


async def _run(vms: int, rounds: int, parallel: int, workdir: str | None) -> None:
    hosts = ("cmp1", "cmp2", "cmp3")
    with NovaRig(hosts=hosts, workdir=workdir) as rig:
        print(f"rig started in {rig.timings['total']} s ({rig.timings}); rig RSS {_rig_rss_mib(rig):.0f} MiB")
        conn = connect(**rig.connect_options())
        driver = NovaDriver(NovaConfig(), connection=conn, poll_interval=0.2, evacuate_timeout=120)
        results = []
        for r in range(rounds):
            res = await _round(rig, driver, conn, hosts[r % len(hosts)], vms, parallel, r)
            results.append(res)
            m, act = res["marks"], res["active"]
            print(
                f"round {r + 1}: host {res['host']} killed; forced down +{m['forced_down']:.2f} s, "
                f"disabled +{m['disabled']:.2f} s, {res['n']} HA servers listed +{m['listed']:.2f} s; "
                f"ACTIVE elsewhere: first +{act[0]:.2f} s, median +{statistics.median(act):.2f} s, "
                f"all +{act[-1]:.2f} s; retries {len(res['retries'])}"
            )
            for e in res["retries"]:
                print(f"  retried: {e}")
        alls = [res["active"][-1] for res in results]
        per_vm = [a for res in results for a in res["active"]]
        evac_each = statistics.median(t for res in results for t in res["took"])
        print(
            f"\nvmha nova driver, {vms} HA servers per host, {parallel} evacuations at once, {rounds} rounds:\n"
            f"  kill -> all ACTIVE elsewhere: median {statistics.median(alls):.2f} s "
            f"(min {min(alls):.2f}, max {max(alls):.2f}); per server median {statistics.median(per_vm):.2f} s; "
            f"one evacuation call to ACTIVE median {evac_each:.2f} s\n"
            f"  (add vmha's detection and fence proof: see `vmha bench detection` and `vmha bench locks`)"
        )
        batches = math.ceil(vms / MASAKARI_THREADS)
        print(
            f"Masakari defaults, same {vms} servers (after its own detection):\n"
            f"  {MASAKARI_WAIT:.0f} s wait + {batches} batches of {MASAKARI_THREADS} evacuations: "
            f"about {MASAKARI_WAIT + batches * evac_each:.0f} s with this Nova's evacuation time, "
            f"up to {MASAKARI_WAIT + batches * MASAKARI_POLL:.0f} s with its {MASAKARI_POLL:.0f} s poll limit"
        )


@click.command("nova")
@click.option("--vms", default=6, show_default=True,
              help="HA servers on the failed host; with --hosts: HA servers in all, spread over the hosts")
@click.option("--rounds", default=3, show_default=True, help="host failures, one after the other")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="evacuations at once (default: the manager's max_parallel)")
@click.option("--dir", "workdir", default=None, help="rig directory, kept with its logs (default: temporary)")
@click.option("--hosts", type=click.IntRange(min=2, max=50), default=None,
              help="scale run: this many computes, --fail of them failed at once, through the manager's queue")
@click.option("--fail", type=click.IntRange(min=1), default=None, help="with --hosts: hosts failed at once [5]")
@click.option("--masakari", is_flag=True, help="with --hosts: Masakari too, running, on the same failures")
@click.option("--detection", type=click.FloatRange(min=0), default=DETECTION_P99, show_default=True,
              help="with --hosts: fault -> planes DOWN (vmha bench detection p99), also when Masakari is told")
@click.option("--proof", type=click.FloatRange(min=0), default=POWER_PROOF, show_default=True,
              help="with --hosts: each fence proof's time (power fence through fence_ipmilan, median)")
@click.option("--api-faults", "api_faults", default=None, metavar="SPEC",
              help="with --hosts: this fraction of vmha's Nova API calls answered by a fault proxy, e.g. "
                   "429:0.2,503:0.1 (429 and 503 not forwarded, 502 after Nova acted)")
def nova(vms: int, rounds: int, parallel: int | None, workdir: str | None, hosts: int | None, fail: int | None,
         masakari: bool, detection: float, proof: float, api_faults: str | None) -> None:
    """Fault to ACTIVE elsewhere through the nova driver and a real Nova; Masakari's defaults beside
    (with --hosts --masakari: Masakari running on the same failures)."""
    settings = RecoverySettings(power_fence=True)  # the manager's defaults (ManagerConfig.recovery_settings)
    if parallel is not None:
        settings = dataclasses.replace(settings, max_parallel=parallel)
    if hosts is None:
        if fail is not None or masakari or api_faults is not None:
            raise click.UsageError("--fail, --masakari and --api-faults need --hosts")
        asyncio.run(_run(vms, rounds, settings.max_parallel, workdir))
        return
    from vmha.bench import nova_scale  # the scale run and Masakari: imported on use

    try:
        faults = parse_spec(api_faults or "")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--api-faults") from None
    fail = 5 if fail is None else fail
    if fail >= hosts:
        raise click.UsageError(f"--fail ({fail}) must be below --hosts ({hosts}): the survivors take the servers")
    asyncio.run(nova_scale.run(hosts, fail, vms, masakari, settings, detection, proof, workdir, faults))
