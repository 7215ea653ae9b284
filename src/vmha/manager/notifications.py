"""Notifications on the OpenStack message bus, in the shape operators know from Masakari's versioned
notifications (masakari/notifications/objects): each recovery and each alert, with its evidence link.

    bus = BusNotifier(cfg.notifications, cluster="c1", manager="m1", public_url=cfg.api.public_url)
    task = asyncio.create_task(bus.run())
    bus.recovery(task)                   # never blocks, never raises: the decision loop goes on
    bus.alert(Level.ERROR, "h1", "vm1", "host h1 fenced")

Event types (`publisher_id` "vmha-manager:MANAGER", as Masakari's "masakari-engine:HOST"):

    recovery.process.start   INFO   a recovery began (status: its first state, "queued" or "proving")
    recovery.process.end     INFO   it ended: status "done" (running_on says where) or "cancelled"
    recovery.process.error   ERROR  it failed: status "failed", `fault` an ExceptionPayload with the reason
    alert                    INFO, WARN or ERROR as the alert's level

The payload is a versioned object as Masakari's {"masakari_object.name", ...}: {"vmha_object.name":
"RecoveryPayload" or "AlertPayload", "vmha_object.namespace": "vmha", "vmha_object.version": "1.0",
"vmha_object.data": {...}}. Every payload's data carries "evidence" (the API's record: the VM's
recoveries, else the hosts or events) and "dashboard" (the page on that timeline) from `[api]
public_url`, null without it; and "cluster", "manager".

On the wire, what oslo.messaging's rabbit driver sends, so its notification listeners and the tools
built on them read vmha's as any service's: a topic exchange `[notifications] exchange`, routing key
TOPIC.PRIORITY (`versioned_notifications.info`), a queue of that name bound to it (declared as oslo
declares it, so nothing is lost before a consumer comes), the body the 2.0 envelope {"oslo.version":
"2.0", "oslo.message": "<the message as JSON>"}. Library: aio-pika (asyncio-native, publisher
confirms: a publish returns once the broker took it). Undelivered ones are retried and then logged as
webhooks' alerts are (vmha.manager.outbox, vmha_notification_undelivered_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from vmha import metrics
from vmha.config import NotificationsConfig, redact_transport
from vmha.core.log import Level
from vmha.core.queue import Task, TaskState
from vmha.manager.outbox import Outbox, Undelivered
from vmha.manager.webhooks import evidence_links

OBJECT_VERSION = "1.0"
_PRIORITY = {Level.INFO: "INFO", Level.WARN: "WARN", Level.ERROR: "ERROR"}


def _time(t: float | None) -> str | None:
    """Masakari's DateTimeField on the wire: 2026-12-03T13:50:01Z."""
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def versioned(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A payload object as oslo.versionedobjects serialize it (Masakari's masakari_object.*)."""
    return {"vmha_object.name": name, "vmha_object.namespace": "vmha", "vmha_object.version": OBJECT_VERSION,
            "vmha_object.data": dict(data)}  # fmt: skip


def message(event_type: str, priority: str, publisher_id: str, payload: Mapping[str, Any], now: float,
            message_id: str) -> dict[str, Any]:  # fmt: skip
    """The notification as oslo.messaging's Notifier builds it (its timestamp str(utcnow()), naive UTC)."""
    return {"message_id": message_id, "publisher_id": publisher_id, "event_type": event_type,
            "priority": priority, "payload": dict(payload),
            "timestamp": datetime.fromtimestamp(now, UTC).replace(tzinfo=None).isoformat(" "),
            "_unique_id": uuid.UUID(message_id).hex}  # fmt: skip


def envelope(msg: Mapping[str, Any]) -> bytes:
    """The body oslo.messaging's rabbit driver publishes (its message format 2.0)."""
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(msg, sort_keys=True)}).encode()


def routing_key(topic: str, msg: Mapping[str, Any]) -> str:
    return f"{topic}.{str(msg['priority']).lower()}"


def recovery_event(task: Task, links: Mapping[str, str]) -> tuple[str, str, dict[str, Any]]:
    """(event_type, priority, payload) of a recovery begun or ended, from its task."""
    if task.state == TaskState.FAILED:
        phase, priority = "error", "ERROR"
        fault: dict[str, Any] | None = versioned("ExceptionPayload", {
            "module_name": "vmha.core.recovery", "function_name": "recover", "exception": "RecoveryFailed",
            "exception_message": task.reason, "traceback": ""})  # fmt: skip
    else:
        ended = task.state in (TaskState.DONE, TaskState.CANCELLED)
        phase, priority, fault = ("end" if ended else "start"), "INFO", None
    proof = task.proof
    data = {
        "type": "VM", "vm": task.vm, "source_host": task.source, "recovery": task.recovery,
        "kind": task.kind.value, "status": task.state.value, "generated_time": _time(task.created),
        "failed_planes": {p: _time(t) for p, t in sorted(task.failed.items())}, "row": task.row,
        "action": task.action, "destination": task.dest, "running_on": task.running_on,
        "proof": None if proof is None else {"method": proof.method.value, "proved": _time(proof.proved)},
        "reason": task.reason or None, "fault": fault,
        "evidence": links.get("evidence"), "dashboard": links.get("dashboard"),
    }  # fmt: skip
    return f"recovery.process.{phase}", priority, versioned("RecoveryPayload", data)


def alert_event(level: Level, host: str | None, vm: str | None, text: str, t: float,
                links: Mapping[str, str]) -> tuple[str, str, dict[str, Any]]:  # fmt: skip
    data = {"level": level.value, "host": host, "vm": vm, "text": text, "generated_time": _time(t),
            "evidence": links.get("evidence"), "dashboard": links.get("dashboard")}  # fmt: skip
    return "alert", _PRIORITY.get(level, "WARN"), versioned("AlertPayload", data)


def brokers(transport_url: str) -> list[str]:
    """aio-pika's URL of each host of an oslo.messaging transport URL (validated by the config), in order."""
    scheme, _, rest = transport_url.partition("://")
    netloc, _, vhost = rest.partition("/")
    scheme = "amqps" if scheme == "amqps" else "amqp"
    return [f"{scheme}://{host}/{vhost}" for host in netloc.split(",")]


class BusNotifier:
    def __init__(self, cfg: NotificationsConfig, cluster: str, manager: str, public_url: str | None = None) -> None:
        self.cfg = cfg
        self.source = {"cluster": cluster, "manager": manager}  # in every payload's data
        self.publisher_id = f"vmha-manager:{manager}"
        self.public_url = public_url
        self.brokers = brokers(cfg.transport_url)
        self.outbox = Outbox("notification bus", cfg, {redact_transport(cfg.transport_url): self._publish},
                             metrics.notification_undelivered)  # fmt: skip
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._bound: set[str] = set()  # routing keys whose queue is declared on this connection

    def recovery(self, task: Task, now: float) -> None:
        self._send(*recovery_event(task, evidence_links(self.public_url, task.vm, task.source)), now,
                   f"{task.vm} recovery {task.recovery} {task.state.value}")  # fmt: skip

    def alert(self, level: Level, host: str | None, vm: str | None, text: str, now: float) -> None:
        self._send(*alert_event(level, host, vm, text, now, evidence_links(self.public_url, vm, host)), now,
                   f"alert {text!r}")  # fmt: skip

    def _send(self, event_type: str, priority: str, payload: dict[str, Any], now: float, summary: str) -> None:
        data = payload["vmha_object.data"]
        data.update(self.source)
        # One id per notification, kept across retries: a consumer can drop a duplicate.
        msg = message(event_type, priority, self.publisher_id, payload, now, str(uuid.uuid4()))
        self.outbox.put(msg, f"{event_type} ({summary})")

    async def run(self) -> None:
        """Publish until cancelled; what is still queued then goes to the undelivered log."""
        try:
            await self.outbox.run()
        finally:
            await self._close()

    async def _publish(self, msg: dict[str, Any]) -> None:
        key = routing_key(self.cfg.topic, msg)
        try:
            async with asyncio.timeout(self.cfg.timeout):
                exchange = await self._declare(key)
                mode = aio_pika.DeliveryMode.PERSISTENT if self.cfg.durable else aio_pika.DeliveryMode.NOT_PERSISTENT
                await exchange.publish(aio_pika.Message(envelope(msg), content_type="application/json",
                                                        content_encoding="utf-8", delivery_mode=mode),
                                       routing_key=key)  # fmt: skip
        except Exception as e:  # any failure to publish (the broker's answers included) is an undelivered one
            await self._close()
            raise Undelivered(self._scrub(str(e) or type(e).__name__)) from None

    async def _declare(self, key: str) -> AbstractExchange:
        """The exchange, and the queue of `key` bound to it, on a connection to the first broker that answers."""
        if self._conn is None or self._conn.is_closed or self._channel is None or self._exchange is None:
            await self._close()
            self._conn = await self._connect()
            self._channel = await self._conn.channel()  # publisher confirms: on
            self._exchange = await self._channel.declare_exchange(self.cfg.exchange, aio_pika.ExchangeType.TOPIC,
                                                                  durable=self.cfg.durable)  # fmt: skip
        if key not in self._bound:
            queue = await self._channel.declare_queue(key, durable=self.cfg.durable)
            await queue.bind(self._exchange, key)
            self._bound.add(key)
        return self._exchange

    async def _connect(self) -> AbstractConnection:
        errors = []
        for url in self.brokers:
            try:
                return await aio_pika.connect(url, timeout=self.cfg.timeout)
            except Exception as e:  # refused, unreachable, a bad handshake: the next broker
                errors.append(f"{redact_transport(url)}: {e or type(e).__name__}")
        raise OSError("; ".join(errors))

    def _scrub(self, text: str) -> str:
        """A library's error text without the brokers' passwords (it may quote the URL)."""
        for url in self.brokers:
            password = urlsplit(url).password
            if password:
                text = text.replace(password, "***")
        return text

    async def _close(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        self._bound.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # it is being dropped for a failure already logged
                await conn.close()


__all__ = ["BusNotifier", "alert_event", "brokers", "envelope", "message", "recovery_event", "routing_key",
           "versioned"]
