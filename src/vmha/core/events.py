"""The events the recovery core takes in (RecoveryCore.step): health and fabric changes, inventory
snapshots, the results of its actions, the operator's commands, a takeover's tasks, and time."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from vmha.core.fencing import FenceProof
from vmha.core.health import FabricChange, HealthOutput, HostHealth
from vmha.core.queue import Step, Task

# -- inventory: drivers.base.VmInfo / HostInfo match these shapes (the core imports no adapter) -----


class VmLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def ha(self) -> bool: ...
    @property
    def priority(self) -> int: ...
    @property
    def state(self) -> str: ...  # the driver's word; desired.STOPPED: no copy runs


class HostLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def up(self) -> bool: ...
    @property
    def forced_down(self) -> bool: ...


# -- events in -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthUpdate:
    """A host's whole health view (HealthChange.health, or HealthCore.view() at start-up)."""

    health: HostHealth


@dataclass(frozen=True, slots=True)
class FabricUpdate:
    """A fabric outage began or ended (HealthOutput.fabric). Logged and alerted; the plane states
    themselves arrive as HealthUpdate (FABRIC planes select the 'fabric' policy row)."""

    change: FabricChange


@dataclass(frozen=True, slots=True)
class Inventory:
    """A full snapshot of the compute hosts and VMs (driver.hosts(), driver.vms())."""

    hosts: tuple[HostLike, ...]
    vms: tuple[VmLike, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """Which proof attempt a Prove and its result belong to: the VM's recovery number and the count
    of its prove steps so far (both persisted in the task, so they survive a leader change). A result
    of an older attempt is stale: it is logged and ignored."""

    recovery: int
    n: int

    def __str__(self) -> str:
        return f"{self.recovery}.{self.n}"


@dataclass(frozen=True, slots=True)
class ProofObtained:
    """Result of Prove: the old copy of the VM can no longer write."""

    proof: FenceProof
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class ProofRefused:
    """Result of Prove: no method succeeded (yet). retryable=False gives up at once. alert: a cause the
    operator must fix, beyond "no proof yet" (a lease never held on the VM's host), alerted once."""

    vm: str
    host: str
    attempt: Attempt
    reason: str
    retryable: bool = True
    alert: str = ""


@dataclass(frozen=True, slots=True)
class StepDone:
    """Result of ReleaseProof (step release), Evacuate (evacuate) or LiveMigrate (migrate).
    running_on: where the VM runs now (evacuate / migrate).

    Unlike proofs, step results need no attempt tag: a step's own result is the only way out of its
    state and nothing cancels a step in flight, so a VM never has two attempts of a step out at once
    (a new leader's core gets no result of the old one's actions: they end with its term)."""

    vm: str
    step: Step
    running_on: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StepFailed:
    """A step of a VM's task failed (DriverError.retryable says whether to retry)."""

    vm: str
    step: Step
    reason: str
    retryable: bool = True
    retry_after: float = 0.0  # s the API asked to wait (Retry-After): the retry comes no sooner


class HostOp(StrEnum):
    DISABLE = "disable"
    MARK_DOWN = "mark-down"
    ENABLE = "enable"


@dataclass(frozen=True, slots=True)
class HostOpDone:
    """Result of DisableHost (op disable), MarkHostDown (op mark-down) or EnableHost (op enable)."""

    host: str
    op: HostOp


@dataclass(frozen=True, slots=True)
class HostOpFailed:
    host: str
    op: HostOp
    reason: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class HostEnabled:
    """The operator re-enabled the host (`vmha host enable`: keys.disabled(host) deleted): what this
    manager did to it (disable, mark down) no longer keeps it out of the destinations."""

    host: str


@dataclass(frozen=True, slots=True)
class Maintenance:
    """`vmha host maintenance HOST on|off` (keys.maintenance(host) written / deleted). On: the host's
    HA VMs are live-migrated away (priority order, within the concurrency limits), it receives no VM,
    and its faults only alert. Off: it returns to placement (at once if healthy, else once it is)."""

    host: str
    on: bool


@dataclass(frozen=True, slots=True)
class Paused:
    """Cluster-wide pause of recoveries (keys.paused written / deleted, e.g. for an upgrade). On: a
    host whose row calls for more than an alert waits, and is only alerted; recoveries already
    started run to their end (a proved VM must be restarted). Off: the waiting hosts are acted upon."""

    on: bool
    why: str = ""


@dataclass(frozen=True, slots=True)
class HostOut:
    """At takeover: an earlier leader disabled (op disable) or marked down (op mark-down) this host,
    and no one enabled it since (keys.disabled(host) holds the record): it rejoins as if this leader
    had taken it out, unless that leader quarantined it (`quarantine`: why; keys.quarantined(host))."""

    host: str
    op: HostOp
    quarantine: str = ""


@dataclass(frozen=True, slots=True)
class RejoinChecked:
    """Result of CheckRejoin: what the core cannot see itself, checked by the runtime on the shared
    storage. ok: the host renews its sanlock lockspace and holds the lease of none of `vms` (no copy of
    a VM that runs elsewhere); evidence: what was seen (or why not ok)."""

    host: str
    ok: bool
    evidence: str


@dataclass(frozen=True, slots=True)
class AgentStopped:
    """The host's agent was stopped cleanly at `since` (unix time; its host record says so), or runs
    again (None). A planned stop or restart is not a failure: while the mark holds, lost planes only
    alert (row 'agent-stopped'), and nothing is fenced or evacuated."""

    host: str
    since: float | None


@dataclass(frozen=True, slots=True)
class TasksLoaded:
    """This manager became leader: the tasks persisted under tasks/ (Task.from_dict of each)."""

    tasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: retries and held decisions whose time has come are acted upon."""


RecoveryEvent = (
    HealthUpdate
    | FabricUpdate
    | Inventory
    | ProofObtained
    | ProofRefused
    | StepDone
    | StepFailed
    | HostOpDone
    | HostOpFailed
    | HostEnabled
    | HostOut
    | Maintenance
    | Paused
    | RejoinChecked
    | AgentStopped
    | TasksLoaded
    | Tick
)


def from_health(out: HealthOutput) -> list[HealthUpdate | FabricUpdate]:
    """The RecoveryCore events of one HealthCore output: each changed host's last view (its planes
    changed at the same instant: deciding on the first of them would act on half the picture), then
    the fabric changes."""
    last = {c.host: c.health for c in out.changes}  # dicts keep the order of first appearance
    events: list[HealthUpdate | FabricUpdate] = [HealthUpdate(h) for h in last.values()]
    events += [FabricUpdate(f) for f in out.fabric]
    return events


__all__ = [
    "AgentStopped",
    "Attempt",
    "FabricUpdate",
    "HealthUpdate",
    "HostEnabled",
    "HostLike",
    "HostOp",
    "HostOpDone",
    "HostOpFailed",
    "HostOut",
    "Inventory",
    "Maintenance",
    "Paused",
    "ProofObtained",
    "ProofRefused",
    "RecoveryEvent",
    "RejoinChecked",
    "StepDone",
    "StepFailed",
    "TasksLoaded",
    "Tick",
    "VmLike",
    "from_health",
]
