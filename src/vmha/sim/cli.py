"""`vmha sim run DIR`: one scenario directory replayed in the simulator and its log printed, as the
scenario tests (tests/scenarios) run each of them."""

from __future__ import annotations

import sys
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
