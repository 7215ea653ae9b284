"""`vmha model check`: the fencing protocol's Promela model checked by Spin (vmha.model.check).

Exit codes:
  vmha model check                 0: never_two_writers holds in every reachable state and every proof
                                      method can prove; 1: it does not (the violating run is printed), a
                                      method can never prove, or the search did not complete
  vmha model check --broken NAME   1: every selected broken variant was caught (its violating run is
                                      printed), as it must be; 3: some variant was NOT caught (a model bug)
  either                           2: spin, gcc or the verifier could not run
"""

from __future__ import annotations

import sys

import click

from vmha.core.fencing import ProofMethod
from vmha.model import check
from vmha.model.check import ModelError, Result

NOT_CAUGHT = 3


class _ToolError(click.ClickException):
    exit_code = 2


def _trail(r: Result) -> None:
    click.echo(f"--- trail of {r.name} (spin -t):")
    click.echo(r.trail)
    click.echo("---")


@click.group(name="model")
def model() -> None:
    """The fencing protocol as a checked model (Promela, Debian's spin)."""


@model.command("check")
@click.option("--broken", "variant", type=click.Choice([*check.VARIANTS, "all"]), default=None,
              help="Run a deliberately broken variant (or all): each must violate never_two_writers; "
                   "exit 1 when every one does, 3 when one is not caught.")  # fmt: skip
@click.option("--max-faults", type=click.IntRange(0, 6), default=None,
              help="Faults per run (the model's MAXF, default 3); more costs states and time.")
def check_cmd(variant: str | None, max_faults: int | None) -> None:
    """Check never_two_writers exhaustively on the model of vmha as it is, or on broken variants."""
    try:
        if variant is None:
            sys.exit(_correct(max_faults))
        sys.exit(_broken(list(check.VARIANTS) if variant == "all" else [variant], max_faults))
    except ModelError as e:
        raise _ToolError(str(e)) from None


def _correct(maxf: int | None) -> int:
    r = check.correct(maxf=maxf)
    click.echo(r.summary())
    if r.violated:
        _trail(r)
        return 1
    if not r.complete:
        click.echo("the search did not complete: the result covers only part of the states")
        return 1
    # A model where nothing proves is safe too: each method must prove in some run.
    never = []
    for name in check.METHODS:
        w = check.proves(name, maxf=maxf)
        method = ProofMethod[name].value
        click.echo(f"{method}: {'proves in some run' if w.violated else 'NEVER proves'} "
                   f"({w.states} states, {w.seconds:.1f} s)")  # fmt: skip
        if not w.violated:
            never.append(method)
    if never:
        click.echo(f"model bug: {', '.join(never)} can never prove, the check says nothing about them")
        return 1
    return 0


def _broken(names: list[str], maxf: int | None) -> int:
    missed = []
    for name in names:
        r = check.broken(name, maxf=maxf)
        click.echo(r.summary())
        if r.violated:
            click.echo(f"caught: {check.VARIANTS[name][1]}")
            _trail(r)
        else:
            click.echo(f"NOT CAUGHT: {name} ({check.VARIANTS[name][1]}): the model no longer sees this fault")
            missed.append(name)
    if missed:
        click.echo(f"model bug: {len(missed)} broken variant(s) not caught: {', '.join(missed)}")
        return NOT_CAUGHT
    click.echo(f"all {len(names)} broken variant(s) caught")
    return 1
