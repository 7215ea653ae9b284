"""A namespace prefix that a running lab in another directory owns is refused by `lab up` and
`lab down` (vmha.lab.owner): two labs with one prefix would build into, and tear down, each other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmha.lab import cluster, owner
from vmha.lab.net import LabError
from vmha.lab.state import LabState


def _running_lab(lab_dir: Path, prefix: str, anchor: int) -> None:
    state = LabState(dir=lab_dir, prefix=prefix, created=time.time())
    state.controller.anchor = anchor
    state.save()


def test_a_live_labs_prefix_is_refused_elsewhere(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    first, second = tmp_path / "a", tmp_path / "b"
    _running_lab(first, "vq", os.getpid())  # this process stands in for its controller's anchor
    owner.claim("vq", first, owners)
    owner.claim("vq", first, owners)  # the owner itself may claim again (lab up on a built lab)
    with pytest.raises(LabError, match=f"belongs to the running lab in {first}"):
        owner.claim("vq", second, owners)
    with pytest.raises(LabError, match="lab down"):
        owner.refuse_if_owned("vq", second, "down", owners)
    owner.claim("vw", second, owners)  # another prefix is free
    owner.release("vq", second, owners)  # not the owner: the record stays
    assert owner.live_owner("vq", second, owners) == first
    owner.release("vq", first, owners)
    owner.claim("vq", second, owners)


def test_leftovers_of_a_dead_lab_are_not_an_owner(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _running_lab(tmp_path / "a", "vq", dead.pid)  # its anchor is gone: what is left is leftovers
    owner.claim("vq", tmp_path / "a", owners)
    owner.claim("vq", tmp_path / "b", owners)
    (tmp_path / "b" / "lab.json").unlink(missing_ok=True)
    owner.claim("vq", tmp_path / "c", owners)  # the recorded owner has no lab.json any more


def test_lab_down_without_a_record_leaves_a_running_lab_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab down` in a directory with no lab.json cleans by the prefix's names: it must refuse when
    those names belong to a running lab elsewhere (before anything is removed)."""
    monkeypatch.setattr(owner, "OWNERS", tmp_path / "owners")
    _running_lab(tmp_path / "a", "vl", os.getpid())
    owner.claim("vl", tmp_path / "a")
    with pytest.raises(LabError, match="belongs to the running lab"):
        cluster.down(tmp_path / "b")  # default prefix vl, no lab.json in b
    assert (tmp_path / "a" / "lab.json").exists()
