"""The lock manager: sanlock leases that keep a VM from running on two hosts, and fence proofs.

The only package that imports sanlock. Production uses the distribution's sanlock daemon with its
watchdog (wdmd): the watchdog resets a host whose lease holders outlive a lost lockspace, which is
what makes sanlock's host_dead safe. The lab and the tests run daemons without a watchdog
(vmha.lab.sanlockd, clearly marked there).

Pieces (see each module):
- space:     the lockspace and the per-VM lease files on shared storage; join/leave; host states.
- lease:     acquire a VM's lease for this process or on behalf of a pid; release; inquire.
- isolation: agent side: stop every local lease holder; attest that a VM's holders are gone.
- prover:    manager side: prove the old copy cannot write (FenceProof) or refuse.
- power:     the PowerFence protocol and the fence-agents implementation.
"""

from vmha.locks.isolation import Attestation, IsolationResult, attest_exit, stop_lease_holders
from vmha.locks.lease import (
    Holder,
    LeaseHold,
    acquire_for,
    acquire_self,
    inquire,
    prune_records,
    register_self,
    release_for,
)
from vmha.locks.power import FenceAgentPower, PowerFence, PowerFenceError, fence_agents
from vmha.locks.prover import ProofRefused, Prover
from vmha.locks.space import (
    HostIdCollision,
    HostInfo,
    HostState,
    IoTimeoutMismatch,
    LeaseAreaError,
    LeaseBusy,
    LeaseMissing,
    LockError,
    LockSpace,
    PaxosLeader,
    SanlockUnavailable,
)

__all__ = [
    "Attestation",
    "FenceAgentPower",
    "Holder",
    "HostIdCollision",
    "HostInfo",
    "HostState",
    "IoTimeoutMismatch",
    "IsolationResult",
    "LeaseAreaError",
    "LeaseBusy",
    "LeaseHold",
    "LeaseMissing",
    "LockError",
    "LockSpace",
    "PaxosLeader",
    "PowerFence",
    "PowerFenceError",
    "ProofRefused",
    "Prover",
    "SanlockUnavailable",
    "acquire_for",
    "acquire_self",
    "attest_exit",
    "fence_agents",
    "inquire",
    "prune_records",
    "register_self",
    "release_for",
    "stop_lease_holders",
]
