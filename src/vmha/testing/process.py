"""Stopping a process the tests started, by its Popen (so by PID, never by name)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout``; reaped either way."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)  # a stopped process (SIGSTOP: a frozen member) would not handle SIGTERM
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
