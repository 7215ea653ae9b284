"""A prefix watch that survives broken streams and compaction, yielding typed, decoded events.

    async for ev in watch_prefix(client, keys.heartbeat_prefix):
        match ev:
            case Snapshot(items, revision): ...   # the whole prefix: first, and again after compaction
            case Put(key, value, kv): ...
            case Delete(key, kv): ...

- The first item is a Snapshot (a listing), unless ``start_revision`` is given.
- A broken stream is resumed from the last seen mod_revision + 1: no event is lost or repeated.
- If that revision was compacted, the prefix is listed again and a new Snapshot is yielded: the
  consumer reconciles (keys absent from it were deleted meanwhile).
- A value that is not JSON is logged and skipped (also inside snapshots); it never ends the watch.
- Connectivity errors are retried forever with the client's backoff; ``on_error`` / ``on_ok``
  let the caller know (the health monitor turns them into EtcdStatus).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rtypes
from aetcd import rpc as _rpc

from vmha.etcd.client import (
    KV,
    BadValue,
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    cancel_watch,
    cancelling,
)
from vmha.etcd.values import refused

log = logging.getLogger("vmha.etcd.watch")


@dataclass(frozen=True, slots=True)
class Snapshot:
    items: list[tuple[KV, Any]]  # (kv, decoded value), sorted by key; broken values left out
    revision: int  # store revision of the listing; events follow from revision + 1
    broken: tuple[KV, ...] = ()  # the keys left out of items: present, but their value is unreadable


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: Any
    kv: KV


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    kv: KV  # mod_revision is the revision of the deletion


WatchItem = Snapshot | Put | Delete


def _decoded(kv: KV) -> tuple[KV, Any] | None:
    try:
        return kv, kv.json()
    except BadValue as e:
        refused(e, kv)
        return None


async def list_prefix(client: EtcdClient, prefix: str) -> Snapshot:
    kvs, revision = await client.get_prefix(prefix)
    decoded = [(kv, _decoded(kv)) for kv in kvs]
    return Snapshot([d for _, d in decoded if d is not None], revision,
                    tuple(kv for kv, d in decoded if d is None))  # fmt: skip


async def _open(c: aetcd.Client, prefix: bytes, revision: int) -> Any:
    return await c.watch_prefix(prefix, start_revision=revision)


async def watch_prefix(
    client: EtcdClient,
    prefix: str,
    *,
    start_revision: int | None = None,
    on_error: Callable[[EtcdError], None] | None = None,
    on_ok: Callable[[], None] | None = None,
) -> AsyncIterator[WatchItem]:
    next_rev = start_revision
    while True:
        try:
            if next_rev is None:
                snap = await list_prefix(client, prefix)
                next_rev = snap.revision + 1
                yield snap
            conn = client.raw()  # the connection carrying this watch (client.call uses the same)
            watch = await client.call(functools.partial(_open, prefix=prefix.encode(), revision=next_rev))
            if on_ok is not None:
                on_ok()
            try:
                if cancelling():  # aetcd's watch creation (3.11's wait_for) swallowed our cancellation
                    raise asyncio.CancelledError
                async for raw in watch:
                    kv = KV.from_aetcd(raw.kv)
                    next_rev = kv.mod_revision + 1
                    if raw.kind == aetcd.rtypes.EventKind.DELETE:
                        yield Delete(kv.key, kv)
                    elif (d := _decoded(kv)) is not None:
                        yield Put(kv.key, d[1], kv)
            except (aetcd.exceptions.ClientError, _rpc.RpcError) as e:
                raise await client.fail(e) from None
            finally:
                # A closed connection took its watches with it: only an open one has one to cancel.
                if conn.channel is not None:
                    try:
                        await cancel_watch(watch)
                    # AttributeError: aetcd's cancel() races with a close() of the connection by
                    # another task (its watcher is gone by then): nothing left to cancel.
                    except (aetcd.exceptions.ClientError, _rpc.RpcError, TimeoutError, AttributeError) as e:
                        log.debug("cancelling the watch on %s: %r", prefix, e)
            # The stream ended without an error: the client was closed under us. Reconnect.
            raise EtcdUnavailable(f"{client.name}: watch stream on {prefix} closed")
        except Compacted as e:
            log.warning("watch on %s: %s; listing again", prefix, e)
            next_rev = None
        except EtcdError as e:
            if cancelling():
                raise asyncio.CancelledError from e
            if on_error is not None:
                on_error(e)
            log.info("watch on %s interrupted (%s); resuming from revision %s", prefix, e, next_rev)
            await client.wait_backoff()
        except Exception as e:
            if cancelling():
                raise asyncio.CancelledError from e
            # A bug in aetcd/gRPC (seen under heavy load) must not end the watch, and with it the
            # manager's sight: log it, start on a fresh connection, resume from the same revision.
            log.exception("watch on %s failed unexpectedly; resuming from revision %s", prefix, next_rev)
            err = EtcdUnavailable(f"{client.name}: watch on {prefix}: {e!r}")
            if on_error is not None:
                on_error(err)
            await client.reset(str(err))
            await client.wait_backoff()


__all__ = ["Delete", "Put", "Snapshot", "WatchItem", "list_prefix", "watch_prefix"]
