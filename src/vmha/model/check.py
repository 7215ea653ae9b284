"""Checks the Promela model of the fencing protocol (fencing.pml, beside this file) with Spin.

Each check runs, in a temporary directory: `spin -a` (the model to pan.c, with the variant's
preprocessor define), `gcc` (pan.c to the verifier), and the verifier, which searches every state.
The verifier is built for a safety search (-DSAFETY), breadth first (-DBFS): never_two_writers is a
safety property (a violation is a finite run), so no acceptance cycles are searched, and breadth
first finds the shortest violating run, whose replay (`spin -t`) is the trail printed.

A check is only as good as the model's ability to fail: every broken variant (VARIANTS) must violate
the property, and every proof method must be able to prove (a model where nothing ever proves would
be safe too). `correct()` checks both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmha.core.fencing import ProofMethod

MODEL = "fencing.pml"
# The verifier's limits: far above what the model needs (about 0.7 M states at MAXF 3), so that a
# model grown by mistake fails as "search not completed" rather than filling the machine.
PAN_MEMORY_MB = 1024
HASH_BITS = 22  # 4 M slots
TIMEOUT = 300.0  # seconds for any one of spin, gcc, pan
# Unoptimised: gcc takes a third of the time of -O2 on pan.c, and the search of under a million states
# loses less than that.
CFLAGS = ("-O0", "-DSAFETY", "-DBFS", f"-DMEMLIM={PAN_MEMORY_MB}")

# name -> (the model's preprocessor define, what is broken)
VARIANTS: dict[str, tuple[str, str]] = {
    "power-no-renewal-check": ("POWER_NO_RENEWAL_CHECK",
                               "power fences a host that still renews its lockspace (a miswired fence "
                               "then 'confirms' a running host off)"),
    "vacuous-lease": ("VACUOUS_LEASE", "lease-taken takes a lease that was never held on the VM's host"),
    "attest-without-lease": ("ATTEST_WITHOUT_LEASE",
                             "exit-attested trusts the attestation for a VM whose lease was never held "
                             "on its host"),
    "host-dead-never-held": ("HOST_DEAD_NEVER_HELD",
                             "host-dead takes a lease never held on the VM's host (vmha before the model "
                             "found it: DEAD vouches only for lease holders)"),
    "dead-on-fail": ("DEAD_ON_FAIL", "host-dead resets the lease when the host is FAIL, not yet DEAD"),
    "no-watchdog": ("NO_WATCHDOG",
                    "assumption broken: no watchdog (the lab's sanlock -w 0), a dead sanlock daemon leaves "
                    "its lease holders running"),
    "fence-miswired-cut": ("FENCE_MISWIRED_CUT",
                           "assumption broken: a miswired power fence while the host is also cut from "
                           "storage (nothing vmha reads can tell)"),
    "two-managers": ("TWO_MANAGERS",
                     "assumption broken: two managers prove at once (a deposed leader's lease reset still in "
                     "flight clobbers the lease the other one's new copy took); one fault per run"),
}

# The model's mtype names are ProofMethod's member names.
METHODS = tuple(m.name for m in ProofMethod)


class ModelError(Exception):
    """Spin, gcc or the verifier could not run, or their output is not what a check expects."""


@dataclass(frozen=True, slots=True)
class Result:
    """One verifier run."""

    name: str  # "correct", a variant name, or "proves <METHOD>"
    violated: bool  # never_two_writers (or the PROVES assertion) found false
    complete: bool  # every reachable state searched
    states: int
    transitions: int
    depth: int
    pan_seconds: float  # the verifier's own time
    seconds: float  # spin, gcc and the verifier
    trail: str  # the violating run, as the model's printf lines and the final values ('' if none)

    def summary(self) -> str:
        verdict = "VIOLATED" if self.violated else "holds" if self.complete else "search NOT completed"
        return (f"{self.name}: never_two_writers {verdict}; {self.states} states, {self.transitions} "
                f"transitions, depth {self.depth}; verifier {self.pan_seconds:.2f} s, with spin and gcc "
                f"{self.seconds:.1f} s")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ModelError(f"{name} not found: install Debian's spin and gcc (scripts/setup.sh does)")
    return path


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{what} took longer than {TIMEOUT:.0f} s: {' '.join(cmd)}") from None
    if r.returncode != 0:
        raise ModelError(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-2000:]}")
    return r.stdout


def _number(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise ModelError(f"verifier output without {what}:\n{text[-2000:]}")
    return float(m.group(1))


def _story(replay: str) -> str:
    """The replay's printf lines (the run, step by step), then the final values of the variables."""
    steps, final = [], []
    for line in replay.splitlines():
        if line.startswith("\t\t"):  # spin -t prints the variables tab-indented once the trail ends
            final.append(line.strip())
        elif line.startswith(" ") and not re.match(r"\s*\d+:\s+proc ", line) and line.strip():  # printf lines
            steps.append(line.strip())
    return "\n".join([*steps, f"final state: {' '.join(final)}"])


def run(name: str, defines: tuple[str, ...] = (), *, maxf: int | None = None) -> Result:
    """Checks the model with the given defines (NAME or NAME=VALUE); replays the violation if any."""
    spin, gcc = _tool("spin"), _tool("gcc")
    flags = [f"-D{d}" for d in defines] + ([f"-DMAXF={maxf}"] if maxf is not None else [])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmha-model-") as tmp:
        d = Path(tmp)
        (d / MODEL).write_text(resources.files("vmha.model").joinpath(MODEL).read_text())
        _run([spin, *flags, "-a", MODEL], d, "spin -a")
        _run([gcc, *CFLAGS, "-o", "pan", "pan.c"], d, "gcc pan.c")
        out = _run(["./pan", f"-w{HASH_BITS}"], d, "the verifier (pan)")
        errors = int(_number(r"errors: (\d+)", out, "an error count"))
        trail = ""
        if errors:
            if not (d / f"{MODEL}.trail").exists():
                raise ModelError(f"{name}: the verifier found {errors} error(s) but wrote no trail:\n{out[-2000:]}")
            trail = _story(_run([spin, *flags, "-t", MODEL], d, "spin -t"))
    return Result(
        name=name,
        violated=errors > 0,
        complete="Search not completed" not in out and errors == 0,
        states=int(_number(r"(\d+) states, stored", out, "a state count")),
        transitions=int(_number(r"(\d+) transitions", out, "a transition count")),
        depth=int(_number(r"depth reached (\d+)", out, "a search depth")),
        pan_seconds=_number(r"elapsed time ([\d.e+-]+) seconds", out, "an elapsed time"),
        seconds=time.monotonic() - started,
        trail=trail,
    )


def correct(*, maxf: int | None = None) -> Result:
    """The model of vmha as it is: never_two_writers must hold over every reachable state."""
    return run("correct", maxf=maxf)


def proves(method: str, *, maxf: int | None = None) -> Result:
    """Whether `method` can prove by its own step: violated=True means it can (the run is its witness)."""
    if method not in METHODS:
        raise ModelError(f"no proof method {method!r}: one of {', '.join(METHODS)}")
    return run(f"proves {method}", (f"PROVES={method}",), maxf=maxf)


def broken(name: str, *, maxf: int | None = None) -> Result:
    """A broken variant: violated=True means the check caught it, as it must."""
    if name not in VARIANTS:
        raise ModelError(f"no broken variant {name!r}: one of {', '.join(VARIANTS)}, or all")
    return run(name, (VARIANTS[name][0],), maxf=maxf)
