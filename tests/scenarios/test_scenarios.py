"""Replay every scenario directory (setup.toml + cmdlist) in the simulator and diff its log against
log.expect, Proxmox style. VMHA_REWRITE=1 regenerates the expectations: review the diff.
`vmha sim run DIR` runs one and prints its log (`--diff`: what differs from log.expect)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.planes import Plane
from vmha.core.queue import TaskKind, TaskState
from vmha.sim.cli import sim
from vmha.sim.env import Refused
from vmha.sim.expect import EXPECT, diff, log_text, purpose
from vmha.sim.scenario import from_setup, load

HERE = Path(__file__).parent
SCENARIOS = sorted(p.parent.name for p in HERE.glob("*/cmdlist"))


def test_scenarios_exist() -> None:
    assert len(SCENARIOS) >= 15, SCENARIOS


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_says_what_it_checks(name: str) -> None:
    assert len(purpose(HERE / name)) >= 20, f"{name}/cmdlist: the first line is a '# ' comment saying what it checks"


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name: str) -> None:
    scenario = load(HERE / name)
    lines = scenario.run()
    text = log_text(lines)
    expect_file = HERE / name / EXPECT
    if os.environ.get("VMHA_REWRITE") == "1":
        expect_file.write_text(text)
    # Whatever the expectation says, these never happen.
    sim = scenario.sim
    assert sim.split_brain == 0, "a VM was restarted while its old copy still ran"
    for vm, data in sorted(sim.store.items()):
        if data["kind"] == TaskKind.EVACUATE.value and data["state"] == TaskState.DONE.value:
            proof = data["proof"]
            assert isinstance(proof, dict) and proof["vm"] == vm, f"{vm}: evacuated without its proof"
    for (vm, recovery), n in sorted(sim.restarts.items()):
        assert n == 1, f"{vm}: {n} restarts for recovery {recovery}"
    assert expect_file.exists(), f"{expect_file} missing: run with VMHA_REWRITE=1 and review it"
    changes = diff(HERE / name, text)
    if changes:
        pytest.fail(f"scenario {name}: log differs from log.expect\n{changes}")


def test_sim_run_prints_the_log_and_diffs_it(tmp_path: Path) -> None:
    name = "storage-down"
    out = CliRunner().invoke(sim, ["run", str(HERE / name)])
    assert out.exit_code == 0, out.output
    assert out.stdout == (HERE / name / EXPECT).read_text()
    assert CliRunner().invoke(sim, ["run", "--diff", str(HERE / name)]).exit_code == 0
    # A scenario whose expectation is wrong: --diff shows the line and exits 1.
    shutil.copytree(HERE / name, tmp_path / name)
    expect = tmp_path / name / EXPECT
    expect.write_text(expect.read_text().replace("running on h4", "running on h5"))
    out = CliRunner().invoke(sim, ["run", "--diff", str(tmp_path / name)])
    assert out.exit_code == 1 and "+info    40.0 sim: end: vm 'vm2' running on h4" in out.stdout, out.output
    # A broken scenario: an error naming the file, no traceback.
    (tmp_path / name / "cmdlist").write_text("# broken\nsoon cut h2 storage\n")
    out = CliRunner().invoke(sim, ["run", str(tmp_path / name)])
    assert out.exit_code == 1 and "cmdlist:2: a line starts with its time" in out.output, out.output


def _drive(coro: Coroutine[Any, Any, FenceProof]) -> FenceProof:
    """A simulated proof to its end, its waits on the virtual clock skipped."""
    while True:
        try:
            coro.send(None)
        except StopIteration as done:
            return cast(FenceProof, done.value)


@pytest.mark.parametrize("method", list(ProofMethod))
def test_no_proof_while_a_copy_elsewhere_holds_the_lease(method: ProofMethod) -> None:
    # A deposed leader's evacuation started vm1 on h2 (seeds 900, 919, 972): every method ends by taking
    # the lease, which that copy holds, so a proof against its old host h1 is refused (a power fence
    # still switches h1 off first); a proof of a free lease is not.
    sim, _ = from_setup({"hosts": {"h1": "r", "h2": "r"}, "vms": {"vm1": {"host": "h1"}}}, "test")
    sim.cut("h1", [Plane.STORAGE])  # h1 no longer renews: a power fence applies
    vm = sim.vms["vm1"]
    vm.copies, vm.host, vm.lease_holder = {"h2"}, "h2", "h2"
    with pytest.raises(Refused):
        _drive(sim.prove("vm1", "h1", [method]))
    assert sim.hosts["h1"].powered == (method != ProofMethod.POWER)
    vm.copies, vm.lease_holder = set(), None
    if method in (ProofMethod.LEASE_TAKEN, ProofMethod.POWER):
        assert _drive(sim.prove("vm1", "h1", [method])).method == method
