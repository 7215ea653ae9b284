"""`vmha bench detection --hosts N`: time from cutting one plane of one host to DOWN in the manager.

Set-up (all real, on this machine):
- a real etcd (temporary data dir, 127.0.0.1);
- N simulated hosts in one child process ("simulator"): for every (host, plane) its own
  PlaneHeartbeat, i.e. its own gRPC connection, lease and key, exactly the agent's code path;
- the HealthMonitor in this process (separate from the simulator, as the manager would be);
- one real `vmha agent` process (its planes pointed at the same etcd), measured for RSS and CPU.

A cut stops one plane's heartbeat task and drops its connection without revoking the lease, which
is what etcd sees when that host's network path on that plane fails: the lease expires by TTL.
Cuts are one at a time, round robin over hosts and planes; each is restored (and seen UP again)
before the next. Latency = cut (simulator's CLOCK_MONOTONIC) -> DOWN published by the monitor
(this process's CLOCK_MONOTONIC; the same system clock). A false DOWN is any DOWN of a plane that
was not cut; false SUSPECTs are counted too (they do not trigger anything, but show stress).

Prints numbers only; nothing here passes or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import psutil

from vmha.config import ConfigError, Timings
from vmha.core.health import HealthChange
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd.client import EtcdClient, EtcdError
from vmha.etcd.heartbeat import PlaneHeartbeat
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register
from vmha.manager.detection import HealthMonitor
from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import config_text

CLUSTER = "bench"


# --- the simulator (child process) ----------------------------------------------------------------


async def _simulate(spec: dict[str, Any]) -> None:
    """Run N hosts' heartbeats; obey "cut H P" / "restore H P" / "stats" / "quit" on stdin."""
    keys = Keys(CLUSTER)
    url: str = spec["url"]
    hosts: list[str] = spec["hosts"]
    ttl, interval = int(spec["ttl"]), float(spec["interval"])

    def make(h: str, p: Plane) -> PlaneHeartbeat:
        return PlaneHeartbeat(keys, h, p, [url], ttl=ttl, interval=interval)

    async with EtcdClient([url], timeout=5.0, name="sim/register") as reg:
        for i in range(0, len(hosts), 50):
            await asyncio.gather(*(register(reg, keys, h, spec["domain"]) for h in hosts[i : i + 50]))
    beats = {(h, p): make(h, p) for h in hosts for p in PLANES}
    # Start them spread out (random order, 50 hosts' planes a second at least over one interval):
    # hosts do not beat in lockstep, and 1500 connections at once would time out on a busy machine.
    order = list(beats.values())
    random.shuffle(order)
    batches = 20
    ramp = max(interval, len(hosts) / 50)
    for i in range(batches):
        for hb in order[i::batches]:
            hb.start()
        await asyncio.sleep(ramp / batches)
    # Ready when every plane has beaten once, or after startup_timeout (an overloaded machine may
    # never get there: the parent reports how many made it rather than waiting forever).
    started = time.monotonic()
    while any(hb.seq < 1 for hb in beats.values()) and time.monotonic() - started < spec["startup_timeout"]:
        await asyncio.sleep(0.1)
    beating = sum(hb.seq >= 1 for hb in beats.values())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "beating": beating, "total": len(beats)})
    me = psutil.Process()
    while line := (await reader.readline()).decode().strip():
        cmd, *args = line.split()
        if cmd == "cut":
            key = (args[0], Plane(args[1]))
            hb = beats[key]
            t0 = time.monotonic()
            await hb.stop(revoke=False)  # the path is gone: etcd must find out by itself
            reply({"cut": args, "t": t0})
        elif cmd == "restore":
            key = (args[0], Plane(args[1]))
            beats[key] = make(*key)
            beats[key].start()
            reply({"restored": args, "t": time.monotonic()})
        elif cmd == "stats":
            cpu = me.cpu_times()
            reply({"rss": me.memory_info().rss, "cpu": cpu.user + cpu.system, "t": time.monotonic()})
        elif cmd == "quit":
            break
    await asyncio.gather(*(hb.stop(revoke=True) for hb in beats.values()))
    reply({"bye": True})


def simulator_main() -> None:
    """Entry point of the child process: the spec is argv[1] (JSON)."""
    # Hundreds of hosts' "unreachable" lines under load would flood the terminal; errors only.
    logging.basicConfig(level=logging.ERROR, format="simulator %(name)s: %(message)s")
    asyncio.run(_simulate(json.loads(sys.argv[1])))


class Simulator:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> Simulator:
        code = "from vmha.bench.detection import simulator_main; simulator_main()"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"simulator exited (rc {await self.proc.wait()})")
        data: dict[str, Any] = json.loads(line)
        return data

    async def ask(self, command: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read(timeout)

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.ask("quit", timeout=30)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# --- the run --------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of the values; nan if there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


class Watcher:
    """Timestamps the monitor's changes as they are published."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        self.events: list[tuple[float, HealthChange]] = []
        self.cut: set[tuple[str, Plane]] = set()
        self.false_down: list[tuple[str, str]] = []
        self.false_suspect = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for c in self.monitor.subscribe():
            if not isinstance(c, HealthChange):
                continue
            self.events.append((time.monotonic(), c))
            if (c.host, c.plane) not in self.cut:
                if c.new == PlaneState.DOWN:
                    self.false_down.append((c.host, c.plane.value))
                elif c.new == PlaneState.SUSPECT:
                    self.false_suspect += 1

    async def wait_for(self, host: str, plane: Plane, state: PlaneState, after: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, c in reversed(self.events):
                if t < after:
                    break
                if c.host == host and c.plane == plane and c.new == state:
                    return t
            await asyncio.sleep(0.02)
        return None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _proc_usage(pid: int) -> tuple[float, float]:
    p = psutil.Process(pid)
    cpu = p.cpu_times()
    return p.memory_info().rss, cpu.user + cpu.system


async def _run(hosts: int, procs: int, cuts: int, timings: Timings, settle: float, echo: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vmha-bench-detection-"))
    etcd = EtcdProcess(
        work / "etcd",
        extra_args=["--auto-compaction-mode", "revision", "--auto-compaction-retention", "100000",
                    "--quota-backend-bytes", str(4 * 1024**3)],
    )  # fmt: skip
    etcd.start()
    sims: list[Simulator] = []
    agent: asyncio.subprocess.Process | None = None
    client = EtcdClient(etcd.client_urls, timeout=2.0, name="bench/manager")
    monitor = HealthMonitor(client, Keys(CLUSTER), timings.health(), name="bench")
    mon_task = asyncio.create_task(monitor.run())
    watcher = Watcher(monitor)
    result: dict[str, Any] = {"hosts": hosts, "timings": timings.model_dump()}
    try:
        names = [f"sim{i:04d}" for i in range(hosts)]
        startup_timeout = 60 + hosts * 0.1
        t = time.monotonic()
        # Host i lives in simulator i % procs: one Python process uses one core at most.
        for k in range(procs):
            spec: dict[str, Any] = {"url": etcd.client_urls[0], "hosts": names[k::procs], "domain": "d0",
                    "ttl": timings.lease_ttl, "interval": timings.keepalive_interval,
                    "startup_timeout": startup_timeout}  # fmt: skip
            sims.append(await Simulator.start(spec))
        readies = [await sim.read(timeout=startup_timeout + 60) for sim in sims]
        beating, planes = sum(r["beating"] for r in readies), sum(r["total"] for r in readies)
        echo(f"{hosts} simulated hosts in {procs} process(es): {beating}/{planes} planes (each its own lease "
             f"and connection) beating after {time.monotonic() - t:.1f}s")  # fmt: skip

        def sim_of(host: str) -> Simulator:
            return sims[names.index(host) % procs]

        # One real agent, for its footprint.
        cfg = work / "agent.toml"
        cfg.write_text(config_text(CLUSTER, "real-agent", "d1", {p: etcd.client_urls for p in PLANES},
                                   timings.model_dump()))  # fmt: skip
        vmha = str(Path(sys.executable).with_name("vmha"))
        with open(work / "agent.log", "ab") as log:
            agent = await asyncio.create_subprocess_exec(
                vmha, "agent", "--config", str(cfg), "--status-file", str(work / "agent.json"),
                stdout=log, stderr=log,
            )  # fmt: skip

        total = (hosts + 1) * 3
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = sum(s.state == PlaneState.UP for h in monitor.view().values() for s in h.planes.values())
            if up == total:
                break
            await asyncio.sleep(0.2)
        echo(f"monitor: {up}/{total} planes UP")
        result["up_at_start"] = f"{up}/{total}"
        watcher.false_down.clear()
        watcher.false_suspect = 0

        # Steady state, for the CPU figures and for false verdicts with nothing cut.
        me = os.getpid()
        s0 = [await sim.ask("stats") for sim in sims]
        a0, m0, e0 = _proc_usage(agent.pid), _proc_usage(me), _proc_usage(etcd.pid or 0)
        t0 = time.monotonic()
        await asyncio.sleep(settle)
        s1 = [await sim.ask("stats") for sim in sims]
        a1, m1, e1 = _proc_usage(agent.pid), _proc_usage(me), _proc_usage(etcd.pid or 0)
        dt = time.monotonic() - t0
        result["steady"] = {
            "seconds": round(dt, 1),
            "sim_rss_per_host_mb": sum(x["rss"] for x in s1) / hosts / 2**20,
            "sim_cpu_per_host_pct": 100 * sum(b["cpu"] - a["cpu"] for a, b in zip(s0, s1, strict=True)) / dt / hosts,
            "sim_cpu_total_pct": 100 * sum(b["cpu"] - a["cpu"] for a, b in zip(s0, s1, strict=True)) / dt,
            "agent_rss_mb": a1[0] / 2**20,
            "agent_cpu_pct": 100 * (a1[1] - a0[1]) / dt,
            "monitor_cpu_pct": 100 * (m1[1] - m0[1]) / dt,
            "monitor_rss_mb": m1[0] / 2**20,
            "etcd_cpu_pct": 100 * (e1[1] - e0[1]) / dt,
            "etcd_rss_mb": e1[0] / 2**20,
            "false_suspect": watcher.false_suspect,
            "false_down": len(watcher.false_down),
        }

        latencies: list[float] = []
        recoveries: list[float] = []
        missed = 0
        done = 0
        for i in range(cuts):
            host = names[(i * 7919) % hosts]
            plane = PLANES[i % 3]
            watcher.cut.add((host, plane))
            try:
                r = await sim_of(host).ask(f"cut {host} {plane.value}")
            except TimeoutError:
                echo(f"the simulator did not answer within 30s (machine overloaded?): stopping after {i} cuts")
                break
            done += 1
            down = await watcher.wait_for(host, plane, PlaneState.DOWN, r["t"], timeout=20)
            if down is None:
                missed += 1
                echo(f"cut {i + 1}/{cuts}: {host} {plane.value}: no DOWN within 20s")
            else:
                latencies.append(down - r["t"])
                echo(f"cut {i + 1}/{cuts}: {host} {plane.value}: DOWN after {down - r['t']:.2f}s")
            try:
                r = await sim_of(host).ask(f"restore {host} {plane.value}")
            except TimeoutError:
                echo(f"the simulator did not answer within 30s (machine overloaded?): stopping after {done} cuts")
                break
            up_at = await watcher.wait_for(host, plane, PlaneState.UP, r["t"], timeout=20)
            if up_at is not None:
                recoveries.append(up_at - r["t"])
            await asyncio.sleep(0.5)  # the restored plane settles before it counts as not cut
            watcher.cut.discard((host, plane))
        result["cuts"] = {
            "count": done,
            "missed": missed,
            "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99),
            "max": max(latencies, default=float("nan")),
            "mean": statistics.fmean(latencies) if latencies else float("nan"),
            "up_again_p50": pct(recoveries, 0.5),
            "false_down": len(watcher.false_down),
            "false_down_planes": watcher.false_down[:10],
            "false_suspect": watcher.false_suspect,
        }
        return result
    finally:
        await watcher.close()
        mon_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, EtcdError):
            await mon_task
        if agent is not None and agent.returncode is None:
            agent.terminate()
            try:
                await asyncio.wait_for(agent.wait(), 10)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        for sim in sims:
            await sim.close()
        await client.close()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _main(hosts: int, procs: int, cuts: int, timings: Timings, settle: float, echo: Any) -> dict[str, Any]:
    # SIGTERM (e.g. from `timeout`) cancels the run like Ctrl-C, so its cleanup (etcd, simulators,
    # the agent, the temporary directory) still happens.
    task = asyncio.create_task(_run(hosts, procs, cuts, timings, settle, echo))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


@click.command("detection")
@click.option("--hosts", default=50, show_default=True, help="simulated hosts (3 planes each)")
@click.option("--procs", type=int, default=None, help="simulator processes [default: one per 200 hosts]")
@click.option("--cuts", default=20, show_default=True, help="plane cuts, one at a time")
@click.option("--keepalive", type=float, default=None, help="keepalive interval (default: config default)")
@click.option("--ttl", type=int, default=None, help="lease TTL, whole seconds (default: config default)")
@click.option("--suspect-after", type=float, default=None, help="(default: config default)")
@click.option("--settle", default=10.0, show_default=True, help="steady-state seconds measured before the cuts")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON too")
@click.option("-v", "--verbose", is_flag=True, help="show the monitor's operator log")
def detection(
    hosts: int, procs: int | None, cuts: int, keepalive: float | None, ttl: int | None, suspect_after: float | None,
    settle: float, as_json: bool, verbose: bool,
) -> None:  # fmt: skip
    """Cut one plane of one host at a time; print detection latency, false DOWNs, agent footprint."""
    overrides = {k: v for k, v in (("keepalive_interval", keepalive), ("lease_ttl", ttl),
                                   ("suspect_after", suspect_after)) if v is not None}  # fmt: skip
    try:
        timings = Timings.model_validate({**Timings().model_dump(), **overrides})
    except ValueError as e:
        raise ConfigError(f"bench detection: bad timings: {e}") from None
    # The monitor's operator log (one line per change) would bury the figures: only with -v.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(name)s %(message)s")
    try:
        r = asyncio.run(_main(hosts, procs or max(1, (hosts + 199) // 200), cuts, timings, settle, click.echo))
    except asyncio.CancelledError:
        raise click.ClickException("bench detection: terminated (everything it started was stopped)") from None
    s, c = r["steady"], r["cuts"]
    t = r["timings"]
    click.echo(
        f"\nvmha bench detection --hosts {hosts} --cuts {cuts}  (ttl {t['lease_ttl']}s, keepalive "
        f"{t['keepalive_interval']}s, suspect_after {t['suspect_after']}s, down_grace {t['down_grace']}s)"
    )
    click.echo(f"  detection latency (cut -> DOWN): p50 {c['p50']:.2f}s  p99 {c['p99']:.2f}s  max {c['max']:.2f}s"
               f"  ({c['count'] - c['missed']}/{c['count']} detected)")  # fmt: skip
    click.echo(f"  back UP after restore: p50 {c['up_again_p50']:.3f}s")
    click.echo(f"  false DOWN: {c['false_down'] + s['false_down']}  (steady {s['false_down']}, during cuts "
               f"{c['false_down']})  false SUSPECT: {s['false_suspect'] + c['false_suspect']}")  # fmt: skip
    click.echo(f"  real agent process: RSS {s['agent_rss_mb']:.1f} MB, CPU {s['agent_cpu_pct']:.2f}% of a core")
    click.echo(f"  simulated hosts: RSS {s['sim_rss_per_host_mb']:.2f} MB/host, CPU {s['sim_cpu_per_host_pct']:.3f}%"
               f"/host ({s['sim_cpu_total_pct']:.0f}% total)")  # fmt: skip
    click.echo(
        f"  manager monitor: CPU {s['monitor_cpu_pct']:.0f}%, RSS {s['monitor_rss_mb']:.0f} MB;"
        f"  etcd: CPU {s['etcd_cpu_pct']:.0f}%, RSS {s['etcd_rss_mb']:.0f} MB  (steady {s['seconds']}s)"
    )
    if as_json:
        click.echo(json.dumps(r, indent=2, default=str))
