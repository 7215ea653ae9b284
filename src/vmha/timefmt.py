"""Times as the CLI shows them to people: local time and how long ago, `10:41:07 (12 s ago)`.

The one helper for every human-readable time of the CLI (the dashboard has its own in JavaScript,
same wording). JSON outputs keep raw Unix times: this is for text only.
"""

from __future__ import annotations

import datetime


def relative(seconds: float) -> str:
    """A duration from now in words: `12 s ago`, `5 min ago`, `3 h ago`, `2 days ago`; a negative
    one (a time still to come, e.g. a retry) `in 12 s`."""
    s = round(abs(seconds))
    if s < 120:
        amount = f"{s} s"
    elif s < 7200:
        amount = f"{round(s / 60)} min"
    elif s < 172800:
        amount = f"{round(s / 3600)} h"
    else:
        amount = f"{round(s / 86400)} days"
    return f"in {amount}" if seconds < 0 else f"{amount} ago"


def when(t: float, now: float, ms: bool = False) -> str:
    """Local time of a Unix time, with the date when it is not today's, and how long ago:
    `10:41:07 (12 s ago)`, `2026-12-01 23:59:58 (26 h ago)`; ms adds milliseconds (event times)."""
    at = datetime.datetime.fromtimestamp(t)
    clock = at.strftime("%H:%M:%S") + (f".{at.microsecond // 1000:03d}" if ms else "")
    if at.date() != datetime.datetime.fromtimestamp(now).date():
        clock = f"{at.date().isoformat()} {clock}"
    return f"{clock} ({relative(now - t)})"


__all__ = ["relative", "when"]
