"""Simulated compute hosts for tests and benchmarks: a real `vmha agent` process per host, each of
its planes reaching etcd through its own cuttable TcpProxy (the host's network path on that plane).

    host = await ProxiedHost.create(tmp_path, "c1", "h1", "r1", etcd)   # its own certificate and role
    await host.start_agent()
    await host.cut(Plane.STORAGE)      # that host's storage path is down; the others are untouched
    host.restore(Plane.STORAGE)
    await host.close()                 # SIGTERM the agent (SIGKILL if it lingers), close the proxies
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from vmha.core.planes import PLANES, Plane
from vmha.testing.etcd import EtcdProcess
from vmha.testing.proxy import TcpProxy


def config_text(
    cluster: str,
    host: str | None,
    domain: str,
    endpoints: dict[Plane, list[str]],
    timings: dict[str, Any] | None = None,
    extra: str = "",
    *,
    etcd: str,
) -> str:
    """A vmha TOML config (json.dumps of a str or list is valid TOML for these values); ``etcd``
    is its [etcd] section (EtcdProcess.toml(user)): no default, so that no test config is plaintext
    without saying so."""
    lines = ["[cluster]", f"name = {json.dumps(cluster)}"]
    if host is not None:
        lines += ["[host]", f"name = {json.dumps(host)}", f"domain = {json.dumps(domain)}"]
    for p in PLANES:
        lines += [f"[planes.{p.value}]", f"endpoints = {json.dumps(endpoints[p])}"]
    if timings:
        lines += ["[timings]", *(f"{k} = {json.dumps(v)}" for k, v in timings.items())]
    return "\n".join(lines) + "\n" + etcd + extra


class ProxiedHost:
    def __init__(self, workdir: Path, cluster: str, name: str, domain: str, proxies: dict[Plane, TcpProxy]) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.name = name
        self.domain = domain
        self.proxies = proxies
        self.config_path = workdir / f"{name}.toml"
        self.status_path = workdir / f"agent-{name}.json"
        self.log_path = workdir / f"agent-{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @classmethod
    async def create(
        cls,
        workdir: Path,
        cluster: str,
        name: str,
        domain: str,
        etcd: EtcdProcess,
        timings: dict[str, Any] | None = None,
    ) -> ProxiedHost:
        """The host connects as etcd user ``name`` with the role setup-auth gives a host (auth on)."""
        if etcd.pki is not None:
            await etcd.setup_auth(cluster, [name])
        proxies = {p: await TcpProxy.to(etcd.client_urls[0]) for p in PLANES}
        h = cls(workdir, cluster, name, domain, proxies)
        workdir.mkdir(parents=True, exist_ok=True)
        endpoints = {p: [proxies[p].url] for p in PLANES}
        h.config_path.write_text(config_text(cluster, name, domain, endpoints, timings, etcd=etcd.toml(name)))
        return h

    async def start_agent(self, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        """Start the agent; ``env``: variables added to ours (e.g. systemd's NOTIFY_SOCKET)."""
        vmha = Path(sys.executable).with_name("vmha")
        with open(self.log_path, "ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                str(vmha), "agent", "--config", str(self.config_path), "--status-file", str(self.status_path),
                stdout=logf, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )  # fmt: skip
        return self.proc

    async def stop_agent(self, timeout: float = 10.0) -> int | None:
        """SIGTERM our agent (by PID) and wait; SIGKILL if it has not exited within ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode

    def status(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def cut(self, plane: Plane, blackhole: bool = False) -> None:
        await self.proxies[plane].cut(blackhole=blackhole)

    def restore(self, plane: Plane) -> None:
        self.proxies[plane].restore()

    async def close(self) -> None:
        await self.stop_agent()
        for p in self.proxies.values():
            await p.close()


__all__ = ["ProxiedHost", "config_text"]
