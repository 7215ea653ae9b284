"""The random rounds' plan: every fault class at least once, reproducible from its seed."""

from __future__ import annotations

from vmha.lab.rounds import plan
from vmha.lab.scenario import CLASSES


def test_every_class_at_least_once_and_the_seed_replays() -> None:
    for seed in range(50):
        kinds = plan(12, seed)
        assert len(kinds) == 12 and set(kinds) == set(CLASSES)
        assert plan(12, seed) == kinds
    assert plan(12, 1) != plan(12, 2)
