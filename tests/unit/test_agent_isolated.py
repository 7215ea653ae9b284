"""The agent's isolation condition: management and service lost while storage works, for long enough.
etcd losing quorum fails every plane at once; storage beating again first when quorum returns must not
count the time it was down as isolation (the agent would stop its VMs on a healthy host)."""

from __future__ import annotations

from vmha.agent.daemon import isolated
from vmha.core.planes import Plane
from vmha.etcd.heartbeat import PlaneReach

AFTER = 3.0


def _reach(reachable: bool, since: float) -> PlaneReach:
    return PlaneReach(Plane.MANAGEMENT, "https://198.18.1.2:2379", reachable, since, None, None, 0, None)


def _view(m: tuple[bool, float], v: tuple[bool, float], s: tuple[bool, float]) -> dict[Plane, PlaneReach]:
    return {Plane.MANAGEMENT: _reach(*m), Plane.SERVICE: _reach(*v), Plane.STORAGE: _reach(*s)}


def test_management_and_service_lost_while_storage_works_is_isolation() -> None:
    view = _view((False, 10.0), (False, 10.5), (True, 0.0))
    assert not isolated(view, 13.0, AFTER)
    assert isolated(view, 13.5, AFTER)


def test_storage_back_after_quorum_loss_restarts_the_count() -> None:
    # Quorum lost at 10: every plane unreachable; quorum back at 40, storage beats first.
    view = _view((False, 10.0), (False, 10.0), (True, 40.0))
    assert not isolated(view, 41.0, AFTER)
    assert not isolated(view, 42.9, AFTER)
    # Still only storage after a whole isolation_after with storage working: now it is isolation.
    assert isolated(view, 43.0, AFTER)


def test_nothing_reachable_is_not_isolation() -> None:
    assert not isolated(_view((False, 10.0), (False, 10.0), (False, 10.0)), 100.0, AFTER)


def test_one_plane_left_is_not_isolation() -> None:
    assert not isolated(_view((True, 0.0), (False, 10.0), (True, 0.0)), 100.0, AFTER)
