"""Strict models of every value vmha reads from etcd: anyone who can write etcd can write anything.

One model per value kind (pydantic, strict types: no "1" for 1, no true for 1, no inf or NaN, closed
enums, bounded strings and collections), plus cross-field checks where a state needs fields (a task
evacuating needs its proof and its destination). The wire bounds (size, nesting depth, finite
numbers) are checked before, when the bytes are decoded (client.decode_json).

    hb = values.parse(values.HeartbeatValue, kv, value)     # BadValue naming the key and the fault

A reader that gets BadValue logs it with `refused(e, kv)` (once per key and revision: a poisoned
key re-read every second must not flood the log) and skips the value; it never stops reading.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vmha.core.fencing import ProofMethod
from vmha.core.planes import Plane, PlaneState
from vmha.core.queue import STEP_STATE, Step, TaskKind, TaskState
from vmha.etcd.client import KV, BadValue

log = logging.getLogger("vmha.etcd.values")

# A name that is also a key segment: no '/', no control characters (they would forge log lines).
Name = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/\x00-\x1f\x7f]+$")]
Text = Annotated[str, Field(max_length=4096)]
# Unix seconds (the simulator and the tests start their clocks near 0: only the sign is checked).
Time = Annotated[float, Field(ge=0, le=1e11)]
Count = Annotated[int, Field(ge=0, le=2**53)]
Details = Annotated[dict[Annotated[str, Field(max_length=255)], Text], Field(max_length=64)]


# Enums arrive as their JSON strings: parsed leniently (from a str only), checked against the closed set.
PlaneName = Annotated[Plane, Field(strict=False)]
PlaneStateName = Annotated[PlaneState, Field(strict=False)]
MethodName = Annotated[ProofMethod, Field(strict=False)]
StepName = Annotated[Step, Field(strict=False)]
KindName = Annotated[TaskKind, Field(strict=False)]
StateName = Annotated[TaskState, Field(strict=False)]


class _Value(BaseModel):
    # extra="ignore": fields added by a newer vmha are tolerated (they are bounded by the decoder).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


class HeartbeatValue(_Value):
    """hb/<host>/<plane>, written by the host's agent on that plane's lease."""

    host: Name
    plane: PlaneName
    seq: Count
    t: Time


class HostValue(_Value):
    """hosts/<host>: the host's registration (other fields, e.g. the sanlock host_id, pass through)."""

    host: Name | None = None
    domain: Name
    agent_stopped: Time | None = None


class PauseValue(_Value):
    """pause: recoveries paused cluster-wide, since t, by whom and why."""

    t: Time
    by: Text = ""
    why: Text = ""


class MaintenanceValue(_Value):
    """maintenance/<host>: the operator put the host in maintenance at t."""

    t: Time


class HostIdValue(_Value):
    """hostid/<n>: sanlock host_id n belongs to this host."""

    host: Name


class LeaderValue(_Value):
    """manager/leader: the leading manager's name and lease."""

    name: Name
    lease: Annotated[str, Field(max_length=16, pattern=r"^[0-9a-f]+$")]


class EventValue(_Value):
    """events/<seq>: one entry of the decision stream."""

    seq: Count
    t: Time
    level: Literal["info", "warn", "err"]
    actor: Name
    text: Text
    kind: Literal["log", "alert"] = "log"


class AttestRequestValue(_Value):
    """attest/req/<host>/<vm>: the manager asks the host's agent about the VM."""

    vm: Name
    host: Name
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    timeout: Annotated[float, Field(gt=0, le=3600)]


class AttestResponseValue(_Value):
    """attest/resp/<host>/<vm>: the agent's answer."""

    vm: Name
    host: Name
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool
    reason: Text
    evidence: Details = Field(default_factory=dict)
    answered: Time = 0.0


class ProofValue(_Value):
    vm: Name
    host: Name
    method: MethodName
    started: Time
    proved: Time
    details: Details = Field(default_factory=dict)


class StepValue(_Value):
    step: StepName
    started: Time
    finished: Time | None = None
    result: Text = ""
    detail: Text = ""


# States whose work needs a destination, and evacuate states that act on a proof already held.
_NEEDS_DEST = frozenset({TaskState.RELEASING, TaskState.EVACUATING, TaskState.MIGRATING})
_NEEDS_PROOF = frozenset({TaskState.MARKING_DOWN, TaskState.READY, TaskState.UNPLACED, TaskState.RELEASING,
                          TaskState.EVACUATING})  # fmt: skip
_RESUMABLE = frozenset({*STEP_STATE.values(), TaskState.READY})


class TaskValue(_Value):
    """tasks/<vm> and records/<vm>/<n>: core.queue.Task.to_dict(), consistent with its state."""

    vm: Name
    source: Name
    kind: KindName
    recovery: Count
    priority: Annotated[int, Field(ge=-(2**31), le=2**31)] = 0
    row: Text = ""
    action: Text = ""
    failed: Annotated[dict[PlaneName, Time], Field(max_length=3)] = Field(default_factory=dict)
    created: Time
    state: StateName
    since: Time = 0.0
    attempts: Count = 0
    retry_at: Time | None = None
    resume: StateName | None = None
    dest: Name | None = None
    proof: ProofValue | None = None
    proof_started: Time | None = None
    steps: Annotated[list[StepValue], Field(max_length=1000)] = Field(default_factory=list)
    reason: Text = ""
    running_on: Name | None = None
    recheck: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TaskValue:
        if self.state in _NEEDS_DEST and self.dest is None:
            raise ValueError(f"state {self.state.value} needs a destination ('dest')")
        if self.kind == TaskKind.EVACUATE and self.state in _NEEDS_PROOF and self.proof is None:
            raise ValueError(f"an evacuation in state {self.state.value} needs its fence proof ('proof')")
        if self.kind == TaskKind.MIGRATE and self.state in (TaskState.RELEASING, TaskState.EVACUATING):
            raise ValueError(f"a migration cannot be in state {self.state.value}")
        if self.kind == TaskKind.EVACUATE and self.state == TaskState.MIGRATING:
            raise ValueError("an evacuation cannot be in state migrating")
        if self.proof is not None and (self.proof.vm, self.proof.host) != (self.vm, self.source):
            raise ValueError(f"the proof is for vm {self.proof.vm!r} on {self.proof.host!r}, "
                             f"not for vm {self.vm!r} on {self.source!r}")  # fmt: skip
        if self.state == TaskState.RETRY_WAIT and self.retry_at is None:
            raise ValueError("state retry-wait needs 'retry_at'")
        if self.resume is not None and self.resume not in _RESUMABLE:
            raise ValueError(f"'resume' {self.resume.value} is not a state a step runs in")
        return self


class PlaneStatusValue(_Value):
    state: PlaneStateName
    since: Time
    evidence: Text = ""


class HealthValue(_Value):
    """health/<host>: the manager's view of the host, for `vmha status` and the next leader."""

    host: Name
    domain: Name
    planes: Annotated[dict[PlaneName, PlaneStatusValue], Field(max_length=3)]
    updated: Time = 0.0
    manager: Text = ""


class FabricValue(_Value):
    """fabric/<plane>[/<domain>]: an active fabric outage."""

    plane: PlaneName
    domain: Name | None
    active: bool
    hosts: Annotated[list[Name], Field(max_length=10_000)]
    since: Time


class LabHostValue(_Value):
    """lab/hosts/<host> (lab driver): the lab cloud's view of a host."""

    enabled: bool = True
    forced_down: bool = False
    reason: Text = ""


class LabVmValue(_Value):
    """lab/vms/<vm> (lab driver): where the lab cloud places a VM."""

    vm: Name | None = None
    host: Name | None = None
    ha: bool = True
    priority: Annotated[int, Field(ge=-(2**31), le=2**31)] = 0


class LibvirtHostValue(_Value):
    """driver/libvirt/hosts/<host> (libvirt driver): the flags libvirt itself has no notion of."""

    enabled: bool = True
    forced_down: bool = False
    reason: Text = ""


# A domain definition as the libvirt driver records it (well under the decoder's bound on a value).
DOMAIN_XML_MAX = 128 * 1024


class LibvirtDomainValue(_Value):
    """driver/libvirt/domains/<vm> (libvirt driver): a protected domain's definition and its last host."""

    vm: Name
    host: Name
    priority: Annotated[int, Field(ge=0, le=1000)] = 0
    xml: Annotated[str, Field(min_length=1, max_length=DOMAIN_XML_MAX)]


M = TypeVar("M", bound=_Value)


def parse(model: type[M], kv: KV, value: Any) -> M:
    """`value` (kv's decoded JSON) as `model`; BadValue naming the key and every fault otherwise."""
    if not isinstance(value, Mapping):
        raise BadValue(kv.key, f"expected a JSON object, got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        faults = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                           for err in e.errors()[:5])  # fmt: skip
        raise BadValue(kv.key, f"not a valid {model.__name__}: {faults}") from None


def read(model: type[M], kv: KV) -> M:
    """kv's value decoded and parsed as `model` (BadValue otherwise)."""
    return parse(model, kv, kv.json())


# (key, mod_revision, digest of the value) of the values already reported; bounded, so a flood of bad
# keys cannot grow it. The digest: a new etcd (restored from a snapshot, or each test's) reuses revisions,
# and another value there must be reported too.
_REPORTED: dict[tuple[str, int, bytes], None] = {}
_REPORTED_MAX = 10_000


def refused(e: BadValue, kv: KV | None = None, what: str = "skipped") -> bool:
    """Log a refused value once per key and revision (an ALERT line: someone wrote a value vmha never
    writes, a bug or an attack); True the first time."""
    mark = (e.key, kv.mod_revision if kv is not None else 0,
            b"" if kv is None else hashlib.blake2b(kv.value, digest_size=8).digest())
    if mark in _REPORTED:
        return False
    if len(_REPORTED) >= _REPORTED_MAX:
        del _REPORTED[next(iter(_REPORTED))]
    _REPORTED[mark] = None
    log.error("ALERT %s (revision %d): %s", e, mark[1], what)
    return True


__all__ = [
    "AttestRequestValue",
    "AttestResponseValue",
    "EventValue",
    "FabricValue",
    "HealthValue",
    "HeartbeatValue",
    "HostIdValue",
    "HostValue",
    "LabHostValue",
    "LabVmValue",
    "LeaderValue",
    "LibvirtDomainValue",
    "LibvirtHostValue",
    "MaintenanceValue",
    "PauseValue",
    "PlaneStatusValue",
    "ProofValue",
    "StepValue",
    "TaskValue",
    "parse",
    "read",
    "refused",
]
