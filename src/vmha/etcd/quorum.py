"""Why etcd fails: asked member by member, is it quorum lost (members up, none with a leader), or
something else (this process's own path, a busy cluster)? The manager alerts the first, which no
agent or manager can fix and during which nothing may move.

Each member answers its status alone, without the cluster (EtcdClient.member_status).
"""

from __future__ import annotations

import asyncio

from vmha.etcd.client import EtcdClient, EtcdError, redact_url
from vmha.etcd.tls import TlsFiles

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


__all__ = ["Answer", "ask_members", "quorum_lost"]
