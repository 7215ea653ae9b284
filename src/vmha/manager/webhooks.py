"""Alerts that reach people: every alert of the manager POSTed as JSON to each `[alerts] webhooks` URL.

    hooks = Webhooks(cfg.alerts, source={"cluster": ..., "manager": ...}, public_url=cfg.api.public_url)
    task = asyncio.create_task(hooks.run())
    hooks.send(payload)                  # never blocks, never raises: the decision loop goes on

One worker per URL, in order: a receiver that is down delays only its own alerts. A POST answered
2xx is delivered; anything else is retried `attempts` times with exponential backoff (retry_base,
doubling, capped at retry_cap). An alert that still was not delivered, or was waiting when the
manager stopped, is appended to the undelivered log (one JSON object a line: url, alert, error, t),
logged as an error and counted (vmha_webhook_undelivered_total): never silently lost.

With `[api] public_url`, each alert carries its evidence links (evidence_links): "evidence", the
API's record of what it is about (the VM's recoveries, else the hosts), and "dashboard", the page
opened on that VM's timeline. Without it, no links.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from vmha import metrics
from vmha.config import AlertsConfig
from vmha.etcd.client import redact_url

log = logging.getLogger("vmha.manager.webhooks")


def evidence_links(public_url: str | None, vm: str | None, host: str | None) -> dict[str, str]:
    """The links an alert about this VM (or host, or the cluster) carries: {} without a public URL."""
    if public_url is None:
        return {}
    if vm is not None:
        return {"evidence": f"{public_url}/v1/recoveries/{quote(vm, safe='')}",
                "dashboard": f"{public_url}/#vm={quote(vm, safe='')}"}  # fmt: skip
    return {"evidence": f"{public_url}/v1/hosts" if host is not None else f"{public_url}/v1/events",
            "dashboard": f"{public_url}/"}  # fmt: skip


class Webhooks:
    def __init__(self, cfg: AlertsConfig, source: Mapping[str, str], public_url: str | None = None) -> None:
        self.cfg = cfg
        self.source = dict(source)  # added to every alert (cluster, manager)
        self.public_url = public_url  # [api] public_url: the alerts' evidence links
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {url: asyncio.Queue() for url in cfg.webhooks}

    def send(self, alert: Mapping[str, Any]) -> None:
        payload = {**self.source, **evidence_links(self.public_url, alert.get("vm"), alert.get("host")), **alert}
        for q in self._queues.values():
            q.put_nowait(payload)

    async def run(self) -> None:
        """Deliver until cancelled; what is still queued then goes to the undelivered log."""
        workers = [asyncio.create_task(self._worker(url, q)) for url, q in self._queues.items()]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            for w in workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await w
            for url, q in self._queues.items():
                while not q.empty():
                    self._undelivered(url, q.get_nowait(), "the manager stopped before delivering it")

    async def _worker(self, url: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            payload = await q.get()
            try:
                await self._deliver(url, payload)
            except asyncio.CancelledError:
                self._undelivered(url, payload, "the manager stopped while delivering it")
                raise

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, sort_keys=True).encode()
        error = ""
        for attempt in range(1, self.cfg.attempts + 1):
            try:
                status = await asyncio.to_thread(self._post, url, body)
            except (urllib.error.URLError, OSError, ValueError) as e:
                error = str(getattr(e, "reason", e)) or type(e).__name__
            else:
                if 200 <= status < 300:
                    return
                error = f"HTTP {status}"
            if attempt < self.cfg.attempts:
                delay = min(self.cfg.retry_base * 2 ** (attempt - 1), self.cfg.retry_cap)
                log.warning("webhook %s: alert not delivered (%s), attempt %d of %d; retrying in %g s",
                            redact_url(url), error, attempt, self.cfg.attempts, delay)  # fmt: skip
                await asyncio.sleep(delay)
        self._undelivered(url, payload, f"{error} after {self.cfg.attempts} attempt(s)")

    def _post(self, url: str, body: bytes) -> int:
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:  # an answer, not a failure to reach it: its status decides
            return int(e.code)

    def _undelivered(self, url: str, payload: dict[str, Any], error: str) -> None:
        metrics.webhook_undelivered()
        log.error("webhook %s: alert NOT delivered (%s): %s; kept in %s", redact_url(url), error,
                  payload.get("text", ""), self.cfg.undelivered)  # fmt: skip
        line = json.dumps({"url": redact_url(url), "alert": payload, "error": error, "t": round(time.time(), 3)},
                          sort_keys=True)  # fmt: skip
        try:
            self.cfg.undelivered.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cfg.undelivered, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            log.error("cannot write the undelivered alerts log %s: %s", self.cfg.undelivered, e)


__all__ = ["Webhooks", "evidence_links"]
