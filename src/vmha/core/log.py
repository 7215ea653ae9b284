"""Operator log lines, also the oracle of the scenario tests.

One line per decision or state change: ``<level> <time> <actor>: <what> (<evidence>)``. Times are the
core's own clock (seconds, formatted with one decimal), never the wall clock, so a scenario replays
to the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    INFO = "info"
    WARN = "warn"
    ERROR = "err"


@dataclass(frozen=True, slots=True)
class LogLine:
    level: Level
    time: float
    actor: str
    text: str

    def render(self) -> str:
        return f"{self.level.value:<4} {self.time:7.1f} {self.actor}: {self.text}"


def evidence(**fields: object) -> str:
    """Evidence as 'k=v k=v', keys in the order given, None values left out."""
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
