"""Issue 11's acceptance run: 12 random fault rounds on the full lab (5 hosts, 10 VMs, process
guests, io_timeout 1, the managers' defaults but rebalancing on, rounds 20 s apart), every fault
class mixed, each repaired before the next, and no operator action: no `vmha host enable`. Once
every host has rejoined by itself and rebalancing has evened out the load, every VM runs exactly
once, over more than one host, and verify finds no split-brain.

Seeded: VMHA_SEED=N replays a run; the seed is printed either way (`vmha bench rto --rounds 12
--seed N` runs the same rounds as a measurement).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster
from vmha.lab.report import verify_lab
from vmha.lab.rounds import run_rounds
from vmha.lab.state import LabState

# In the README's test command since three runs in a row passed (2026-12-03, 17:19 to 17:38); before,
# an extra job (4 of 6 passed; the failures, an oracle judging a 1.1 s migration pause at load 13 a
# stop, and a rebalancing round dropped during a fabric outage (fixed), are in BENCHMARKS.md).
pytestmark = pytest.mark.e2e

PREFIX = "vrr"
ROUNDS = 12


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab")
    try:
        # Rebalancing on: a host out for rejoin_after misses several rounds, whose faults send every VM
        # to the hosts left (seed 3294725129 ended with all 10 on h3); rebalancing evens it out after.
        yield cluster.up(lab_dir, hosts=5, vms=10, io_timeout=1, prefix=PREFIX, echo=echo, rebalance=True)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def test_random_rounds_end_with_every_vm_running_once_over_several_hosts(lab: LabState) -> None:
    seed = int(os.environ.get("VMHA_SEED") or random.randrange(1 << 32))
    print(f"\nrandom fault rounds: seed {seed} (VMHA_SEED={seed} replays them)")
    ran = run_rounds(lab, ROUNDS, seed, echo)
    assert ran.ok, (seed, ran.problems, [tl.problems for tl in ran.timelines if tl.problems])
    report = verify_lab(lab)
    assert report["split_brain"] == [], seed
    assert report["ok"], (seed, [f for f in report["faults"] if not f["ok"]])
