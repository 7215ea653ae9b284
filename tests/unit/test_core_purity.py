"""The decision core imports only an allow-list of pure standard-library modules and itself.

Checked on the syntax tree, not the text: every import at any depth (a function-local `import socket`
counts), every relative import (none may leave `vmha.core`), every attribute of an allowed module that is
itself a module (`typing.sys.modules["time"]` is a way out), the builtins that load code or touch the
world (`__import__`, `open`, `eval`, ...), and dunder attributes (`x.__globals__`, `__builtins__`).
The clock, randomness, I/O and the adapters are thus unreachable, not merely uncalled.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "vmha" / "core"
PACKAGE = "vmha.core"

# What core/ needs today, plus three as pure (math, functools, bisect). Widen only for a module
# that does no I/O, reads no clock or randomness and exposes no module that does.
ALLOWED = frozenset(
    {
        "__future__",
        "bisect",
        "collections.abc",
        "dataclasses",
        "enum",
        "functools",
        "heapq",
        "itertools",
        "math",
        "typing",
    }
)
FORBIDDEN_BUILTINS = frozenset(
    {
        "__import__", "breakpoint", "compile", "delattr", "eval", "exec", "getattr", "globals",
        "input", "locals", "open", "print", "setattr", "vars",
    }
)
ALLOWED_DUNDERS = frozenset({"__all__", "__init__", "__post_init__"})


def _in_core(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _module_attribute_is_module(module: str, attr: str) -> bool:
    return inspect.ismodule(getattr(importlib.import_module(module), attr, None))


def violations(path: Path) -> list[str]:
    """Every way `path` reaches beyond the allow-list, one line each."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> allowed module it is bound to
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name not in ALLOWED and not _in_core(a.name):
                    found.append(f"{where} imports {a.name}")
                elif a.name in ALLOWED:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 0 and node.module is None):
                found.append(f"{where} relative import leaves {PACKAGE}")
                continue
            module = f"{PACKAGE}.{node.module}" if node.level == 1 and node.module else node.module or PACKAGE
            if module not in ALLOWED and not _in_core(module):
                found.append(f"{where} imports from {module}")
            elif module in ALLOWED:
                for a in node.names:
                    if module != "__future__" and _module_attribute_is_module(module, a.name):
                        found.append(f"{where} imports module {module}.{a.name}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS:
            found.append(f"{where} uses {node.id}")
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDERS:
                found.append(f"{where} uses {name}")
    # Second pass, once every alias is known: `typing.sys`, `dataclasses.sys.modules["time"]`, ...
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _module_attribute_is_module(aliases[node.value.id], node.attr)
        ):
            found.append(f"{path.name}:{node.lineno} reaches module {aliases[node.value.id]}.{node.attr}")
    return found


# The recovery core's parts (core/recovery.py's docstring): a part renamed or moved out of core/ must
# be named here again, so that none leaves the guard's reach unnoticed.
RECOVERY_PARTS = ("actions", "events", "hosts", "placement", "recovery", "rejoin", "settings", "state", "steps",
                  "takeover")


def test_core_imports_only_the_allow_list() -> None:
    files = sorted(CORE.glob("*.py"))
    assert {f"{m}.py" for m in RECOVERY_PARTS} <= {f.name for f in files}, "core modules not found"
    assert [v for f in files for v in violations(f)] == []


@pytest.mark.parametrize("part", RECOVERY_PARTS)
def test_guard_fails_on_an_escape_planted_in_each_recovery_part(tmp_path: Path, part: str) -> None:
    core = tmp_path / "core"
    shutil.copytree(CORE, core)
    target = core / f"{part}.py"
    assert violations(target) == []
    target.write_text(target.read_text() + "\nimport time as heapq\nheapq.perf_counter()\n")
    assert any("imports time" in v for v in violations(target))


PLANTED = {
    "import subprocess": "imports subprocess",
    "import socket as heapq": "imports socket",
    "def f() -> None:\n    import asyncio": "imports asyncio",
    "import logging": "imports logging",
    "import os.path": "imports os.path",
    "from threading import Lock": "imports from threading",
    "from random import random": "imports from random",
    "import vmha.etcd.client": "imports vmha.etcd.client",
    "from vmha.locks import space": "imports from vmha.locks",
    "from .. import lab": "relative import leaves vmha.core",
    # The clock through an allowed-looking alias, three ways.
    "import time as heapq\nheapq.perf_counter()": "imports time",
    "import typing\ntyping.sys.modules['time'].perf_counter()": "reaches module typing.sys",
    "from dataclasses import sys": "imports module dataclasses.sys",
    "__import__('time').perf_counter()": "uses __import__",
    "import importlib\nimportlib.import_module('time')": "imports importlib",
    "t = heapq.__builtins__": "uses __builtins__",
    "open('/etc/hosts')": "uses open",
}


@pytest.mark.parametrize("snippet", sorted(PLANTED))
def test_guard_fails_on_a_planted_escape(tmp_path: Path, snippet: str) -> None:
    core = tmp_path / "core"
    shutil.copytree(CORE, core)
    target = core / "health.py"
    assert violations(target) == []
    target.write_text(target.read_text() + "\n" + snippet + "\n")
    found = violations(target)
    assert any(PLANTED[snippet] in v for v in found), found
