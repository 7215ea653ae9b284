"""The three networks of a compute host and the states vmha gives each of them."""

from __future__ import annotations

from enum import StrEnum


class Plane(StrEnum):
    MANAGEMENT = "management"
    STORAGE = "storage"
    SERVICE = "service"


# Fixed order: used for iteration, keys and display, so logs are deterministic.
PLANES: tuple[Plane, ...] = (Plane.MANAGEMENT, Plane.STORAGE, Plane.SERVICE)


class PlaneState(StrEnum):
    UNKNOWN = "unknown"  # never heard of since this manager started
    UP = "up"
    SUSPECT = "suspect"  # heartbeat late or lease gone, still inside the grace period
    DOWN = "down"  # lost, and only this host (or too few hosts) lost it
    FABRIC = "fabric"  # lost as part of a fabric outage: nothing may evacuate because of it


def combination_key(failed: frozenset[Plane] | set[Plane]) -> str:
    """'management+service' style key of a set of failed planes, in PLANES order ('' when none)."""
    return "+".join(p.value for p in PLANES if p in failed)
