"""Randomized fault search (`vmha sim explore`): random fault schedules through the manager's runtime
loop in the simulator, with invariants checked after every simulated event.

A seed draws a setup (recovery settings, proof and driver delays) and up to MAX_FAULTS faults in the
first FAULT_WINDOW seconds, most of them repaired some seconds later: plane cuts and repairs, flapping,
power-off and power-on, agent crashes, fabric outages (management or service plane), etcd leader
changes, manager failovers, failing proofs and driver calls (retryable: they are slow, not fatal).
At FAULT_WINDOW every fault is repaired; REPAIR_GRACE later the operator enables every host (`vmha
host enable`: quarantined hosts too). Invariants, after every event:
  - never two running copies of a VM;
  - no restart while the old copy still runs (the simulator's SPLIT BRAIN: a proof that was wrong);
  - no evacuation from a host that had only management-plane or fabric faults (an outage of one
    rack's plane, 2 hosts, is below the fabric guard's fabric_min_hosts: the hosts' own fault);
  - no task lost or doubled across leader changes: every unfinished task persisted is the new
    leader's, with the same recovery number, and a VM restarts at most once per recovery, for a
    recovery that is done or still under way;
and at the end, BOUND seconds after the repair: every VM runs (once); a VM that is not running and has
no task or a cancelled one is reported as 'lost with its host', one whose task FAILED (alerted) as
'left to the operator', any other as 'not recovered'.
A failing seed replays exactly (the same seed draws the same run) and is shrunk: faults are dropped
one at a time while the same invariant still fails; the rest is written as a scenario directory
(setup.toml, cmdlist), to be committed with its fix.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmha.core.queue import TaskState
from vmha.sim.env import Sim
from vmha.sim.scenario import Command, Scenario, from_setup

HOSTS = {"h1": "rack1", "h2": "rack1", "h3": "rack2", "h4": "rack2"}
VMS = {"vm1": "h1", "vm2": "h2", "vm3": "h2", "vm4": "h3", "vm5": "h4"}
FAULT_WINDOW = 60.0  # faults start within this many seconds; all are repaired at its end
REPAIR_GRACE = 30.0  # then the operator enables every host this much later
BOUND = 240.0  # every VM runs again this long after the repair
MAX_FAULTS = 6
BOOT = 20.0  # the shortest power cycle
_FINISHED = {TaskState.DONE.value, TaskState.FAILED.value, TaskState.CANCELLED.value}


class Violation(AssertionError):
    """An invariant failed: `what` names it (the shrinker keeps that name failing)."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what


@dataclass(frozen=True, slots=True)
class Run:
    seed: int
    setup: dict[str, Any]
    faults: tuple[Command, ...]  # the shrinkable part
    repairs: tuple[Command, ...]  # the repair at the end of the window: never shrunk

    @property
    def commands(self) -> list[Command]:
        return sorted(self.faults + self.repairs, key=lambda c: c.time)


def draw(seed: int) -> Run:
    """The setup and fault schedule of one seed."""
    rng = random.Random(seed)
    setup: dict[str, Any] = {
        "hosts": dict(HOSTS),
        "vms": {vm: {"host": host, "priority": rng.randint(0, 3)} for vm, host in VMS.items()},
        "settings": {
            "power_fence": rng.random() < 0.5,
            "rejoin_after": float(rng.choice([20, 60])),
            "max_parallel": rng.choice([1, 8]),
            "decide_after": rng.choice([0.0, 1.0]),
        },
        "sim": {
            "duration": FAULT_WINDOW + BOUND,
            "evacuate": rng.choice([0.5, 2.0, 8.0]),
            "mark_down": rng.choice([0.2, 3.0]),
            "proof_delay": {"request-force": rng.choice([0.5, 2.0, 9.0]), "power": rng.choice([1.0, 5.0, 15.0])},
        },
    }
    faults: list[Command] = []

    def at(t: float, *words: str) -> None:
        faults.append(Command(round(t, 1), words, f"seed {seed}"))

    hosts, vms = sorted(HOSTS), sorted(VMS)
    for _ in range(rng.randint(1, MAX_FAULTS)):
        t = rng.uniform(1.0, FAULT_WINDOW - 1.0)
        back = t + rng.choice([1.0, 4.0, 8.0, 15.0, 40.0, 100.0])  # beyond the window: the repair does it
        host = rng.choice(hosts)
        kind = rng.choice(["cut", "cut", "flap", "power", "agent", "fabric", "etcd", "failover", "fail"])
        if kind == "cut":
            plane = rng.choice(["management", "storage", "service", "all"])
            at(t, "cut", host, plane)
            if back < FAULT_WINDOW:
                at(back, "restore", host, plane)
        elif kind == "flap":
            plane = rng.choice(["management", "storage", "service"])
            for i in range(rng.randint(2, 4)):
                at(t + 3 * i, "cut", host, plane)
                at(t + 3 * i + rng.choice([0.5, 1.5, 2.5]), "restore", host, plane)
        elif kind == "power":
            # A power cycle takes a boot (BOOT s at least): a host back sooner than the failure is
            # detected would lose its VMs unseen, which no real host does.
            t = min(t, FAULT_WINDOW - BOOT)
            at(t, "power-off", host)
            if t + BOOT < back < FAULT_WINDOW:
                at(back, "power-on", host)
        elif kind == "agent":
            at(t, "agent-kill", host)
            if back < FAULT_WINDOW:
                at(back, "agent-start", host)
        elif kind == "fabric":
            plane = rng.choice(["management", "service"])
            domain = rng.choice([[], ["rack1"], ["rack2"]])
            at(t, "fabric", plane, "down", *domain)
            at(min(back, FAULT_WINDOW - 0.5), "fabric", plane, "up", *domain)
        elif kind == "etcd":
            at(t, "etcd-leader-change")
        elif kind == "failover":
            at(t, "manager-failover")
        else:
            what = rng.choice(["fail-proof", "fail-evacuate", "fail-migrate", "fail-mark-down"])
            at(t, what, host if what == "fail-mark-down" else rng.choice(vms), str(rng.randint(1, 2)))
    repairs: list[Command] = []
    for host in hosts:
        for words in (("restore", host, "all"), ("power-on", host), ("agent-start", host)):
            repairs.append(Command(FAULT_WINDOW, words, "repair"))
        repairs.append(Command(FAULT_WINDOW + REPAIR_GRACE, ("enable", host), "repair"))
    for fabric in ("management", "service"):
        repairs.append(Command(FAULT_WINDOW, ("fabric", fabric, "up"), "repair"))
        for rack in ("rack1", "rack2"):
            repairs.append(Command(FAULT_WINDOW, ("fabric", fabric, "up", rack), "repair"))
    return Run(seed, setup, tuple(sorted(faults, key=lambda c: c.time)), tuple(repairs))


class _Settled(Exception):
    """The run is over early: repaired, enabled, every VM running and every task finished."""


class Invariants:
    """The checks of one run, after every event of its simulation."""

    def __init__(self, sim: Sim, faults: tuple[Command, ...]) -> None:
        self.sim = sim
        self.faults = sorted(faults, key=lambda c: c.time)
        self.checked = 0  # restarts seen so far

    def _may_evacuate(self, host: str, until: float) -> bool:
        """The host had a fault that can call for a restart elsewhere (not management-only, not fabric)."""
        for c in self.faults:
            if c.time > until:
                break
            w = c.words
            if len(w) > 2 and w[0] == "cut" and w[1] == host and w[2] != "management":
                return True
            if len(w) > 1 and w[0] in ("power-off", "agent-kill") and w[1] == host:
                return True
            # An outage of one domain's plane is below fabric_min_hosts here (2 hosts a rack): to the
            # detector it is that plane lost by each of those hosts, not a fabric fault.
            if len(w) == 4 and w[0] == "fabric" and w[1] != "management" and w[2] == "down" \
                    and w[3] == self.sim.hosts[host].domain:
                return True
        return False

    def __call__(self) -> None:
        sim = self.sim
        for vm in sim.vms.values():
            if len(vm.copies) > 1:
                raise Violation("two copies", f"at {sim.now:.1f} vm '{vm.name}' runs on {sorted(vm.copies)}")
        if sim.split_brain:
            raise Violation("split brain", f"at {sim.now:.1f} a VM restarted while its old copy ran")
        for t, vm_name, source in sim.evacuated[self.checked:]:
            if not self._may_evacuate(source, t):
                raise Violation("needless evacuation",
                                f"at {t:.1f} vm '{vm_name}' restarted away from '{source}', which had only "
                                "management or fabric faults")
        self.checked = len(sim.evacuated)
        core = sim.manager.loop.core
        for vm_name, data in sim.store.items():
            if data["state"] in _FINISHED:
                continue
            task = core.task(vm_name)
            if task is None or task.recovery != data["recovery"]:
                raise Violation("task lost", f"at {sim.now:.1f} vm '{vm_name}': persisted recovery "
                                f"{data['recovery']} ({data['state']}) is not the leader's ({task and task.recovery})")
        for (vm_name, recovery), n in sim.restarts.items():
            # Once per recovery, and only for one that is done or still the leader's (its evacuation
            # in flight, or a deposed leader's that finished after the failover).
            task = core.task(vm_name)
            done = sim.records.get((vm_name, recovery), {}).get("state") == TaskState.DONE.value
            ongoing = task is not None and task.recovery == recovery and task.state.value not in _FINISHED
            if n > 1 or not (done or ongoing):
                raise Violation("task doubled", f"at {sim.now:.1f} vm '{vm_name}': {n} restart(s) for recovery "
                                f"{recovery}, which is {'done' if done else 'ongoing' if ongoing else 'not done'}")
        if sim.now > FAULT_WINDOW + REPAIR_GRACE and all(len(vm.copies) == 1 for vm in sim.vms.values()) \
                and all(t.state.value in _FINISHED for t in core.tasks()):
            raise _Settled()

    def at_end(self) -> None:
        core = self.sim.manager.loop.core
        for vm in self.sim.vms.values():
            if len(vm.copies) == 1:
                continue
            task = core.task(vm.name)
            if task is None or task.state == TaskState.CANCELLED:
                # Named apart: the VM died with its host, which came back before a recovery restarted it
                # (no task, or its task cancelled by the host's return), and nothing restarts it since.
                raise Violation("lost with its host", f"vm '{vm.name}' not running {BOUND:.0f} s after the repair, "
                                f"{'no task' if task is None else 'its task cancelled'}")
            if task.state == TaskState.FAILED:
                # The recovery gave up (a non-retryable failure, or too many) and alerted: the operator's.
                raise Violation("left to the operator", f"vm '{vm.name}' not running {BOUND:.0f} s after the "
                                f"repair, its task failed: {task.reason}")
            raise Violation("not recovered", f"vm '{vm.name}' not running {BOUND:.0f} s after the repair, "
                            f"its task {task.state.value}")


def replay(run: Run, faults: tuple[Command, ...] | None = None) -> tuple[Violation | None, list[str]]:
    """Run the seed's schedule (or a subset of its faults): the violation, if any, and the log."""
    faults = run.faults if faults is None else faults
    sim, duration = from_setup(run.setup, f"seed {run.seed}")
    scenario = Scenario(f"seed-{run.seed}", sim, sorted(faults + run.repairs, key=lambda c: c.time), duration)
    return checked(scenario, faults)


def checked(scenario: Scenario, faults: tuple[Command, ...] | None = None) -> tuple[Violation | None, list[str]]:
    """Run a scenario with the invariants (`faults`: the commands that are faults, default all)."""
    sim = scenario.sim
    check = Invariants(sim, tuple(scenario.commands) if faults is None else faults)
    try:
        scenario.run(check)
        check.at_end()
    except _Settled:
        pass
    except Violation as v:
        return v, [line.render() for line in sim.lines]
    return None, [line.render() for line in sim.lines]


def shrink(run: Run, violation: Violation) -> tuple[Command, ...]:
    """The fewest faults (dropping one at a time, until none can go) that still fail the same way."""
    faults = run.faults
    changed = True
    while changed:
        changed = False
        for i in range(len(faults)):
            fewer = faults[:i] + faults[i + 1:]
            v, _ = replay(run, fewer)
            if v is not None and v.what == violation.what:
                faults, changed = fewer, True
                break
    return faults


def write_scenario(directory: Path, run: Run, faults: tuple[Command, ...], violation: Violation) -> None:
    """setup.toml and cmdlist of the shrunk run (no log.expect: `VMHA_REWRITE=1` once it is fixed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "setup.toml").write_text(_toml(run.setup))
    lines = [f"# explore seed {run.seed}, shrunk: {violation}"]
    lines += [f"{c.time:g} {' '.join(c.words)}" for c in sorted(faults + run.repairs, key=lambda c: c.time)]
    (directory / "cmdlist").write_text("\n".join(lines) + "\n")


def _toml(raw: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        return repr(v)

    out: list[str] = []
    for table, items in raw.items():
        out.append(f"[{table}]")
        out += [f'"{k}" = {value(v)}' for k, v in items.items()]
        out.append("")
    return "\n".join(out)


def explore(first: int, count: int, found: Callable[[Run, Violation], None] | None = None) -> list[int]:
    """Seeds first .. first+count-1; the failing ones (each reported to `found`)."""
    failing = []
    for seed in range(first, first + count):
        run = draw(seed)
        v, _ = replay(run)
        if v is not None:
            failing.append(seed)
            if found is not None:
                found(run, v)
    return failing


__all__ = [
    "BOUND", "Invariants", "Run", "Violation", "checked", "draw", "explore", "replay", "shrink", "write_scenario",
]
