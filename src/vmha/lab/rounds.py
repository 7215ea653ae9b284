"""Random fault rounds (issue 11): seeded, every fault class mixed, each fault repaired before the
next, and no operator action at all: the hosts vmha took out must come back by themselves.

The run that found issue 11 (5 rounds, hosts never returning) ended with every VM on one host, then
none running. A run of rounds passes when, once every host has rejoined, every VM runs exactly once
and the VMs are spread over more than one host.

Placement alone cannot promise that spread: a host taken out stays out for `rejoin_after` (60 s),
longer than a round, so the faults of the next rounds send every VM to the few hosts left, and the
hosts that rejoin come back empty (the CI run with seed 3294725129 ended with all 10 VMs on h3). What
evens the load out once hosts return is rebalancing: in a lab with it (LabState.rebalance), the end
also waits for the load to be even (at most one VM between the most and the least loaded host). Each
round starts once no recovery or rebalancing move is in flight, from a settled lab.

The host of each round is drawn among the powered hosts vmha has not taken out, preferring those
that run VMs, and sparing a host that already failed QUARANTINE_SPARE times: a third failure within
the hour would quarantine it (which has its own test), and a quarantined host never returns by itself.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vmha.core.settings import RecoverySettings
from vmha.lab.configs import REBALANCE_COOLDOWN
from vmha.lab.scenario import CLASSES, FABRIC, Echo, Timeline, _disabled, in_flight, run_fault, running_on
from vmha.lab.state import LabState

QUARANTINE_SPARE = RecoverySettings().quarantine_after - 1
ALERT_ONLY = FABRIC  # classes that are no host failure (they do not count towards quarantine)
REJOIN_TIMEOUT = RecoverySettings().rejoin_after + 60.0  # the last repaired host's rejoin, with margin
# The moves still in flight after a round's repair (a VM that arrived on a failed host, a rebalancing round).
QUIET_TIMEOUT = 60.0
# The end's rebalancing: from 10 VMs on one host of 5, four rounds of 2 moves, REBALANCE_COOLDOWN apart,
# each on an inventory (every 10 s), with margin.
EVEN_TIMEOUT = 4 * (REBALANCE_COOLDOWN + 10.0) + 60.0
POLL = 0.5


@dataclass(slots=True)
class Rounds:
    seed: int
    timelines: list[Timeline] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    placement: dict[str, list[str | None]] = field(default_factory=dict)  # at the end

    @property
    def ok(self) -> bool:
        return not self.problems and all(tl.ok for tl in self.timelines)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "ok": self.ok, "problems": self.problems, "placement": self.placement,
                "rounds": [tl.to_dict() for tl in self.timelines]}


def plan(rounds: int, seed: int) -> list[str]:
    """The fault class of each round: every class once, the rest drawn at random, all shuffled."""
    rng = random.Random(seed)
    kinds = list(CLASSES) + rng.choices(list(CLASSES), k=max(0, rounds - len(CLASSES)))
    rng.shuffle(kinds)
    return kinds[:rounds]


def _pick(state: LabState, rng: random.Random, failures: Counter[str]) -> str | None:
    """The round's host; waits for one to rejoin when every candidate is still out (None: none did)."""
    deadline = time.monotonic() + REJOIN_TIMEOUT
    while True:
        state.reload()
        load = _loads(state)
        ok = [h for h, ns in sorted(state.hosts.items()) if ns.power == "on" and not _disabled(state, h)
              and failures[h] < QUARANTINE_SPARE]
        busy = [h for h in ok if load[h]]
        if ok or time.monotonic() > deadline:
            return rng.choice(busy or ok) if ok else None
        time.sleep(POLL)


def _quiet(state: LabState, timeout: float) -> list[str]:
    """Waits until no recovery task is in flight; the VMs of those still in flight at the timeout."""
    deadline = time.monotonic() + timeout
    while (busy := in_flight(state)) and time.monotonic() < deadline:
        time.sleep(POLL)
    return busy


def _loads(state: LabState) -> dict[str, int]:
    """VM copies running per lab host (every host, 0 included)."""
    load = dict.fromkeys(state.hosts, 0)
    for hs in running_on(state).values():
        for h in hs:
            if h in load:
                load[h] += 1
    return load


def _wait_even(state: LabState, timeout: float) -> dict[str, int]:
    """Waits until nothing is in flight and the most and least loaded hosts differ by one VM at most;
    the loads then, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        loads = _loads(state)
        even = max(loads.values()) - min(loads.values()) <= 1
        if (even and not in_flight(state)) or time.monotonic() > deadline:
            return loads
        time.sleep(POLL)


def run_rounds(state: LabState, rounds: int, seed: int, echo: Echo) -> Rounds:
    if rounds < len(CLASSES):
        raise ValueError(f"{rounds} rounds cannot mix the {len(CLASSES)} fault classes")
    out = Rounds(seed)
    rng = random.Random(seed + 1)  # the hosts' draw, apart from the classes'
    failures: Counter[str] = Counter()
    echo(f"{rounds} random fault rounds, seed {seed}")
    for n, kind in enumerate(plan(rounds, seed), 1):
        busy = _quiet(state, QUIET_TIMEOUT)
        if busy:
            echo(f"round {n}: recoveries still in flight after {QUIET_TIMEOUT:.0f} s: {', '.join(busy)}")
        host = _pick(state, rng, failures)
        if host is None:
            out.problems.append(f"round {n}: no host left to fault (every host out or failed twice)")
            break
        tl = run_fault(state, kind, host, echo, enable=False)
        if kind not in ALERT_ONLY:
            failures[host] += 1
        echo(f"round {n}: {tl.line()}")
        out.timelines.append(tl)
    deadline = time.monotonic() + REJOIN_TIMEOUT
    out_hosts = sorted(h for h in state.hosts if _disabled(state, h))
    while out_hosts and time.monotonic() < deadline:
        time.sleep(POLL)
        out_hosts = sorted(h for h in state.hosts if _disabled(state, h))
    if out_hosts:
        out.problems.append(f"hosts still out {REJOIN_TIMEOUT:.0f} s after the last repair: {', '.join(out_hosts)}")
    elif state.rebalance:
        loads = _wait_even(state, EVEN_TIMEOUT)
        if max(loads.values()) - min(loads.values()) > 1:
            out.problems.append(f"load not even {EVEN_TIMEOUT:.0f} s after every host rejoined (rebalance on): "
                                + ", ".join(f"{h}={n}" for h, n in sorted(loads.items())))
    out.placement = {vm: running_on(state).get(vm, []) for vm in sorted(state.vms)}
    wrong = {vm: hs for vm, hs in out.placement.items() if len(hs) != 1}
    if wrong:
        out.problems.append(f"VMs not running exactly once: {wrong}")
    hosts = {hs[0] for hs in out.placement.values() if len(hs) == 1}
    if len(hosts) < 2:
        out.problems.append(f"every VM on {len(hosts)} host(s): {sorted(h or '-' for h in hosts)}")
    echo(f"end: {'ok' if out.ok else 'WRONG: ' + '; '.join(out.problems)}; VMs on {len(hosts)} hosts ("
         + ", ".join(f"{h}={n}" for h, n in sorted(_loads(state).items())) + ")")
    return out


__all__ = ["Rounds", "plan", "run_rounds"]
