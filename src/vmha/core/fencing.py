"""Fence proofs: the evidence that the old copy of a VM can no longer write.

The invariant of vmha: no VM is restarted elsewhere without a FenceProof for that VM. The proof
methods are tried by the lock manager (vmha.locks); this module holds the pure vocabulary and the
choice of methods for a host's situation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vmha.core.planes import Plane, PlaneState


class ProofMethod(StrEnum):
    LEASE_TAKEN = "lease-taken"  # we acquired the VM's lease: its holder released it or its host is DEAD
    REQUEST_FORCE = "request-force"  # sanlock REQ_FORCE over the storage plane killed the holder
    EXIT_ATTESTED = "exit-attested"  # owner's agent: holders gone, lockspace lost; lease reset and taken
    # out-of-band fence confirmed the host off; refused while the host still renews its lockspace
    # (alive on the shared storage: only its agent or its etcd paths failed)
    POWER = "power"
    HOST_DEAD = "host-dead"  # sanlock reports the owner host DEAD; lease taken


@dataclass(frozen=True, slots=True)
class FenceProof:
    """One proof record. `details` holds the sanlock states, pids and timestamps seen, as text."""

    vm: str
    host: str  # the host the old copy ran on
    method: ProofMethod
    started: float  # unix time the proof attempt began
    proved: float  # unix time the proof was complete
    details: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "host": self.host,
            "method": self.method.value,
            "started": self.started,
            "proved": self.proved,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FenceProof:
        details = d.get("details") or {}
        assert isinstance(details, Mapping)
        return cls(
            vm=str(d["vm"]),
            host=str(d["host"]),
            method=ProofMethod(str(d["method"])),
            started=float(str(d["started"])),
            proved=float(str(d["proved"])),
            details={str(k): str(v) for k, v in details.items()},
        )


def proof_methods(
    states: Mapping[Plane, PlaneState], *, power_fence: bool, allow_exit_attested: bool
) -> tuple[ProofMethod, ...]:
    """The methods worth trying for a VM of a host in this situation, fastest first.

    LEASE_TAKEN is always first (free when the holder already released, e.g. after the agent's
    isolation response). REQUEST_FORCE needs the host's storage plane (it travels on the shared
    storage); EXIT_ATTESTED needs its management plane (the agent answers there) and disks that
    bypass the page cache; HOST_DEAD is the last resort and always possible.
    """
    up = {p for p, s in states.items() if s in (PlaneState.UP, PlaneState.SUSPECT)}
    methods = [ProofMethod.LEASE_TAKEN]
    if Plane.STORAGE in up:
        methods.append(ProofMethod.REQUEST_FORCE)
    if Plane.MANAGEMENT in up and allow_exit_attested:
        methods.append(ProofMethod.EXIT_ATTESTED)
    if power_fence:
        methods.append(ProofMethod.POWER)
    methods.append(ProofMethod.HOST_DEAD)
    return tuple(methods)
