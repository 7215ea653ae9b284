"""The compute driver interface the manager uses. Drivers: nova (openstacksdk), lab.

Every method is idempotent where the underlying API allows it (evacuating a VM already running on
another host reports that host), so a new manager leader can repeat a step it is unsure of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class VmInfo:
    name: str  # unique VM name (Nova: server id) - also the sanlock resource name
    host: str | None  # compute host it is placed on (None: nowhere)
    ha: bool  # protected by vmha
    priority: int = 0  # higher recovers first
    state: str = "unknown"  # driver's own state word (ACTIVE, SHUTOFF, running, ...)


@dataclass(frozen=True, slots=True)
class HostInfo:
    name: str
    enabled: bool  # accepts new VMs
    up: bool  # the cloud's own view (nova-compute service up / lab host powered)
    forced_down: bool = False


class DriverError(Exception):
    """A driver call failed; `retryable` says whether the queue should try again, `retry_after` how
    many seconds the API asked to wait before that (HTTP Retry-After; 0: it did not ask)."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class ComputeDriver(Protocol):
    name: str

    async def hosts(self) -> Sequence[HostInfo]: ...

    async def vms(self, host: str | None = None) -> Sequence[VmInfo]:
        """VMs (all projects), optionally only those placed on `host`."""
        ...

    async def disable_host(self, host: str, reason: str) -> None:
        """Stop scheduling new VMs onto the host. Needs no fence proof."""
        ...

    async def mark_host_down(self, host: str) -> None:
        """Tell the cloud the host is down and take it out of scheduling (Nova: force_down, then
        disable; lab: the same flags). Only after a fence proof."""
        ...

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        """Restart the VM on another host (dest None: scheduler's choice); returns the host it runs on
        once running. Only after a fence proof for this VM."""
        ...

    async def live_migrate(self, vm: str, source: str, dest: str | None) -> str:
        """Move a running VM without a restart; returns the destination once done."""
        ...

    async def enable_host(self, host: str) -> None:
        """Undo disable_host / mark_host_down for a repaired host."""
        ...
