"""Alert webhooks against a real local HTTP receiver: delivered in order, retried with backoff while the
receiver fails, and kept in the undelivered log when it never takes them (or the manager stops)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vmha import config, metrics
from vmha.config import AlertsConfig
from vmha.manager.webhooks import Webhooks
from vmha.testing.etcd import free_ports
from vmha.testing.wait import until


class Receiver:
    """Answers `fail` requests with 500, then 204; records the JSON bodies it took."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.got: list[dict[str, object]] = []
        self.tries = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.tries += 1
                if receiver.fail > 0:
                    receiver.fail -= 1
                    self.send_response(500)
                else:
                    receiver.got.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail=2)
    yield r
    r.close()


def settings(tmp_path: Path, *urls: str, attempts: int = 4) -> AlertsConfig:
    return AlertsConfig(webhooks=list(urls), attempts=attempts, retry_base=0.05, retry_cap=0.2, timeout=2,
                        undelivered=tmp_path / "undelivered.jsonl")  # fmt: skip


def undelivered(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "undelivered.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_delivered_in_order_after_retries(tmp_path: Path, receiver: Receiver) -> None:
    hooks = Webhooks(settings(tmp_path, receiver.url), {"cluster": "c", "manager": "m1"})
    task = asyncio.create_task(hooks.run())
    try:
        hooks.send({"level": "err", "host": "h1", "vm": "vm1", "text": "first"})
        hooks.send({"level": "warn", "host": "h1", "vm": None, "text": "second"})
        await until(lambda: len(receiver.got) == 2, "both alerts delivered", timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [a["text"] for a in receiver.got] == ["first", "second"]
    assert receiver.got[0] == {"cluster": "c", "manager": "m1", "level": "err", "host": "h1", "vm": "vm1",
                               "text": "first"}  # fmt: skip
    assert receiver.tries == 4  # the first alert failed twice (500), then both went through
    assert undelivered(tmp_path) == []


async def test_a_receiver_that_never_answers_gets_the_alert_in_the_undelivered_log(tmp_path: Path) -> None:
    receiver = Receiver()
    down = f"http://127.0.0.1:{free_ports(1)[0]}/hook"  # nothing listens there
    before = metrics.MANAGER.get_sample_value("vmha_webhook_undelivered_total") or 0.0
    hooks = Webhooks(settings(tmp_path, down, receiver.url, attempts=2), {"cluster": "c"})
    task = asyncio.create_task(hooks.run())
    try:
        hooks.send({"level": "err", "text": "host h1 fenced"})
        await until(lambda: undelivered(tmp_path), "the alert in the undelivered log", timeout=10)
        await until(lambda: receiver.got, "the working receiver still got it", timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        receiver.close()
    [lost] = undelivered(tmp_path)
    assert lost["url"] == down and lost["alert"] == {"cluster": "c", "level": "err", "text": "host h1 fenced"}
    assert "after 2 attempt(s)" in str(lost["error"])
    assert metrics.MANAGER.get_sample_value("vmha_webhook_undelivered_total") == before + 1


async def test_alerts_still_queued_at_stop_are_kept(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_ports(1)[0]}/hook"
    hooks = Webhooks(AlertsConfig(webhooks=[down], retry_base=30, undelivered=tmp_path / "undelivered.jsonl"), {})
    task = asyncio.create_task(hooks.run())
    hooks.send({"text": "one"})
    hooks.send({"text": "two"})
    await asyncio.sleep(0.3)  # the first is waiting for its retry
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [(a["alert"], a["error"]) for a in undelivered(tmp_path)] == [
        ({"text": "one"}, "the manager stopped while delivering it"),
        ({"text": "two"}, "the manager stopped before delivering it"),
    ]


@pytest.mark.parametrize("url", ["ftp://example.org/x", "http://", "example.org/hook", "http://a.b/\nx"])
def test_a_webhook_must_be_an_http_url(url: str) -> None:
    data = {"cluster": {"name": "c"}, "planes": {p: {"endpoints": ["http://127.0.0.1:2379"]}
                                                for p in ("management", "storage", "service")},
            "alerts": {"webhooks": [url]}}  # fmt: skip
    with pytest.raises(config.ConfigError, match=r"alerts\.webhooks\.0.*is not an http:// or https:// URL"):
        config.parse(data)


async def test_each_alert_carries_its_evidence_link_when_the_api_has_a_public_url(tmp_path: Path) -> None:
    receiver = Receiver()
    hooks = Webhooks(settings(tmp_path, receiver.url), {"cluster": "c"}, public_url="https://vmha.example.org:8443")
    task = asyncio.create_task(hooks.run())
    try:
        hooks.send({"level": "err", "host": "h1", "vm": "db 1/a", "text": "vm 'db 1/a' recovery FAILED"})
        hooks.send({"level": "err", "host": "h1", "vm": None, "text": "host 'h1' quarantined"})
        hooks.send({"level": "err", "host": None, "vm": None, "text": "fabric outage"})
        await until(lambda: len(receiver.got) == 3, "the three alerts delivered", timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        receiver.close()
    assert [(a["evidence"], a["dashboard"]) for a in receiver.got] == [
        ("https://vmha.example.org:8443/v1/recoveries/db%201%2Fa", "https://vmha.example.org:8443/#vm=db%201%2Fa"),
        ("https://vmha.example.org:8443/v1/hosts", "https://vmha.example.org:8443/"),
        ("https://vmha.example.org:8443/v1/events", "https://vmha.example.org:8443/"),
    ]
    # Without [api] public_url (test_delivered_in_order_after_retries): no link, and no error.


@pytest.mark.parametrize(("url", "error"), [
    ("https://vmha.example.org:8443/", None),
    ("http://10.0.0.5:8443", None),
    ("https://admin:secret@vmha.example.org/", "no user, password"),
    ("https://vmha.example.org/?token=x", "no user, password, query or fragment"),
    ("vmha.example.org", "is not an http:// or https:// URL"),
])  # fmt: skip
def test_the_api_public_url_is_a_plain_http_url(url: str, error: str | None) -> None:
    data = {"cluster": {"name": "c"}, "planes": {p: {"endpoints": ["http://127.0.0.1:2379"]}
                                                for p in ("management", "storage", "service")},
            "etcd": {"insecure": True},
            "api": {"cert": "/c.pem", "key": "/k.pem", "tokens_file": "/t", "public_url": url}}  # fmt: skip
    if error is None:
        api = config.parse(data).api
        assert api is not None and api.public_url == url.rstrip("/")
        return
    with pytest.raises(config.ConfigError, match=r"api\.public_url") as e:
        config.parse(data)
    assert error in str(e.value) and "secret" not in str(e.value)
