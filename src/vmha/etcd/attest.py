"""Exit attestation over etcd: the manager asks a host's agent whether a VM's old copy is gone.

    manager: attest/req/<host>/<vm> = {"vm", "host", "nonce", "timeout"}
    agent:   attest/resp/<host>/<vm> = {"vm", "host", "nonce", "ok", "reason", "evidence", "answered"}

The agent's etcd client uses the management plane, so this works while the host's storage plane
is cut: exactly the case where the attestation saves the wait for sanlock's host_dead.

The agent re-checks a request until the check passes or the request's timeout (counted on the
agent's own clock: the clocks of the two hosts are never compared) runs out, then answers once.
The nonce ties an answer to its request, so a stale answer from an earlier attempt is never taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmha.etcd import values
from vmha.etcd.client import KV, BadValue, EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.values import refused
from vmha.etcd.watch import Delete, Put, Snapshot, watch_prefix

log = logging.getLogger("vmha.etcd.attest")


class AttestTimeout(Exception):
    """No answer from the host's agent in time (agent down, or its management plane cut)."""


class CheckResult(Protocol):
    """What the agent's check returns (vmha.locks.isolation.Attestation)."""

    @property
    def ok(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def evidence(self) -> Mapping[str, str]: ...


Check = Callable[[str], Awaitable[CheckResult]]


@dataclass(frozen=True, slots=True)
class AttestResponse:
    vm: str
    host: str
    nonce: str
    ok: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)
    answered: float = 0.0  # the agent's unix time

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "host": self.host, "nonce": self.nonce, "ok": self.ok, "reason": self.reason,
                "evidence": self.evidence, "answered": self.answered}

    @classmethod
    def parse(cls, kv: KV, value: Any) -> AttestResponse:
        """A stored answer; BadValue if it is not one (values.AttestResponseValue)."""
        v = values.parse(values.AttestResponseValue, kv, value)
        return cls(v.vm, v.host, v.nonce, v.ok, v.reason, dict(v.evidence), v.answered)


async def request_attestation(
    client: EtcdClient, keys: Keys, host: str, vm: str, timeout: float, *, poll: float = 0.2
) -> AttestResponse:
    """Manager side: asks `host`'s agent about `vm` and waits for its answer (ok or not).

    AttestTimeout if no answer arrives within `timeout` plus a second for the round trip."""
    nonce = secrets.token_hex(8)
    req_key, resp_key = keys.attest_request(host, vm), keys.attest_response(host, vm)
    deadline = time.monotonic() + timeout + 1.0
    written = False
    try:
        while time.monotonic() < deadline:
            try:
                if not written:
                    await client.put_json(req_key, {"vm": vm, "host": host, "nonce": nonce, "timeout": timeout})
                    written = True
                got = await client.get_json(resp_key)
            except EtcdError as e:
                log.info("attest %s/%s: etcd: %s; retrying", host, vm, e)
                got = None
            if got is not None:
                try:
                    resp = AttestResponse.parse(got[1], got[0])
                except BadValue as e:
                    refused(e, got[1], f"answer to the attestation of vm {vm} on {host} skipped")
                else:
                    if (resp.nonce, resp.vm, resp.host) == (nonce, vm, host):
                        return resp
            await asyncio.sleep(poll)
        raise AttestTimeout(f"host {host}: no exit attestation for VM {vm} within {timeout:.1f} s "
                            "(agent down or management plane cut)")
    finally:
        if written:
            with contextlib.suppress(EtcdError):
                await client.delete(req_key)


async def serve_attestations(
    client: EtcdClient, keys: Keys, host: str, check: Check, *, poll: float = 0.25
) -> None:
    """Agent side: answers every attestation request for this host until cancelled."""
    running: dict[str, tuple[str, asyncio.Task[None]]] = {}  # vm -> (nonce, task)

    def start(kv: KV, value: Any) -> None:
        vm = kv.key[len(keys.attest_requests_prefix(host)) :]
        try:
            req = values.parse(values.AttestRequestValue, kv, value)
            if (req.vm, req.host) != (vm, host):
                raise BadValue(kv.key, f"the request names vm {req.vm!r} on {req.host!r}")
        except BadValue as e:
            refused(e, kv, "attestation request skipped")
            return
        nonce, timeout = req.nonce, req.timeout
        old = running.get(vm)
        if old is not None:
            if old[0] == nonce:
                return  # already working on it (seen again after a watch resume)
            old[1].cancel()
        running[vm] = (nonce, asyncio.create_task(_answer(client, keys, host, vm, nonce, timeout, check, poll)))

    def stop(key: str) -> None:
        entry = running.pop(key[len(keys.attest_requests_prefix(host)) :], None)
        if entry is not None:
            entry[1].cancel()  # the manager gave up or got its answer

    try:
        async for ev in watch_prefix(client, keys.attest_requests_prefix(host)):
            if isinstance(ev, Snapshot):
                for kv, value in ev.items:
                    start(kv, value)
            elif isinstance(ev, Put):
                start(ev.kv, ev.value)
            elif isinstance(ev, Delete):
                stop(ev.key)
            for vm in [vm for vm, (_, t) in running.items() if t.done()]:
                del running[vm]
    finally:
        for _, t in running.values():
            t.cancel()


async def _answer(
    client: EtcdClient, keys: Keys, host: str, vm: str, nonce: str, timeout: float, check: Check, poll: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = await check(vm)
        if result.ok or time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll)
    resp = AttestResponse(vm, host, nonce, result.ok, result.reason, dict(result.evidence), time.time())
    log.info("attest host=%s vm=%s ok=%s reason=%s evidence=%s", host, vm, result.ok, result.reason,
             " ".join(f"{k}={v}" for k, v in sorted(result.evidence.items())))
    while True:
        try:
            await client.put_json(keys.attest_response(host, vm), resp.to_dict())
            return
        except EtcdError as e:
            if time.monotonic() >= deadline + 5.0:
                log.warning("attest host=%s vm=%s: could not write the answer: %s", host, vm, e)
                return
            await client.wait_backoff()
