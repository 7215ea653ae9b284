"""Where the daemons' log lines go, chosen by [logging] format:

- "text": `time level logger: decision text` on stderr (the lab's and the tests' format);
- "json": one JSON object per line on stderr: time, level, logger, message, and the fields below;
- "journald": systemd's journal through its native socket (/run/systemd/journal/socket), with
  MESSAGE (the decision text, unchanged), PRIORITY, SYSLOG_IDENTIFIER and the fields below, so
  `journalctl -u vmha-manager VM=vm1` finds every decision about one VM;
- "auto" (the default): "journald" when stderr is the journal (systemd's $JOURNAL_STREAM names it),
  else "text".

The fields, where a line knows them: HOST, PLANE, VM, TASK (recovery.attempt), PROOF_METHOD. They
come from the `extra` of a log call (logging.info(..., extra={"vm": vm})), else from the decision
text's fixed phrases (`host 'h1'`, `vm=vm1`, `plane storage`, `proof lease-taken`, `attempt 3.1`),
else from the process's own defaults (an agent's lines are about its host). Names and methods are
matched against closed sets and name patterns only: a free word is never taken for a field.

The journal socket failing (journald restarting) loses no line: it is written to stderr as text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping

from vmha.core.fencing import ProofMethod
from vmha.core.planes import PLANES

JOURNAL_SOCKET = "/run/systemd/journal/socket"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("host", "plane", "vm", "task", "proof_method")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"  # config.Name, not ending in . or -
_PLANES = "|".join(p.value for p in PLANES)
_METHODS = "|".join(re.escape(m.value) for m in ProofMethod)
# field -> patterns of the decision texts (group 1 is the value); the first match wins.
_PATTERNS: dict[str, list[re.Pattern[str]]] = {
    "host": [re.compile(rf"\bhost '({_NAME})'"), re.compile(rf"\bhost=({_NAME})")],
    "vm": [re.compile(rf"\bvm '({_NAME})'"), re.compile(rf"\bvm=({_NAME})")],
    "plane": [re.compile(rf"\bplane[ =]({_PLANES})\b")],
    "task": [re.compile(r"\battempt (\d+\.\d+)\b")],
    "proof_method": [re.compile(rf"\b(?:proof|method=)\s?({_METHODS})(?![\w-])")],
}
# Python's levels -> syslog priorities (journald's PRIORITY)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def fields(record: logging.LogRecord, defaults: Mapping[str, str]) -> dict[str, str]:
    """The structured fields of one record: its extras, else its text, else the process defaults."""
    text = record.getMessage()
    found: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = next((m.group(1) for p in _PATTERNS[name] if (m := p.search(text))), None)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            found[name] = str(value)
    return found


class JsonFormatter(logging.Formatter):
    def __init__(self, defaults: Mapping[str, str]) -> None:
        super().__init__()
        self.defaults = dict(defaults)

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record, self.defaults),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, sort_keys=True)


def _journal_field(name: str, value: str) -> bytes:
    """One field of journald's native protocol: NAME=value, or NAME, a length and the raw value when
    the value holds a newline (a traceback)."""
    raw = value.encode("utf-8", "replace")
    if b"\n" not in raw:
        return name.encode() + b"=" + raw + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"


class JournalHandler(logging.Handler):
    """Sends each record to journald as one datagram of fields; stderr text if the socket fails."""

    def __init__(self, defaults: Mapping[str, str], identifier: str = "vmha", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.defaults = dict(defaults)
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(logging.Formatter(TEXT_FORMAT))

    def payload(self, record: logging.LogRecord) -> bytes:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        parts = [
            _journal_field("MESSAGE", message),
            _journal_field("PRIORITY", str(_PRIORITY.get(record.levelno, 6))),
            _journal_field("SYSLOG_IDENTIFIER", self.identifier),
            _journal_field("LOGGER", record.name),
            _journal_field("CODE_FILE", record.pathname),
            _journal_field("CODE_LINE", str(record.lineno)),
            _journal_field("CODE_FUNC", record.funcName or "?"),
        ]
        parts += [_journal_field(k.upper(), v) for k, v in fields(record, self.defaults).items()]
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(self.payload(record), self.path)
        except OSError:
            self.fallback.emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def journal_is_stderr() -> bool:
    """Does stderr go to the journal? systemd sets $JOURNAL_STREAM to its "device:inode"."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def configure(fmt: str, *, verbose: bool = False, defaults: Mapping[str, str] | None = None) -> str:
    """Set up the root logger for a daemon in format `fmt` ([logging] format); the format used. As
    logging.basicConfig, it leaves a root logger that already has handlers alone (pytest's capture)."""
    if fmt == "auto":
        fmt = "journald" if journal_is_stderr() else "text"
    handler: logging.Handler
    if fmt == "journald":
        handler = JournalHandler(defaults or {})
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(defaults or {}) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    return fmt


__all__ = ["FIELDS", "JournalHandler", "JsonFormatter", "configure", "fields", "journal_is_stderr"]
