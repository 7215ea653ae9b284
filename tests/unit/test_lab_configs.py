"""The lab's generated manager config follows the lab's power-fence and rebalancing settings, which
lab.json keeps;
the RTO bench builds its lab under its own prefix and directory, never the demo's."""

from __future__ import annotations

import time
from pathlib import Path

from vmha import config
from vmha.bench.rto import rto
from vmha.lab.cli import up
from vmha.lab.configs import REBALANCE_COOLDOWN, manager_config
from vmha.lab.state import LabState


def _power_fence(state: LabState) -> bool:
    return config.load(manager_config(state, "m1")).require_manager().power_fence


def test_power_fence_setting_reaches_the_managers_and_survives_reload(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    assert _power_fence(state)  # the lab's default: its power fence
    state.power_fence = False
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded.power_fence is False
    assert not _power_fence(loaded)


def test_a_lab_recorded_before_the_setting_keeps_its_power_fence(tmp_path: Path) -> None:
    LabState(dir=tmp_path, created=time.time()).save()
    raw = (tmp_path / "lab.json").read_text().replace('"power_fence": true,', "")
    assert "power_fence" not in raw
    (tmp_path / "lab.json").write_text(raw)
    assert LabState.load(tmp_path).power_fence is True


def test_rebalance_setting_reaches_the_managers_and_survives_reload(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    assert not config.load(manager_config(state, "m1")).require_manager().rebalance  # off by default
    state.rebalance = True
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded.rebalance is True
    settings = config.load(manager_config(loaded, "m1")).require_manager().recovery_settings()
    assert (settings.rebalance, settings.rebalance_cooldown) == (True, REBALANCE_COOLDOWN)


def test_bench_lab_never_shares_the_demo_labs_prefix_or_directory() -> None:
    def defaults(cmd: object) -> dict[str, object]:
        return {p.name: p.default for p in cmd.params}  # type: ignore[attr-defined]

    lab, bench = defaults(up), defaults(rto)
    assert bench["prefix"] != lab["prefix"]
    assert bench["lab_dir"] != lab["lab_dir"]
