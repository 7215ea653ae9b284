"""A process's state and start from /proc/PID/stat, the one parse every part of vmha shares.

The start is in clock ticks after boot: fixed for the process's life, so it tells a reused pid apart,
and unlike a start in Unix time (psutil's create_time adds the boot time, which the kernel derives from
the wall clock) no step of the wall clock moves it.
"""

from __future__ import annotations

from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int]:
    """(state letter, start in clock ticks after boot) of `pid`. FileNotFoundError or ProcessLookupError
    once it is gone."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
