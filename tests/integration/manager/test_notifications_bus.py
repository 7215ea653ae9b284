"""The manager's notifications on a real RabbitMQ (Debian's, started as the Nova rig starts it).

Real: etcd, RabbitMQ, the manager process (election, detection, the recovery core, [api] for its
public URL, [notifications]); the hosts' heartbeats in this process. Doubles: the compute driver and
the prover (recording_parts.py), as in the failover test: what is tested is what reaches the bus.
A consumer of this test reads the raw AMQP messages (oslo.messaging's wire format); where the Nova
venv is installed, oslo.messaging's own notification listener (what Masakari and Nova consumers run)
reads them too.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from test_manager_failover import CLUSTER, HOSTS, KEYS, ManagerProcess, calls, heartbeats, sees_all_up, write_config

from vmha.config import NotificationsConfig
from vmha.core.log import Level
from vmha.core.queue import Task, TaskKind, TaskState
from vmha.etcd.client import EtcdClient
from vmha.etcd.election import leader_name
from vmha.etcd.registry import register
from vmha.lab.nova.rig import RABBITMQ_SERVER, VENV, NovaRig
from vmha.manager.notifications import BusNotifier
from vmha.testing.etcd import EtcdProcess, free_ports
from vmha.testing.process import stop_process
from vmha.testing.wait import until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(RABBITMQ_SERVER).exists(),
                       reason="needs Debian's rabbitmq-server (scripts/setup-nova.sh)"),
]

ON_H1 = ["vm1", "vm2", "vm3"]
ON_H2 = "vm4"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[NovaRig]:
    rig = NovaRig(hosts=(), workdir=tmp_path / "rabbit").start_broker()
    try:
        yield rig
    finally:
        rig.stop()


class Consumer:
    """Every message on exchange "vmha" with a routing key under `topic`: its own queue, bound."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str | None, dict[str, Any], dict[str, Any]]] = []  # key, type, body, message

    async def start(self, url: str, topic: str = "versioned_notifications") -> None:
        self.conn = await aio_pika.connect(url)
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange("vmha", aio_pika.ExchangeType.TOPIC, durable=False)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, f"{topic}.#")
        await queue.consume(self._got, no_ack=True)

    async def _got(self, m: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(m.body)
        self.got.append((m.routing_key or "", m.content_type, body, json.loads(body["oslo.message"])))

    def events(self, event_type: str) -> dict[str, dict[str, Any]]:
        return {msg["payload"]["vmha_object.data"]["vm"]: msg for _, _, _, msg in self.got
                if msg["event_type"] == event_type}  # fmt: skip


@pytest.fixture
async def consumer(broker: NovaRig) -> AsyncIterator[Consumer]:
    c = Consumer()
    await c.start(broker.transport_url.replace("rabbit://", "amqp://"))
    yield c
    await c.conn.close()


async def test_the_manager_s_recoveries_reach_the_bus_and_a_broker_down_stops_nothing(
    etcd: EtcdProcess, tmp_path: Path, broker: NovaRig, consumer: Consumer
) -> None:
    url = etcd.client_urls[0]
    (tmp_path / "state.json").write_text(json.dumps({"hosts": HOSTS, "placement": {
        **dict.fromkeys(ON_H1, "h1"), ON_H2: "h2"}, "restarts": {}, "disabled": [], "down": []}))  # fmt: skip
    api_port = free_ports(1)[0]
    public = f"https://127.0.0.1:{api_port}"
    assert etcd.pki is not None
    tls = etcd.pki.issue("vmha-api", ips=["127.0.0.1"])
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken-0123456789abcdef admin\n")
    tokens.chmod(0o600)
    undelivered = tmp_path / "undelivered-notifications.jsonl"
    cfg = write_config(tmp_path / "manager.toml", "mgr-a", etcd, url)
    with open(cfg, "a") as f:
        f.write(f'[api]\nlisten = "127.0.0.1:{api_port}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
                f'tokens_file = "{tokens}"\npublic_url = "{public}"\n'
                f'[notifications]\ntransport_url = "{broker.transport_url}"\nattempts = 2\nretry_base = 0.2\n'
                f'timeout = 2\nundelivered = "{undelivered}"\n')  # fmt: skip
    cfg.chmod(0o600)  # the transport URL holds a password
    client = EtcdClient([url], timeout=2.0, tls=etcd.tls())
    beats_gen = heartbeats(etcd)
    manager: ManagerProcess | None = None
    try:
        await etcd.setup_auth(CLUSTER, HOSTS, ["mgr-a"])
        for h in HOSTS:
            await register(client, KEYS, h, "default")
        beats = await anext(beats_gen)
        manager = ManagerProcess("mgr-a", cfg, tmp_path)

        async def leads() -> bool:
            return leader_name(await client.get(KEYS.leader)) == "mgr-a"

        await until(leads, "mgr-a leads", timeout=30, interval=0.2)
        # Its monitor has seen every host UP (not a fixed sleep): h1's crash is then a host failure.
        await until(lambda: sees_all_up(client, "mgr-a"), "mgr-a's view: every host UP", timeout=20, interval=0.2)
        for hb in beats["h1"]:
            await hb.stop(revoke=False)  # h1 crashes
        await until(lambda: len(consumer.events("recovery.process.end")) == len(ON_H1),
                    "a recovery.process.end per VM of h1", timeout=90, interval=0.2)  # fmt: skip

        starts, ends = consumer.events("recovery.process.start"), consumer.events("recovery.process.end")
        assert sorted(starts) == sorted(ends) == ON_H1
        for key, content_type, body, _ in consumer.got:
            assert key == "versioned_notifications.info" and content_type == "application/json"
            assert body["oslo.version"] == "2.0"
        for vm in ON_H1:
            start, end = starts[vm], ends[vm]
            for msg in (start, end):
                assert msg["publisher_id"] == "vmha-manager:mgr-a" and msg["priority"] == "INFO"
                uuid.UUID(msg["message_id"])
                assert msg["payload"]["vmha_object.name"] == "RecoveryPayload"
                assert msg["payload"]["vmha_object.namespace"] == "vmha"
            data = end["payload"]["vmha_object.data"]
            # Each carries its evidence link: the API's record of this VM's recoveries.
            assert data["evidence"] == f"{public}/v1/recoveries/{vm}" and data["dashboard"] == f"{public}/#vm={vm}"
            assert start["payload"]["vmha_object.data"]["evidence"] == data["evidence"]
            assert (data["source_host"], data["status"], data["kind"], data["cluster"]) == ("h1", "done", "evacuate",
                                                                                           CLUSTER)  # fmt: skip
            assert data["running_on"] in HOSTS[1:] and data["proof"]["method"]
            assert list(data["failed_planes"]) == ["management", "service", "storage"]
            # Its state when first persisted: the same step may have begun its proof already.
            assert start["payload"]["vmha_object.data"]["status"] in ("queued", "proving")
        assert not undelivered.exists()

        # RabbitMQ goes away; h2 crashes: its VM is still recovered, its notifications are logged undelivered.
        await asyncio.to_thread(broker.stop)
        for hb in beats["h2"]:
            await hb.stop(revoke=False)

        def recovered() -> bool:
            return any(c["call"] == "evacuate" and c["phase"] == "end" and c.get("vm") == ON_H2
                       for c in calls(tmp_path))

        await until(recovered, f"{ON_H2} evacuated with the broker down", timeout=90, interval=0.2)

        def lost() -> list[dict[str, Any]]:
            lines = undelivered.read_text().split("\n")[:-1] if undelivered.exists() else []  # whole lines only
            return [json.loads(line)["alert"] for line in lines]

        await until(lambda: any(m["payload"]["vmha_object.data"].get("vm") == ON_H2 and
                                m["event_type"] == "recovery.process.end" for m in lost()),
                    f"{ON_H2}'s recovery.process.end in the undelivered log", timeout=30, interval=0.2)  # fmt: skip
        log = manager.log.read_text()
        assert "notification bus rabbit://guest:***@127.0.0.1" in log and "NOT delivered" in log
        assert "guest:guest" not in log
        assert manager.proc.poll() is None  # the manager runs on
    finally:
        if manager is not None:
            manager.stop()
        await beats_gen.aclose()
        await client.close()
        if manager is not None and manager.proc.returncode not in (0, None):
            print(f"--- manager (exit {manager.proc.returncode}):\n{manager.log.read_text()[-3000:]}")


# The threading executor runs two notifications' handlers at once: each line is written whole, under
# a lock (two print() calls interleaved once, two objects on one line: integration run of 2026-12-03).
LISTENER = """
import json, sys, threading
import oslo_messaging
from oslo_config import cfg

lock = threading.Lock()

class Endpoint:
    def _got(self, priority, publisher_id, event_type, payload, metadata):
        line = json.dumps({"priority": priority, "publisher_id": publisher_id, "event_type": event_type,
                           "payload": payload, "message_id": metadata["message_id"],
                           "timestamp": metadata["timestamp"]}) + "\\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()
    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self._got("info", publisher_id, event_type, payload, metadata)
    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        self._got("error", publisher_id, event_type, payload, metadata)

conf = cfg.ConfigOpts()
conf([])
transport = oslo_messaging.get_notification_transport(conf, url=sys.argv[1])
target = oslo_messaging.Target(topic="versioned_notifications", exchange="vmha")
listener = oslo_messaging.get_notification_listener(transport, [target], [Endpoint()], executor="threading")
listener.start()
print("ready", flush=True)
listener.wait()
"""


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs the Nova venv (scripts/setup-nova.sh)")
async def test_oslo_messaging_s_own_listener_reads_them(tmp_path: Path, broker: NovaRig) -> None:
    cfg = NotificationsConfig(transport_url=broker.transport_url, attempts=2, retry_base=0.2,
                              undelivered=tmp_path / "undelivered.jsonl")  # fmt: skip
    bus = BusNotifier(cfg, "c1", "m1", "https://vmha.example.org:8443")
    out = tmp_path / "listener.out"
    with open(out, "wb") as f:
        listener = subprocess.Popen([str(VENV / "bin" / "python"), "-c", LISTENER, broker.transport_url],
                                    stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    runner = asyncio.create_task(bus.run())
    try:
        await until(lambda: "ready" in out.read_text(), "the oslo.messaging listener started", timeout=60)
        failed = Task(vm="vm1", source="h1", kind=TaskKind.EVACUATE, recovery=1, priority=0, row="storage",
                      action="fence-evacuate", failed={"storage": 1796230287.0}, created=1796230288.0,
                      state=TaskState.FAILED, reason="no fence proof")  # fmt: skip
        bus.recovery(failed, 1796230300.0)
        bus.alert(Level.INFO, "h1", None, "host 'h1' enabled", 1796230301.0)

        def received() -> list[dict[str, Any]]:
            lines = out.read_text().split("\n")[:-1]  # whole lines only: the listener may be writing one
            return [json.loads(line) for line in lines if line.startswith("{")]

        await until(lambda: len(received()) == 2, "both notifications, through oslo.messaging", timeout=30)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        stop_process(listener, timeout=10)
    error, alert = sorted(received(), key=lambda m: m["event_type"], reverse=True)
    assert (error["priority"], error["event_type"], error["publisher_id"]) == (
        "error", "recovery.process.error", "vmha-manager:m1")  # fmt: skip
    data = error["payload"]["vmha_object.data"]
    assert data["evidence"] == "https://vmha.example.org:8443/v1/recoveries/vm1"
    assert data["fault"]["vmha_object.data"]["exception_message"] == "no fence proof"
    assert error["timestamp"] == "2026-12-02 16:51:40"  # str(utcnow()): no zero microseconds
    assert (alert["priority"], alert["event_type"]) == ("info", "alert")
    assert alert["payload"]["vmha_object.data"]["evidence"] == "https://vmha.example.org:8443/v1/hosts"
    assert not (tmp_path / "undelivered.jsonl").exists()
