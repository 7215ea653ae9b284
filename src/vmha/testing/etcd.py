"""EtcdProcess: a real etcd (/usr/bin/etcd) with its own data directory, started and stopped by PID.

    with EtcdProcess() as e:                      # 127.0.0.1, free ports, temporary data dir
        client = EtcdClient(e.client_urls)

    EtcdProcess(data_dir, client_urls=["http://198.18.0.1:2379", "http://198.19.0.1:2379"],
                peer_url="http://198.18.0.1:2380", netns="lab-ctl").start()

Several client URLs make one member reachable through several planes (one address per plane).
A cluster of several members: give each the same ``initial_cluster`` ("n1=peer1,n2=peer2,...").

With ``pki`` (vmha.lab.pki.Pki) etcd serves its clients over TLS only (https:// URLs) and requires
a client certificate signed by the PKI's CA (--client-cert-auth; the CN is the etcd user). An https://
peer URL makes the members talk to each other over TLS too, with the PKI's peer certificate:

    with EtcdProcess(pki=Pki(tmp_path / "pki")) as e:
        client = EtcdClient(e.client_urls, tls=e.tls("h1"))   # a certificate with CN h1
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from vmha.etcd.auth import ROOT, setup_auth
from vmha.etcd.client import EtcdClient
from vmha.etcd.tls import TlsFiles
from vmha.lab.pki import PEER, Pki
from vmha.testing.process import stop_process

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


class EtcdStartError(RuntimeError):
    """etcd did not become healthy in time; the message carries the tail of its log."""


def free_ports(n: int, address: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``address`` now (the kernel picks them: bind to port 0).
    All sockets stay open until every port is picked: closed one by one, the kernel may hand out the
    same port twice (an etcd got one port for its client and its peer URL)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((address, 0))
            ports.append(s.getsockname()[1])
        return ports


class EtcdProcess:
    def __init__(
        self,
        data_dir: str | Path | None = None,
        client_urls: list[str] | None = None,
        peer_url: str | None = None,
        netns: str | None = None,
        name: str = "etcd0",
        initial_cluster: str | None = None,
        ready_timeout: float = 20.0,
        extra_args: list[str] | None = None,
        pki: Pki | None = None,
    ) -> None:
        # Without a data dir we own a temporary one and delete it on stop().
        self._own_dir = data_dir is None
        self.base = Path(tempfile.mkdtemp(prefix="vmha-etcd-")) if data_dir is None else Path(data_dir)
        self.data_dir = self.base / "data" if self._own_dir else self.base
        self.log_path = (self.base if self._own_dir else self.base.parent) / f"{name}.log"
        client_port, peer_port = free_ports(2)
        self.pki = pki
        scheme = "http" if pki is None else "https"
        self.client_urls = client_urls or [f"{scheme}://127.0.0.1:{client_port}"]
        self.peer_url = peer_url or f"http://127.0.0.1:{peer_port}"
        self.netns = netns
        self.name = name
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.ready_timeout = ready_timeout
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def tls(self, user: str = ROOT) -> TlsFiles | None:
        """The TLS files of etcd user ``user`` (made on first use); None for a plaintext etcd."""
        return None if self.pki is None else self.pki.issue(user)

    def toml(self, user: str = ROOT) -> str:
        """The [etcd] section of a vmha config connecting as ``user``."""
        tls = self.tls(user)
        if tls is None:
            return "[etcd]\ninsecure = true\n"
        return "[etcd]\n" + "".join(f"{f} = {json.dumps(str(getattr(tls, f)))}\n" for f in ("ca", "cert", "key"))

    async def setup_auth(self, cluster: str, hosts: Sequence[str] = (), managers: Sequence[str] = ()) -> None:
        """`vmha etcd setup-auth` for these users (as root): auth is on from here."""
        async with EtcdClient(self.client_urls, timeout=5.0, name="setup-auth", tls=self.tls(ROOT)) as c:
            await setup_auth(c, cluster, hosts, managers)

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        ips = sorted({str(urlsplit(u).hostname) for u in self.client_urls})
        self.pki.create(ips, [ROOT])
        server = self.pki.client("etcd-server")
        args = ["--cert-file", str(server.cert), "--key-file", str(server.key), "--client-cert-auth",
                "--trusted-ca-file", str(server.ca)]  # fmt: skip
        if self.peer_url.startswith("https://"):
            # One certificate for every member: its SANs are all the peer addresses of the cluster.
            peers = [u for part in self.initial_cluster.split(",") for u in part.partition("=")[2:]]
            peer = self.pki.issue(PEER, sorted({str(urlsplit(u).hostname) for u in peers}))
            args += ["--peer-cert-file", str(peer.cert), "--peer-key-file", str(peer.key),
                     "--peer-client-cert-auth", "--peer-trusted-ca-file", str(peer.ca)]  # fmt: skip
        return args

    def _ctl_tls(self) -> list[str]:
        tls = self.tls()
        return [] if tls is None else [f"--cacert={tls.ca}", f"--cert={tls.cert}", f"--key={tls.key}"]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def _prefix(self) -> list[str]:
        # `ip netns exec` execs the command after setns: the PID we get is etcd's own.
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def command(self) -> list[str]:
        urls = ",".join(self.client_urls)
        return [
            *self._prefix(),
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", urls,
            "--advertise-client-urls", urls,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> EtcdProcess:
        if self.proc is not None:
            raise RuntimeError(f"etcd {self.name} already started (pid {self.proc.pid})")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait:
            self.wait_ready()
        return self

    def healthy(self, timeout: float = 1.0) -> bool:
        """One `etcdctl endpoint health` on the first client URL (from inside the netns, if any)."""
        cmd = [
            *self._prefix(), ETCDCTL, f"--endpoints={self.client_urls[0]}", *self._ctl_tls(),
            f"--dial-timeout={timeout}s", f"--command-timeout={timeout}s", "endpoint", "health",
        ]  # fmt: skip
        try:
            r = subprocess.run(
                cmd, capture_output=True, timeout=timeout + 2, env={**os.environ, "ETCDCTL_API": "3"}
            )
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.1)
        raise EtcdStartError(f"etcd {self.name} not healthy after {self.ready_timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to our etcd (SIGSTOP / SIGCONT freeze it, as a hung member would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0, remove_data: bool = True) -> None:
        """SIGTERM our PID (SIGKILL after ``timeout``), then remove the data we own."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout)
        if remove_data:
            shutil.rmtree(self.base if self._own_dir else self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL (a crash): the data directory stays, start() again resumes from it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = ["ETCD", "EtcdProcess", "EtcdStartError", "free_ports"]
