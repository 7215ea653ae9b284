"""systemd's service notification protocol (sd_notify(3)) for the daemons' Type=notify units, without
libsystemd: one datagram of "KEY=value" lines to the unix socket $NOTIFY_SOCKET names.

- READY=1 once the daemon really works (its `ready()` says so), not when the process started;
- WATCHDOG=1 every half of WatchdogSec ($WATCHDOG_USEC), sent from a task of the daemon's event loop:
  a hung loop stops feeding it and systemd restarts the unit;
- STATUS= whenever the daemon's one-line status changes (`systemctl status` shows it);
- STOPPING=1 when a clean stop begins.

Outside systemd ($NOTIFY_SOCKET unset) nothing is sent. A failing socket is logged, never fatal:
the daemon's work matters more than its supervisor's bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("vmha.sdnotify")

IDLE_PERIOD = 5.0  # seconds between STATUS checks when systemd asked for no watchdog
READY_POLL = 0.1  # seconds between readiness checks before READY=1


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=...") to systemd; False if not under systemd or not sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: systemd not notified", address)
        return False
    # One line per field: a newline inside a value would forge another field.
    payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(payload, address)
    except OSError as e:
        log.warning("cannot notify systemd at %s (%s): %s", os.environ.get("NOTIFY_SOCKET"), fields[0], e)
        return False
    return True


def watchdog_period() -> float | None:
    """How often to send WATCHDOG=1 (half of $WATCHDOG_USEC), or None: no watchdog asked for this
    process (unset, meant for another PID, or not a positive integer)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
        if value <= 0:
            raise ValueError("not positive")
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a positive integer: the systemd watchdog is not fed", usec)
        return None
    return value / 1e6 / 2


async def supervise(ready: Callable[[], str | None]) -> None:
    """Run as a task of the daemon's event loop until cancelled. ``ready()`` is None until the daemon
    really works, then its one-line status. Feeds the watchdog from the start: a daemon still getting
    ready (joining a lockspace, waiting for etcd) is not hung."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    period = watchdog_period()
    beat = period if period is not None else IDLE_PERIOD
    shown: str | None = None
    last_beat = 0.0
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        status = ready()
        fields = []
        if period is not None and now - last_beat >= period:
            fields.append("WATCHDOG=1")
            last_beat = now
        if status is not None and status != shown:
            fields += ["READY=1", f"STATUS={status}"] if shown is None else [f"STATUS={status}"]
            if shown is None:
                log.info("systemd notified: ready (%s)", status)
            shown = status
        if fields:
            notify(*fields)
        await asyncio.sleep(READY_POLL if shown is None else min(beat, IDLE_PERIOD))


def stop_handler(stop: asyncio.Event, who: str) -> Callable[[], None]:
    """A SIGTERM/SIGINT handler: tell systemd the clean stop has begun (it can take a few seconds), set `stop`."""

    def handler() -> None:
        if not stop.is_set():
            notify("STOPPING=1", f"STATUS={who}: stopping")
        stop.set()

    return handler


__all__ = ["notify", "stop_handler", "supervise", "watchdog_period"]
