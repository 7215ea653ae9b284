#!/usr/bin/env bash
# Man pages for every vmha command (vmha.1, vmha-agent.1, vmha-host-enable.1, ...), generated from the
# click CLI by Debian's click-man (python3-click-man, installed by scripts/setup.sh), into DIR
# (default build/man). The venv's Python runs it, with click_man alone on its path.
#   bash scripts/build-man.sh [DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/build/man}
py=${PYTHON:-$here/.venv/bin/python}
click_man=${CLICK_MAN_DIR:-/usr/lib/python3/dist-packages/click_man}
if [ ! -d "$click_man" ]; then
  echo "build-man: $click_man is missing: apt-get install python3-click-man (scripts/setup.sh does)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ln -s "$click_man" "$tmp/click_man"
mkdir -p "$out"
rm -f "$out"/vmha*.1
# click-man 0.4.1 imports distutils (deprecated in 3.11): its warning is no finding of ours.
PYTHONPATH="$tmp${PYTHONPATH:+:$PYTHONPATH}" "$py" -W ignore::DeprecationWarning - "$out" <<'PY'
import sys

import click
from click_man.core import write_man_pages

import vmha
from vmha.cli import cli

# click-man walks each group's `commands`; vmha's top-level commands are imported on use: load them.
ctx = click.Context(cli)
for name in cli.list_commands(ctx):
    cli.add_command(cli.get_command(ctx, name), name)
write_man_pages("vmha", cli, version=vmha.__version__, target_dir=sys.argv[1])
PY
echo "build-man: $(ls "$out"/vmha*.1 | wc -l) man pages in $out"
