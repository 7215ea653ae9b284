"""The dashboard in headless Chromium against the lab (3 hosts, 4 VMs, prefix vd3): the page, opened
with the lab's admin token from `vmha lab status --json`, shows a storage cut of h2 within 3 s with no
reload, then the recovery of h2's VMs and its timeline with the fence proof. Screenshots go to the
test's output directory (printed; run with -s).

Chromium runs inside the controller's netns, where the managers' API listens (like the lab's etcd),
driven over the DevTools protocol by cdp_driver.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labcheck import assert_nothing_left, echo

from vmha.lab import cluster, faults
from vmha.lab.state import LabState

pytestmark = pytest.mark.e2e

PREFIX = "vd3"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    lab_dir = tmp_path_factory.mktemp("lab-dashboard")
    try:
        yield cluster.up(lab_dir, hosts=3, vms=4, io_timeout=1, prefix=PREFIX, echo=echo)
    finally:
        cluster.down(lab_dir)
        assert_nothing_left(lab_dir, PREFIX)


def _line(proc: subprocess.Popen[str], expect: str) -> list[str]:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    words = line.split()
    assert words and words[0] == expect, f"driver: {line or 'no answer (see chromium.log)'}"
    return words[1:]


def test_a_fault_shows_on_the_page_within_3_s(lab: LabState, tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "vmha.cli", "lab", "status", "--json", "--dir", str(lab.dir)],
                        capture_output=True, text=True, timeout=60, check=True)
    api = json.loads(cp.stdout)["api"]
    assert api["url"].startswith("https://") and api["token"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    echo(f"screenshots: {shots}")
    driver = subprocess.Popen(
        ["ip", "netns", "exec", lab.node("controller").netns, sys.executable, str(HERE / "cdp_driver.py"),
         api["url"], api["token"], str(shots), "h2", "storage"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _line(driver, "ready")
        t_fault = float(faults.host_plane(lab, "h2", "storage", "down")["t"])  # type: ignore[arg-type]
        assert driver.stdin is not None
        driver.stdin.write("go\n")
        driver.stdin.flush()
        state, t_shown = _line(driver, "shown")
        (t_down,) = _line(driver, "down")
        vm, phase, t_task = _line(driver, "task")
        (t_timeline,) = _line(driver, "timeline")
        times = {"shown": float(t_shown) - t_fault, "down": float(t_down) - t_fault,
                 "recovery": float(t_task) - t_fault, "timeline": float(t_timeline) - t_fault}  # fmt: skip
        echo(f"dashboard: storage cut of h2 -> page shows {state.upper()} after {times['shown']:.2f} s, DOWN after "
             f"{times['down']:.2f} s, recovery of {vm} ({phase}) after {times['recovery']:.2f} s, its timeline "
             f"with the fence proof after {times['timeline']:.2f} s")
        (shots / "times.json").write_text(json.dumps({"state": state, **times}, indent=2))
        assert times["shown"] < 3.0, times
        assert state in ("suspect", "down")
        page = (shots / "page.txt").read_text()
        assert "fence proof:" in page and "recovery 1 created: row storage" in page
        assert driver.wait(30) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        faults.host_plane(lab, "h2", "storage", "up")
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "1-before.png", "2-fault-shown.png", "3-down.png", "4-recovery.png", "5-timeline.png"]
