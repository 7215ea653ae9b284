"""Which lab directory owns a namespace prefix.

Two labs with one prefix share namespace names: the second `lab up` would build into the first's
namespaces, and a `lab down` without a lab.json (it cleans leftovers by the <prefix>- names) would
tear down a live lab it never built. So `lab up` records its directory as the prefix's owner, and
a prefix that a live lab in another directory owns is refused by `up` and `down` alike. The record
lives under /run (gone at reboot, with the namespaces it speaks for).
"""

from __future__ import annotations

from pathlib import Path

from vmha.lab.net import LabError, pid_alive
from vmha.lab.state import LabState

OWNERS = Path("/run/vmha-lab")


def _record(prefix: str, owners: Path | None) -> Path:
    return (owners or OWNERS) / f"{prefix}.owner"


def live_owner(prefix: str, lab_dir: Path, owners: Path | None = None) -> Path | None:
    """The directory of ANOTHER lab that owns `prefix` and still runs (its lab.json names the prefix,
    its controller's anchor process lives); None when there is none, or only leftovers."""
    try:
        other = Path(_record(prefix, owners).read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    if other.resolve() == lab_dir.resolve():
        return None
    try:
        state = LabState.load(other)
    except LabError:
        return None
    if state.prefix != prefix or not state.controller.anchor or not pid_alive(state.controller.anchor):
        return None
    return other


def refuse_if_owned(prefix: str, lab_dir: Path, action: str, owners: Path | None = None) -> None:
    other = live_owner(prefix, lab_dir, owners)
    if other is not None:
        raise LabError(
            f"lab {action} {lab_dir}: namespace prefix {prefix} belongs to the running lab in {other}; "
            f"use another --prefix, or `vmha lab down --dir {other}` first"
        )


def claim(prefix: str, lab_dir: Path, owners: Path | None = None) -> None:
    """Record `lab_dir` as the owner of `prefix`; refused while another live lab owns it."""
    refuse_if_owned(prefix, lab_dir, "up", owners)
    record = _record(prefix, owners)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{lab_dir.resolve()}\n")


def release(prefix: str, lab_dir: Path, owners: Path | None = None) -> None:
    """Drop the record if it names `lab_dir` (another lab's record stays)."""
    record = _record(prefix, owners)
    try:
        if Path(record.read_text().strip()) == lab_dir.resolve():
            record.unlink()
    except (OSError, UnicodeDecodeError):
        return
