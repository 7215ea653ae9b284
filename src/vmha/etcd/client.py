"""The one etcd client every vmha process uses: aetcd behind a small, typed, failure-aware wrapper.

Why a wrapper:
- aetcd talks to one host:port; vmha configures a list of endpoint URLs. EtcdClient moves to
  another endpoint when a call fails for connectivity reasons and rebuilds the gRPC channel.
- Every call is bounded (``timeout`` per client, overridable per call), so a silently dead network
  path turns into EtcdUnavailable within that time instead of a hang.
- Every connectivity failure raises EtcdUnavailable (one exception for callers to catch), and a
  value that is not JSON raises BadValue naming the key (callers log it and skip it).
- Reconnection pacing is a capped exponential backoff with jitter; long-running loops call
  ``await client.wait_backoff()`` after a failure, and every success resets it.

Each EtcdClient owns its own TCP connection (a local gRPC subchannel pool): the per-plane heartbeat
relies on that, since a lease kept alive through a connection proves that connection's path.

https:// endpoints need ``tls`` (CA, client certificate and key: vmha.etcd.tls) and are always used
with TLS; http:// endpoints are plaintext and refuse ``tls`` (a config mixing both is a mistake).

Usage:
    async with EtcdClient(["https://198.18.0.1:2379"], tls=TlsFiles(ca, cert, key), timeout=1.0) as c:
        await c.put_json(key, {"a": 1})
        created = await c.create(key, {"a": 1})          # txn: only if the key is absent
        ok = await c.cas(key, {"a": 2}, kv.mod_revision)  # txn: only if nobody wrote since
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
from aetcd import rpc  # re-exports the grpc names used here (grpc itself ships no type stubs)

from vmha import metrics
from vmha.etcd.tls import SecureClient, TlsError, TlsFiles

log = logging.getLogger("vmha.etcd")

T = TypeVar("T")

# gRPC options for every channel. The local subchannel pool gives each client its own connection
# (by default channels to the same target share one). The short reconnect backoff keeps gRPC's own
# retries close to ours (its default grows to 120 s). The 10 s transport keepalive notices a dead
# watch stream on a path that drops packets silently; etcd refuses pings more often than every 5 s.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 3_000,
}


# The key revision() reads (nothing is ever stored there): every etcd role may read it.
PROBE_KEY = "\0vmha-probe"


class EtcdError(Exception):
    """Base of the errors EtcdClient raises."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached (refused, reset, timed out, no leader): retry after wait_backoff()."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away: list again, then watch from there."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compacted_revision})")
        self.compacted_revision = compacted_revision


class BadValue(EtcdError):
    """A stored value that is not the JSON vmha wrote; str() names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"etcd key {key}: unreadable value ({reason})")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KV:
    """One key-value pair as read from etcd (or received in a watch event)."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int

    def json(self) -> Any:
        """The value decoded as JSON; BadValue if it is not."""
        return decode_json(self.key, self.value)

    @classmethod
    def from_aetcd(cls, kv: Any) -> KV:
        return cls(
            key=bytes(kv.key).decode(errors="replace"),
            value=bytes(kv.value),
            mod_revision=int(kv.mod_revision),
            create_revision=int(kv.create_revision),
            version=int(kv.version),
            lease=int(kv.lease),
        )


def encode_json(value: Any) -> bytes:
    # Sorted keys and no spaces: the same value always gives the same bytes (tests compare them).
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# Bounds of any value vmha reads: its largest (an evidence record) is a few KiB, 4 levels deep.
MAX_VALUE_BYTES = 256 * 1024
MAX_DEPTH = 16
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def _too_deep(raw: bytes) -> bool:
    # Counted before parsing: json.loads recurses, and a deep enough value exhausts the stack.
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", raw)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _finite(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"number {text[:20]} is out of range")
    return f


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number vmha writes")


def decode_json(key: str, raw: bytes) -> Any:
    """The value as JSON; BadValue if it is not, or is larger, deeper or less finite than any value
    vmha writes (a value that crashed the parser or a reader must never get that far)."""
    if len(raw) > MAX_VALUE_BYTES:
        raise BadValue(key, f"{len(raw)} bytes, more than {MAX_VALUE_BYTES}")
    if _too_deep(raw):
        raise BadValue(key, f"nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadValue(key, f"not JSON: {e}; raw={raw[:80]!r}") from None


def redact_url(url: str) -> str:
    """The URL with the password of its user part (http://user:secret@host) replaced by ***, for
    logs, status files and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@" + parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()


def parse_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an etcd client URL such as http://198.18.0.1:2379."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"{redact_url(url)!r} is not an etcd URL of the form http://HOST:PORT")
    host = parts.hostname
    return (f"[{host}]" if ":" in host else host), parts.port


class Backoff:
    """Capped exponential backoff with full jitter (so hundreds of agents do not retry in step)."""

    def __init__(self, initial: float = 0.1, cap: float = 2.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; each call grows the following one up to the cap."""
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


# aetcd / gRPC errors that mean "this endpoint is not usable now" rather than "your request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    aetcd.exceptions.WatchTimeoutError,
    rpc.RpcError,
    TimeoutError,
    OSError,
)


# gRPC codes aetcd leaves as a plain ClientError although they mean the connection, not the request.
_TRANSIENT_CODES = {
    rpc.StatusCode.CANCELLED,
    rpc.StatusCode.UNKNOWN,
    rpc.StatusCode.ABORTED,
    rpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _is_connectivity(e: BaseException) -> bool:
    if isinstance(e, _UNAVAILABLE):
        return True
    cause = e.__cause__
    return isinstance(cause, rpc.AioRpcError) and cause.code() in _TRANSIENT_CODES


def cancelling() -> bool:
    """This task is being cancelled: an error caught now may be aetcd's or gRPC's translation of
    the cancellation, and a loop that retried it would run on forever (a shutdown that hangs)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_watch(watch: Any, timeout: float = 1.0) -> None:
    """Cancel an aetcd watch, bounded: aetcd queues the cancel request, and on a stuck stream that
    queue is full. asyncio.timeout, not wait_for: Python 3.11's wait_for swallows the caller's own
    cancellation when it arrives as the inner call ends (an API shutdown hung on it)."""
    async with asyncio.timeout(timeout):
        await watch.cancel()


class EtcdClient:
    """A connection to one etcd cluster through a list of endpoints, with bounded calls.

    Safe to share between tasks of one event loop. Not thread-safe (nothing in vmha uses threads).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 2.0,
        backoff: Backoff | None = None,
        name: str = "etcd",
        tls: TlsFiles | None = None,
        first: int = 0,
    ) -> None:
        """`first`: the endpoint to use first (modulo their number), to spread clients over the members."""
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints = [parse_endpoint(u) for u in endpoints]
        schemes = {urlsplit(u).scheme for u in endpoints}
        if tls is None and "https" in schemes:
            raise ValueError(f"{name}: https:// etcd endpoints need TLS files (ca, cert, key): never plaintext")
        if tls is not None and "http" in schemes:
            raise ValueError(f"{name}: http:// etcd endpoints with TLS files: use https:// URLs")
        self.urls = list(endpoints)
        self.tls = tls
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.name = name
        self.first = first % len(self.endpoints)
        self._index = self.first
        self._client: aetcd.Client | None = None
        self.last_ok: float | None = None  # time.monotonic() of the last successful call
        self.last_error: str | None = None  # text of the last failure, cleared by a success
        self._keepalive: tuple[aetcd.Client, Any] | None = None  # (connection, LeaseKeepAlive stream)
        self._keepalive_lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        """The URL currently in use (its password redacted: this goes to logs and status files)."""
        return redact_url(self.urls[self._index])

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def raw(self) -> aetcd.Client:
        """The underlying aetcd client of the current endpoint (created on first use)."""
        if self._client is None:
            host, port = self.endpoints[self._index]
            if self.tls is None:
                self._client = aetcd.Client(host=host, port=port, timeout=self.timeout, options=dict(_CHANNEL_OPTIONS))
            else:
                try:
                    creds = self.tls.credentials()
                except TlsError as e:
                    # A certificate file renamed or unreadable now: a failure to retry, as any other.
                    raise EtcdUnavailable(f"{self.name}: {e}") from None
                self._client = SecureClient(credentials=creds, host=host, port=port, timeout=self.timeout,
                                            options=dict(_CHANNEL_OPTIONS))  # fmt: skip
        return self._client

    async def close(self) -> None:
        self._drop_keepalive()
        client, self._client = self._client, None
        if client is not None:
            try:
                async with asyncio.timeout(self.timeout):  # not wait_for: see cancel_watch
                    await client.close()
            except (*_UNAVAILABLE, aetcd.exceptions.ClientError) as e:
                # The connection is being dropped anyway; a failing close changes nothing.
                log.debug("%s: closing %s: %r", self.name, self.endpoint, e)

    async def reset(self, reason: str) -> None:
        """Drop the current connection and move to another endpoint (called on connectivity errors): one
        drawn at random, so the clients of a failed member spread over the others, not all onto one."""
        self.last_error = reason
        await self.close()
        others = [i for i in range(len(self.endpoints)) if i != self._index]
        self._index = random.choice(others) if others else self._index

    @property
    def away(self) -> bool:
        """On another endpoint than the first one: a failure moved this client."""
        return self._index != self.first

    async def first_answers(self, timeout: float) -> bool:
        """Whether the first endpoint serves a linearizable read now (it is up and in the quorum),
        through a connection of its own: the current one is left alone."""
        probe = EtcdClient([self.urls[self.first]], timeout=timeout, name=f"{self.name} probe", tls=self.tls)
        try:
            await probe.revision()
            return True
        except EtcdError:
            return False
        finally:
            await probe.close()

    async def back_to_first(self) -> None:
        """Use the first endpoint again (after first_answers): the next call connects to it."""
        await self.close()
        self._index = self.first

    async def wait_backoff(self) -> None:
        """Sleep the current backoff delay; loops call this after EtcdUnavailable."""
        await asyncio.sleep(self.backoff.next())

    def succeeded(self) -> None:
        self.last_ok = time.monotonic()
        self.last_error = None
        self.backoff.reset()

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``op(aetcd_client)`` bounded by ``timeout``; connectivity errors raise EtcdUnavailable
        after the connection has been dropped (the next call reconnects, to another endpoint)."""
        limit = self.timeout if timeout is None else timeout
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when the call
            # ends as the caller is being cancelled, swallowing the cancellation (a loop that was
            # cancelled then runs on forever; seen with the manager's keepalive).
            async with asyncio.timeout(limit):
                result = await op(self.raw())
        except asyncio.CancelledError:
            if cancelling():
                raise  # this task is being cancelled
            # Nobody cancelled this task: gRPC cancelled the call because another task's failure
            # closed the shared channel (reset). That is a connectivity error, not a cancellation.
            metrics.etcd_error("unavailable")
            raise EtcdUnavailable(f"{self.name}: {self.endpoint}: call cut by a connection reset") from None
        except (*_UNAVAILABLE, aetcd.exceptions.ClientError) as e:
            raise await self.fail(e) from None
        self.succeeded()
        return result

    async def fail(self, e: BaseException) -> EtcdError:
        """The EtcdError to raise for an aetcd/gRPC failure; a connectivity failure also drops the
        connection. For code that drives aetcd streams itself (watch)."""
        if isinstance(e, EtcdError):
            return e
        if isinstance(e, aetcd.exceptions.RevisionCompactedError):
            metrics.etcd_error("compacted")
            return Compacted(int(e.compacted_revision))
        reason = f"{self.endpoint}: {type(e).__name__}: {e}".strip()
        if not _is_connectivity(e):
            metrics.etcd_error("error")
            return EtcdError(f"{self.name}: {reason}")
        metrics.etcd_error("unavailable")
        await self.reset(reason)
        return EtcdUnavailable(f"{self.name}: {reason}")

    # --- keys -------------------------------------------------------------------------------------

    async def get(self, key: str, timeout: float | None = None) -> KV | None:
        r = await self.call(lambda c: c.get(key.encode()), timeout)
        return None if r is None else KV.from_aetcd(r)

    async def get_json(self, key: str, timeout: float | None = None) -> tuple[Any, KV] | None:
        """(decoded value, KV) or None if absent; BadValue if the value is not JSON."""
        kv = await self.get(key, timeout)
        return None if kv is None else (kv.json(), kv)

    async def get_prefix(self, prefix: str, timeout: float | None = None) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted by key) and the store revision of the read; watching
        from that revision + 1 misses nothing."""
        r = await self.call(lambda c: c.get_prefix(prefix.encode(), sort_order="ascend"), timeout)
        return [KV.from_aetcd(kv) for kv in r.kvs], int(r.header.revision)

    async def put(self, key: str, value: bytes, lease: int | None = None, timeout: float | None = None) -> int:
        """Write the key; returns the revision of the write."""
        r = await self.call(lambda c: c.put(key.encode(), value, lease=lease), timeout)
        return int(r.header.revision)

    async def put_json(self, key: str, value: Any, lease: int | None = None, timeout: float | None = None) -> int:
        return await self.put(key, encode_json(value), lease, timeout)

    async def delete(self, key: str, timeout: float | None = None) -> bool:
        r = await self.call(lambda c: c.delete(key.encode()), timeout)
        return r is not None and int(r.deleted) > 0

    async def delete_prefix(self, prefix: str, timeout: float | None = None) -> int:
        r = await self.call(lambda c: c.delete_prefix(prefix.encode()), timeout)
        return int(r.deleted)

    async def create(self, key: str, value: Any, lease: int | None = None, timeout: float | None = None) -> bool:
        """Write the JSON value only if the key does not exist; True if this call created it."""
        return await self.cas(key, value, 0, lease, timeout)

    async def cas(
        self, key: str, value: Any, mod_revision: int, lease: int | None = None, timeout: float | None = None
    ) -> bool:
        """Write the JSON value only if the key's mod_revision is still ``mod_revision`` (0: absent).
        True if written; False if someone else wrote (re-read and decide again)."""
        k = key.encode()

        async def op(c: aetcd.Client) -> bool:
            t = c.transactions
            ok, _ = await c.transaction(
                compare=[t.mod(k) == mod_revision],
                success=[t.put(k, encode_json(value), lease=lease)],
                failure=[],
            )
            return bool(ok)

        return await self.call(op, timeout)

    async def delete_cas(self, key: str, mod_revision: int, timeout: float | None = None) -> bool:
        """Delete only if the key's mod_revision is still ``mod_revision``; True if deleted."""
        k = key.encode()

        async def op(c: aetcd.Client) -> bool:
            t = c.transactions
            ok, _ = await c.transaction(compare=[t.mod(k) == mod_revision], success=[t.delete(k)], failure=[])
            return bool(ok)

        return await self.call(op, timeout)

    # --- leases -----------------------------------------------------------------------------------

    async def grant(self, ttl: int, timeout: float | None = None) -> int:
        """A new lease of ``ttl`` whole seconds; returns its id."""
        lease = await self.call(lambda c: c.lease(ttl), timeout)
        return int(lease.id)

    async def refresh(self, lease_id: int, timeout: float | None = None) -> int:
        """Keep the lease alive once; returns the TTL etcd granted (<= 0: the lease is gone).

        Uses one long-lived LeaseKeepAlive stream per connection (aetcd opens a stream per call,
        which costs about 4x the CPU: it matters with hundreds of heartbeats a second). Any error or
        timeout drops the stream; the next call opens a new one."""

        async def op(c: aetcd.Client) -> int:
            async with self._keepalive_lock:
                await c.connect()
                if self._keepalive is None or self._keepalive[0] is not c:
                    self._keepalive = (c, c.leasestub.LeaseKeepAlive(metadata=c.metadata))
                stream = self._keepalive[1]
                try:
                    await stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    reply = await stream.read()
                    if not isinstance(reply, rpc.LeaseKeepAliveResponse):
                        raise ConnectionError("the keepalive stream was closed")
                except (asyncio.CancelledError, rpc.RpcError):
                    self._drop_keepalive()
                    raise
                except Exception as e:  # e.g. InvalidStateError: the stream ended under us
                    self._drop_keepalive()
                    raise ConnectionError(f"keepalive stream: {e!r}") from e
                return int(reply.TTL)

        return await self.call(op, timeout)

    def _drop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive[1].cancel()
            self._keepalive = None

    async def time_to_live(self, lease_id: int, timeout: float | None = None) -> int:
        """The lease's remaining TTL in seconds; <= 0 once etcd has dropped it (expired or revoked)."""
        r = await self.call(lambda c: c.get_lease_info(lease_id, keys=False), timeout)
        return int(r.TTL)

    async def revoke(self, lease_id: int, timeout: float | None = None) -> None:
        """Revoke the lease (its keys are deleted at once). A lease already gone is not an error."""
        try:
            await self.call(lambda c: c.revoke_lease(lease_id), timeout)
        except EtcdError as e:
            if isinstance(e, EtcdUnavailable) or "not found" not in str(e):
                raise

    # --- cluster ----------------------------------------------------------------------------------

    async def revision(self, timeout: float | None = None) -> int:
        """The current store revision, through a linearizable read (it fails without a leader)."""
        r = await self.call(lambda c: c.get_prefix(PROBE_KEY.encode(), keys_only=True), timeout)
        return int(r.header.revision)

    async def member_status(self, timeout: float | None = None) -> tuple[int, int]:
        """(this member's id, the leader's id as it knows it; 0: none). The member answers it alone,
        without the cluster: it tells a member that is up but has no leader (quorum lost)."""

        async def op(c: aetcd.Client) -> tuple[int, int]:
            await c.connect()
            r = await c.maintenancestub.Status(rpc.StatusRequest(), timeout=self.timeout, metadata=c.metadata)
            return int(r.header.member_id), int(r.leader)

        return await self.call(op, timeout)

    async def compact(self, revision: int, timeout: float | None = None) -> None:
        await self.call(lambda c: c.compact(revision, physical=True), timeout)


__all__ = [
    "KV",
    "Backoff",
    "BadValue",
    "Compacted",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "decode_json",
    "encode_json",
    "parse_endpoint",
]
