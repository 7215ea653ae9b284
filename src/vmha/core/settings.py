"""RecoverySettings: the knobs of the recovery core (config.ManagerConfig.recovery_settings() builds
one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vmha.core.queue import QueueLimits


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    """The manager's knobs (config.ManagerConfig.recovery_settings() builds one)."""

    max_parallel: int = 8  # restarts/migrations in flight, cluster-wide
    max_per_host: int = 4  # restarts/migrations in flight towards one destination host
    retry_base: float = 2.0  # first retry after this many seconds, doubling each time
    retry_cap: float = 60.0  # longest wait between retries
    max_attempts: int = 5  # failed attempts before a task is FAILED
    # Hold a host's new policy row this long before acting on it: a dead host's three leases expire
    # up to ~1 s apart, and acting on the first of them decides on a partial row.
    decide_after: float = 1.0
    # A host getting better (fewer failed planes) passes through rows on its way back, one plane's
    # heartbeat at a time: its new row is acted upon only if it lasts this long.
    settle_after: float = 5.0
    power_fence: bool = False  # an out-of-band power fence exists for every host
    allow_exit_attested: bool = True  # VM disks bypass the page cache: exit attestation is a proof
    host_capacity: int = 0  # VMs per host (0: unlimited)
    # A host back before its VMs were proved dead: one lease-taken attempt this long decides whether
    # sanlock killed them meanwhile (recovery continues) or they still run (cancelled).
    recheck_timeout: float = 5.0
    # A host vmha took out (disabled, or fenced and marked down) rejoins once healthy this long: every
    # plane UP and, if it was fenced, the rejoin check passed (CheckRejoin). 0: never, the operator
    # runs `vmha host enable`.
    rejoin_after: float = 60.0
    # A host that failed this many times within quarantine_window seconds stays out until the
    # operator enables it (0: no quarantine). Hyper-V's rule: 3 failures in an hour.
    quarantine_after: int = 3
    quarantine_window: float = 3600.0
    # A clean agent stop: "alert" (its VMs run on, unprotected) or "drain" (maintenance on: its HA
    # VMs are live-migrated away first; off again once the agent runs again).
    on_agent_stop: Literal["drain", "alert"] = "alert"
    # Desired state: a protected VM the inventory shows stopped this long (two snapshots this far
    # apart), with no recovery in flight, is restarted once proved stopped (core/desired.py). 0: never.
    restart_after: float = 20.0
    # Rebalancing (core/rebalance.py): once a host is a destination again, live-migrate VMs to even
    # out the load, at most rebalance_moves per round, rounds rebalance_cooldown seconds apart.
    rebalance: bool = False
    rebalance_moves: int = 2
    rebalance_cooldown: float = 300.0

    @property
    def limits(self) -> QueueLimits:
        return QueueLimits(
            self.max_parallel, self.max_per_host, self.retry_base, self.retry_cap, self.max_attempts
        )


__all__ = ["RecoverySettings"]
