"""A scenario's expected log (DIR/log.expect): the text a run is compared with, and the comparison.
Shared by the scenario tests and `vmha sim run --diff`."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

EXPECT = "log.expect"


def log_text(lines: Sequence[str]) -> str:
    return "\n".join(lines) + "\n"


def diff(directory: Path, text: str) -> str:
    """The unified diff from DIR/log.expect to `text` ("" when equal); a missing file counts as empty."""
    path = directory / EXPECT
    expected = path.read_text() if path.exists() else ""
    if text == expected:
        return ""
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                        EXPECT, "log"))  # fmt: skip


def purpose(directory: Path) -> str:
    """What the scenario checks: its cmdlist's first line, a comment ("" when it has none)."""
    first = next(iter((directory / "cmdlist").read_text().splitlines()), "")
    return first[1:].strip() if first.startswith("#") else ""
