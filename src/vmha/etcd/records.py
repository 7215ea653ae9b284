"""Evidence records and the decision stream, in etcd.

records/<vm>/<n>: the evidence record of recovery n of the VM (core/queue.py Task.to_dict(): failed
  planes and since when, the policy row and action, the proof, each step with timestamps and
  result). Written by the leader when a recovery ends, in the same transaction as the task's final
  state (TaskStore.write); `vmha recovery show VM` reads it.
events/<seq>: one decision or alert per key, seq increasing across leaders. Bounded: each append
  deletes what falls beyond the newest `keep` events in the same transaction. `vmha events` lists
  and follows it.

Writes are leader-only (election.leader_txn): a deposed leader neither records nor announces.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import transactions as tx

from vmha.core.queue import Task
from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient, encode_json
from vmha.etcd.election import Leadership, leader_txn
from vmha.etcd.keys import Keys
from vmha.etcd.tasks import parse_task
from vmha.etcd.values import refused
from vmha.etcd.watch import Put, Snapshot, watch_prefix

log = logging.getLogger("vmha.manager.records")

KEEP_EVENTS = 5000
_CHUNK = 100  # events per transaction (etcd allows 128 operations)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the decision stream."""

    seq: int
    t: float  # unix time the manager wrote it
    level: str  # info / warn / err
    actor: str  # manager / health
    text: str
    kind: str = "log"  # log: a decision or state change; alert: the operator must look

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "t": self.t,
            "level": self.level,
            "actor": self.actor,
            "text": self.text,
            "kind": self.kind,
        }



def _event(kv: KV, value: Any) -> Event | None:
    try:
        v = values.parse(values.EventValue, kv, value)
    except BadValue as e:
        refused(e, kv)
        return None
    return Event(v.seq, v.t, v.level, v.actor, v.text, v.kind)


class RecordStore:
    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def records(self, vm: str) -> list[Task]:
        """The VM's recovery records, oldest first; unreadable ones are logged and skipped."""
        kvs, _ = await self.client.get_prefix(self.keys.records_prefix(vm))
        out: list[Task] = []
        for kv in kvs:
            try:
                out.append(parse_task(kv))
            except BadValue as e:
                refused(e, kv)
        return sorted(out, key=lambda t: t.recovery)

    async def history(self, vm: str) -> list[Task]:
        """Every recovery of the VM, oldest first: its records, and its task under tasks/ (the newest
        state of the newest recovery; a finished one is also a record). Unreadable values are skipped."""
        shown = {t.recovery: t for t in await self.records(vm)}
        kv = await self.client.get(self.keys.task(vm))
        if kv is not None:
            try:
                current = parse_task(kv)
            except BadValue as e:
                refused(e, kv)
            else:
                if current.vm == vm:
                    shown[current.recovery] = current
        return [shown[n] for n in sorted(shown)]


class EventLog:
    """The decision stream. The leader calls `start()` once per leadership, then `append()`."""

    def __init__(self, client: EtcdClient, keys: Keys, keep: int = KEEP_EVENTS) -> None:
        self.client = client
        self.keys = keys
        self.keep = keep
        self._next = 1
        self._oldest = 1

    async def _seqs(self) -> list[int]:
        prefix = self.keys.events_prefix.encode()

        async def op(c: aetcd.Client) -> Any:
            return await c.get_prefix(prefix, keys_only=True)

        r = await self.client.call(op)
        seqs = []
        for kv in r.kvs:
            try:
                seqs.append(int(bytes(kv.key)[len(prefix) :]))
            except ValueError:
                log.warning("event key %r skipped: not a sequence number", bytes(kv.key))
        return sorted(seqs)

    async def start(self) -> None:
        """Continue the sequence after the newest event (written by any earlier leader)."""
        seqs = await self._seqs()
        self._oldest = seqs[0] if seqs else 1
        self._next = seqs[-1] + 1 if seqs else 1

    async def append(self, lead: Leadership, events: Sequence[tuple[str, str, str, str]], t: float) -> None:
        """Append (level, actor, text, kind) entries; prune the oldest beyond `keep`."""
        for i in range(0, len(events), _CHUNK):
            chunk = events[i : i + _CHUNK]
            if not await self._append(lead, chunk, t):
                # Someone (an earlier leader whose write we did not see) used these seqs: skip past.
                await self.start()
                if not await self._append(lead, chunk, t):
                    log.warning("%d event(s) not recorded: sequence numbers taken", len(chunk))

    async def _append(self, lead: Leadership, chunk: Sequence[tuple[str, str, str, str]], t: float) -> bool:
        first = self._next
        keys = [self.keys.event(first + j).encode() for j in range(len(chunk))]
        ops: list[Any] = [
            tx.Put(k, encode_json(Event(first + j, t, *e).to_dict()))
            for j, (k, e) in enumerate(zip(keys, chunk, strict=True))
        ]
        floor = first + len(chunk) - self.keep
        if floor > self._oldest:
            ops.append(tx.Delete(self.keys.event(self._oldest).encode(), self.keys.event(floor).encode()))
        # Create-if-absent: a seq another leader already used is never overwritten.
        if await leader_txn(self.client, lead, [tx.Mod(k) == 0 for k in keys], ops) is None:
            return False
        self._next = first + len(chunk)
        self._oldest = max(self._oldest, floor)
        return True

    async def tail(self, count: int) -> tuple[list[Event], int]:
        """The newest `count` events (oldest first) and the revision to follow from."""
        kvs, revision = await self.client.get_prefix(self.keys.events_prefix)
        out = []
        for kv in kvs[-count:] if count > 0 else []:
            try:
                ev = _event(kv, kv.json())
            except BadValue as e:
                refused(e, kv)
                continue
            if ev is not None:
                out.append(ev)
        return out, revision

    async def follow(self, revision: int) -> AsyncIterator[Event]:
        """Events written after `revision`, forever (the watch resumes after broken streams)."""
        async for item in watch_prefix(self.client, self.keys.events_prefix, start_revision=revision + 1):
            if isinstance(item, Put):
                ev = _event(item.kv, item.value)
                if ev is not None:
                    yield ev
            elif isinstance(item, Snapshot):
                # After a compaction the stream restarts from a listing: events missed are lost to
                # the follower (not to etcd); say so rather than replay everything.
                log.warning("event stream resumed after compaction; some events were not shown")


__all__ = ["KEEP_EVENTS", "Event", "EventLog", "RecordStore"]
