"""`vmha sim run DIR`: one scenario directory replayed in the simulator and its log printed, as the
scenario tests (tests/scenarios) run each of them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from vmha.sim.expect import diff, log_text, purpose
from vmha.sim.scenario import ScenarioError, load


@click.group(name="sim")
def sim() -> None:
    """The simulator: the decision core under scripted faults, on a virtual clock."""


@sim.command("run")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--diff", "show_diff", is_flag=True,
              help="Print the differences from DIRECTORY/log.expect instead of the log; exit 1 if any.")  # fmt: skip
def run(directory: Path, show_diff: bool) -> None:
    """Run the scenario in DIRECTORY (setup.toml, cmdlist) and print its log."""
    try:
        what = purpose(directory)
        text = log_text(load(directory).run())
    except (ScenarioError, OSError, ValueError) as e:  # a scenario is read from files: name what is wrong
        raise click.ClickException(f"scenario {directory}: {e}") from None
    click.echo(f"# {directory.name}: {what or '(no first-line comment saying what it checks)'}", err=True)
    if not show_diff:
        click.echo(text, nl=False)
        return
    changes = diff(directory, text)
    click.echo(changes or "same as log.expect", nl=not changes)
    sys.exit(1 if changes else 0)


@sim.command("explore")
@click.option("--seeds", "count", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many seeds to run.")
@click.option("--seed", "first", type=int, default=1, show_default=True, help="The first seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("explore-failures"),
              show_default=True, help="Where each failing seed's shrunk scenario is written (DIR/seed-S).")
def explore_cmd(count: int, first: int, out: Path) -> None:
    """Random fault schedules through the manager's runtime loop, invariants checked at every step
    (see vmha.sim.explore). Exits 1 if any seed fails; each failing seed is replayed, shrunk and
    written as a scenario directory."""
    from vmha.sim.explore import Run, Violation, explore, replay, shrink, write_scenario

    shrinking = 0.0  # time spent replaying and shrinking failures, apart from the exploration

    def found(run: Run, v: Violation) -> None:
        nonlocal shrinking
        t = time.perf_counter()
        again, _ = replay(run)
        exact = again is not None and str(again) == str(v)
        faults = shrink(run, v)
        write_scenario(out / f"seed-{run.seed}", run, faults, v)
        click.echo(f"seed {run.seed}: VIOLATION {v} (replays {'exactly' if exact else 'DIFFERENTLY'}); "
                   f"shrunk from {len(run.faults)} to {len(faults)} fault(s): {out / f'seed-{run.seed}'}")
        shrinking += time.perf_counter() - t

    t0 = time.perf_counter()
    failing = explore(first, count, found)
    spent = time.perf_counter() - t0 - shrinking
    more = f" (replayed and shrunk in {shrinking:.1f} s more)" if failing else ""
    click.echo(f"{count} seeds ({first}..{first + count - 1}) in {spent:.1f} s: {count / spent:.1f} seeds/s; "
               f"{len(failing)} failing{more}")
    sys.exit(1 if failing else 0)
