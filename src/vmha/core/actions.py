"""The actions the recovery core gives out (RecoveryOutput), for the runtime to carry out in order and
answer with events (events.py).

THE INVARIANT: no Evacuate without a FenceProof for that VM and host. It is enforced in one place,
`Evacuate.__post_init__`: the action cannot be built otherwise, so no code path can emit one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmha.core.events import Attempt
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.log import Level, LogLine


class InvariantError(AssertionError):
    """An evacuation without a matching fence proof was about to be emitted: a bug, never allowed."""


@dataclass(frozen=True, slots=True)
class PersistTask:
    """Write tasks/<vm> = data (JSON) with compare-and-swap. Comes before the step it records."""

    vm: str
    data: dict[str, object]


@dataclass(frozen=True, slots=True)
class RecordEvidence:
    """Write records/<vm>/<recovery> = data: the finished (done, failed, cancelled) recovery."""

    vm: str
    recovery: int
    data: dict[str, object]


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell the operator (events stream, notification)."""

    level: Level
    host: str | None
    vm: str | None
    text: str


@dataclass(frozen=True, slots=True)
class DisableHost:
    """driver.disable_host(host, reason); result: HostOpDone/HostOpFailed(op=disable)."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class CheckRejoin:
    """A fenced host is back and healthy: check on the shared storage that it renews its lockspace and
    holds the lease of none of `vms` (recovered from it, now placed elsewhere). Result: RejoinChecked."""

    host: str
    vms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EnableHost:
    """driver.enable_host(host) and keys.disabled(host) deleted: the host rejoins (a decision of the
    core, `reason` its evidence). Result: HostOpDone/HostOpFailed(op=enable)."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class QuarantineHost:
    """Record keys.quarantined(host) = reason, so that a new leader keeps the host out too (`vmha host
    enable` deletes it). Fire and forget: the alert already told the operator."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class Prove:
    """Obtain a FenceProof for the VM's old copy on host, trying `methods` in order, within `timeout`
    seconds (None: the runtime's default, long enough for host-dead); result: ProofObtained or
    ProofRefused, tagged with `attempt`."""

    vm: str
    host: str
    methods: tuple[ProofMethod, ...]
    attempt: Attempt
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class CancelProof:
    """Stop the Prove of `attempt` in flight. A result that still arrives is fed back anyway."""

    vm: str
    host: str
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class MarkHostDown:
    """driver.mark_host_down(host) (Nova force_down); only emitted once a proof exists for the host.
    Result: HostOpDone/HostOpFailed(op=mark-down)."""

    host: str


@dataclass(frozen=True, slots=True)
class ReleaseProof:
    """Release the VM's lease that the proof holds, right before its restart, so the new copy can
    acquire it. Result: StepDone/StepFailed(step=release)."""

    vm: str
    host: str
    proof: FenceProof


@dataclass(frozen=True, slots=True)
class DropProof:
    """Release the lease a proof holds for a recovery that FAILED: the old copy is proven dead, and
    the operator must be able to start the VM by hand (its own lease acquisition would be refused
    while the manager holds it). Fire and forget: no result event."""

    vm: str
    host: str


@dataclass(frozen=True, slots=True)
class Evacuate:
    """driver.evacuate(vm, source, dest). Result: StepDone/StepFailed(step=evacuate).

    THE INVARIANT lives here, and only here: the action cannot exist without a proof for this VM
    and this source host."""

    vm: str
    source: str
    dest: str | None
    proof: FenceProof

    def __post_init__(self) -> None:
        if not isinstance(self.proof, FenceProof):
            raise InvariantError(f"evacuate vm '{self.vm}' refused: no fence proof")
        if self.proof.vm != self.vm or self.proof.host != self.source:
            raise InvariantError(
                f"evacuate vm '{self.vm}' from '{self.source}' refused: the proof is for vm "
                f"'{self.proof.vm}' on '{self.proof.host}'"
            )


@dataclass(frozen=True, slots=True)
class LiveMigrate:
    """driver.live_migrate(vm, source, dest). No proof: the VM keeps running, nothing restarts.
    Result: StepDone/StepFailed(step=migrate)."""

    vm: str
    source: str
    dest: str | None


RecoveryAction = (
    PersistTask
    | RecordEvidence
    | Alert
    | DisableHost
    | CheckRejoin
    | EnableHost
    | QuarantineHost
    | Prove
    | CancelProof
    | MarkHostDown
    | ReleaseProof
    | DropProof
    | Evacuate
    | LiveMigrate
)


@dataclass(slots=True)
class RecoveryOutput:
    actions: list[RecoveryAction] = field(default_factory=list)
    log: list[LogLine] = field(default_factory=list)


__all__ = [
    "Alert",
    "CancelProof",
    "CheckRejoin",
    "DisableHost",
    "DropProof",
    "EnableHost",
    "Evacuate",
    "InvariantError",
    "LiveMigrate",
    "MarkHostDown",
    "PersistTask",
    "Prove",
    "QuarantineHost",
    "RecordEvidence",
    "RecoveryAction",
    "RecoveryOutput",
    "ReleaseProof",
]
