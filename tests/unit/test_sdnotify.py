"""sd_notify over a real unix datagram socket: READY only once ready, the watchdog fed from the loop,
STATUS on change, nothing at all outside systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield s
    s.close()


def received(s: socket.socket) -> list[str]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out += s.recv(4096).decode().split("\n")
    return out


def test_notify_sends_one_datagram_of_fields(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=two\nlines")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_nothing_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not sdnotify.notify("READY=1")


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vmha-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid", "period"),
    [("", "", None), ("4000000", "", 2.0), ("4000000", "self", 2.0), ("4000000", "1", None),
     ("0", "", None), ("soon", "", None)],
)  # fmt: skip
def test_watchdog_period(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str, period: float | None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_period() == period


async def test_ready_only_once_ready_watchdog_meanwhile(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    status: list[str | None] = [None]
    task = asyncio.create_task(sdnotify.supervise(lambda: status[0]))
    try:
        await asyncio.sleep(0.35)
        before = received(notify_socket)
        assert "READY=1" not in before and before.count("WATCHDOG=1") >= 2
        status[0] = "beating"
        await asyncio.sleep(0.3)
        after = received(notify_socket)
        assert after.count("READY=1") == 1 and "STATUS=beating" in after
        status[0] = "beating; unreachable: storage"
        await asyncio.sleep(0.3)
        later = received(notify_socket)
        assert "READY=1" not in later and "STATUS=beating; unreachable: storage" in later
        assert "WATCHDOG=1" in later
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_blocked_loop_starves_the_watchdog(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog is fed by the loop itself: a loop blocked in a call sends nothing meanwhile."""
    import time

    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    task = asyncio.create_task(sdnotify.supervise(lambda: "ok"))
    try:
        await asyncio.sleep(0.2)
        received(notify_socket)
        time.sleep(0.5)  # the hung loop
        assert received(notify_socket) == []
        await asyncio.sleep(0.15)
        assert "WATCHDOG=1" in received(notify_socket)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_stop_handler_says_stopping_once(notify_socket: socket.socket) -> None:
    stop = asyncio.Event()
    handler = sdnotify.stop_handler(stop, "agent of h1")
    handler()
    handler()
    assert stop.is_set()
    assert received(notify_socket) == ["STOPPING=1", "STATUS=agent of h1: stopping"]
