"""`vmha sim explore`: random fault schedules through the runtime loop in the simulator, invariants
checked after every event (vmha.sim.explore)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmha.sim import env as sim_env
from vmha.sim.cli import sim
from vmha.sim.explore import checked, draw, replay, shrink, write_scenario
from vmha.sim.scenario import load

KNOWN = Path(__file__).parent  # shrunk failing seeds whose fix is still to come (a directory each)
# 2,000 take 80 to 170 s on the 2-core test machine (12 to 25 seeds/s): CI sets VMHA_EXPLORE_SEEDS=2000.
SEEDS = int(os.environ.get("VMHA_EXPLORE_SEEDS", "600"))
TOLERATED = ("lost with its host", "left to the operator")  # known gaps, counted (see the test)
# Seeds whose failure is a known gap with its shrunk scenario in tests/explore/, fix still to come.
KNOWN_SEEDS = {1292: "deposed-leader-evacuate"}


def test_explore_many_seeds_finds_nothing_but_the_known_gaps() -> None:
    """Two kinds of failure the explorer finds today are known gaps, counted and printed; anything else
    fails the test (every safety invariant, and a recovery that stalls):
    - 'lost with its host' (tests/explore): a VM dies with its host (power, storage lost and sanlock's
      kill), the host returns before the recovery restarted the VM (its task cancelled by the return,
      or none created: a fabric outage masked the host's failure), and nothing restarts a VM stopped
      on a healthy host;
    - 'left to the operator': the recovery FAILED and alerted (a live migration whose VM died during
      it is not retryable) and no later fault of the host starts another."""
    t0 = time.perf_counter()
    unexpected = []
    known = 0
    for seed in range(1, SEEDS + 1):
        v, _ = replay(draw(seed))
        if v is None:
            continue
        if v.what in TOLERATED or seed in KNOWN_SEEDS:
            known += 1
        else:
            unexpected.append(f"seed {seed}: {v}")
    spent = time.perf_counter() - t0
    print(f"{SEEDS} seeds in {spent:.1f} s ({SEEDS / spent:.1f} seeds/s); {known} with a known gap")
    assert not unexpected, "\n".join(unexpected)


def test_power_cycle_during_proof_recovers_every_vm() -> None:
    # Was a known gap (a VM lost with its host, which returned before the restart): desired state fixed it.
    v, lines = checked(load(KNOWN / "power-cycle-during-proof"))
    assert v is None, f"{v}\n" + "\n".join(lines)


@pytest.mark.xfail(strict=True, reason="known gap: a deposed leader's evacuate completes after the failover")
def test_deposed_leaders_evacuate_is_no_doubled_task() -> None:
    v, lines = checked(load(KNOWN / KNOWN_SEEDS[1292]))
    assert v is None, f"{v}\n" + "\n".join(lines)


def test_a_planted_fault_is_found_replayed_shrunk_and_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fault: a proof takes the VM's lease but kills nothing (the old copy survives request-force).
    def take_lease_only(self: sim_env.Sim, method: object, vm: sim_env.SimVm, h: sim_env.SimHost) -> None:
        vm.lease_holder = sim_env.MANAGER_HOLDS

    monkeypatch.setattr(sim_env.Sim, "_proof_effect", take_lease_only)
    for seed in range(1, 200):
        run = draw(seed)
        v, _ = replay(run)
        if v is not None and v.what in ("two copies", "split brain"):
            break
    else:
        pytest.fail("the planted fault was never found")
    again, _ = replay(run)
    assert again is not None and str(again) == str(v), "a seed replays exactly"
    faults = shrink(run, v)
    assert 1 <= len(faults) < max(2, len(run.faults))
    write_scenario(tmp_path / "found", run, faults, v)
    found, _ = checked(load(tmp_path / "found"))
    assert found is not None and found.what == v.what, found
    # The command line: exit 1, the shrunk scenario written, seeds per second printed.
    out = CliRunner().invoke(sim, ["explore", "--seeds", "3", "--seed", str(run.seed), "--out", str(tmp_path / "cli")])
    assert out.exit_code == 1, out.output
    assert f"seed {run.seed}: VIOLATION" in out.output and "replays exactly" in out.output, out.output
    assert (tmp_path / "cli" / f"seed-{run.seed}" / "cmdlist").exists()
    assert "seeds/s" in out.output


def test_explore_exits_0_without_a_violation(tmp_path: Path) -> None:
    out = CliRunner().invoke(sim, ["explore", "--seeds", "5", "--seed", "1", "--out", str(tmp_path)])
    assert out.exit_code == 0 and "5 seeds (1..5)" in out.output and "0 failing" in out.output, out.output
