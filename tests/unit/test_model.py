"""The fencing protocol's Promela model, checked for real with Debian's spin and gcc (seconds each):
the model of vmha as it is keeps never_two_writers, every proof method can prove in it, and every
deliberately broken variant is caught with a trail that shows the two writers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmha.cli import cli
from vmha.core.fencing import ProofMethod
from vmha.model import check
from vmha.model.check import ModelError

pytestmark = pytest.mark.model

PML = Path(check.__file__).with_name(check.MODEL)


def test_the_model_of_vmha_keeps_never_two_writers() -> None:
    r = check.correct()
    assert not r.violated, r.trail
    assert r.complete
    assert 100_000 < r.states < 3_000_000, r.summary()  # the fault budget still explores, and stays small


@pytest.mark.parametrize("method", check.METHODS)
def test_every_proof_method_can_prove(method: str) -> None:
    """A model in which nothing proves would keep the property too."""
    r = check.proves(method)
    assert r.violated, f"{method} never proves by its own step in the model"
    assert re.search(rf"^manager \d+: proof by {method};", r.trail, re.M), r.trail


@pytest.mark.parametrize("variant", check.VARIANTS)
def test_every_broken_variant_is_caught(variant: str) -> None:
    r = check.broken(variant)
    assert r.violated, f"{variant} not caught: {r.summary()}"
    # The trail is the run up to the second writer: two of A's old copy and the new ones run.
    assert re.search(r"^manager \d+: proof by", r.trail, re.M), r.trail
    final = dict(re.findall(r"([\w\[\]]+) = (\w+)", r.trail.splitlines()[-1]))
    running = [final["a_on"] == final["a_vm"] == "1", final["started[0]"] == "1", final["started[1]"] == "1"]
    assert sum(running) == 2, r.trail


def test_every_define_the_runner_names_is_in_the_model() -> None:
    """A variant whose define the model does not use would check the correct model (and not be caught:
    the test above would say so, but this names the cause)."""
    text = PML.read_text()
    for define, _ in check.VARIANTS.values():
        assert re.search(rf"#ifn?def {define}\b", text), define
    assert set(check.METHODS) == {m.name for m in ProofMethod}
    assert "PROVES" in text


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ModelError, match="no broken variant 'nope'"):
        check.broken("nope")
    with pytest.raises(ModelError, match="no proof method 'nope'"):
        check.proves("nope")


def test_a_missing_spin_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    with pytest.raises(ModelError, match="spin not found: install Debian's spin"):
        check.correct()


def test_cli_exit_codes() -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["model", "check", "--max-faults", "1"])  # the plumbing; the full check is above
    assert ok.exit_code == 0, ok.output
    assert re.search(r"^correct: never_two_writers holds; \d+ states", ok.output, re.M)
    assert ok.output.count("proves in some run") == len(check.METHODS)
    caught = runner.invoke(cli, ["model", "check", "--broken", "power-no-renewal-check"])
    assert caught.exit_code == 1, caught.output
    assert "--- trail of power-no-renewal-check (spin -t):" in caught.output
    assert "manager 2: power: miswired fence confirms off, A runs on" in caught.output


def test_cli_says_when_a_variant_is_not_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant that breaks nothing (here: the correct model under a variant's name) is a model bug:
    exit 3, named."""
    monkeypatch.setitem(check.VARIANTS, "power-no-renewal-check", ("NOTHING_BROKEN", "nothing"))
    r = CliRunner().invoke(cli, ["model", "check", "--broken", "power-no-renewal-check"])
    assert r.exit_code == 3, r.output
    assert "NOT CAUGHT: power-no-renewal-check" in r.output


def test_a_search_that_does_not_complete_is_no_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier stopped by its memory bound has found nothing: that is not "holds"."""
    monkeypatch.setattr(check, "CFLAGS", (*check.CFLAGS, "-DMEMLIM=20"))
    r = CliRunner().invoke(cli, ["model", "check"])
    assert r.exit_code == 1, r.output
    assert "search NOT completed" in r.output and "the search did not complete" in r.output
