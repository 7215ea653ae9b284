"""pyproject's package data: every pattern names files that exist (a folder that is gone, such as the
old `defaults/`, ships nothing and says so here), and every file of the package that is not Python
source is named by one (or the installed package would lack it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "vmha"


def patterns() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs: list[str] = data["tool"]["setuptools"]["package-data"]["vmha"]
    return globs


def test_every_package_data_pattern_matches_a_file() -> None:
    assert [g for g in patterns() if not any(p.is_file() for p in PKG.glob(g))] == []


def test_every_non_python_file_is_package_data() -> None:
    shipped = {p for g in patterns() for p in PKG.glob(g) if p.is_file()}
    others = {p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
              and "__pycache__" not in p.parts}  # fmt: skip
    assert sorted(str(p.relative_to(PKG)) for p in others - shipped) == []


def test_python_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.14"
