"""Log formats: the decision text unchanged in every format, the structured fields (HOST, PLANE, VM,
TASK, PROOF_METHOD) where the line knows them, journald's native protocol on a real datagram socket."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha import config, logsetup

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("vmha.manager", level, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vm 'vm1' on host 'h2': queued -> proving (row storage, action fence-evacuate, methods "
         "lease-taken,exit-attested,host-dead, attempt 1.1)", {"vm": "vm1", "host": "h2", "task": "1.1"}),
        ("vm 'vm1' on host 'h2': proving -> marking-down (proof exit-attested after 3.9s)",
         {"vm": "vm1", "host": "h2", "proof_method": "exit-attested"}),
        ("host 'h1' plane storage: up -> suspect (reason=no new heartbeat for 1.2s seq=20)",
         {"host": "h1", "plane": "storage"}),
        ("proof vm=vm7 host=c-3 method=lease-taken in 1.2s owners_before=[]",
         {"vm": "vm7", "host": "c-3", "proof_method": "lease-taken"}),
        ("leader: loaded 2 task(s), 2 active", {}),
        # free words are no fields: "the host came back", a plane name outside the closed set
        ("proof attempt cancelled: the host came back; plane backup lost", {}),
    ],
)  # fmt: skip
def test_fields_from_the_decision_text(text: str, expected: dict[str, str]) -> None:
    assert logsetup.fields(record(text), {}) == expected


def test_extras_win_then_text_then_defaults() -> None:
    r = record("vm 'vm1' on host 'h2': done", vm="vm9")
    assert logsetup.fields(r, {"host": "self", "plane": "storage"}) == {"vm": "vm9", "host": "h2", "plane": "storage"}


def test_every_scenario_line_with_a_vm_names_it() -> None:
    """Over the scenarios' real decision lines: each naming a vm 'X' yields VM=X (and its host)."""
    lines = [ln for p in sorted(SCENARIOS.glob("*/log.expect")) for ln in p.read_text().splitlines()]
    named = [ln for ln in lines if " vm '" in ln]
    assert len(named) > 100
    for ln in named:
        f = logsetup.fields(record(ln.split(": ", 1)[1]), {})
        assert f["vm"] == ln.split("vm '", 1)[1].split("'", 1)[0], ln
        if " on host '" in ln:
            assert f["host"] == ln.split(" on host '", 1)[1].split("'", 1)[0], ln


def test_json_line_keeps_the_text() -> None:
    text = "vm 'vm1' on host 'h2': proving -> marking-down (proof power after 2.0s)"
    out = json.loads(logsetup.JsonFormatter({"host": "ignored"}).format(record(text, level=logging.WARNING)))
    assert out["message"] == text and out["level"] == "warning" and out["logger"] == "vmha.manager"
    assert (out["vm"], out["host"], out["proof_method"]) == ("vm1", "h2", "power")


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol, as journald reads it."""
    out: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            data = rest
        else:
            (n,) = struct.unpack("<Q", rest[:8])
            out[line.decode()] = rest[8 : 8 + n].decode()
            assert rest[8 + n : 9 + n] == b"\n"
            data = rest[9 + n :]
    return out


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()


def test_journald_native_protocol(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    handler = logsetup.JournalHandler({"host": "c17"}, path=path)
    handler.emit(record("host %s plane %s: lease expired", "c17", "service", level=logging.ERROR))
    got = parse_native(sock.recv(65536))
    assert got["MESSAGE"] == "host c17 plane service: lease expired"
    assert (got["PRIORITY"], got["SYSLOG_IDENTIFIER"], got["LOGGER"]) == ("3", "vmha", "vmha.manager")
    assert (got["HOST"], got["PLANE"]) == ("c17", "service")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = record("vm=vm1: releasing failed")
        r.exc_info = sys.exc_info()
    handler.emit(r)
    got = parse_native(sock.recv(65536))
    assert got["MESSAGE"].startswith("vm=vm1: releasing failed\nTraceback") and "RuntimeError: boom" in got["MESSAGE"]
    assert got["VM"] == "vm1"
    handler.close()


def test_journald_down_falls_back_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = logsetup.JournalHandler({}, path=str(tmp_path / "no-journal"))
    handler.fallback.stream = sys.stderr
    handler.emit(record("vm 'vm1' on host 'h2': done"))
    assert "INFO vmha.manager: vm 'vm1' on host 'h2': done" in capsys.readouterr().err
    handler.close()


def test_auto_is_journald_only_when_stderr_is_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logsetup.journal_is_stderr()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited from a parent
    assert not logsetup.journal_is_stderr()


def test_config_format_is_a_closed_set() -> None:
    base = {"cluster": {"name": "c"}, "planes": {p: {"endpoints": ["http://198.18.0.1:2379"]}
                                                 for p in ("management", "storage", "service")},
            "etcd": {"insecure": True}}  # fmt: skip
    assert config.parse(base).logging.format == "auto"
    assert config.parse({**base, "logging": {"format": "json"}}).logging.format == "json"
    with pytest.raises(config.ConfigError, match=r"logging.format"):
        config.parse({**base, "logging": {"format": "syslog"}})
