"""Why etcd fails: asked member by member, is it quorum lost (members up, none with a leader), or
something else (this process's own path, a busy cluster)? The managers alert the first (QuorumWatch,
fed by their election loop, which runs whether they lead or not): no agent or manager can fix it,
and nothing may move while it lasts.

Each member answers its status alone, without the cluster (EtcdClient.member_status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from vmha.etcd.client import EtcdClient, EtcdError, redact_url
from vmha.etcd.tls import TlsFiles

log = logging.getLogger("vmha.manager")

# Members up without a leader for this long is a lost quorum, not an election (about a second here).
ALERT_AFTER = 3.0

Answer = tuple[int, int] | str  # (member id, leader id as it knows it; 0 none), or the error


def quorum_lost(answers: dict[str, Answer]) -> str | None:
    """The evidence that the cluster has lost quorum, or None: no member answered (nothing is known
    about the others), or one knows a leader (the cluster has one, whatever failed)."""
    up = {url: a for url, a in answers.items() if not isinstance(a, str)}
    if not up or any(leader for _, leader in up.values()):
        return None
    down = {url: a for url, a in answers.items() if isinstance(a, str)}
    text = "etcd lost quorum: up without a leader: " + ", ".join(
        f"{redact_url(u)} (member {m:x})" for u, (m, _) in sorted(up.items())
    )
    if down:
        text += "; not answering: " + ", ".join(f"{redact_url(u)} ({e})" for u, e in sorted(down.items()))
    return text


async def ask_members(urls: list[str], tls: TlsFiles | None, timeout: float, name: str) -> dict[str, Answer]:
    """Every endpoint's own status, asked at once, each on a connection of its own."""

    async def one(url: str) -> Answer:
        try:
            async with EtcdClient([url], timeout=timeout, name=f"{name}/status", tls=tls) as c:
                return await c.member_status()
        except EtcdError as e:
            return str(e)

    answers = await asyncio.gather(*(one(u) for u in urls))
    return dict(zip(urls, answers, strict=True))


class QuorumWatch:
    """Told of each etcd failure and success of a loop; alerts once per outage when the members
    stay up without a leader for ALERT_AFTER, and says when etcd answers again."""

    def __init__(self, client: EtcdClient, who: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.who = who
        self.clock = clock
        self.lost_since: float | None = None  # first failure that found the members without a leader
        self.alerted = False

    async def failed(self) -> None:
        lost = quorum_lost(await ask_members(self.client.urls, self.client.tls, self.client.timeout, self.who))
        now = self.clock()
        if lost is None:
            self.lost_since = None
            return
        if self.lost_since is None:
            self.lost_since = now
        if not self.alerted and now - self.lost_since >= ALERT_AFTER:
            self.alerted = True
            # No event record: etcd cannot store one now.
            log.error("ALERT %s: %s, for %.1f s: no failure can be detected or recovered until it returns",
                      self.who, lost, now - self.lost_since)  # fmt: skip

    def ok(self) -> None:
        if self.alerted and self.lost_since is not None:
            log.warning("%s: etcd answers again (quorum lost for at least %.1f s)", self.who,
                        self.clock() - self.lost_since)  # fmt: skip
        self.lost_since, self.alerted = None, False


__all__ = ["ALERT_AFTER", "Answer", "QuorumWatch", "ask_members", "quorum_lost"]
