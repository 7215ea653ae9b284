"""`vmha fence test HOST` against a real BMC (ipmi_sim) through Debian's fence_ipmilan: it reports the
power status and changes nothing; a wrong password or an unknown host fails naming why."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vmha.cli import cli
from vmha.testing.ipmi import IPMI_SIM, IpmiSim

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (os.path.exists(IPMI_SIM) and shutil.which("fence_ipmilan") and shutil.which("ipmitool")),
        reason="needs ipmi_sim (openipmi), fence_ipmilan (fence-agents) and ipmitool on PATH: run scripts/setup.sh",
    ),
]


@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[IpmiSim]:
    with IpmiSim(tmp_path / "bmc") as sim:
        yield sim


def write_config(path: Path, options: dict[str, str | int | bool]) -> Path:
    planes = "".join(f'[planes.{p}]\nendpoints = ["http://198.18.0.1:2379"]\n' for p in ("management", "storage",
                                                                                          "service"))  # fmt: skip
    power = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    # `fence test` never reaches etcd: plaintext endpoints are allowed outright rather than given TLS files.
    path.write_text(f'[cluster]\nname = "c"\n{planes}[etcd]\ninsecure = true\n[power.h1]\n{power}')
    path.chmod(0o600)  # it holds the BMC password
    return path


async def vmha(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


async def test_status_through_the_configured_agent(bmc: IpmiSim, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "vmha.toml", bmc.power_options())
    r = await vmha("fence", "test", "--config", str(cfg), "h1")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("host h1: fence_ipmilan: ON (Status: ON) in "), r.output
    assert bmc.host_alive()  # a test changes nothing


async def test_wrong_password_fails_naming_the_agent(bmc: IpmiSim, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "vmha.toml", {**bmc.power_options(), "password": "not-it"})
    r = await vmha("fence", "test", "--config", str(cfg), "h1")
    assert r.exit_code == 1
    assert "host h1: fence_ipmilan action=status failed (1)" in r.output and "not-it" not in r.output
    assert bmc.host_alive()


async def test_unknown_host(bmc: IpmiSim, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "vmha.toml", bmc.power_options())
    r = await vmha("fence", "test", "--config", str(cfg), "h9")
    assert r.exit_code == 1 and "no [power.h9]" in r.output and "configured: h1" in r.output
