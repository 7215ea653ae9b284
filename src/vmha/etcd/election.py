"""Leader election of the managers through etcd.

    election = Election(client, keys.leader, name="mgr-a", ttl=2)
    leadership = await election.campaign()     # returns once this manager is the leader
    ... act while not leadership.lost.is_set() ...
    await election.resign()

How it works:
- Campaign: grant a lease of `ttl` seconds and write keys.leader = {"name", "lease"} on it in a
  transaction that succeeds only if the key is absent (create_revision == 0). The exact bytes
  written are the leadership's token: every leader-only write (tasks.py, records.py) compares the
  leader key's value with it in the same transaction, so a deposed leader cannot write.
- A standby whose campaign failed watches the key and campaigns again when it is deleted (the
  leader resigned or its lease expired). The watch is re-armed at least every `ttl` seconds with a
  fresh read, so a silently dead watch stream delays a takeover by one TTL at most.
- The leader refreshes its lease every ttl/6. Leadership is LOST (the `lost` event is set, and
  `on_lost` is called once) as soon as:
    * etcd answers that the lease is gone (TTL <= 0), or the key no longer holds our token, or
    * no keepalive succeeded for 0.9 TTL, counted from the SEND time of the last successful one.
  The last rule is the safety margin: etcd expires the lease no earlier than TTL after it received
  that keepalive, which is after we sent it, so a manager cut off from etcd stops acting before
  another one can be elected (with a tenth of the TTL to spare for a busy event loop). Nothing an
  unreachable or leaderless member answers moves that deadline: a majority we cannot see may have
  a leader, and it expires our lease on time.
  Once lost, a Leadership never comes back: the daemon campaigns anew.
- An etcd leader change (one to two etcd election timeouts, 1 to 2 s by default) is ridden out, not
  waited out: after a failed keepalive the next one goes at once to another member, so the first
  answer after the new etcd leader is elected renews the term. A term survives an outage of
  `ride_out(ttl)` seconds whatever its phase (config.py checks election_ttl against etcd's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rtypes
from aetcd import transactions as tx

from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdError, cancel_watch, cancelling, encode_json
from vmha.etcd.quorum import QuorumWatch
from vmha.etcd.values import refused

log = logging.getLogger("vmha.manager.election")

MARGIN = 0.1  # of the TTL, kept in hand for the event loop's own lateness (a long decision step)
REFRESHES = 6  # keepalives per TTL: the last success is at most ttl/6 old when etcd loses its leader
RETRY = 0.05  # s between keepalive attempts after a failure (etcd's own forwarding retries every 50 ms)


def ride_out(ttl: float) -> float:
    """The longest etcd outage (an etcd leader election) a term of `ttl` seconds survives in its worst
    phase: the deadline (ttl less the margin) less the age of the last successful keepalive."""
    return ttl * (1 - MARGIN - 1 / REFRESHES)


@dataclass(slots=True)
class Leadership:
    """This manager's term as leader. `token` is the exact value of the leader key."""

    name: str
    key: str
    lease: int
    token: bytes
    since: float  # Election.clock() (time.monotonic()) when elected
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""  # why it was lost
    on_lost: Callable[[Leadership], None] | None = None

    @property
    def active(self) -> bool:
        return not self.lost.is_set()

    def end(self, reason: str, *, resigned: bool = False) -> None:
        """Stop acting now (idempotent): the one place a leadership ends."""
        if not self.active:
            return
        self.reason = reason
        self.lost.set()
        if resigned:
            log.info("manager %s: resigned leadership (%s)", self.name, reason)
        else:
            log.warning("manager %s: leadership lost: %s; stopping all actions", self.name, reason)
        if self.on_lost is not None:
            self.on_lost(self)


class NotLeader(EtcdError):
    """A leader-only write was refused: the leader key no longer holds our token."""


async def leader_txn(client: EtcdClient, lead: Leadership, compare: list[Any], success: list[Any]) -> int | None:
    """Apply `success` only if this manager is still the leader and every `compare` holds.

    Returns the revision of the write, or None if one of `compare` failed (the caller reloads).
    If the leader key no longer holds our token, the leadership ends and NotLeader is raised: a
    deposed leader never writes, even when its own keepalive has not noticed yet.
    """
    if not lead.active:
        raise NotLeader(f"manager {lead.name}: not the leader ({lead.reason})")
    k = lead.key.encode()

    async def op(c: aetcd.Client) -> tuple[bool, list[Any]]:
        ok, responses = await c.transaction(
            compare=[tx.Value(k) == lead.token, *compare], success=success, failure=[tx.Get(k)]
        )
        return bool(ok), responses

    ok, responses = await client.call(op)
    if ok:
        for r in responses:
            if r.WhichOneof("response") == "response_put":
                return int(r.response_put.header.revision)
            if r.WhichOneof("response") == "response_delete_range":
                return int(r.response_delete_range.header.revision)
        return 0
    current = [KV.from_aetcd(kv) for _, kv in responses[0]] if responses else []
    if not current or current[0].value != lead.token:
        holder = leader_name(current[0]) if current else None
        lead.end(f"a write was refused: leader key held by {holder or 'nobody'}")
        raise NotLeader(f"manager {lead.name}: leader key held by {holder or 'nobody'}")
    return None


def leader_name(kv: KV | None) -> str | None:
    """The manager named in a leader key's value, None if absent or unreadable."""
    if kv is None:
        return None
    try:
        return values.read(values.LeaderValue, kv).name
    except BadValue as e:
        refused(e, kv)
        return None


class Election:
    def __init__(
        self,
        client: EtcdClient,
        key: str,
        name: str,
        ttl: int,
        *,
        on_lost: Callable[[Leadership], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if ttl < 2:
            raise ValueError("election ttl must be at least 2 s (etcd's minimum lease TTL)")
        self.client = client
        self.key = key
        self.name = name
        self.ttl = ttl
        self.on_lost = on_lost
        self.clock = clock  # the keepalive's time and pauses: inputs, so its timing is tested on a fake clock
        self.sleep = sleep
        self.leadership: Leadership | None = None
        self.reached = False  # a campaign round got etcd's answer: campaigning, not only starting
        self._seen_leader: str | None = None  # the leader last logged by this standby
        self._keepalive: asyncio.Task[None] | None = None
        self.quorum = QuorumWatch(client, f"manager {name}")

    async def campaign(self) -> Leadership:
        """Wait until this manager is the leader; EtcdUnavailable is retried with backoff."""
        while True:
            try:
                won = await self._try()
            except EtcdError as e:
                log.warning("manager %s: campaign failed (%s); retrying", self.name, e)
                await self.quorum.failed()
                await self.client.wait_backoff()
                continue
            self.reached = True
            self.quorum.ok()
            if isinstance(won, Leadership):
                self.leadership = won
                self._keepalive = asyncio.create_task(self._keep(won), name=f"election-{self.name}")
                log.info("manager %s: elected leader (lease %x)", self.name, won.lease)
                return won
            if won:
                await self._wait_vacant(won)

    async def _try(self) -> Leadership | int:
        """One campaign: the Leadership if won, else the revision to watch the leader key from
        (0: try again at once)."""
        lease = await self.client.grant(self.ttl)
        started = self.clock()
        token = encode_json({"name": self.name, "lease": f"{lease:x}"})
        k = self.key.encode()

        async def txn(c: aetcd.Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            ok, responses = await c.transaction(
                compare=[t.create(k) == 0], success=[t.put(k, token, lease=lease)], failure=[t.get(k)]
            )
            return bool(ok), responses

        try:
            ok, responses = await self.client.call(txn)
        except BaseException:
            # The txn may have been applied although we saw no answer: revoking the lease
            # deletes the key in that case, so no one is left believing in a leader that is not.
            await self._revoke_quietly(lease)
            raise
        if ok:
            return Leadership(self.name, self.key, lease, token, started, on_lost=self.on_lost)
        await self._revoke_quietly(lease)
        current = [KV.from_aetcd(kv) for _, kv in responses[0]] if responses else []
        if not current:
            return 0  # deleted between our txn and its read: campaign again at once
        kv = current[0]
        if kv.lease == 0:
            # Written by hand (or by a tool) without a lease: it would never expire and no manager
            # would ever lead again. Remove exactly that value.
            log.error(
                "manager %s: leader key %s has no lease (value %r); removing it", self.name, self.key, kv.value[:80]
            )
            await self.client.delete_cas(self.key, kv.mod_revision)
            return 0
        holder = leader_name(kv) or "(unreadable)"
        if holder != self._seen_leader:
            self._seen_leader = holder
            log.info("manager %s: standby, leader is %s", self.name, holder)
        return kv.mod_revision + 1

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self.client.revoke(lease)
        except EtcdError as e:
            # It expires by itself within the TTL; nothing holds on it.
            log.debug("manager %s: revoking lease %x: %s", self.name, lease, e)

    async def _wait_vacant(self, from_revision: int) -> None:
        """Return when the leader key was deleted, or after one TTL (the caller then retries)."""
        watch: Any = None

        async def open_watch(c: aetcd.Client) -> Any:
            return await c.watch(self.key.encode(), start_revision=from_revision or None)

        try:
            async with asyncio.timeout(self.ttl):
                watch = await self.client.call(open_watch)
                if cancelling():  # aetcd's watch creation (3.11's wait_for) swallowed our cancellation
                    raise asyncio.CancelledError
                async for event in watch:
                    if event.kind == aetcd.rtypes.EventKind.DELETE:
                        return
        except (TimeoutError, EtcdError, aetcd.exceptions.ClientError) as e:
            if cancelling():
                raise asyncio.CancelledError from e
            # Time to re-read the key: the caller campaigns again, which is a read as well.
            log.debug("manager %s: watching %s: %r", self.name, self.key, e)
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):
                    await cancel_watch(watch)

    async def _keep(self, lead: Leadership) -> None:
        """Keep the lease alive; set `lost` when it is, or may be, gone."""
        interval = self.ttl / REFRESHES
        margin = self.ttl * MARGIN
        deadline = lead.since + self.ttl - margin  # no successful keepalive by then: stop acting
        failing: float | None = None  # when the current run of failed keepalives began
        while lead.active:
            now = self.clock()
            if now >= deadline:
                lead.end(f"no keepalive answered for {self.ttl - margin:g} s")
                return
            sent = now
            try:
                ttl = await self.client.refresh(lead.lease, timeout=min(interval, deadline - now))
                if ttl <= 0:
                    lead.end("lease expired in etcd")
                    return
                deadline = sent + ttl - margin
                kv = await self.client.get(self.key, timeout=max(0.05, min(interval, deadline - self.clock())))
                if kv is None or kv.value != lead.token:
                    lead.end(f"leader key now held by {leader_name(kv) or 'nobody'}")
                    return
            except EtcdError as e:
                if failing is None:
                    failing = sent
                    log.warning("manager %s: keepalive failed (%s); retrying on every member, leadership ends in "
                                "%.1f s without an answer", self.name, e, max(0.0, deadline - self.clock()))
                # Retry at once (client.call moved to another member on a connectivity error): during
                # an etcd leader change the first answer after the election must find us asking.
                await self.sleep(max(0.0, min(RETRY, deadline - self.clock())))
                continue
            if failing is not None:
                log.info("manager %s: keepalive answered again after %.1f s (lease %x, term kept)",
                         self.name, sent - failing, lead.lease)  # fmt: skip
                failing = None
            await self.sleep(max(0.0, min(interval - (self.clock() - sent), deadline - self.clock())))

    async def resign(self) -> None:
        """Give up leadership (if held): stop the keepalive and revoke the lease (deletes the key)."""
        lead, self.leadership = self.leadership, None
        task, self._keepalive = self._keepalive, None
        if lead is not None:
            lead.end("stopping", resigned=True)  # first: the keepalive loop ends even if it misses the cancel
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=self.ttl)
        if lead is not None:
            await self._revoke_quietly(lead.lease)


__all__ = ["Election", "Leadership", "NotLeader", "leader_name", "leader_txn", "ride_out"]
