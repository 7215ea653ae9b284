"""Deliveries that never block the manager's loop: alerts to webhooks, notifications to the message bus.

    box = Outbox("webhook", cfg, {redacted_url: deliver}, metrics.webhook_undelivered)
    task = asyncio.create_task(box.run())
    box.put(payload, summary)            # never blocks, never raises

One worker per destination, in order: a destination that is down delays only its own items. `deliver`
returns once the destination took the item, or raises Undelivered (its text says why): then it is
retried `attempts` times with exponential backoff (retry_base, doubling, capped at retry_cap). An item
that still was not delivered, or was waiting when the manager stopped, is appended to the undelivered
log (one JSON object a line: url, alert, error, t), logged as an error and counted: never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("vmha.manager.outbox")

Deliver = Callable[[dict[str, Any]], Awaitable[None]]


class Undelivered(Exception):
    """The destination did not take the item; the text says why (no secrets)."""


class RetrySettings(Protocol):
    """[alerts] and [notifications] both carry these."""

    @property
    def attempts(self) -> int: ...
    @property
    def retry_base(self) -> float: ...
    @property
    def retry_cap(self) -> float: ...
    @property
    def undelivered(self) -> Path: ...


class Outbox:
    def __init__(self, kind: str, cfg: RetrySettings, destinations: Mapping[str, Deliver],
                 counted: Callable[[], None]) -> None:  # fmt: skip
        self.kind = kind  # "webhook", "notification bus": the logs' first word
        self.cfg = cfg
        self.destinations = dict(destinations)  # shown name (its password redacted) -> deliver
        self.counted = counted  # the metric of items given up on
        self._queues: dict[str, asyncio.Queue[tuple[dict[str, Any], str]]] = {
            name: asyncio.Queue() for name in destinations}  # fmt: skip

    def put(self, payload: dict[str, Any], summary: str) -> None:
        """Queue `payload` for every destination; `summary` names it in the logs."""
        for q in self._queues.values():
            q.put_nowait((payload, summary))

    async def run(self) -> None:
        """Deliver until cancelled; what is still queued then goes to the undelivered log."""
        workers = [asyncio.create_task(self._worker(name, q)) for name, q in self._queues.items()]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            for w in workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await w
            for name, q in self._queues.items():
                while not q.empty():
                    self._undelivered(name, *q.get_nowait(), "the manager stopped before delivering it")

    async def _worker(self, name: str, q: asyncio.Queue[tuple[dict[str, Any], str]]) -> None:
        while True:
            payload, summary = await q.get()
            try:
                await self._deliver(name, payload, summary)
            except asyncio.CancelledError:
                self._undelivered(name, payload, summary, "the manager stopped while delivering it")
                raise

    async def _deliver(self, name: str, payload: dict[str, Any], summary: str) -> None:
        error = ""
        for attempt in range(1, self.cfg.attempts + 1):
            try:
                await self.destinations[name](payload)
            except Undelivered as e:
                error = str(e)
            except Exception as e:  # a sender's bug must not end this destination's worker
                log.exception("%s %s: delivering %s failed unexpectedly", self.kind, name, summary)
                error = f"{type(e).__name__}: {e}"
            else:
                return
            if attempt < self.cfg.attempts:
                delay = min(self.cfg.retry_base * 2 ** (attempt - 1), self.cfg.retry_cap)
                log.warning("%s %s: %s not delivered (%s), attempt %d of %d; retrying in %g s",
                            self.kind, name, summary, error, attempt, self.cfg.attempts, delay)  # fmt: skip
                await asyncio.sleep(delay)
        self._undelivered(name, payload, summary, f"{error} after {self.cfg.attempts} attempt(s)")

    def _undelivered(self, name: str, payload: dict[str, Any], summary: str, error: str) -> None:
        self.counted()
        log.error("%s %s: %s NOT delivered (%s); kept in %s", self.kind, name, summary, error,
                  self.cfg.undelivered)  # fmt: skip
        line = json.dumps({"url": name, "alert": payload, "error": error, "t": round(time.time(), 3)}, sort_keys=True)
        try:
            self.cfg.undelivered.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cfg.undelivered, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            log.error("cannot write the undelivered log %s: %s", self.cfg.undelivered, e)


__all__ = ["Deliver", "Outbox", "RetrySettings", "Undelivered"]
