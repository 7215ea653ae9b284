"""`vmha lab verify`: every disk, the fault log and the manager's evidence records, checked together.

Per VM: split-brain (two hosts writing at once: must never happen) and downtime (vmha.lab.verify).
Per fault episode (a host from its first plane down to its last plane up, a power-off to its
power-on, a fabric plane down to up): the policy row it makes, the action that row asks for, and
whether that is what happened:
  alert / disable   no VM of the host moved and no recovery task was recorded for it, but for the
                    desired state's restarts in place (evidence record with action restart and a
                    proof) of guests sanlock ended because the storage fabric was lost (their
                    downtime is sanlock's, not vmha's);
  live-migrate      every VM that ran on the host moved away without a restart (records say
                    live-migrate, no gap in its disk);
  *-evacuate        every VM that ran on the host runs elsewhere, each restart backed by an
                    evidence record with a fence proof.
A rebalancing move decided after the repair is no response to the fault: a VM's window ends there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vmha import config
from vmha.core.desired import RESTART
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.core.policy import Action, PolicyTable
from vmha.core.rebalance import REBALANCE_KEY
from vmha.lab import etcdq, novalab
from vmha.lab.cluster import KEYS
from vmha.lab.configs import manager_config
from vmha.lab.state import LabState
from vmha.lab.verify import DEFAULT_GAP, DiskReport, check_disk, downtime_starting, restart_floor, summary
from vmha.lab.vm import disk_lines

# After a repair, recoveries already under way may still finish: they belong to the episode.
SETTLE = 60.0


@dataclass(slots=True)
class Episode:
    target: str  # host name, or "fabric"
    start: float
    end: float | None = None  # None: not repaired yet
    planes: set[str] = field(default_factory=set)  # every plane lost during the episode
    power: bool = False  # a power-off

    def row_states(self) -> dict[Plane, PlaneState]:
        if self.target == "fabric":
            return {Plane(p): PlaneState.FABRIC for p in self.planes}
        lost = set(PLANES) if self.power else {Plane(p) for p in self.planes}
        return {p: PlaneState.DOWN for p in lost}

    def label(self) -> str:
        if self.power:
            return "power-off"
        what = "+".join(p.value for p in PLANES if p.value in self.planes)
        return f"fabric {what}" if self.target == "fabric" else what


def episodes(faults: list[dict[str, Any]]) -> list[Episode]:
    """Groups the fault log into episodes (see the module text); manager kills are not host faults."""
    out: list[Episode] = []
    open_: dict[str, Episode] = {}
    down: dict[str, set[str]] = {}
    for f in sorted(faults, key=lambda x: float(x.get("t", 0))):
        target, kind, action, t = str(f.get("target")), str(f.get("kind")), str(f.get("action")), float(f["t"])
        if target == "manager":
            continue
        if kind == "power":
            if action == "off":
                ep = open_.get(target) or Episode(target, t)
                ep.power = True
                if target not in open_:
                    open_[target] = ep
                    out.append(ep)
            elif target in open_ and open_[target].power:
                open_.pop(target).end = t
                down.pop(target, None)
            continue
        lost = down.setdefault(target, set())
        if action == "down":
            if target not in open_:
                open_[target] = Episode(target, t)
                out.append(open_[target])
            lost.add(kind)
            open_[target].planes.add(kind)
        elif action == "up":
            lost.discard(kind)
            if not lost and target in open_ and not open_[target].power:
                open_.pop(target).end = t
    return out


def _host_at(report: DiskReport, t: float) -> str | None:
    """The host whose interval covers t, or the last one that wrote before t."""
    best: tuple[float, str] | None = None
    for iv in report.intervals:
        if iv.start <= t and (best is None or iv.start >= best[0]):
            best = (iv.start, iv.host)
    return None if best is None else best[1]


def _runs_after(report: DiskReport, t: float, until: float) -> str | None:
    """The host of the last interval that started in (t, until] (where the VM went), if any."""
    later = [iv for iv in report.intervals if t < iv.start <= until]
    return max(later, key=lambda iv: iv.start).host if later else None


def check_episode(ep: Episode, policy: PolicyTable, disks: dict[str, DiskReport],
                  records: dict[str, list[dict[str, Any]]], window_end: float,
                  floor: float = 0.0) -> dict[str, Any]:
    """The episode's verdict; only what happened between its start and window_end counts. Where the
    policy keeps VMs running, only a gap longer than `floor` (restart_floor) is downtime."""
    decision = policy.decide(ep.row_states())
    expected = decision.action
    hosts = set(disks) if ep.target == "fabric" else None
    affected = sorted(vm for vm, r in disks.items()
                      if (hosts is not None and r.writes) or _host_at(r, ep.start) == ep.target)
    until = {vm: _until(ep, records.get(vm, []), window_end) for vm in affected}
    recs = {vm: [r for r in records.get(vm, []) if ep.start <= float(r.get("created", 0)) <= until[vm]
                 and not _rebalanced_after(ep, r) and (ep.target == "fabric" or r.get("source") == ep.target)]
            for vm in affected}
    problems: list[str] = []
    moved: dict[str, str | None] = {}
    for vm in affected:
        before = _host_at(disks[vm], ep.start)
        after = _runs_after(disks[vm], ep.start, until[vm])
        in_flight = _rebalancing_at_start(ep, records.get(vm, []))
        moved[vm] = after if after not in (before, in_flight) else None
        actions = {str(r.get("action")) for r in recs[vm]}
        if expected in (None, Action.ALERT, Action.DISABLE):
            # Storage lost by a fabric outage: sanlock ends the guests; the desired state restarts them
            # in place after the repair, each on a proof.
            killed = ep.target == "fabric" and Plane.STORAGE.value in ep.planes
            restarts = [r for r in recs[vm] if killed and r.get("action") == RESTART]
            if moved[vm] or any(r.get("kind") in ("evacuate", "migrate") for r in recs[vm] if r not in restarts):
                problems.append(f"{vm} moved ({before} -> {after}) or has a recovery, but the policy says "
                                f"{expected.value if expected else 'nothing'}")
            if any(not r.get("proof") for r in restarts):
                problems.append(f"{vm}: restarted without a fence proof in its evidence record")
            if not killed and downtime_starting(disks[vm], ep.start, until[vm] - DEFAULT_GAP, floor) > 0:
                problems.append(f"{vm}: downtime during a fault that must not touch it")
            continue
        if in_flight not in (None, before) and after == in_flight:
            continue  # it left on a move decided before the fault: there is no response to judge
        if not moved[vm]:
            problems.append(f"{vm} still on {before}: expected {expected.value}")
        if expected.value not in actions:
            problems.append(f"{vm}: no evidence record with action {expected.value} (saw {sorted(actions)})")
        if expected == Action.LIVE_MIGRATE:
            if downtime_starting(disks[vm], ep.start, until[vm] - DEFAULT_GAP, floor) > 0:
                problems.append(f"{vm}: live migration with downtime (a restart?)")
        elif not any(r.get("proof") for r in recs[vm]):
            problems.append(f"{vm}: restarted without a fence proof in its evidence record")
    return {
        "fault": ep.label(),
        "target": ep.target,
        "start": ep.start,
        "end": ep.end,
        "row": decision.key,
        "expected": expected.value if expected else None,
        "vms": affected,
        "moved": moved,
        "records": {vm: [{"action": r.get("action"), "state": r.get("state"),
                          "proof": (r.get("proof") or {}).get("method"), "running_on": r.get("running_on")}
                         for r in rs] for vm, rs in recs.items()},
        "ok": not problems,
        "problems": problems,
    }


def _rebalanced_after(ep: Episode, record: dict[str, Any]) -> bool:
    """A rebalancing move decided after the episode's repair. One decided during the episode is still
    judged: no host in a fault is a rebalancing source or destination."""
    return record.get("row") == REBALANCE_KEY and ep.end is not None and float(record.get("created", 0)) > ep.end


def _rebalancing_at_start(ep: Episode, records: list[dict[str, Any]]) -> str | None:
    """The destination of a rebalancing move decided before the episode began (its VM's latest record
    then), or None. Such a move may complete during the episode (CI, seed 4135235935: decided 26 ms
    before a fabric outage, done 0.9 s into it): it is no response to the fault."""
    earlier = [r for r in records if float(r.get("created", 0)) < ep.start]
    if not earlier:
        return None
    last = max(earlier, key=lambda r: float(r.get("created", 0)))
    dest = last.get("running_on")
    return str(dest) if last.get("row") == REBALANCE_KEY and dest else None


def _until(ep: Episode, records: list[dict[str, Any]], window_end: float) -> float:
    """Until when a VM's moves count for the episode: window_end, or the first rebalancing move decided
    after the repair (the rounds' end evens the load out within SETTLE of the last repair)."""
    return min([window_end, *(float(r.get("created", 0)) for r in records if _rebalanced_after(ep, r))])


def window_end(eps: list[Episode], i: int, now: float) -> float:
    """Until when episode i's effects count: SETTLE after its repair, but never into an episode that
    began after that repair (the demo runs them back to back: a later fault may move the same VMs
    again). An episode that began while this one lasted (two hosts powered off 0.6 s apart) does not
    cut it short: its recoveries are decided seconds after both began, and the records are told
    apart by their source host."""
    ep = eps[i]
    end = (ep.end if ep.end is not None else now) + SETTLE
    for later in eps[i + 1 :]:
        if ep.end is not None and later.start >= ep.end:
            return min(end, later.start)
    return end


def verify_lab(state: LabState, gap: float = DEFAULT_GAP) -> dict[str, Any]:
    disks: dict[str, DiskReport] = {}
    for vm in state.vms:
        try:
            lines = disk_lines(state.disk_on_controller(vm))
        except FileNotFoundError:
            lines = []
        disks[vm] = check_disk(vm, lines, gap)
    raw, bad = etcdq.get_json_prefix(state, KEYS.records_prefix())
    records: dict[str, list[dict[str, Any]]] = {}
    names = novalab.lab_names(state) if state.nova else {}
    for key in sorted(raw):  # records/<vm>/<n>: oldest first
        value = raw[key]
        if isinstance(value, dict):
            vm = str(value.get("vm"))
            records.setdefault(names.get(vm, vm), []).append(value)
    policy = config.load(manager_config(state, "m1")).policy_table
    now = time.time()
    eps = episodes(state.faults())
    floor = restart_floor(state.guests)
    faults = [check_episode(ep, policy, disks, records, window_end(eps, i, now), floor)
              for i, ep in enumerate(eps)]
    out = summary(disks)
    out.update({
        "ok": not out["split_brain"] and all(f["ok"] for f in faults),
        "faults": faults,
        "disks": {vm: r.to_dict() for vm, r in disks.items()},
        "unreadable_records": bad,
        "gap_threshold": gap,
    })
    return out
