"""CoreState: what the recovery core knows (hosts, VMs, tasks, decisions in progress) and the
primitives shared by its parts, among them `_transition`, the one place a task changes state (through
`RecoveryQueue.transition`), is persisted and logged.

RecoveryCore is built in layers, each a class over the one below, each in a module named after what it
decides: state -> placement -> steps -> takeover -> rejoin -> hosts -> recovery (the entry).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from vmha.core.actions import PersistTask, RecordEvidence, RecoveryOutput
from vmha.core.desired import StoppedVms
from vmha.core.events import Attempt, HostLike, VmLike
from vmha.core.fencing import FenceProof
from vmha.core.health import HostHealth
from vmha.core.log import Level
from vmha.core.planes import PLANES, PlaneState
from vmha.core.policy import Action, Decision, PolicyTable
from vmha.core.queue import TERMINAL, RecoveryQueue, Step, Task, TaskState
from vmha.core.settings import RecoverySettings

EVACUATING_ACTIONS = frozenset({Action.ISOLATE_EVACUATE, Action.FENCE_EVACUATE})
MOVING_ACTIONS = EVACUATING_ACTIONS | {Action.LIVE_MIGRATE}


@dataclass(slots=True)
class HostDecision:
    """A host's current policy row, and when (and whether) it was acted upon."""

    decision: Decision
    since: float  # when the row took effect
    act_at: float  # when to act on it, if it still holds
    acted: bool = False
    waiting_inventory: bool = False


class CoreState:
    """What the recovery core knows, and the few primitives every part of it uses."""

    def __init__(self, policy: PolicyTable, settings: RecoverySettings) -> None:
        self.policy = policy
        self.settings = settings
        self.queue = RecoveryQueue(settings.limits)
        self._health: dict[str, HostHealth] = {}
        self._decisions: dict[str, HostDecision] = {}
        self._held: set[str] = set()  # hosts whose decision waits (decide_after, inventory)
        self._hosts: dict[str, HostLike] = {}
        self._vms: dict[str, VmLike] = {}
        self._placed: dict[str, str | None] = {}  # vm -> host, updated by our own moves too
        self._vms_on: dict[str, set[str]] = {}  # host -> VMs placed there (all, HA or not)
        self._inventory = False
        self._by_source: dict[str, set[str]] = {}  # host -> VMs with a task from it
        self._disabled: set[str] = set()  # disable requested (done or in flight)
        self._marked_down: set[str] = set()
        self._marking_down: set[str] = set()  # MarkHostDown in flight
        # VMs recovered (done / failed) from a host while it stayed failed: no second task for them
        # until the host has been seen healthy again.
        self._handled: dict[str, set[str]] = {}
        # vm -> the attempt of a Prove cancelled in flight (its task cancelled): a proof that still
        # arrives for it continues the recovery
        self._late_proof: dict[str, Attempt] = {}
        self._dests: list[str] | None = None  # eligible destinations, sorted (None: recompute)
        self._dest_set: set[str] = set()
        self._agent_stopped: dict[str, float] = {}  # host -> when its agent was stopped cleanly
        # (load, host) of eligible destinations, least loaded first. Every load change pushes a
        # fresh entry (_touch); entries whose load is no longer current are dropped when popped.
        self._dest_heap: list[tuple[int, str]] = []
        # Rejoin: hosts taken out by us (disabled / marked down) and healthy since (every plane UP);
        # the row that took each out; those waiting for unproved recoveries from them; those whose
        # CheckRejoin or EnableHost is in flight; those enabled by a rejoin (their keys.disabled
        # deletion comes back as HostEnabled: not the operator's).
        self._healthy_since: dict[str, float] = {}
        self._out_row: dict[str, str] = {}
        self._rejoin_wait: set[str] = set()
        self._rejoin_retry: dict[str, float] = {}  # host -> not before (its last check or enable failed)
        self._rejoining: set[str] = set()
        self._rejoined: set[str] = set()
        # Quarantine: per host, its failures (when, row) within quarantine_window; the hosts whose
        # current failure episode is counted; the hosts kept out until the operator enables them.
        self._failures: dict[str, list[tuple[float, str]]] = {}
        self._episode: set[str] = set()
        self._quarantined: set[str] = set()
        # Hosts in maintenance, and why: "operator" (`vmha host maintenance`), "agent" (a clean agent
        # stop with on_agent_stop = drain). Either keeps it; each ends only its own.
        self._maintenance: dict[str, set[str]] = {}
        # Recoveries paused cluster-wide (Paused); the hosts whose action waits for the resume.
        self._paused = False
        self._pause_held: set[str] = set()
        # Desired state: protected VMs seen stopped; why each due one waits (logged when it changes).
        self._stopped = StoppedVms(settings.restart_after)
        self._restart_wait: dict[str, str] = {}
        # Rebalancing: a host became a destination again (a round is due); no round before this time.
        self._rebalance_due = False
        self._rebalance_next = 0.0
        # Evacuate tasks loaded by this leader and not yet checked against the world (_verify_resumed):
        # nothing is done for them until then.
        self._unverified: set[str] = set()
        # vm -> the destination and proof of a previous leader's evacuation, perhaps still in flight, of a
        # resumed task this leader proves again: seen running there, it is the recovery's restart.
        self._deposed: dict[str, tuple[str, FenceProof | None]] = {}

    def _in_flight(self) -> bool:
        """Some task is not finished."""
        return len(self.queue) > sum(self.queue.count(s) for s in TERMINAL)

    def _all_up(self, host: str) -> bool:
        hh = self._health.get(host)
        return hh is not None and all(
            (st := hh.planes.get(p)) is not None and st.state == PlaneState.UP for p in PLANES)

    @staticmethod
    def _failed_text(hh: HostHealth) -> str:
        lost = [f"{p.value} {hh.planes[p].state.value} since {hh.planes[p].since:.1f}"
                for p in PLANES if hh.planes[p].state in (PlaneState.DOWN, PlaneState.FABRIC)]
        return ", ".join(lost) or "no plane lost"

    @staticmethod
    def _attempt(task: Task) -> Attempt:
        """The tag of the task's latest proof attempt."""
        return Attempt(task.recovery, task.attempts_of(Step.PROVE))

    def _load_of(self, host: str) -> int:
        return len(self._vms_on.get(host, ())) + self.queue.running_to(host)

    def _touch(self, host: str | None) -> None:
        """The load of `host` changed: keep its place in the destination order current."""
        if host is not None and self._dests is not None and host in self._dest_set:
            heapq.heappush(self._dest_heap, (self._load_of(host), host))

    def _transition(self, task: Task, new: TaskState, now: float, why: str, out: RecoveryOutput,
                    level: Level = Level.INFO, retry: tuple[float, TaskState] | None = None,
                    dest: str | None = None) -> None:
        old_dest = task.dest
        out.log.append(self.queue.transition(task, new, now, why, level, retry, dest))
        # A slot towards the destination was taken or given back: its load changed.
        self._touch(old_dest)
        if task.dest != old_dest:
            self._touch(task.dest)
        self._persist(task, out)

    @staticmethod
    def _persist(task: Task, out: RecoveryOutput) -> None:
        out.actions.append(PersistTask(task.vm, task.to_dict()))

    @staticmethod
    def _record_evidence(task: Task, out: RecoveryOutput) -> None:
        out.actions.append(RecordEvidence(task.vm, task.recovery, task.to_dict()))
