"""FenceAgentPower against the real thing: Debian's fence_ipmilan (with ipmitool) talking IPMI 2.0
over UDP to OpenIPMI's ipmi_sim, a real BMC simulator whose chassis power is a real process (the
"host"). Powered off means that process is gone: checked after every power_off.

Needs fence-agents, ipmitool and openipmi (scripts/setup.sh installs them).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha import config
from vmha.locks.power import FenceAgentPower, PowerFenceError, fence_agents
from vmha.testing.ipmi import IPMI_SIM, IpmiSim, free_udp_port
from vmha.testing.wait import until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (os.path.exists(IPMI_SIM) and shutil.which("fence_ipmilan") and shutil.which("ipmitool")),
        reason="needs ipmi_sim (openipmi), fence_ipmilan (fence-agents) and ipmitool on PATH: run scripts/setup.sh",
    ),
]

TIMEOUT = 30.0  # what the manager would give one power-off; fence_ipmilan's own defaults fit in it


@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[IpmiSim]:
    with IpmiSim(tmp_path / "bmc") as sim:
        yield sim


def agent_pids(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (a port only this test uses)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                pids.append(int(d.name))
    return pids


async def test_power_off_kills_the_host(bmc: IpmiSim) -> None:
    power = FenceAgentPower(fence_agents({"h1": bmc.power_options()}))
    assert bmc.host_alive()
    evidence = await power.power_off("h1", TIMEOUT)
    assert evidence == "fence_ipmilan: off confirmed (Status: OFF)"
    assert not bmc.host_alive(), f"power_off returned while host process {bmc.host_pid} still exists"
    # Already off: a second fence (a retried proof) confirms again.
    assert await power.power_off("h1", TIMEOUT) == evidence


async def test_wrong_password_is_refused_and_host_runs_on(bmc: IpmiSim) -> None:
    power = FenceAgentPower(fence_agents({"h1": {**bmc.power_options(), "password": "not-it"}}))
    with pytest.raises(PowerFenceError) as err:
        await power.power_off("h1", TIMEOUT)
    msg = str(err.value)
    assert msg.startswith("host h1: fence_ipmilan action=off failed (1): ")
    assert "Unable to obtain correct plug status" in msg  # the agent's own words
    assert "DeprecationWarning" not in msg
    assert bmc.host_alive()


async def test_unreachable_bmc_fails_within_the_timeout() -> None:
    port = free_udp_port()  # nothing listens there
    power = FenceAgentPower(fence_agents({"h1": {"agent": "fence_ipmilan", "ip": "127.0.0.1", "ipport": port,
                                                 "username": "vmha", "password": "x", "lanplus": True,
                                                 "cipher": 3}}))
    timeout = 3.0
    t0 = time.monotonic()
    with pytest.raises(PowerFenceError, match=r"^host h1: fence_ipmilan action=off gave no answer in 3 s$"):
        await power.power_off("h1", timeout)
    assert time.monotonic() - t0 < timeout + 2.0  # + killing and reaping the agent
    # The agent's ipmitool went with it: nothing keeps talking to the BMC after vmha gave up (the
    # grandchild exits a moment after the kill: waited for, not slept for).
    await until(lambda: agent_pids(f"-p {port} ") == [], "no ipmitool left for the unreachable BMC", timeout=2)


async def test_operator_config_powers_the_host_off(bmc: IpmiSim, tmp_path: Path) -> None:
    path = tmp_path / "vmha.toml"
    path.write_text(f"""
[cluster]
name = "c1"

[etcd]
insecure = true

[planes.management]
endpoints = ["http://198.18.0.1:2379"]
[planes.storage]
endpoints = ["http://198.18.64.1:2379"]
[planes.service]
endpoints = ["http://198.18.128.1:2379"]

[manager]
name = "m1"
endpoints = ["http://198.18.0.1:2379"]
driver = "nova"
power_fence = true

[power.h1]
agent = "fence_ipmilan"
ip = "{bmc.address}"
ipport = {bmc.port}
username = "{bmc.username}"
password = "{bmc.password}"
lanplus = true
cipher = 3
""")
    path.chmod(0o600)  # it holds a password: vmha refuses it readable by others
    cfg = config.load(path)
    assert cfg.require_manager().power_fence
    power = FenceAgentPower(fence_agents(cfg.power))  # as the manager builds it (manager/daemon.py)
    assert "off confirmed" in await power.power_off("h1", TIMEOUT)
    assert not bmc.host_alive()
