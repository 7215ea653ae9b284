"""Placement and capacity: which hosts may receive VMs, the least loaded one with room and a free
slot, the room kept for higher priorities under a shortfall, and the moves that are not recoveries
(rebalance rounds, maintenance drains).
"""

from __future__ import annotations

import heapq

from vmha.core.actions import Alert, RecoveryOutput
from vmha.core.log import Level, LogLine
from vmha.core.policy import MAINTENANCE_KEY, Action
from vmha.core.queue import ACTOR, RUNNING, TERMINAL, Task, TaskKind, TaskState
from vmha.core.rebalance import REBALANCE_KEY, plan
from vmha.core.state import CoreState


class Placement(CoreState):
    """Where VMs go: the layer over CoreState (what the core knows); task steps dispatch through it."""

    def _is_eligible(self, h: str) -> bool:
        """May receive VMs: every plane UP, enabled and up in the cloud, not disabled by us, not in
        maintenance."""
        info = self._hosts.get(h)
        return (
            info is not None and info.enabled and info.up and not info.forced_down
            and h not in self._disabled and h not in self._marked_down and h not in self._maintenance
            and self._all_up(h)
        )

    def _eligible(self) -> list[str]:
        """The eligible destinations, sorted; cached until something that affects them changes."""
        if self._dests is None:
            self._dests = [h for h in sorted(self._hosts) if self._is_eligible(h)]
            self._dest_set = set(self._dests)
            self._dest_heap = [(self._load_of(h), h) for h in self._dests]
            heapq.heapify(self._dest_heap)
        return self._dests

    def _pick_dest(self, source: str | None) -> tuple[str | None, bool]:
        """(the least loaded eligible host with room and a free slot, ties by name; whether any host
        has room). (None, True): every host with room is busy; (None, False): no host has room."""
        self._eligible()
        seen: list[tuple[int, str]] = []
        choice: str | None = None
        room = False
        while self._dest_heap:
            entry = heapq.heappop(self._dest_heap)
            load, h = entry
            if h not in self._dest_set or load != self._load_of(h) or entry in seen:
                continue  # stale: a current entry for the host is in the heap
            seen.append(entry)
            if h == source:
                continue
            if not self._room(h):
                break  # the least loaded host is full: every host is
            room = True
            if self.queue.has_slot(h):
                choice = h
                break
        for entry in seen:
            heapq.heappush(self._dest_heap, entry)
        return choice, room

    def _room(self, host: str) -> bool:
        cap = self.settings.host_capacity
        return cap == 0 or self._load_of(host) < cap

    def _capacity_check(self, now: float, out: RecoveryOutput) -> None:
        """Before evacuating: can the surviving hosts hold every VM waiting for a place?"""
        cap = self.settings.host_capacity
        if cap == 0:
            return
        free = sum(max(0, cap - self._load_of(h)) for h in self._eligible())
        waiting = sorted(
            (t for t in self.queue if t.kind == TaskKind.EVACUATE and t.state not in TERMINAL
             and t.dest is None),
            key=lambda t: (-t.priority, t.vm))
        if len(waiting) <= free:
            return
        left = waiting[free:]
        text = (f"capacity shortfall: {len(waiting)} VM(s) to evacuate, room for {free} "
                f"({len(self._eligible())} host(s) x {cap}); cannot be placed: "
                + ", ".join(f"{t.vm} (priority {t.priority})" for t in left))
        out.log.append(LogLine(Level.WARN, now, ACTOR, text))
        out.actions.append(Alert(Level.WARN, None, None, text))

    def _room_left(self) -> int:
        """Free places on the eligible hosts (host_capacity set)."""
        cap = self.settings.host_capacity
        return sum(max(0, cap - self._load_of(h)) for h in self._eligible())

    def _ahead(self, task: Task) -> int:
        """Evacuations still waiting for a place that go before `task`: higher priority, then name."""
        key = (-task.priority, task.vm)
        return sum(1 for t in self.queue.values()
                   if t.kind == TaskKind.EVACUATE and t.state not in TERMINAL and t.state not in RUNNING
                   and (-t.priority, t.vm) < key)

    def _kept_for_others(self, task: Task) -> str:
        """Why an evacuation must not take a place now: the room left is kept for the higher-priority
        evacuations still waiting (proving, marking down, retrying), so that under a capacity shortfall
        the VMs restarted are the highest priorities, whatever order their proofs arrive in ('' if it
        may go)."""
        if task.kind != TaskKind.EVACUATE or not self.settings.host_capacity:
            return ""
        ahead, free = self._ahead(task), self._room_left()
        return "" if ahead < free else f"the room left ({free}) is kept for {ahead} VM(s) of higher priority"

    def _unblock_unplaced(self, now: float, out: RecoveryOutput) -> None:
        if not any(self._room(h) for h in self._eligible()):
            return
        for t in self.queue.in_state(TaskState.UNPLACED):
            if t.vm not in self._unverified and not self._kept_for_others(t):
                self._transition(t, TaskState.READY, now, "room on a host again", out)

    def _place(self, vm: str, host: str | None) -> None:
        """The VM moved (our own evacuation/migration), before the next inventory says so."""
        old = self._placed.get(vm)
        if old is not None:
            self._vms_on.get(old, set()).discard(vm)
        self._placed[vm] = host
        if host is not None:
            self._vms_on.setdefault(host, set()).add(vm)
        self._touch(old)
        self._touch(host)

    def _rebalance(self, now: float, out: RecoveryOutput) -> None:
        """One bounded round of live migrations towards the least loaded hosts (core/rebalance.py), when
        no recovery is in flight: a recovery's placement comes first, and a round plans on settled loads."""
        if not self._inventory or self._in_flight():
            return
        hosts = self._eligible()
        loads = {h: self._load_of(h) for h in hosts}
        movable = {h: [(v.priority, v.name) for name in self._vms_on.get(h, ())
                       if (v := self._vms[name]).ha and self._placed.get(name) == h] for h in hosts}
        moves = plan(loads, movable, self.settings.rebalance_moves, self.settings.host_capacity)
        self._rebalance_next = now + self.settings.rebalance_cooldown
        # Moved some: another round after the cool-down, until even. Fewer than two destinations (a
        # fabric outage, the hosts still out): nothing can be judged now, so the round stays due; it
        # was dropped, and a host that rejoined during a fabric outage kept its 10 VMs for good.
        self._rebalance_due = bool(moves) or len(hosts) < 2
        if len(hosts) < 2:
            return
        text = ", ".join(f"{h}={n}" for h, n in sorted(loads.items()))
        if not moves:
            out.log.append(LogLine(Level.INFO, now, ACTOR, f"rebalance: loads {text}: even, nothing to move"))
            return
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"rebalance: loads {text}: live-migrating "
                               + ", ".join(f"{vm} from '{src}'" for vm, src in moves)
                               + f" to the least loaded; next round not before {self._rebalance_next:.1f}"))
        for vm, src in moves:
            info = self._vms[vm]
            task = Task(vm=vm, source=src, kind=TaskKind.MIGRATE, recovery=self.queue.next_recovery(vm),
                        priority=info.priority, row=REBALANCE_KEY, action=Action.LIVE_MIGRATE.value,
                        failed={}, created=now)
            self.queue.add(task, now)
            self._by_source.setdefault(src, set()).add(vm)
            self._transition(task, TaskState.READY, now, f"rebalance, priority {task.priority}", out)

    def _drain(self, host: str, vms: list[str], why: str, now: float, out: RecoveryOutput) -> None:
        """Live-migrate the HA VMs among `vms` away from `host` (no task for those that have one)."""
        new: list[Task] = []
        for vm in vms:
            info = self._vms.get(vm)
            if info is None or not info.ha or self.queue.active(vm) is not None:
                continue
            task = Task(vm=vm, source=host, kind=TaskKind.MIGRATE, recovery=self.queue.next_recovery(vm),
                        priority=info.priority, row=MAINTENANCE_KEY, action=Action.LIVE_MIGRATE.value,
                        failed={}, created=now)
            self.queue.add(task, now)
            self._by_source.setdefault(host, set()).add(vm)
            new.append(task)
        out.log.append(LogLine(Level.INFO, now, ACTOR, f"host '{host}': {why}: draining {len(new)} HA VM(s), "
                               "its faults alert only"))
        for task in new:
            self._transition(task, TaskState.READY, now, f"drain, priority {task.priority}", out)
