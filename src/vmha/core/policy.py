"""The policy table: which action each combination of failed planes gets.

Keys are the failed planes joined in PLANES order ('management', 'storage+service', ...) plus
'fabric' for any combination where a plane is lost as part of a fabric outage. Every combination
must be covered and every action known; PolicyTable.parse refuses anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import combinations

from vmha.core.planes import PLANES, Plane, PlaneState, combination_key


class Action(StrEnum):
    ALERT = "alert"  # tell the operator, touch nothing
    DISABLE = "disable"  # alert and stop scheduling new VMs onto the host; VMs stay
    LIVE_MIGRATE = "live-migrate"  # move HA VMs away without a restart; no fence needed
    ISOLATE_EVACUATE = "isolate-evacuate"  # fence through the storage plane, then restart elsewhere
    FENCE_EVACUATE = "fence-evacuate"  # prove the VMs dead (power, exit attested, host dead), restart


FABRIC_KEY = "fabric"
# Rows outside the table that replace a host's own row (RecoveryCore): its agent was stopped cleanly, or it
# is in maintenance (also the row of its drain tasks). Either alerts only, whatever the planes.
AGENT_STOPPED_KEY = "agent-stopped"
MAINTENANCE_KEY = "maintenance"

COMBINATIONS: tuple[str, ...] = (
    *(combination_key(set(c)) for n in range(1, len(PLANES) + 1) for c in combinations(PLANES, n)),
    FABRIC_KEY,
)

DEFAULT_POLICY: Mapping[str, str] = {
    "management": Action.DISABLE.value,
    "storage": Action.FENCE_EVACUATE.value,
    "service": Action.LIVE_MIGRATE.value,
    "management+storage": Action.FENCE_EVACUATE.value,
    "management+service": Action.ISOLATE_EVACUATE.value,
    "storage+service": Action.FENCE_EVACUATE.value,
    "management+storage+service": Action.FENCE_EVACUATE.value,
    FABRIC_KEY: Action.ALERT.value,
}

# Actions that need the storage plane of the failed host up: a storage-plane fence (request-force)
# reaches the host only through storage, and a live migration needs the VM's disk.
_NEEDS_STORAGE = {Action.ISOLATE_EVACUATE, Action.LIVE_MIGRATE}


class PolicyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Decision:
    key: str  # the policy row, '' when nothing failed
    action: Action | None  # None: nothing to do


@dataclass(frozen=True, slots=True)
class PolicyTable:
    rows: Mapping[str, Action]

    @classmethod
    def parse(cls, raw: Mapping[str, str]) -> PolicyTable:
        unknown = sorted(set(raw) - set(COMBINATIONS))
        if unknown:
            raise PolicyError(
                f"policy: unknown combination(s) {', '.join(unknown)}; known: {', '.join(COMBINATIONS)}"
            )
        missing = [k for k in COMBINATIONS if k not in raw]
        if missing:
            raise PolicyError(f"policy: no action for combination(s) {', '.join(missing)}")
        rows: dict[str, Action] = {}
        known = ", ".join(a.value for a in Action)
        for key in COMBINATIONS:
            try:
                action = Action(raw[key])
            except ValueError:
                raise PolicyError(f"policy.{key}: unknown action {raw[key]!r}; known: {known}") from None
            if action in _NEEDS_STORAGE and (key == FABRIC_KEY or Plane.STORAGE.value in key.split("+")):
                raise PolicyError(
                    f"policy.{key}: {action.value} needs the host's storage plane, which this row has lost"
                )
            if key == FABRIC_KEY and action not in (Action.ALERT, Action.DISABLE):
                raise PolicyError("policy.fabric: alert or disable only: a fabric outage is no host failure")
            rows[key] = action
        return cls(rows)

    def decide(self, states: Mapping[Plane, PlaneState]) -> Decision:
        """The row for a host's plane states. SUSPECT and UNKNOWN count as not failed (yet)."""
        if any(states.get(p) == PlaneState.FABRIC for p in PLANES):
            return Decision(FABRIC_KEY, self.rows[FABRIC_KEY])
        key = combination_key({p for p in PLANES if states.get(p) == PlaneState.DOWN})
        if not key:
            return Decision("", None)
        return Decision(key, self.rows[key])

    def render(self) -> list[tuple[str, str]]:
        return [(k, self.rows[k].value) for k in COMBINATIONS]
