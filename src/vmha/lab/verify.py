"""`vmha lab verify`: what the lab VMs' disks say happened (pure functions, no I/O here).

A lab VM appends one JSON line per write to its disk: {"vm", "host", "seq", "t", "mono"} (t: unix
time; mono: the lab machine's CLOCK_MONOTONIC, absent from records older than it). From those
records alone:
- split-brain: two hosts writing in the same time span (their writing intervals overlap), or a
  sequence number that does not grow in file order (two copies continued from the same record);
- downtime: gaps between consecutive writes (any host) longer than `gap`.
Records are placed in time by t, while the time between two of them is measured by mono when both
carry it: a step of the machine's wall clock (seen in CI: +7 s at once, every lab VM "silent" for
6.6 s by t) is no silence of the VM. All lab hosts share one kernel, so one monotonic clock.
Faults (from the lab's fault log) are matched with the manager's evidence records by fault_report.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A copy writes every 0.1 s; a silence longer than this is downtime, and ends a copy's interval.
# 1 s: on a loaded machine single writes over sshfs stall for up to ~0.8 s (seen with 6 test runs on
# 2 cores), which is no outage. Short enough that a copy that stopped and one that took over later
# never merge into one interval; a real second writer that stalls longer still shows as a seq
# error (both continue from the same record).
DEFAULT_GAP = 1.0


def restart_floor(guests: str) -> float:
    """The shortest silence a restart of this kind of lab VM can cause: below it, a gap is a pause
    (a live migration's hand-over, a busy machine's late write), never a restart. A QEMU guest is
    silent for its boot at least (4.2 s at best, BENCHMARKS.md), while a live migration under TCG
    on a loaded 2-core machine paused one for 1.26 s (CI, 2026-12-03). A stand-in VM restarts in
    a fraction of a second, so for it every gap counts."""
    return 3.0 if guests == "qemu" else 0.0


@dataclass(frozen=True, slots=True)
class Record:
    vm: str
    host: str
    seq: int
    t: float
    mono: float | None = None


def elapsed(a: Record, b: Record) -> float:
    """Seconds from write a to write b: by the monotonic clock when both carry it and it runs forward
    between them (it restarts with the machine), else by their wall-clock times."""
    if a.mono is not None and b.mono is not None and b.mono >= a.mono:
        return b.mono - a.mono
    return b.t - a.t


@dataclass(frozen=True, slots=True)
class Interval:
    host: str
    start: float
    end: float
    first_seq: int
    last_seq: int
    writes: int

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "start": self.start, "end": self.end, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "writes": self.writes}


@dataclass(frozen=True, slots=True)
class Gap:
    """A silence between two writes: placed by their wall-clock times, `seconds` long (elapsed())."""

    start: float
    end: float
    from_host: str
    to_host: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "seconds": round(self.seconds, 3),
                "from_host": self.from_host, "to_host": self.to_host}


@dataclass(frozen=True, slots=True)
class Overlap:
    """A span in which two hosts both wrote the disk: split-brain."""

    hosts: tuple[str, str]
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        return {"hosts": list(self.hosts), "start": self.start, "end": self.end,
                "seconds": round(self.end - self.start, 3)}


@dataclass(frozen=True, slots=True)
class SeqError:
    """A record whose seq is not above the one before it in the file."""

    line: int
    host: str
    seq: int
    previous_seq: int

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "host": self.host, "seq": self.seq, "previous_seq": self.previous_seq}


@dataclass(frozen=True, slots=True)
class DiskReport:
    vm: str
    writes: int
    intervals: tuple[Interval, ...]
    overlaps: tuple[Overlap, ...]
    seq_errors: tuple[SeqError, ...]
    gaps: tuple[Gap, ...]
    bad_lines: tuple[int, ...] = field(default=())
    last_t: float | None = None
    last_host: str | None = None

    @property
    def split_brain(self) -> bool:
        return bool(self.overlaps or self.seq_errors)

    @property
    def downtime(self) -> float:
        return sum(g.seconds for g in self.gaps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "writes": self.writes,
            "split_brain": self.split_brain,
            "overlaps": [o.to_dict() for o in self.overlaps],
            "seq_errors": [e.to_dict() for e in self.seq_errors],
            "downtime": round(self.downtime, 3),
            "gaps": [g.to_dict() for g in self.gaps],
            "intervals": [i.to_dict() for i in self.intervals],
            "bad_lines": list(self.bad_lines),
            "last_t": self.last_t,
            "last_host": self.last_host,
        }


def parse_disk(vm: str, lines: Iterable[str]) -> tuple[list[tuple[int, Record]], list[int]]:
    """(line number, record) for every well-formed record of this VM, and the numbers of bad lines.

    A torn last line (a copy killed mid-write) is a bad line, reported and skipped.
    """
    records: list[tuple[int, Record]] = []
    bad: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            mono = d.get("mono")
            rec = Record(vm=str(d["vm"]), host=str(d["host"]), seq=int(d["seq"]), t=float(d["t"]),
                         mono=None if mono is None else float(mono))
        except (ValueError, KeyError, TypeError):
            bad.append(n)
            continue
        if rec.vm != vm:
            bad.append(n)
            continue
        records.append((n, rec))
    return records, bad


def intervals(records: Sequence[Record], gap: float = DEFAULT_GAP) -> list[Interval]:
    """Per host, its runs of writes with no silence longer than `gap`, sorted by start."""
    by_host: dict[str, list[Record]] = {}
    for r in records:
        by_host.setdefault(r.host, []).append(r)
    out: list[Interval] = []
    for host in sorted(by_host):
        run: list[Record] = []
        for r in sorted(by_host[host], key=lambda x: x.t):
            if run and elapsed(run[-1], r) > gap:
                out.append(_interval(host, run))
                run = []
            run.append(r)
        if run:
            out.append(_interval(host, run))
    return sorted(out, key=lambda i: (i.start, i.host))


def _interval(host: str, run: Sequence[Record]) -> Interval:
    return Interval(host, run[0].t, run[-1].t, run[0].seq, run[-1].seq, len(run))


def overlaps(ivs: Sequence[Interval]) -> list[Overlap]:
    """Every pair of intervals of different hosts sharing any instant (touching counts)."""
    out: list[Overlap] = []
    for i, a in enumerate(ivs):
        for b in ivs[i + 1 :]:
            if b.start > a.end:
                break  # sorted by start: no later interval reaches back into a
            if a.host != b.host:
                hosts = (a.host, b.host) if a.host < b.host else (b.host, a.host)
                out.append(Overlap(hosts, max(a.start, b.start), min(a.end, b.end)))
    return out


def seq_errors(numbered: Sequence[tuple[int, Record]]) -> list[SeqError]:
    out: list[SeqError] = []
    prev: int | None = None
    for n, r in numbered:
        if prev is not None and r.seq <= prev:
            out.append(SeqError(n, r.host, r.seq, prev))
        prev = r.seq if prev is None else max(prev, r.seq)
    return out


def gaps(records: Sequence[Record], gap: float = DEFAULT_GAP) -> list[Gap]:
    """Silences longer than `gap` between consecutive writes of any copy: the VM was not running."""
    ordered = sorted(records, key=lambda r: r.t)
    return [Gap(a.t, b.t, a.host, b.host, s) for a, b in itertools.pairwise(ordered) if (s := elapsed(a, b)) > gap]


def check_disk(vm: str, lines: Iterable[str], gap: float = DEFAULT_GAP) -> DiskReport:
    numbered, bad = parse_disk(vm, lines)
    recs = [r for _, r in numbered]
    ivs = intervals(recs, gap)
    last = max(recs, key=lambda r: r.t) if recs else None
    return DiskReport(
        vm=vm,
        writes=len(recs),
        intervals=tuple(ivs),
        overlaps=tuple(overlaps(ivs)),
        seq_errors=tuple(seq_errors(numbered)),
        gaps=tuple(gaps(recs, gap)),
        bad_lines=tuple(bad),
        last_t=last.t if last else None,
        last_host=last.host if last else None,
    )


def downtime_between(report: DiskReport, start: float, end: float, longer_than: float = 0.0) -> float:
    """Seconds of the report's gaps (those longer than `longer_than`) that fall inside [start, end]: a
    gap cut by the window counts in proportion to the wall-clock part of it inside."""
    total = 0.0
    for g in report.gaps:
        if g.seconds <= longer_than:
            continue
        lo, hi = max(g.start, start), min(g.end, end)
        if hi > lo:
            total += g.seconds * (hi - lo) / (g.end - g.start)
        elif g.end <= g.start and start <= g.start <= end:  # the wall clock stepped back across it
            total += g.seconds
    return total


def downtime_starting(report: DiskReport, start: float, end: float, longer_than: float = 0.0) -> float:
    """Seconds of the gaps (those longer than `longer_than`) that begin inside [start, end]: the
    downtime a fault at `start` caused, when the next fault comes at `end` (a gap it causes begins
    at most one write before it)."""
    return sum(g.seconds for g in report.gaps if start <= g.start <= end and g.seconds > longer_than)


def hosts_between(report: DiskReport, start: float, end: float) -> list[str]:
    """Hosts that wrote at some instant of [start, end]."""
    return sorted({i.host for i in report.intervals if i.start <= end and i.end >= start})


def summary(reports: Mapping[str, DiskReport]) -> dict[str, Any]:
    return {
        "vms": len(reports),
        "split_brain": sorted(vm for vm, r in reports.items() if r.split_brain),
        "downtime": {vm: round(r.downtime, 3) for vm, r in sorted(reports.items())},
    }
