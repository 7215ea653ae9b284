"""Type=notify for real: a `vmha agent` and a manager process, with a unix datagram socket of ours as
systemd's NOTIFY_SOCKET, send READY=1 only once really working (heartbeats beating on every plane;
campaigning in etcd), then WATCHDOG=1 at half of WATCHDOG_USEC, and STOPPING=1 at a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha.core.planes import PLANES, Plane
from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import ProxiedHost
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
WATCHDOG_USEC = "1000000"  # WatchdogSec=1: a ping every 0.5 s


class Systemd:
    """The notify socket's end systemd holds: every datagram received, as lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": WATCHDOG_USEC}

    def read(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.lines += self.sock.recv(4096).decode().split("\n")
        return self.lines


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    s = Systemd(tmp_path / "notify")
    yield s
    s.sock.close()


async def test_agent_ready_once_every_plane_beats(tmp_path: Path, etcd: EtcdProcess, systemd: Systemd) -> None:
    host = await ProxiedHost.create(tmp_path, "t", "h1", "r1", etcd)
    # A cut plane at start: no READY while it has not beaten (READY_WAIT is 30 s).
    await host.cut(Plane.SERVICE)
    try:
        await host.start_agent(env=systemd.env())
        def beating(plane: Plane) -> bool:
            status = host.status()
            return status is not None and status["planes"][plane.value]["seq"] > 0

        await until(lambda: beating(Plane.MANAGEMENT) and beating(Plane.STORAGE), "two planes beating")
        pings = systemd.read().count("WATCHDOG=1")
        await until(lambda: systemd.read().count("WATCHDOG=1") >= pings + 2, "the watchdog fed while not ready")
        assert "READY=1" not in systemd.read(), systemd.lines
        host.restore(Plane.SERVICE)
        await until(lambda: "READY=1" in systemd.read(), "READY=1 once service beats", timeout=15)
        ready_at = systemd.lines.index("READY=1")
        # READY said so from the agent's own view, which names all three planes beating:
        assert systemd.lines[ready_at + 1] == "STATUS=host h1: heartbeats on 3/3 planes", systemd.lines
        # and its status file (written every keepalive interval) agrees soon after.
        await until(lambda: all(beating(p) for p in PLANES), "every plane beating in the status file", timeout=5)
        pings = systemd.lines.count("WATCHDOG=1")
        await until(lambda: systemd.read().count("WATCHDOG=1") >= pings + 2, "the watchdog fed when ready")
        await host.stop_agent()
        assert "STOPPING=1" in systemd.read(), systemd.lines
    finally:
        await host.close()


async def test_manager_ready_once_campaigning(tmp_path: Path, etcd: EtcdProcess, systemd: Systemd) -> None:
    url = etcd.client_urls[0]
    cfg = tmp_path / "vmha.toml"
    planes = "".join(f'[planes.{p.value}]\nendpoints = ["{url}"]\n' for p in PLANES)
    cfg.write_text(f'[cluster]\nname = "sd"\n{planes}[manager]\nname = "m1"\nendpoints = ["{url}"]\ndriver = "lab"\n'
                   + etcd.toml())
    env = {**os.environ, **systemd.env(), "VMHA_TEST_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(HERE / "manager"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # etcd frozen: the manager cannot campaign, so it is not ready (but its loop runs: the watchdog is fed).
    etcd.signal(signal.SIGSTOP)
    log = tmp_path / "manager.log"
    with open(log, "wb") as out:
        # The tests' manager entry point: a real Manager (election, campaign) with recording parts.
        proc = subprocess.Popen([sys.executable, str(HERE / "manager" / "recording_parts.py"), str(cfg)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        await until(lambda: systemd.read().count("WATCHDOG=1") >= 3, "the watchdog fed while etcd is paused")
        assert "READY=1" not in systemd.read(), systemd.lines
        etcd.signal(signal.SIGCONT)
        await until(lambda: "READY=1" in systemd.read(), "READY=1 once campaigning", timeout=20)
        await until(lambda: "STATUS=manager m1: leading" in systemd.read(), "the status says leading")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        assert "STOPPING=1" in systemd.read(), systemd.lines
    finally:
        etcd.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
