"""The manager's production fencing parts against a real sanlock daemon (lab-only, no watchdog) and
a real etcd: the manager allocates a host_id, joins the lockspace and proves through the Prover."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from manager_config import config_text

from vmha.lab.sanlockd import start_sanlock, stop_sanlock
from vmha.testing.etcd import EtcdProcess

pytestmark = pytest.mark.integration


async def test_production_prover_joins_and_proves(etcd: EtcdProcess, tmp_path: Path) -> None:
    await etcd.setup_auth("vt5", managers=["mgr-p"])  # the probe connects as the manager mgr-p
    url = etcd.client_urls[0]
    (tmp_path / "shared").mkdir()
    cfg = tmp_path / "vmha.toml"
    cfg.write_text(
        config_text(etcd, "mgr-p", f"""[locks]
path = "{tmp_path / "shared"}"
lockspace = "vt5"
io_timeout = 1
[manager]
name = "mgr-p"
endpoints = ["{url}"]
driver = "nova"
""")
    )
    daemon = start_sanlock("vt5mgr", run_dir=tmp_path / "run", log_path=tmp_path / "sanlock.log")
    try:
        r = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(Path(__file__).with_name("prover_probe.py")), str(cfg)],
            env={**daemon.env(), "VMHA_RUN_DIR": str(tmp_path / "vmha")},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        stop_sanlock(daemon)
    assert r.returncode == 0, r.stderr[-3000:]
    refused, proof = (json.loads(line) for line in r.stdout.splitlines()[-2:])
    assert "VM vm2: its lease" in refused["refused"] and "was never acquired" in refused["alert"]
    assert (proof["vm"], proof["host"], proof["method"]) == ("vm1", "mgr-p", "lease-taken")
    assert "joined lockspace vt5 as host_id 1" in r.stderr
