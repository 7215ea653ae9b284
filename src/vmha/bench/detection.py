"""`vmha bench detection --hosts N`: time from cutting one plane of one host to DOWN in the manager.

Set-up (all real, on this machine):
- a real etcd (temporary data dir, 127.0.0.1);
- the load generator: N simulated hosts in child processes (HeartbeatLoad, one process per 250
  hosts, at nice 10): per (host, plane) its own connection, lease and key, one keepalive and one
  heartbeat put per keepalive interval, the etcd traffic of N agents (see vmha.bench.heartbeat_load);
- the HealthMonitor in this process (separate from the generator, as the manager would be);
- one real `vmha agent` process (its planes pointed at the same etcd), measured for RSS and CPU.

The CPU of each part is printed for the steady state and the cuts, split into the measured system
(etcd and the monitor: what a deployment pays on its control plane) and the load generator (which a
deployment pays on each host, not here), with the traffic actually generated and etcd's own counters.

A cut stops one plane's keepalives and writes without revoking its lease, which is what etcd sees
when that host's network path on that plane fails: the lease expires by TTL. Cuts are one at a time,
round robin over hosts and planes; each is restored (and seen UP again) before the next. Latency =
cut (generator's CLOCK_MONOTONIC) -> DOWN published by the monitor (this process's CLOCK_MONOTONIC;
the same system clock). A false DOWN is any DOWN of a plane that was not cut; false SUSPECTs and
fabric outages are counted too (they trigger nothing by themselves, but show stress, and a false
fabric outage turns a real loss into FABRIC).

Prints numbers only; nothing here passes or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import psutil

from vmha.bench.heartbeat_load import HeartbeatLoad
from vmha.config import ConfigError, Timings
from vmha.core.health import FabricChange, HealthChange
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd.auth import ROOT
from vmha.etcd.client import EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.registry import register
from vmha.lab.pki import Pki
from vmha.manager.detection import HealthMonitor
from vmha.testing.etcd import EtcdProcess, free_ports
from vmha.testing.hosts import config_text

CLUSTER = "bench"
NICE = 10  # the load generator's niceness


# --- the load generator (child processes) ---------------------------------------------------------


async def _simulate(spec: dict[str, Any]) -> None:
    """Run N hosts' heartbeat traffic; obey "cut H P" / "restore H P" / "stats" / "quit" on stdin."""
    keys = Keys(CLUSTER)
    url: str = spec["url"]
    hosts: list[str] = spec["hosts"]
    pki = Pki(Path(spec["pki"])) if spec["pki"] else None
    # One connection for every host record (as root with auth on): registering is not what is
    # measured, and hundreds of new gRPC channels at once time out on this machine.
    async with EtcdClient([url], timeout=5.0, name="sim/register", tls=pki.client(ROOT) if pki else None) as reg:
        for i in range(0, len(hosts), 50):
            await asyncio.gather(*(register(reg, keys, h, spec["domain"]) for h in hosts[i : i + 50]))
    load = HeartbeatLoad(url, keys, [(h, p) for h in hosts for p in PLANES], ttl=int(spec["ttl"]),
                         interval=float(spec["interval"]), tls=pki.client if pki else None)  # fmt: skip
    await load.start()
    # Ready when every plane has beaten once, or after startup_timeout (an overloaded machine may
    # never get there: the parent reports how many made it rather than waiting forever).
    started = time.monotonic()
    while load.beating() < 3 * len(hosts) and time.monotonic() - started < spec["startup_timeout"]:
        await asyncio.sleep(0.1)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(cmd: str, obj: dict[str, Any]) -> None:
        # Each reply names its command: the parent skips a late reply to one it gave up on.
        sys.stdout.write(json.dumps({"cmd": cmd, **obj}) + "\n")
        sys.stdout.flush()

    reply("ready", {"beating": load.beating(), "total": 3 * len(hosts)})
    me = psutil.Process()
    while line := (await reader.readline()).decode().strip():
        cmd, *args = line.split()
        if cmd == "cut":
            t, last_keepalive = load.cut(args[0], Plane(args[1]))
            reply(cmd, {"t": t, "last_keepalive": last_keepalive})
        elif cmd == "restore":
            reply(cmd, {"t": await load.restore(args[0], Plane(args[1]))})
        elif cmd == "stats":
            cpu = me.cpu_times()
            reply(cmd, {"rss": me.memory_info().rss, "cpu": cpu.user + cpu.system, "t": time.monotonic(),
                        "load": load.stats.to_dict()})  # fmt: skip
        elif cmd == "quit":
            break
    await load.close(revoke=True)
    reply("quit", {})


def simulator_main() -> None:
    """Entry point of the child process: the spec is argv[1] (JSON)."""
    # Below the measured system (etcd, the monitor) in the scheduler: on 2 cores the generator
    # competes with them for CPU that a real deployment's agents, each on its own host, do not take.
    # Its own lateness is counted (beats_late), so a starved generator shows in the output.
    os.nice(NICE)
    logging.basicConfig(level=logging.ERROR, format="simulator %(name)s: %(message)s")
    logging.getLogger("vmha.bench.heartbeat_load").setLevel(logging.WARNING)  # rare: reconnects, failed rounds
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
        """Send a command, return its reply; a late reply to an earlier command (one that timed out)
        is skipped."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout):
            while (r := await self.read(timeout))["cmd"] != command.split()[0]:
                pass
        return r

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


def on_time_quantile(from_keepalive: list[float], interval: float, q: float) -> float:
    """The q-quantile of cut -> DOWN for agents on time: each measured keepalive -> DOWN time minus a
    cut phase uniform over one keepalive interval (when a path fails, the last keepalive through it
    went out between 0 and one interval before). nan if there is nothing measured."""
    if not from_keepalive:
        return float("nan")

    def cdf(y: float) -> float:
        return statistics.fmean(min(1.0, max(0.0, (y - x + interval) / interval)) for x in from_keepalive)

    lo, hi = min(from_keepalive) - interval, max(from_keepalive)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return hi


class Watcher:
    """Timestamps the monitor's changes as they are published."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        # Per (host, plane): (time, new state) of its changes. Indexed, since this runs in the
        # monitor's process: scanning every change while waiting cost that process seconds of CPU.
        self.events: dict[tuple[str, Plane], list[tuple[float, PlaneState]]] = {}
        self.cut: set[tuple[str, Plane]] = set()
        self.false_down: list[tuple[str, str]] = []
        self.false_suspect = 0
        self.fabric = 0  # fabric outages formed (none is real here: one plane of one host is cut at a time)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for c in self.monitor.subscribe():
            if isinstance(c, FabricChange):
                self.fabric += c.active
            if not isinstance(c, HealthChange):
                continue
            self.events.setdefault((c.host, c.plane), []).append((time.monotonic(), c.new))
            if (c.host, c.plane) not in self.cut:
                if c.new == PlaneState.DOWN:
                    self.false_down.append((c.host, c.plane.value))
                elif c.new == PlaneState.SUSPECT:
                    self.false_suspect += 1

    async def wait_for(self, host: str, plane: Plane, state: PlaneState, after: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, new in reversed(self.events.get((host, plane), [])):
                if t < after:
                    break
                if new == state:
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


# etcd's own counters (GET /metrics): what the load generator made etcd do, and what etcd sent on.
ETCD_METRICS = {
    "etcd_mvcc_put_total": "puts",
    "etcd_debugging_lease_renewed_total": "lease_renewals",
    "etcd_debugging_lease_revoked_total": "lease_revocations",
    "etcd_debugging_mvcc_events_total": "watch_events",
    "etcd_server_proposals_committed_total": "proposals",
    "etcd_disk_wal_fsync_duration_seconds_count": "wal_fsyncs",
}


async def _etcd_metrics(url: str) -> dict[str, float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(fetch)
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ETCD_METRICS:
            found[ETCD_METRICS[name]] = float(value)
    return found


class Sampler:
    """CPU and counters of every part, sampled at the start and end of a phase."""

    def __init__(self, sims: list[Simulator], agent: int, etcd: EtcdProcess, monitor: HealthMonitor,
                 metrics_url: str) -> None:  # fmt: skip
        self.sims, self.agent, self.etcd, self.monitor = sims, agent, etcd, monitor
        self.metrics_url = metrics_url  # plain HTTP on its own port: the client port wants a certificate

    async def sample(self) -> dict[str, Any]:
        stats = [await sim.ask("stats") for sim in self.sims]
        return {
            "t": time.monotonic(),
            "sims": stats,
            "agent": _proc_usage(self.agent),
            "monitor": _proc_usage(os.getpid()),
            "etcd": _proc_usage(self.etcd.pid or 0),
            "metrics": await _etcd_metrics(self.metrics_url),
            "counters": dict(self.monitor.counters),
        }

    @staticmethod
    def phase(a: dict[str, Any], b: dict[str, Any], hosts: int) -> dict[str, Any]:
        dt = float(b["t"] - a["t"])

        def pct(x: tuple[float, float], y: tuple[float, float]) -> float:
            return 100 * (y[1] - x[1]) / dt

        sim_cpu = 100 * sum(y["cpu"] - x["cpu"] for x, y in zip(a["sims"], b["sims"], strict=True)) / dt
        load = {k: sum(y["load"][k] - x["load"][k] for x, y in zip(a["sims"], b["sims"], strict=True)) / dt
                for k in ("keepalives", "acks", "puts", "errors")}  # fmt: skip
        return {
            "seconds": round(dt, 1),
            "sim_rss_per_host_mb": sum(x["rss"] for x in b["sims"]) / hosts / 2**20,
            "sim_cpu_total_pct": sim_cpu,
            "sim_cpu_per_host_pct": sim_cpu / hosts,
            "load_per_s": load,
            "load_beats_late": sum(
                y["load"]["beats_late"] - x["load"]["beats_late"] for x, y in zip(a["sims"], b["sims"], strict=True)
            ),
            "load_lag_p99": max(y["load"]["lag_p99"] for y in b["sims"]),
            "agent_rss_mb": b["agent"][0] / 2**20,
            "agent_cpu_pct": pct(a["agent"], b["agent"]),
            "monitor_cpu_pct": pct(a["monitor"], b["monitor"]),
            "monitor_rss_mb": b["monitor"][0] / 2**20,
            "etcd_cpu_pct": pct(a["etcd"], b["etcd"]),
            "etcd_rss_mb": b["etcd"][0] / 2**20,
            "etcd_per_s": {k: (b["metrics"].get(k, 0) - a["metrics"].get(k, 0)) / dt for k in ETCD_METRICS.values()},
            "monitor_per_s": {k: (v - a["counters"].get(k, 0)) / dt for k, v in b["counters"].items()},
        }


async def _run(hosts: int, procs: int, cuts: int, timings: Timings, settle: float, echo: Any,
               tls: bool = False) -> dict[str, Any]:  # fmt: skip
    """tls: etcd serves TLS only with client-certificate auth and RBAC on (vmha etcd setup-auth):
    each simulated host presents its own certificate and may write only its own keys."""
    work = Path(tempfile.mkdtemp(prefix="vmha-bench-detection-"))
    metrics_port = free_ports(1)[0]
    etcd = EtcdProcess(
        work / "etcd",
        pki=Pki(work / "pki") if tls else None,
        # 500 hosts write 3000 revisions a second: compacted every 30 s, the history stays small. With
        # revision mode (compaction every 5 min) the store grew until etcd stalled ("waiting for the
        # applied index took too long"), ending keepalive streams and watches after about 2 min.
        extra_args=["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "30s",
                    "--quota-backend-bytes", str(4 * 1024**3),
                    "--listen-metrics-urls", f"http://127.0.0.1:{metrics_port}"],
    )  # fmt: skip
    etcd.start()
    names = [f"sim{i:04d}" for i in range(hosts)]
    if tls:
        t = time.monotonic()
        await asyncio.to_thread(lambda: [etcd.tls(n) for n in [*names, "real-agent", "bench"]])
        await etcd.setup_auth(CLUSTER, [*names, "real-agent"], ["bench"])
        echo(f"TLS and auth: {hosts + 2} certificates and roles in {time.monotonic() - t:.1f}s")
    sims: list[Simulator] = []
    agent: asyncio.subprocess.Process | None = None
    client = EtcdClient(etcd.client_urls, timeout=2.0, name="bench/manager", tls=etcd.tls("bench"))
    monitor = HealthMonitor(client, Keys(CLUSTER), timings.health(), name="bench")
    mon_task = asyncio.create_task(monitor.run())
    watcher = Watcher(monitor)
    result: dict[str, Any] = {"hosts": hosts, "procs": procs, "timings": timings.model_dump(),
                              "security": "tls+auth" if tls else "plaintext"}  # fmt: skip
    try:
        startup_timeout = 60 + hosts * 0.1
        t = time.monotonic()
        # Host i lives in generator i % procs: one Python process uses one core at most.
        for k in range(procs):
            spec: dict[str, Any] = {"url": etcd.client_urls[0], "hosts": names[k::procs], "domain": "d0",
                    "pki": str(etcd.pki.dir) if etcd.pki else None,
                    "ttl": timings.lease_ttl, "interval": timings.keepalive_interval,
                    "startup_timeout": startup_timeout}  # fmt: skip
            sims.append(await Simulator.start(spec))
        readies = [await sim.read(timeout=startup_timeout + 60) for sim in sims]
        beating, planes = sum(r["beating"] for r in readies), sum(r["total"] for r in readies)
        echo(f"{hosts} simulated hosts in {procs} load generator process(es) (nice {NICE}): "
             f"{beating}/{planes} planes (each its own connection, lease and key) beating after "
             f"{time.monotonic() - t:.1f}s")  # fmt: skip

        def sim_of(host: str) -> Simulator:
            return sims[names.index(host) % procs]

        # One real agent, for its footprint.
        cfg = work / "agent.toml"
        cfg.write_text(config_text(CLUSTER, "real-agent", "d1", {p: etcd.client_urls for p in PLANES},
                                   timings.model_dump(), etcd=etcd.toml("real-agent")))  # fmt: skip
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
        sampler = Sampler(sims, agent.pid, etcd, monitor, f"http://127.0.0.1:{metrics_port}")
        s0 = await sampler.sample()
        await asyncio.sleep(settle)
        s1 = await sampler.sample()
        result["steady"] = {
            **Sampler.phase(s0, s1, hosts),
            "false_suspect": watcher.false_suspect,
            "false_down": len(watcher.false_down),
        }
        result["fabric_outages"] = watcher.fabric

        latencies: list[float] = []
        # From the cut plane's last keepalive to DOWN: what etcd and the monitor take (TTL, etcd's
        # expiry check, delivery, down_grace). An agent on time beats at most one interval before the
        # cut, so for it cut -> DOWN is at most this: an upper bound that a late generator (its last
        # keepalive older than one interval at the cut, which shortens cut -> DOWN) cannot flatter.
        from_keepalive: list[float] = []
        late_at_cut = 0
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
                from_keepalive.append(down - r["last_keepalive"])
                echo(f"cut {i + 1}/{cuts}: {host} {plane.value}: DOWN after {down - r['t']:.2f}s "
                     f"({down - r['last_keepalive']:.2f}s after its last keepalive)")  # fmt: skip
            late_at_cut += r["t"] - r["last_keepalive"] > timings.keepalive_interval
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
        try:
            s2 = await sampler.sample()
        except TimeoutError:
            echo("the simulator did not answer its statistics within 30s: no CPU figures for the cuts")
            result["during_cuts"] = None
        else:
            result["during_cuts"] = Sampler.phase(s1, s2, hosts)
        result["cuts"] = {
            "count": done,
            "missed": missed,
            "p50": pct(latencies, 0.5),
            "p95": pct(latencies, 0.95),
            "p99": pct(latencies, 0.99),
            "max": max(latencies, default=float("nan")),
            "mean": statistics.fmean(latencies) if latencies else float("nan"),
            "from_keepalive": {q: pct(from_keepalive, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
            | {"max": max(from_keepalive, default=float("nan"))},
            "on_time": {
                q: on_time_quantile(from_keepalive, timings.keepalive_interval, v)
                for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
            },
            "late_at_cut": late_at_cut,
            "up_again_p50": pct(recoveries, 0.5),
            "false_down": len(watcher.false_down),
            "false_down_planes": watcher.false_down[:10],
            "false_suspect": watcher.false_suspect,
            "fabric_outages": watcher.fabric - result["fabric_outages"],
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


async def _main(hosts: int, procs: int, cuts: int, timings: Timings, settle: float, echo: Any,
                modes: list[bool]) -> list[dict[str, Any]]:  # fmt: skip
    # SIGTERM (e.g. from `timeout`) cancels the run like Ctrl-C, so its cleanup (etcd, simulators,
    # the agent, the temporary directory) still happens.
    results = []
    for tls in modes:
        echo(f"--- {'TLS + client certificates + auth' if tls else 'plaintext, no auth'}")
        task = asyncio.create_task(_run(hosts, procs, cuts, timings, settle, echo, tls))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            results.append(await task)
        except TimeoutError:
            # The load generator stopped answering before the figures were complete (an overloaded
            # machine): this half has no figure; the other half still runs.
            echo("the simulator did not answer within 30s (machine overloaded?): no figure for this half")
    return results


def _print_phase(name: str, p: dict[str, Any], hosts: int, timings: dict[str, Any]) -> None:
    load, e, m = p["load_per_s"], p["etcd_per_s"], p["monitor_per_s"]
    measured = p["etcd_cpu_pct"] + p["monitor_cpu_pct"]
    expected = 3 * hosts / timings["keepalive_interval"]
    click.echo(f"  {name} ({p['seconds']}s), CPU in % of one core (the machine has {os.cpu_count()}):")
    click.echo(f"    measured system: {measured:.0f}%  = etcd {p['etcd_cpu_pct']:.0f}% (RSS {p['etcd_rss_mb']:.0f} MB)"
               f" + manager monitor {p['monitor_cpu_pct']:.0f}% (RSS {p['monitor_rss_mb']:.0f} MB)")  # fmt: skip
    click.echo(f"    load generator: {p['sim_cpu_total_pct']:.0f}% ({p['sim_cpu_per_host_pct']:.3f}%/host, "
               f"{p['sim_rss_per_host_mb']:.2f} MB/host): not paid by a real deployment, each agent runs on its "
               f"own host")  # fmt: skip
    click.echo(f"    traffic generated: {load['keepalives']:.0f} keepalives/s, {load['puts']:.0f} heartbeat puts/s "
               f"(N agents: {expected:.0f}/s each), {load['errors']:.0f} errors/s; beats over 100 ms late: "
               f"{p['load_beats_late']} (scheduler lag p99 {p['load_lag_p99']:.3f}s)")  # fmt: skip
    click.echo(f"    etcd: {e['puts']:.0f} puts/s, {e['lease_renewals']:.0f} lease renewals/s, "
               f"{e['proposals']:.0f} proposals/s, {e['wal_fsyncs']:.0f} WAL fsyncs/s, "
               f"{e['watch_events']:.0f} watch events/s sent")  # fmt: skip
    click.echo("    monitor: " + ", ".join(f"{v:.0f} {k}/s" for k, v in sorted(m.items())))


@click.command("detection")
@click.option("--hosts", default=50, show_default=True, help="simulated hosts (3 planes each)")
@click.option("--procs", type=int, default=None, help="load generator processes [default: one per 250 hosts]")
@click.option("--cuts", default=20, show_default=True, help="plane cuts, one at a time")
@click.option("--keepalive", type=float, default=None, help="keepalive interval (default: config default)")
@click.option("--ttl", type=int, default=None, help="lease TTL, whole seconds (default: config default)")
@click.option("--suspect-after", type=float, default=None, help="(default: config default)")
@click.option("--settle", default=10.0, show_default=True, help="steady-state seconds measured before the cuts")
@click.option("--profile", type=click.Path(dir_okay=False), help="write a cProfile of the monitor's process here")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON too")
@click.option("-v", "--verbose", is_flag=True, help="show the monitor's operator log")
@click.option("--security", type=click.Choice(["plaintext", "tls", "both"]), default="plaintext", show_default=True,
              help="tls: etcd with TLS, client certificates and auth (a role per host); both: plaintext, then tls")
def detection(
    hosts: int, procs: int | None, cuts: int, keepalive: float | None, ttl: int | None,
    suspect_after: float | None, settle: float, profile: str | None, as_json: bool, verbose: bool, security: str,
) -> None:  # fmt: skip
    """Cut one plane of one host at a time; print detection latency, false DOWNs, where the CPU goes."""
    overrides = {k: v for k, v in (("keepalive_interval", keepalive), ("lease_ttl", ttl),
                                   ("suspect_after", suspect_after)) if v is not None}  # fmt: skip
    try:
        timings = Timings.model_validate({**Timings().model_dump(), **overrides})
    except ValueError as e:
        raise ConfigError(f"bench detection: bad timings: {e}") from None
    # The monitor's operator log (one line per change) would bury the figures: only with -v.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(name)s %(message)s")
    logging.getLogger("vmha.etcd").setLevel(logging.INFO)  # rare and telling: broken watches, failed writes
    logging.getLogger("vmha.etcd.hostids").setLevel(logging.WARNING)  # --security tls: one line per host
    prof = cProfile.Profile() if profile else None
    try:
        if prof is not None:
            prof.enable()
        modes = {"plaintext": [False], "tls": [True], "both": [False, True]}[security]
        results = asyncio.run(_main(hosts, procs or max(1, (hosts + 249) // 250), cuts, timings, settle,
                                    click.echo, modes))  # fmt: skip
    except asyncio.CancelledError:
        raise click.ClickException("bench detection: terminated (everything it started was stopped)") from None
    finally:
        if prof is not None and profile:
            prof.disable()
            prof.dump_stats(profile)
    for r in results:
        _report(r, hosts, cuts, as_json)
    if len(results) > 1:
        click.echo("\n" + "; ".join(f"{r['security']}: p99 {r['cuts']['p99']:.2f}s, p50 {r['cuts']['p50']:.2f}s, "
                                    f"etcd CPU {r['steady']['etcd_cpu_pct']:.0f}%" for r in results))


def _report(r: dict[str, Any], hosts: int, cuts: int, as_json: bool) -> None:
    s, c = r["steady"], r["cuts"]
    t = r["timings"]
    click.echo(
        f"\nvmha bench detection --hosts {hosts} --cuts {cuts} [{r['security']}]  (ttl {t['lease_ttl']}s, keepalive "
        f"{t['keepalive_interval']}s, suspect_after {t['suspect_after']}s, down_grace {t['down_grace']}s)"
    )
    click.echo(f"  detection latency (cut -> DOWN): p50 {c['p50']:.2f}s  p95 {c['p95']:.2f}s  p99 {c['p99']:.2f}s"
               f"  max {c['max']:.2f}s  ({c['count'] - c['missed']}/{c['count']} detected)")  # fmt: skip
    k = c["from_keepalive"]
    click.echo(f"  last keepalive -> DOWN (upper bound of cut -> DOWN for agents on time): p50 {k['p50']:.2f}s  p95 "
               f"{k['p95']:.2f}s  p99 {k['p99']:.2f}s  max {k['max']:.2f}s; cuts whose last keepalive was over "
               f"{t['keepalive_interval']}s old (generator late): {c['late_at_cut']}")  # fmt: skip
    o = c["on_time"]
    click.echo(f"  cut -> DOWN for agents on time (the above minus a cut phase uniform over one keepalive "
               f"interval): p50 {o['p50']:.2f}s  p95 {o['p95']:.2f}s  p99 {o['p99']:.2f}s")  # fmt: skip
    click.echo(f"  back UP after restore: p50 {c['up_again_p50']:.3f}s")
    click.echo(f"  false DOWN: {c['false_down'] + s['false_down']}  (steady {s['false_down']}, during cuts "
               f"{c['false_down']})  false SUSPECT: {s['false_suspect'] + c['false_suspect']}  fabric outages "
               f"formed: {r['fabric_outages'] + c['fabric_outages']} (none is real)")  # fmt: skip
    click.echo(f"  real agent process: RSS {s['agent_rss_mb']:.1f} MB, CPU {s['agent_cpu_pct']:.2f}% of a core")
    _print_phase("steady state", s, hosts, t)
    if r["during_cuts"] is None:
        click.echo("  during the cuts: not sampled (the load generator did not answer)")
    else:
        _print_phase("during the cuts", r["during_cuts"], hosts, t)
    if as_json:
        click.echo(json.dumps(r, indent=2, default=str))
