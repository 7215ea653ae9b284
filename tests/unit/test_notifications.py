"""Message-bus notifications: Masakari's versioned-notification shape and oslo.messaging's wire format
(pure), the [notifications] config checks, and a broker that is not there (undelivered, logged)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from vmha import config, metrics
from vmha.config import NotificationsConfig
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.log import Level
from vmha.core.queue import Task, TaskKind, TaskState
from vmha.manager.notifications import BusNotifier, alert_event, brokers, envelope, message, recovery_event, routing_key
from vmha.manager.webhooks import evidence_links
from vmha.testing.etcd import free_ports
from vmha.testing.wait import until

PUBLIC = "https://vmha.example.org:8443"
T0 = 1796230287.0  # 2026-12-02T16:51:27Z


def task(state: TaskState, **fields: object) -> Task:
    t = Task(vm="vm1", source="h1", kind=TaskKind.EVACUATE, recovery=2, priority=0, row="storage",
             action="fence-evacuate", failed={"storage": T0}, created=T0 + 1.5)  # fmt: skip
    t.state = state
    for k, v in fields.items():
        setattr(t, k, v)
    return t


def test_a_recovery_begins_ends_and_fails_as_masakari_s_process_events() -> None:
    links = evidence_links(PUBLIC, "vm1", "h1")
    event, priority, payload = recovery_event(task(TaskState.QUEUED), links)
    assert (event, priority) == ("recovery.process.start", "INFO")
    assert {k: v for k, v in payload.items() if k != "vmha_object.data"} == {
        "vmha_object.name": "RecoveryPayload", "vmha_object.namespace": "vmha", "vmha_object.version": "1.0"}
    data = payload["vmha_object.data"]
    assert data["evidence"] == f"{PUBLIC}/v1/recoveries/vm1" and data["dashboard"] == f"{PUBLIC}/#vm=vm1"
    assert (data["type"], data["vm"], data["source_host"], data["recovery"], data["status"]) == (
        "VM", "vm1", "h1", 2, "queued")  # fmt: skip
    assert data["generated_time"] == "2026-12-02T16:51:28Z"
    assert data["failed_planes"] == {"storage": "2026-12-02T16:51:27Z"}
    assert data["fault"] is None and data["proof"] is None

    proof = FenceProof("vm1", "h1", ProofMethod.LEASE_TAKEN, T0 + 2, T0 + 3)
    event, priority, payload = recovery_event(task(TaskState.DONE, proof=proof, dest="h2", running_on="h2"), links)
    data = payload["vmha_object.data"]
    assert (event, priority, data["status"], data["running_on"]) == ("recovery.process.end", "INFO", "done", "h2")
    assert data["proof"] == {"method": "lease-taken", "proved": "2026-12-02T16:51:30Z"}

    event, _, payload = recovery_event(task(TaskState.CANCELLED, reason="the VM runs on h1 again"), links)
    assert (event, payload["vmha_object.data"]["status"]) == ("recovery.process.end", "cancelled")

    event, priority, payload = recovery_event(task(TaskState.FAILED, reason="no fence proof: host alive"), links)
    fault = payload["vmha_object.data"]["fault"]
    assert (event, priority) == ("recovery.process.error", "ERROR")
    assert fault["vmha_object.name"] == "ExceptionPayload"
    assert fault["vmha_object.data"]["exception_message"] == "no fence proof: host alive"
    # Without [api] public_url: the fields are there, null.
    _, _, payload = recovery_event(task(TaskState.QUEUED), evidence_links(None, "vm1", "h1"))
    assert payload["vmha_object.data"]["evidence"] is None


def test_an_alert_carries_its_level_as_the_priority_and_its_evidence_link() -> None:
    for level, priority in ((Level.INFO, "INFO"), (Level.WARN, "WARN"), (Level.ERROR, "ERROR")):
        event, got, payload = alert_event(level, "h1", None, "host 'h1' quarantined", T0,
                                          evidence_links(PUBLIC, None, "h1"))  # fmt: skip
        assert (event, got, payload["vmha_object.name"]) == ("alert", priority, "AlertPayload")
        assert payload["vmha_object.data"]["evidence"] == f"{PUBLIC}/v1/hosts"


def test_the_message_is_oslo_messaging_s_2_0_envelope() -> None:
    mid = str(uuid.uuid4())
    msg = message("recovery.process.start", "INFO", "vmha-manager:m1", {"x": 1}, T0 + 0.25, mid)
    assert msg["timestamp"] == "2026-12-02 16:51:27.250000"  # str(utcnow()), as oslo's Notifier
    datetime.strptime(msg["timestamp"], "%Y-%m-%d %H:%M:%S.%f")
    assert (msg["message_id"], msg["_unique_id"]) == (mid, uuid.UUID(mid).hex)
    body = json.loads(envelope(msg))
    assert body["oslo.version"] == "2.0" and json.loads(body["oslo.message"]) == msg
    assert routing_key("versioned_notifications", msg) == "versioned_notifications.info"


def bus_config(**fields: object) -> dict[str, object]:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    return {"cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
            "etcd": {"insecure": True}, "notifications": fields}  # fmt: skip


def test_transport_urls_are_oslo_s_and_one_broker_per_host() -> None:
    url = "rabbit://vmha:s3cret@10.0.0.5:5672,vmha:0ther@[fd00::6]:5672/openstack"
    cfg = config.parse(bus_config(transport_url=url))
    assert cfg.notifications is not None and cfg.notifications.topic == "versioned_notifications"
    assert brokers(url) == ["amqp://vmha:s3cret@10.0.0.5:5672/openstack", "amqp://vmha:0ther@[fd00::6]:5672/openstack"]
    assert brokers("amqps://h/") == ["amqps://h/"]
    assert config.secrets(cfg) == ["notifications.transport_url (a password in a URL)"]
    assert config.redact_transport(url) == "rabbit://vmha:***@10.0.0.5:5672,vmha:***@[fd00::6]:5672/openstack"


@pytest.mark.parametrize(("fields", "error"), [
    ({"transport_url": "http://u:s3cret@h:5672/"}, "is not a rabbit://"),
    ({"transport_url": "rabbit://u:s3cret@h:5672,u:s3cret@:5672/"}, "is not HOST or HOST:PORT"),
    ({"transport_url": "rabbit://u:s3cret@h:99999/"}, "is not HOST or HOST:PORT"),
    ({"transport_url": "rabbit://u:s3cret@h/?ssl=1"}, "no query or fragment"),
    ({"transport_url": "rabbit://u:s3cret@h/a/b"}, "the virtual host is one path segment"),
    ({"transport_url": "rabbit://h/", "topic": "a b"}, "notifications.topic"),
    ({"transport_url": "rabbit://h/", "attempts": 0}, "notifications.attempts"),
    ({"topic": "x"}, "notifications.transport_url: required field is missing"),
])  # fmt: skip
def test_a_bad_notifications_section_is_refused_naming_the_field(fields: dict[str, object], error: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(bus_config(**fields))
    assert error in str(e.value) and "s3cret" not in str(e.value)


async def test_a_broker_that_is_not_there_gets_the_notification_in_the_undelivered_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_ports(1)[0]  # nothing listens there: refused at once
    cfg = NotificationsConfig(transport_url=f"rabbit://vmha:s3cret@127.0.0.1:{port}/", attempts=2, retry_base=0.05,
                              timeout=2, undelivered=tmp_path / "undelivered.jsonl")  # fmt: skip
    before = metrics.MANAGER.get_sample_value("vmha_notification_undelivered_total") or 0.0
    bus = BusNotifier(cfg, "c1", "m1", PUBLIC)
    runner = asyncio.create_task(bus.run())
    caplog.set_level(logging.WARNING, "vmha.manager.outbox")
    try:
        bus.recovery(task(TaskState.QUEUED), T0)
        path = tmp_path / "undelivered.jsonl"
        await until(lambda: path.exists(), "the notification in the undelivered log", timeout=10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    [lost] = [json.loads(line) for line in path.read_text().splitlines()]
    assert lost["url"] == f"rabbit://vmha:***@127.0.0.1:{port}/" and "after 2 attempt(s)" in lost["error"]
    assert lost["alert"]["event_type"] == "recovery.process.start"
    assert lost["alert"]["payload"]["vmha_object.data"]["evidence"] == f"{PUBLIC}/v1/recoveries/vm1"
    assert metrics.MANAGER.get_sample_value("vmha_notification_undelivered_total") == before + 1
    assert "s3cret" not in caplog.text and "s3cret" not in path.read_text()
    assert "recovery.process.start (vm1 recovery 2 queued) NOT delivered" in caplog.text
