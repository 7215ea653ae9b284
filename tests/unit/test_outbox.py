"""The outbox: a destination's failures, expected or not, cost only its own items, and are kept."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmha.manager.outbox import Outbox, Undelivered
from vmha.testing.wait import until


@dataclass(frozen=True)
class Retry:
    undelivered: Path
    attempts: int = 2
    retry_base: float = 0.01
    retry_cap: float = 0.01


async def test_a_sender_that_raises_anything_keeps_its_worker_and_the_item_is_kept(tmp_path: Path) -> None:
    # A sender's bug (here a KeyError on one payload) used to end that destination's worker: every
    # later item for it waited forever, unlogged.
    got: list[int] = []

    async def deliver(payload: dict[str, Any]) -> None:
        if payload["n"] == 1:
            raise KeyError("boom")
        if payload["n"] == 2:
            raise Undelivered("refused")
        got.append(payload["n"])

    counted: list[int] = []
    box = Outbox("webhook", Retry(tmp_path / "undelivered.jsonl"), {"http://x": deliver}, lambda: counted.append(1))
    task = asyncio.create_task(box.run())
    try:
        for n in range(4):
            box.put({"n": n}, f"item {n}")
        await until(lambda: got == [0, 3], "items 0 and 3 delivered after the failures", timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [json.loads(line) for line in (tmp_path / "undelivered.jsonl").read_text().splitlines()]
    assert [(e["alert"]["n"], e["error"]) for e in lines] == [
        (1, "KeyError: 'boom' after 2 attempt(s)"),
        (2, "refused after 2 attempt(s)"),
    ]
    assert len(counted) == 2
