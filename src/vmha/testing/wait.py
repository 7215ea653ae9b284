"""Waiting in tests for what a real component does: poll a check until it holds, or fail naming it.

    await until(lambda: recorder.plane_changes(), "h2's storage change recorded", timeout=20)
    leader = await until(current_leader, "a leader")      # an async check works too; its value returns
    until_sync(lambda: writing_on(state, "vm1", "h2", t), "vm1 writing on h2", timeout=30)  # blocking tests

Poll the view the test then asserts on: waiting on one view and asserting on another races (two views
of one event are updated at different moments).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _late(what: str, timeout: float, started: float) -> AssertionError | None:
    return AssertionError(f"not within {timeout} s: {what}") if time.monotonic() - started > timeout else None


async def until(check: Callable[[], T | Awaitable[T]], what: str, *, timeout: float = 15.0,
                interval: float = 0.05) -> T:  # fmt: skip
    """The first truthy value of `check()` (awaited when it is a coroutine), polled every `interval`;
    AssertionError naming `what` when `timeout` seconds passed without one."""
    started = time.monotonic()
    while True:
        got = check()
        value: T = await got if inspect.isawaitable(got) else got
        if value:
            return value
        if late := _late(what, timeout, started):
            raise late
        await asyncio.sleep(interval)


def until_sync(check: Callable[[], T], what: str, *, timeout: float = 15.0, interval: float = 0.05) -> T:
    """until() for a test that blocks (no event loop)."""
    started = time.monotonic()
    while True:
        if value := check():
            return value
        if late := _late(what, timeout, started):
            raise late
        time.sleep(interval)
