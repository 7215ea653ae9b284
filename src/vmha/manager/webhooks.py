"""Alerts that reach people: every alert of the manager POSTed as JSON to each `[alerts] webhooks` URL.

    hooks = Webhooks(cfg.alerts, source={"cluster": ..., "manager": ...}, public_url=cfg.api.public_url)
    task = asyncio.create_task(hooks.run())
    hooks.send(payload)                  # never blocks, never raises: the decision loop goes on

One worker per URL (vmha.manager.outbox), in order: a receiver that is down delays only its own
alerts. A POST answered 2xx is delivered; anything else is retried `attempts` times with exponential
backoff. An alert that still was not delivered, or was waiting when the manager stopped, is appended
to the undelivered log (one JSON object a line: url, alert, error, t), logged as an error and counted
(vmha_webhook_undelivered_total): never silently lost.

With `[api] public_url`, each alert carries its evidence links (evidence_links): "evidence", the
API's record of what it is about (the VM's recoveries, else the hosts), and "dashboard", the page
opened on that VM's timeline. Without it, no links.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from vmha import metrics
from vmha.config import AlertsConfig
from vmha.etcd.client import redact_url
from vmha.manager.outbox import Deliver, Outbox, Undelivered


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
        self.outbox = Outbox("webhook", cfg, {redact_url(url): self._poster(url) for url in cfg.webhooks},
                             metrics.webhook_undelivered)  # fmt: skip

    def send(self, alert: Mapping[str, Any]) -> None:
        payload = {**self.source, **evidence_links(self.public_url, alert.get("vm"), alert.get("host")), **alert}
        self.outbox.put(payload, f"alert {str(payload.get('text', ''))!r}")

    async def run(self) -> None:
        """Deliver until cancelled; what is still queued then goes to the undelivered log."""
        await self.outbox.run()

    def _poster(self, url: str) -> Deliver:
        async def deliver(payload: dict[str, Any]) -> None:
            body = json.dumps(payload, sort_keys=True).encode()
            try:
                status = await asyncio.to_thread(self._post, url, body)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise Undelivered(str(getattr(e, "reason", e)) or type(e).__name__) from None
            if not 200 <= status < 300:
                raise Undelivered(f"HTTP {status}")

        return deliver

    def _post(self, url: str, body: bytes) -> int:
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:  # an answer, not a failure to reach it: its status decides
            return int(e.code)


__all__ = ["Webhooks", "evidence_links"]
