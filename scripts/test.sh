#!/usr/bin/env bash
# The test command (README): lint and type-check the code, then every test, unit to end-to-end.
# Needs root (namespaces, sanlock). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
