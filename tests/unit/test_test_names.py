"""Every test file has a basename of its own: pytest imports test modules by basename (rootdir mode,
no __init__.py), so two tests/*/test_x.py stop the whole run at collection, and a run of one folder
(tests/unit, as helpers and quick checks do) never sees it. Twice found only by the CI dry run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
