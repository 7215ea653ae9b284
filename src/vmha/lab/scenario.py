"""One fault of one class against a running lab, watched to its outcome and repaired: the building
block of `vmha demo`, `vmha bench rto` and the end-to-end tests.

Timeline of a fault (seconds after the fault was injected):
  detected   the manager's health view shows the fault (plane DOWN, or FABRIC)
  decided    the manager acted on it: a recovery task created, or the host disabled (management)
  proved     the last fence proof of the host's VMs was obtained (evacuations only)
  recovered  every VM of the host writes again elsewhere (evacuations, migrations): its disk's last
             record comes from another host (a QEMU guest: after its boot, not at its process's start)
  active     (lab with Nova) every server of the host's VMs is ACTIVE on another host in Nova's view
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmha.core.planes import PLANES, Plane
from vmha.core.queue import TERMINAL
from vmha.core.rebalance import REBALANCE_KEY
from vmha.lab import etcdq, faults, novalab
from vmha.lab.cluster import KEYS, health_problems, health_view, host_flags_key
from vmha.lab.configs import manager_config
from vmha.lab.controller import sanlock_run_dir
from vmha.lab.hosts import vmha_command
from vmha.lab.net import LabError, run
from vmha.lab.procs import vm_processes
from vmha.lab.state import LabState
from vmha.lab.verify import check_disk, downtime_between, restart_floor
from vmha.lab.vm import INTERVAL, disk_lines, last_record

Echo = Callable[[str], None]

# Fault classes: the planes each cuts on the host (the fabric classes cut the planes' bridges instead:
# every host at once).
CLASSES: dict[str, tuple[Plane, ...]] = {
    "management": (Plane.MANAGEMENT,),
    "service": (Plane.SERVICE,),
    "storage": (Plane.STORAGE,),
    "isolation": (Plane.MANAGEMENT, Plane.SERVICE),
    "power-off": (),
    "fabric": (Plane.SERVICE,),
    # Every host "isolated" at once: a fabric outage, so no agent may stop its VMs (isolation response).
    "fabric-isolation": (Plane.MANAGEMENT, Plane.SERVICE),
}
FABRIC = {"fabric", "fabric-isolation"}
MOVES = {"service", "storage", "isolation", "power-off"}  # the classes whose VMs must end elsewhere
OBSERVE = 10.0  # no-move classes: how long after detection nothing may move
OUTCOME_TIMEOUT = 150.0  # longer than sanlock's host_dead at io_timeout 1 (~70 s) with margin
SETTLE_TIMEOUT = 60.0  # repaired host back (boot, lockspace join ~3 s, enable) and every VM writing
NOVA_SETTLE_TIMEOUT = 150.0  # with Nova also: its compute restarted and up (~30 s), evacuations completed
POLL = 0.25
TERMINAL_STATES = {s.value for s in TERMINAL}


@dataclass(slots=True)
class Timeline:
    fault: str
    host: str
    t0: float
    vms: list[str]
    detected: float | None = None
    decided: float | None = None
    proved: float | None = None
    recovered: float | None = None
    active: float | None = None
    moved: dict[str, str | None] = field(default_factory=dict)  # vm -> host it runs on after
    # vm -> seconds without writes: every gap longer than two write intervals (STOP_GAP) counts
    downtime: dict[str, float] = field(default_factory=dict)
    stopped: dict[str, float] = field(default_factory=dict)  # vm -> seconds in gaps over 1 s: the VM stopped
    proofs: dict[str, str] = field(default_factory=dict)  # vm -> proof method
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault, "host": self.host, "t0": self.t0, "vms": self.vms,
            "detected": self.rel(self.detected), "decided": self.rel(self.decided),
            "proved": self.rel(self.proved), "recovered": self.rel(self.recovered), "active": self.rel(self.active),
            "moved": self.moved, "downtime": self.downtime, "stopped": self.stopped, "proofs": self.proofs,
            "ok": self.ok, "problems": self.problems,
        }  # fmt: skip

    def line(self) -> str:
        def s(t: float | None) -> str:
            r = self.rel(t)
            return "-" if r is None else f"+{r:.1f}s"

        where = ", ".join(f"{vm}->{h or 'nowhere'}" for vm, h in sorted(self.moved.items())) or "nothing moved"
        down = max(self.downtime.values(), default=0.0)
        # Two decimals: a live migration's pause of 0.3 s must not read as no downtime at all.
        verdict = "ok" if self.ok else "WRONG: " + "; ".join(self.problems)
        return (f"{self.fault:<10} {self.host:<6} detected {s(self.detected):>8}  decided {s(self.decided):>8}  "
                f"proved {s(self.proved):>8}  recovered {s(self.recovered):>8}  "
                f"{'' if self.active is None else f'nova ACTIVE {s(self.active):>8}  '}max VM downtime "
                f"{down:.2f}s  [{where}]  {verdict}")


def running_on(state: LabState) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for p in vm_processes(state.prefix):
        if p.active:
            out.setdefault(p.vm, []).append(p.host)
    return out


def _tasks(state: LabState) -> list[dict[str, Any]]:
    """Every recovery the manager recorded: finished (records) and current (tasks)."""
    raw, _ = etcdq.get_json_prefix(state, KEYS.records_prefix())
    tasks, _ = etcdq.get_json_prefix(state, KEYS.tasks_prefix)
    names = novalab.lab_names(state) if state.nova else {}  # Nova's tasks name servers by id
    out = []
    for value in [*raw.values(), *tasks.values()]:
        if isinstance(value, dict):
            value["vm"] = names.get(str(value.get("vm")), value.get("vm"))
            out.append(value)
    return out


def _records_since(state: LabState, vms: list[str], t0: float) -> list[dict[str, Any]]:
    """The fault's recoveries of `vms`: created since t0, rebalancing moves left out (no response to it)."""
    return [v for v in _tasks(state) if v.get("vm") in vms and float(v.get("created") or 0) >= t0
            and v.get("row") != REBALANCE_KEY]


def rebalanced(state: LabState, t0: float, before: float) -> set[str]:
    """VMs a rebalancing live migration moved during the round: decided before `before` (the fault's
    detection, while their host was still a healthy source), still running or ended since t0."""
    return {str(v.get("vm")) for v in _tasks(state)
            if v.get("row") == REBALANCE_KEY and float(v.get("created") or 0) < before
            and (v.get("state") not in TERMINAL_STATES or float(v.get("since") or 0) >= t0)}


def in_flight(state: LabState) -> list[str]:
    """VMs with an unfinished recovery task (a move under way, a proof, a retry, no place yet)."""
    tasks, _ = etcdq.get_json_prefix(state, KEYS.tasks_prefix)
    return sorted(str(v.get("vm")) for v in tasks.values()
                  if isinstance(v, dict) and v.get("state") not in TERMINAL_STATES)


def inject(state: LabState, kind: str, host: str, up: bool) -> None:
    if kind == "power-off":
        faults.power(state, host, on=up)
    elif kind in FABRIC:
        for p in CLASSES[kind]:
            faults.fabric(state, p.value, "up" if up else "down")
    else:
        for p in CLASSES[kind]:
            faults.host_plane(state, host, p.value, "up" if up else "down")


def _detected(state: LabState, kind: str, host: str) -> bool:
    view = health_view(state)
    if kind in FABRIC:
        return all(any(v.get(p.value) == "fabric" for v in view.values()) for p in CLASSES[kind])
    planes = PLANES if kind == "power-off" else CLASSES[kind]
    mine = view.get(host, {})
    return all(mine.get(p.value) == "down" for p in planes)


def _disabled(state: LabState, host: str) -> bool:
    if state.nova:
        svc = novalab.services(state).get(host, {})
        return svc.get("status") == "disabled" or bool(svc.get("forced_down"))
    key = host_flags_key(state, host)
    rec, _ = etcdq.get_json_prefix(state, key)
    value = rec.get(key)
    return isinstance(value, dict) and value.get("enabled") is False


def run_fault(state: LabState, kind: str, host: str, echo: Echo, enable: bool = True) -> Timeline:
    """Injects one fault, waits for its outcome, repairs it and waits until the lab is healthy again
    (enable: the operator also runs `vmha host enable`; else a host vmha took out rejoins by itself,
    later: the caller checks that)."""
    if kind not in CLASSES:
        raise LabError(f"unknown fault class {kind!r}: {', '.join(CLASSES)}")
    state.reload()
    before = running_on(state)
    vms = sorted(vm for vm, hs in before.items() if host in hs) if kind not in FABRIC else sorted(before)
    t0 = time.time()
    tl = Timeline(kind, host if kind not in FABRIC else "all", t0, vms)
    echo(f"fault {kind} on {tl.host} (VMs there: {', '.join(vms) or 'none'})")
    inject(state, kind, host, up=False)
    try:
        _watch(state, tl, kind, host)
    finally:
        echo(f"repair {kind} on {tl.host}")
        inject(state, kind, host, up=True)
    _settle(state, tl, host if kind not in FABRIC else None, enable)
    after = running_on(state)
    for vm in vms:
        hs = after.get(vm, [])
        tl.moved[vm] = hs[0] if len(hs) == 1 else None
        if len(hs) != 1:
            tl.problems.append(f"{vm} runs {len(hs)} times after the fault, expected once")
        elif kind in MOVES and hs[0] == host:
            tl.problems.append(f"{vm} still on {host}")
        elif kind not in MOVES and hs != before.get(vm) and vm not in rebalanced(state, t0, tl.detected or t0):
            tl.problems.append(f"{vm} moved ({before.get(vm)} -> {hs}) though the policy keeps it")
    now = time.time()
    for vm in vms:
        lines = disk_lines(state.disk_on_controller(vm))
        report = check_disk(vm, lines)
        tl.stopped[vm] = round(downtime_between(report, t0, now), 2)
        tl.downtime[vm] = round(downtime_between(check_disk(vm, lines, gap=2 * INTERVAL), t0, now), 2)
        if report.split_brain:
            tl.problems.append(f"{vm}: SPLIT-BRAIN {[o.to_dict() for o in report.overlaps]}")
        # No stop where the policy keeps VMs running: a live migration's pause, and a busy machine's
        # late write, stay under the 1 s gap, or (QEMU guests) under the shortest restart.
        if kind in ("management", "service", *FABRIC) and downtime_between(
                report, t0, now, restart_floor(state.guests)) > 0:
            tl.problems.append(f"{vm}: stopped for {tl.stopped[vm]} s where the policy keeps it running")
    return tl


def _watch(state: LabState, tl: Timeline, kind: str, host: str) -> None:
    deadline = time.monotonic() + OUTCOME_TIMEOUT
    quiet_until: float | None = None
    while time.monotonic() < deadline:
        now = time.time()
        if tl.detected is None and _detected(state, kind, host):
            tl.detected = now
            if kind not in MOVES:
                quiet_until = time.monotonic() + OBSERVE
        recs = _records_since(state, tl.vms, tl.t0) if kind in MOVES else []
        if recs and tl.decided is None:
            tl.decided = min(float(r["created"]) for r in recs)
            failed = [float(s) for r in recs for s in (r.get("failed") or {}).values()]
            if failed and tl.detected is not None:
                tl.detected = min(tl.detected, min(failed))  # the manager's own DOWN time is earlier
        if kind == "management" and tl.decided is None and _disabled(state, host):
            tl.decided = now
        for r in recs:
            proof = r.get("proof")
            if isinstance(proof, dict):
                tl.proofs[str(r["vm"])] = str(proof.get("method"))
                tl.proved = max(tl.proved or 0.0, float(proof.get("proved") or 0.0))
        if kind in MOVES:
            if state.nova and tl.active is None and tl.vms and _active_elsewhere(state, tl.vms, host):
                tl.active = now
            where = running_on(state)
            if tl.recovered is None and tl.vms and all(
                len(where.get(vm, [])) == 1 and where[vm][0] != host and writes_elsewhere(state, vm, host, tl.t0)
                for vm in tl.vms
            ):
                tl.recovered = now
            if tl.recovered is not None and (tl.active is not None or not state.nova):
                return
            if not tl.vms and tl.detected is not None:
                return
        elif quiet_until is not None and time.monotonic() >= quiet_until:
            return
        time.sleep(POLL)
    tl.problems.append(f"no outcome within {OUTCOME_TIMEOUT:.0f} s (detected: {tl.detected is not None})")


def writes_elsewhere(state: LabState, vm: str, host: str, since: float) -> bool:
    rec = last_record(state.disk_on_controller(vm))
    return rec is not None and rec.get("host") != host and float(str(rec.get("t", 0))) > since


def _active_elsewhere(state: LabState, vms: list[str], host: str) -> bool:
    """Nova's view: every server of `vms` ACTIVE, with no task, on another host than `host`."""
    servers = novalab.servers(state)
    return all(
        (s := servers.get(vm)) is not None and s["status"] == "ACTIVE" and s["task"] is None and s["host"] != host
        for vm in vms
    )


def _settle(state: LabState, tl: Timeline, host: str | None, enable: bool = True) -> None:
    """After the repair: the host enabled again (vmha host enable, unless not `enable`) and the lab
    healthy."""
    deadline = time.monotonic() + (NOVA_SETTLE_TIMEOUT if state.nova else SETTLE_TIMEOUT)
    since = time.time()
    enabled = host is None or not enable
    problems: list[str] = []
    state.reload()
    if host is not None and state.hosts[host].power == "off":
        # The manager fenced it (power fence): the operator's repair includes powering it on.
        faults.power(state, host, on=True)
    elif host is not None and state.nova and novalab.services(state).get(host, {}).get("forced_down"):
        # Nova un-forces the host only once its compute restarted and destroyed the evacuated
        # servers' copies (a powered-on host's compute is new already).
        novalab.restart_compute(state, host)
    while time.monotonic() < deadline:
        if not enabled and all(v == "up" for v in health_view(state).get(str(host), {}).values()):
            enabled = enable_host(state, str(host))
        problems = health_problems(state, since)
        if enabled and not problems:
            return
        time.sleep(0.5)
    tl.problems.append(f"lab not healthy after the repair: {'; '.join(problems[:4])}")


def enable_host(state: LabState, host: str) -> bool:
    """`vmha host enable HOST` (the manager's own command, which checks the host is clean first)."""
    if not _disabled(state, host):
        return True
    ctl = state.node("controller")
    cfg = manager_config(state, "m1")
    nova = [f"{k}={v}" for k, v in novalab.manager_env(state).items()] if state.nova else []
    cp = run([*ctl.enter(), "env", f"SANLOCK_RUN_DIR={sanlock_run_dir(state, 'm1')}", *nova,
              *vmha_command("host", "enable", "--config", str(cfg), host)], check=False, timeout=30)
    return cp.returncode == 0


def busiest_host(state: LabState, exclude: frozenset[str] = frozenset()) -> str:
    """The powered host running the most VMs (ties: by name), so every fault has VMs to move."""
    load = {h: 0 for h, ns in state.hosts.items() if ns.power == "on" and h not in exclude}
    for hs in running_on(state).values():
        for h in hs:
            if h in load:
                load[h] += 1
    if not load:
        raise LabError("no powered host left to inject a fault into")
    return max(sorted(load), key=lambda h: load[h])
