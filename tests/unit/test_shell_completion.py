"""Shell completion through click's own mechanism (README, "Shell completion"): the installed `vmha`
prints a bash completion script, and bash, with that script loaded, completes a subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VMHA = str(Path(sys.executable).with_name("vmha"))


def _env(**extra: str) -> dict[str, str]:
    # PYTHONPATH as the test run's: the worktree's vmha, not only the installed one.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def test_vmha_prints_a_completion_script_for_each_shell() -> None:
    for shell, marker in (("bash", "complete -o nosort -F _vmha_completion vmha"), ("zsh", "#compdef vmha"),
                          ("fish", "complete --no-files --command vmha")):  # fmt: skip
        cp = subprocess.run([VMHA], env=_env(_VMHA_COMPLETE=f"{shell}_source"), capture_output=True, text=True,
                            timeout=60)  # fmt: skip
        assert cp.returncode == 0 and marker in cp.stdout, (shell, cp.stdout, cp.stderr)


def _complete(words: str) -> list[str]:
    """What bash offers for the last word of `words`, with vmha's completion script loaded (bash
    calls the function with the command as $1: here the installed one's path)."""
    script = (f'eval "$(_VMHA_COMPLETE=bash_source {VMHA})"; COMP_WORDS=({words}); '
              'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); '
              f'_vmha_completion {VMHA}; printf "%s\\n" "${{COMPREPLY[@]}}"')
    cp = subprocess.run(["bash", "-c", script], env=_env(), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.split()


def test_bash_completes_a_subcommand() -> None:
    assert _complete("vmha rec") == ["recovery"]
    assert _complete("vmha recovery ''") == ["list", "show"]
    assert {"status", "events", "host"} <= set(_complete("vmha ''"))
