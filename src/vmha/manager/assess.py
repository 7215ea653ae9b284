"""The verdict of `vmha status` for people and monitors: OK, DEGRADED, CRITICAL or UNKNOWN, with
the Nagios plugin exit codes (0, 1, 2, 3), a one-line summary and one line per problem.

    verdict = assess(hosts, tasks, unreadable, members, now)   # pure: what etcd said in, verdict out
    verdict.summary   # "VMHA CRITICAL - no active manager; 2 hosts degraded"

CRITICAL: nothing recovers, or a VM is down and the manager cannot bring it back by itself:
  no active manager; etcd quorum lost; a fabric outage; a recovery FAILED (within failed_window);
  a VM waiting for a place (unplaced: proved dead, runs nowhere); a VM whose fence proof was refused
  and is still awaited (no proof, no restart).
DEGRADED: the cluster works but is not whole: a host with a plane not UP, taken out by vmha
  (disabled, marked down, quarantined) or in maintenance; a recovery under way; an unreadable task;
  recoveries paused; an etcd member not answering; no host in the health view.
UNKNOWN (cannot_read): etcd could not be read at all, so nothing can be said (the Nagios convention;
  a lost quorum, which the members themselves report, is CRITICAL instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from vmha.core.planes import PLANES
from vmha.core.queue import TERMINAL, Step, Task, TaskState
from vmha.etcd.client import redact_url
from vmha.etcd.quorum import Answer, quorum_lost
from vmha.timefmt import when

FAILED_WINDOW = 86400.0  # a FAILED recovery counts as critical for a day: its alert went out then


class Level(IntEnum):
    """The exit code of `vmha status` (Nagios plugin convention)."""

    OK = 0
    DEGRADED = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Problem:
    level: Level
    what: str  # manager, etcd, fabric, host, recovery, task, pause
    subject: str  # the host, VM, etcd member or task key it is about ("" for the cluster)
    text: str  # one line for people, with its evidence
    short: str = ""  # its words in the summary line, for a cluster-wide problem (others are counted)

    def to_dict(self) -> dict[str, object]:
        return {"level": self.level.name.lower(), "what": self.what, "subject": self.subject, "text": self.text}


@dataclass(frozen=True, slots=True)
class Verdict:
    level: Level
    summary: str  # the first line of the output: what a monitor shows
    problems: tuple[Problem, ...]

    def to_dict(self) -> dict[str, object]:
        return {"level": self.level.name.lower(), "code": int(self.level), "summary": self.summary,
                "problems": [p.to_dict() for p in self.problems]}  # fmt: skip


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _host(h: Mapping[str, Any], now: float) -> Problem | None:
    """A host's degraded states, in one line, or None when it is whole."""
    parts = [f"{p.value} {st['state'].upper()} since {when(st['since'], now)}"
             for p in PLANES if (st := h["planes"].get(p.value)) is not None and st["state"] != "up"]  # fmt: skip
    parts += [f"{p.value} unknown (no record)" for p in PLANES if p.value not in h["planes"]]
    if h.get("out"):
        parts.append("marked down by vmha" if h["out"] == "mark-down" else "disabled by vmha")
    if h.get("quarantined"):
        parts.append(f"quarantined ({h['quarantined']}): `vmha host enable` when repaired")
    if h.get("maintenance"):
        since = h.get("maintenance_since")
        parts.append("in maintenance" + (f" since {when(since, now)}" if since is not None else ""))
    if not parts:
        return None
    return Problem(Level.DEGRADED, "host", h["host"], f"host '{h['host']}': {'; '.join(parts)}")


def _refused_proof(t: Task) -> str | None:
    """The last refusal of the task's fence proof while one is still awaited (its VM is down and
    stays down until a proof comes), or None."""
    awaiting = t.state == TaskState.PROVING or (t.state == TaskState.RETRY_WAIT and t.resume == TaskState.PROVING)
    finished = [r for r in t.steps if r.step == Step.PROVE and r.finished is not None]
    if awaiting and finished and finished[-1].result != "ok":
        return finished[-1].result
    return None


def _task(t: Task, now: float, failed_window: float) -> Problem | None:
    where = f"vm '{t.vm}' (from host '{t.source}', row {t.row or '-'})"
    since = when(t.since or t.created, now)
    if t.state == TaskState.FAILED:
        if now - t.since > failed_window:
            return None
        return Problem(Level.CRITICAL, "recovery", t.vm, f"{where}: recovery FAILED since {since}: {t.reason}")
    if t.state == TaskState.UNPLACED:
        return Problem(Level.CRITICAL, "recovery", t.vm,
                       f"{where}: proved dead, runs nowhere: no host with room since {since}")  # fmt: skip
    if (refusal := _refused_proof(t)) is not None:
        return Problem(Level.CRITICAL, "recovery", t.vm, f"{where}: down, no fence proof ({refusal}); "
                       f"{t.attempts} failed attempt(s), {t.state.value} since {since}")  # fmt: skip
    if t.state in TERMINAL:
        return None
    step = f"{t.state.value} -> {t.resume.value}" if t.resume is not None else t.state.value
    return Problem(Level.DEGRADED, "recovery", t.vm, f"{where}: recovery {step} since {since}"
                   + (f" ({t.reason})" if t.reason else ""))  # fmt: skip


def _etcd(members: Mapping[str, Answer]) -> list[Problem]:
    lost = quorum_lost(dict(members))
    if lost is not None:
        return [Problem(Level.CRITICAL, "etcd", "", lost, "etcd quorum lost")]
    return [Problem(Level.DEGRADED, "etcd", redact_url(url), f"etcd member {redact_url(url)} not answering: {a}")
            for url, a in sorted(members.items()) if isinstance(a, str)]  # fmt: skip


def assess(hosts: Mapping[str, Any], tasks: Sequence[Task], unreadable: Mapping[str, str],
           members: Mapping[str, Answer], now: float, failed_window: float = FAILED_WINDOW) -> Verdict:  # fmt: skip
    """The verdict on what etcd holds: `hosts` as the API's /v1/hosts (vmha.api.views.hosts: the
    health view, operator states, leader, pause), the recovery tasks and the unreadable task keys
    (key -> why), and each etcd member's own status (vmha.etcd.quorum.ask_members)."""
    problems: list[Problem] = []
    if not hosts.get("leader"):
        problems.append(Problem(Level.CRITICAL, "manager", "", "no active manager (no leader in etcd): "
                                "no failure is detected or recovered", "no active manager"))  # fmt: skip
    problems += _etcd(members)
    for f in hosts["fabric"]:
        where = "the whole cluster" if f["domain"] is None else f"domain {f['domain']}"
        problems.append(Problem(Level.CRITICAL, "fabric", f["plane"], f"fabric outage: plane {f['plane']} in {where} "
                                f"since {when(f['since'], now)}: hosts {', '.join(f['hosts'])}",
                                f"fabric outage ({f['plane']})"))  # fmt: skip
    problems += [p for t in tasks if (p := _task(t, now, failed_window)) is not None]
    problems += [Problem(Level.DEGRADED, "task", key, f"unreadable task {key}: {why} (fix or delete the key)")
                 for key, why in sorted(unreadable.items())]  # fmt: skip
    pause = hosts.get("pause") or {}
    if pause.get("paused"):
        since = f" since {when(pause['t'], now)}" if pause.get("t") is not None else ""
        by = f" by {pause['by']}" if pause.get("by") else ""
        why = f": {pause['why']}" if pause.get("why") else ""
        problems.append(Problem(Level.DEGRADED, "pause", "", f"recoveries paused cluster-wide{since}{by}{why}",
                                "recoveries paused"))  # fmt: skip
    if not hosts["hosts"]:
        problems.append(Problem(Level.DEGRADED, "host", "", "no host in the manager's health view: nothing is "
                                "protected", "no host in the health view"))  # fmt: skip
    problems += [p for h in hosts["hosts"] if (p := _host(h, now)) is not None]
    problems.sort(key=lambda p: -p.level)  # stable: the worst first, each kind in the order above
    level = max((p.level for p in problems), default=Level.OK)
    return Verdict(level, f"VMHA {level.name} - {_summary(problems, hosts)}", tuple(problems))


def _summary(problems: Sequence[Problem], hosts: Mapping[str, Any]) -> str:
    if not problems:
        return f"{_count(len(hosts['hosts']), 'host', 'hosts')}, all planes up, leader {hosts['leader']}"
    critical = [p for p in problems if p.level == Level.CRITICAL]
    parts = list(dict.fromkeys(p.short for p in critical if p.short))  # in order, each once
    down = [p for p in critical if p.what == "recovery"]
    if down:
        parts.append(f"vm '{down[0].subject}' not recovered" if len(down) == 1
                     else f"{len(down)} VMs not recovered")  # fmt: skip
    degraded = [p for p in problems if p.level == Level.DEGRADED]
    for what, one, many in (("host", "host degraded", "hosts degraded"),
                            ("recovery", "recovery under way", "recoveries under way"),
                            ("task", "unreadable task", "unreadable tasks"),
                            ("etcd", "etcd member down", "etcd members down")):  # fmt: skip
        if n := sum(1 for p in degraded if p.what == what and not p.short):
            parts.append(_count(n, one, many))
    parts += [p.short for p in degraded if p.short]
    return "; ".join(parts)


def cannot_read(reason: str, members: Mapping[str, Answer]) -> Verdict:
    """etcd could not be read: CRITICAL when its members say they lost quorum (that is known),
    else UNKNOWN, with the reason (this machine's own path may be what failed)."""
    lost = [p for p in _etcd(members) if p.level == Level.CRITICAL]
    if lost:
        return Verdict(Level.CRITICAL, f"VMHA CRITICAL - {lost[0].short}: {reason}", tuple(lost))
    return Verdict(Level.UNKNOWN, f"VMHA UNKNOWN - {reason}", (Problem(Level.UNKNOWN, "etcd", "", reason),))


__all__ = ["FAILED_WINDOW", "Level", "Problem", "Verdict", "assess", "cannot_read"]
