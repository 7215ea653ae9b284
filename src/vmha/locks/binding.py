"""The sanlock Python binding, or a stand-in that names what is missing when it is first used.

The binding is a compiled module Debian builds for its system Python only (python3-sanlock: 3.11 on
Debian 12, 3.13 on Debian 13). A Python it was not built for can still run every vmha command that
does not touch sanlock (`vmha config check`, `status`, `events`, the simulator); the first sanlock
call then fails with an error that says which Python lacks the binding and how to get it, instead
of an ImportError at start naming a module operators never asked for.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn


class BindingMissing(ImportError):
    """The sanlock binding cannot be imported by this Python."""


class _Missing:
    def __init__(self, cause: ImportError) -> None:
        self._cause = cause

    def __getattr__(self, name: str) -> NoReturn:
        version = ".".join(map(str, sys.version_info[:2]))
        raise BindingMissing(
            f"sanlock.{name}: the sanlock Python binding is not importable by Python {version} "
            f"({sys.executable}): install the distribution's python3-sanlock built for this Python "
            f"(Debian: apt install python3-sanlock, then run vmha with the system's python3) [{self._cause}]"
        ) from self._cause


sanlock: Any
try:
    import sanlock as _binding

    sanlock = _binding
except ImportError as exc:
    sanlock = _Missing(exc)
