"""The decision core imports only the standard library and itself, and never reads the clock."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "src" / "vmha" / "core"
FORBIDDEN_CALLS = {"time.time", "time.monotonic", "time.sleep", "uuid.uuid4", "random.random", "datetime.now"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_modules_import_only_stdlib_and_core() -> None:
    files = sorted(CORE.glob("*.py"))
    assert files, "no core modules found"
    for f in files:
        for name in _imports(ast.parse(f.read_text())):
            top = name.split(".")[0]
            ok = top in sys.stdlib_module_names or name.startswith("vmha.core") or top == "__future__"
            assert ok, f"{f.name} imports {name}: the core must stay pure"


def test_core_never_reads_the_clock_or_randomness() -> None:
    for f in sorted(CORE.glob("*.py")):
        src = f.read_text()
        for call in FORBIDDEN_CALLS:
            assert f"{call}(" not in src, f"{f.name} calls {call}: time and randomness are inputs"
        for mod in ("import random", "import uuid", "from random", "from uuid"):
            assert mod not in src, f"{f.name}: {mod}"
