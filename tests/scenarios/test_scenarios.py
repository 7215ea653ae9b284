"""Replay every scenario directory (setup.toml + cmdlist) in the simulator and diff its log against
log.expect, Proxmox style. VMHA_REWRITE=1 regenerates the expectations: review the diff."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from vmha.core.queue import TaskKind, TaskState
from vmha.sim.scenario import load

HERE = Path(__file__).parent
SCENARIOS = sorted(p.parent.name for p in HERE.glob("*/cmdlist"))


def test_scenarios_exist() -> None:
    assert len(SCENARIOS) >= 15, SCENARIOS


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name: str) -> None:
    scenario = load(HERE / name)
    lines = scenario.run()
    text = "\n".join(lines) + "\n"
    expect_file = HERE / name / "log.expect"
    if os.environ.get("VMHA_REWRITE") == "1":
        expect_file.write_text(text)
    # Whatever the expectation says, these never happen.
    sim = scenario.sim
    assert sim.split_brain == 0, "a VM was restarted while its old copy still ran"
    for vm, data in sorted(sim.store.items()):
        if data["kind"] == TaskKind.EVACUATE.value and data["state"] == TaskState.DONE.value:
            proof = data["proof"]
            assert isinstance(proof, dict) and proof["vm"] == vm, f"{vm}: evacuated without its proof"
    for vm, n in sorted(sim.restarts.items()):
        tasks = [r for (v, _), r in sim.records.items() if v == vm and r["state"] == TaskState.DONE.value]
        assert n <= max(1, len(tasks)), f"{vm}: {n} restarts for {len(tasks)} finished recoveries"
    assert expect_file.exists(), f"{expect_file} missing: run with VMHA_REWRITE=1 and review it"
    expected = expect_file.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), text.splitlines(keepends=True), "log.expect", "log"
            )
        )
        pytest.fail(f"scenario {name}: log differs from log.expect\n{diff}")
