"""[logging] format = "journald" for real: a `vmha agent` process logs to a real systemd-journald (in a
private mount namespace of its own: tmpfs over /run/systemd and /run/log, so the machine's are
untouched), and journalctl finds its lines by the structured fields, decision text unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmha.testing.etcd import EtcdProcess
from vmha.testing.hosts import ProxiedHost

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/lib/systemd/systemd-journald").exists() or shutil.which("unshare") is None,
                       reason="systemd-journald or unshare is missing: scripts/setup.sh installs systemd"),
]  # fmt: skip

SCRIPT = r"""
set -eu
mount -t tmpfs vmha-test /run/systemd 2>/dev/null || { mkdir -p /run/systemd && mount -t tmpfs vmha-test /run/systemd; }
mkdir -p /run/log && mount -t tmpfs vmha-test /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs vmha-test /var/log/journal; fi
/lib/systemd/systemd-journald & journald=$!
trap 'kill $journald 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
"$VMHA" agent --config "$CONFIG" --status-file "$STATUS" & agent=$!
sleep "$RUN_FOR"
kill -TERM $agent; wait $agent || true
sleep 0.5
journalctl --directory=/run/log/journal -o json --no-pager SYSLOG_IDENTIFIER=vmha
"""


async def test_agent_lines_reach_journald_with_fields(tmp_path: Path, etcd: EtcdProcess) -> None:
    host = await ProxiedHost.create(tmp_path, "t", "h1", "r1", etcd)
    try:
        host.config_path.write_text(host.config_path.read_text() + '[logging]\nformat = "journald"\n')
        env = {**os.environ, "VMHA": str(Path(sys.executable).with_name("vmha")), "CONFIG": str(host.config_path),
               "STATUS": str(host.status_path), "RUN_FOR": "4"}  # fmt: skip
        r = await asyncio.to_thread(subprocess.run, ["unshare", "--mount", "bash", "-c", SCRIPT], env=env,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        await host.close()
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert entries, r.stdout + r.stderr
    messages = [e["MESSAGE"] for e in entries]
    assert "host h1 registered (domain r1)" in messages, messages
    # Every agent line is about its host; a plane named in the text becomes PLANE.
    assert all(e.get("HOST") == "h1" and e["LOGGER"].startswith("vmha") for e in entries), entries
    assert any(e.get("PRIORITY") == "6" for e in entries)
    stop = [e for e in entries if "marked as stopped cleanly" in e["MESSAGE"]]
    assert stop and stop[0]["SYSLOG_IDENTIFIER"] == "vmha", messages
