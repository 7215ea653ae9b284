"""LAB / TEST ONLY: a sanlock daemon per simulated host, without a watchdog.

Production runs the distribution's sanlock daemon (systemd unit, `sanlock daemon` with its wdmd
watchdog, default run dir /run/sanlock): a host that cannot stop its lease holders in time is
reset by the watchdog, which is what makes host_dead safe. Nothing here is for production:
- `-w 0` disables the watchdog (this machine has no watchdog device). A killed daemon whose lease
  holders survive is then a split brain that the lab itself creates; simulate a power loss by
  killing every process of the host, never the daemon alone.
- An LD_PRELOAD shim (setrlimit_shim.c) hides the sandbox's refusal to raise RLIMIT_MEMLOCK and
  RLIMIT_RTPRIO, without which the daemon exits at start.
- Several daemons share one machine, each with its own socket directory: either SANLOCK_RUN_DIR
  (tests) or a private mount namespace entered with a command prefix such as
  `nsenter -t ANCHOR -m -n --` (the lab's per-host anchors, vmha.lab.net.Node.enter).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmha.lab.net import pid_alive

SHIM_SOURCE = Path(__file__).with_name("setrlimit_shim.c")
SHIM_CACHE = Path(os.environ.get("VMHA_LAB_CACHE", "/var/tmp/vmha-lab"))


class SanlockdError(Exception):
    """The lab's sanlock daemon could not be built, started or stopped; the message says why."""


def build_shim(cache_dir: Path = SHIM_CACHE) -> Path:
    """The compiled shim, built with gcc once per source version (cached by content hash)."""
    src = SHIM_SOURCE.read_bytes()
    so = cache_dir / f"setrlimit_shim-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if so.exists():
        return so
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    try:
        cp = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except FileNotFoundError:
        raise SanlockdError("gcc not found: install it (scripts/setup.sh) to build the lab's sanlock shim") from None
    if cp.returncode != 0:
        raise SanlockdError(f"building {SHIM_SOURCE} failed: {cp.stderr.strip()}")
    os.replace(tmp, so)  # atomic: concurrent builders never load a half-written library
    return so


@dataclass(frozen=True, slots=True)
class LabSanlock:
    """A running lab daemon: its host name (-e), pid, and how to reach it."""

    name: str
    pid: int
    run_dir: Path | None  # SANLOCK_RUN_DIR, or None: /run/sanlock inside the entered namespace
    enter: tuple[str, ...]  # command prefix for clients of this daemon ("" when none)

    def env(self) -> dict[str, str]:
        """Environment for a client process of this daemon."""
        env = dict(os.environ)
        if self.run_dir is not None:
            env["SANLOCK_RUN_DIR"] = str(self.run_dir)
        else:
            env.pop("SANLOCK_RUN_DIR", None)
        return env

    def client(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Runs `sanlock client ARGS` against this daemon."""
        return subprocess.run(
            [*self.enter, "sanlock", "client", *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout, check=False,
        )


def start_sanlock(
    name: str,
    *,
    run_dir: Path | None = None,
    enter: Sequence[str] = (),
    kill_grace: int | None = None,
    log_path: Path | None = None,
    timeout: float = 15.0,
) -> LabSanlock:
    """Starts `sanlock daemon -D -w 0` for lab host `name` and waits until its socket answers.

    kill_grace: sanlock's -g, seconds between SIGTERM and SIGKILL of the holders of a lost lockspace
    (default 40).
    """
    if run_dir is None and not enter:
        raise SanlockdError(
            f"sanlock for {name}: give run_dir (SANLOCK_RUN_DIR) or an enter prefix (private mount "
            "namespace); the default /run/sanlock belongs to the system daemon"
        )
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    shim = build_shim()
    cmd = [*enter, "env", f"LD_PRELOAD={shim}",
           "sanlock", "daemon", "-D", "-w", "0", "-l", "0", "-U", "root", "-G", "root",
           "-L", "-1", "-S", "-1", "-e", name]
    if kill_grace is not None:
        cmd += ["-g", str(kill_grace)]
    out: int = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    d = LabSanlock(name=name, pid=0, run_dir=run_dir, enter=tuple(enter))
    try:
        # nsenter and env exec in place: the Popen pid is the daemon's.
        proc = subprocess.Popen(cmd, env=d.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    finally:
        if out != subprocess.DEVNULL:
            os.close(out)
    d = LabSanlock(name=name, pid=proc.pid, run_dir=run_dir, enter=tuple(enter))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SanlockdError(f"sanlock for {name} exited with {proc.returncode} at start (log: {log_path})")
        try:
            if d.client("gets", timeout=5.0).returncode == 0:
                return d
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.05)
    stop_sanlock(d)
    raise SanlockdError(f"sanlock for {name}: socket did not answer within {timeout:.0f} s (log: {log_path})")


def stop_sanlock(d: LabSanlock, *, timeout: float = 10.0) -> None:
    """Stops the daemon by pid: SIGTERM, SIGKILL when it lingers; reaps it if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(d.pid, sig)
        except ProcessLookupError:
            return
        # sanlock ignores SIGTERM while it holds a lockspace: a short grace, then SIGKILL.
        deadline = time.monotonic() + (1.0 if sig == signal.SIGTERM else timeout)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(d.pid, os.WNOHANG)
            except ChildProcessError:  # not our child: poll for its disappearance instead
                done = 0 if pid_alive(d.pid) else d.pid
            if done:
                return
            time.sleep(0.05)
    raise SanlockdError(f"sanlock for {d.name} (pid {d.pid}) survived SIGKILL")
