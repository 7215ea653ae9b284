"""The policy table: every combination covered, and the defaults the issue asks for."""

from __future__ import annotations

import pytest

from vmha.core.fencing import ProofMethod, proof_methods
from vmha.core.planes import Plane, PlaneState
from vmha.core.policy import COMBINATIONS, DEFAULT_POLICY, Action, PolicyError, PolicyTable

M, S, V = Plane.MANAGEMENT, Plane.STORAGE, Plane.SERVICE
UP, DOWN, FABRIC, SUSPECT = PlaneState.UP, PlaneState.DOWN, PlaneState.FABRIC, PlaneState.SUSPECT


def test_every_combination_has_a_default() -> None:
    assert set(DEFAULT_POLICY) == set(COMBINATIONS)
    assert len(COMBINATIONS) == 8  # 7 non-empty subsets of three planes, and fabric


def test_defaults() -> None:
    t = PolicyTable.parse(DEFAULT_POLICY)
    assert t.decide({M: DOWN, S: UP, V: UP}).action == Action.DISABLE
    assert t.decide({M: UP, S: UP, V: DOWN}).action == Action.LIVE_MIGRATE
    assert t.decide({M: UP, S: DOWN, V: UP}).action == Action.FENCE_EVACUATE
    assert t.decide({M: DOWN, S: UP, V: DOWN}).action == Action.ISOLATE_EVACUATE
    assert t.decide({M: DOWN, S: DOWN, V: DOWN}).action == Action.FENCE_EVACUATE
    assert t.decide({M: FABRIC, S: DOWN, V: DOWN}).key == "fabric"
    assert t.decide({M: SUSPECT, S: UP, V: UP}).action is None


def test_proof_methods_follow_reachable_planes() -> None:
    isolated = proof_methods({M: DOWN, S: UP, V: DOWN}, power_fence=False, allow_exit_attested=True)
    assert isolated == (ProofMethod.LEASE_TAKEN, ProofMethod.REQUEST_FORCE, ProofMethod.HOST_DEAD)
    storage_lost = proof_methods({M: UP, S: DOWN, V: UP}, power_fence=False, allow_exit_attested=True)
    assert storage_lost == (ProofMethod.LEASE_TAKEN, ProofMethod.EXIT_ATTESTED, ProofMethod.HOST_DEAD)
    dead = proof_methods({M: DOWN, S: DOWN, V: DOWN}, power_fence=True, allow_exit_attested=True)
    assert dead == (ProofMethod.LEASE_TAKEN, ProofMethod.POWER, ProofMethod.HOST_DEAD)
    cached = proof_methods({M: UP, S: DOWN, V: UP}, power_fence=False, allow_exit_attested=False)
    assert ProofMethod.EXIT_ATTESTED not in cached


def test_parse_refuses_a_table_that_leaves_a_combination_uncovered_or_lets_a_fabric_evacuate() -> None:
    partial = {k: v for k, v in DEFAULT_POLICY.items() if k != "storage+service"}
    with pytest.raises(PolicyError, match=r"no action for combination\(s\) storage\+service"):
        PolicyTable.parse(partial)
    with pytest.raises(PolicyError, match=r"policy\.fabric: alert or disable only"):
        PolicyTable.parse({**DEFAULT_POLICY, "fabric": "fence-evacuate"})
