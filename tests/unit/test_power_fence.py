"""FenceAgentPower's protocol with fence-agents. No BMC exists here, so the agent is a stand-in
script speaking the fence-agents stdin protocol (name=value lines; `action=status` prints Status)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmha import config
from vmha.locks.power import FenceAgentPower, PowerFenceError, fence_agents

STUB = """#!/bin/sh
[ "$1" = "-o" ] && exit 0  # -o metadata: none (its options are not checked)
cat >> "{log}"
echo --- >> "{log}"
case "$(tail -n 2 "{log}" | head -n 1)" in
  action=status) echo "Status: {status}"; exit {status_rc} ;;
  action=off) echo "Success: Powered OFF" ;;
esac
exit {rc}
"""


def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str = "OFF", rc: int = 0) -> Path:
    log = tmp_path / "calls"
    agent = tmp_path / "bin" / "fence_vt2stub"
    agent.parent.mkdir()
    # Like fence-agents: status exits 2 for OFF, 0 for ON.
    agent.write_text(STUB.format(log=log, status=status, rc=rc, status_rc=2 if status == "OFF" else 0))
    agent.chmod(0o755)
    monkeypatch.setenv("PATH", f"{agent.parent}:/usr/bin:/bin")
    return log


async def test_off_then_status_confirmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = stub(tmp_path, monkeypatch)
    power = FenceAgentPower(fence_agents({"h1": {"agent": "fence_vt2stub", "ip": "10.0.0.5", "password": "s3"}}))
    evidence = await power.power_off("h1", timeout=5)
    assert "off confirmed" in evidence
    calls = log.read_text().split("---\n")
    assert calls[0].splitlines() == ["ip=10.0.0.5", "password=s3", "action=off"]  # on stdin, not argv
    assert calls[1].splitlines()[-1] == "action=status"


async def test_status_not_off_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub(tmp_path, monkeypatch, status="ON")
    power = FenceAgentPower(fence_agents({"h1": {"agent": "fence_vt2stub"}}))
    with pytest.raises(PowerFenceError, match="reports 'Status: ON', not OFF"):
        await power.power_off("h1", timeout=5)


async def test_failing_agent_and_unknown_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub(tmp_path, monkeypatch, rc=1)
    power = FenceAgentPower(fence_agents({"h1": {"agent": "fence_vt2stub"}}))
    with pytest.raises(PowerFenceError, match=r"fence_vt2stub action=off failed \(1\)"):
        await power.power_off("h1", timeout=5)
    with pytest.raises(PowerFenceError, match=r"host h2: no fence agent configured \(\[power.h2\]"):
        await power.power_off("h2", timeout=5)


def test_bad_tables_are_named() -> None:
    with pytest.raises(PowerFenceError, match=r"\[power\].h1.agent: 'ipmitool' is not a fence agent"):
        fence_agents({"h1": {"agent": "ipmitool"}})
    with pytest.raises(PowerFenceError, match="h1: remove action"):
        fence_agents({"h1": {"agent": "fence_ipmilan", "action": "reboot"}})
    with pytest.raises(PowerFenceError, match="h1: expected a table"):
        fence_agents({"h1": "fence_ipmilan"})


def test_config_power_section_feeds_fence_agents() -> None:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    cfg = config.parse({"cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
            "etcd": {"insecure": True},
                        "power": {"h1": {"agent": "fence_ipmilan", "ip": "10.0.0.5", "lanplus": 1}}})
    agents = fence_agents(cfg.power)
    assert agents["h1"].agent == "fence_ipmilan" and agents["h1"].options == {"ip": "10.0.0.5", "lanplus": "1"}


def test_an_option_the_fence_agent_does_not_declare_is_refused() -> None:
    import shutil

    from vmha.locks.power import agent_options

    if shutil.which("fence_ipmilan") is None:
        pytest.skip("fence-agents not installed")
    assert agent_options("fence_ipmilan") is not None and "ip" in agent_options("fence_ipmilan")  # type: ignore[operator]
    with pytest.raises(PowerFenceError, match="fence_ipmilan has no option passwrod"):
        fence_agents({"h1": {"agent": "fence_ipmilan", "ip": "10.0.0.1", "passwrod": "x"}})
    assert fence_agents({"h1": {"agent": "fence_ipmilan", "ip": "10.0.0.1", "password": "x"}})["h1"].options["ip"]


async def test_the_agents_output_never_carries_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub(tmp_path, monkeypatch)
    # A careless agent echoing its stdin (the password line) and a terminal escape.
    agent = tmp_path / "bin" / "fence_vt2stub"
    agent.write_text('#!/bin/sh\n[ "$1" = "-o" ] && exit 0\ncat; printf "\\033[2Jdone\\n"\n')
    power = FenceAgentPower(fence_agents({"h1": {"agent": "fence_vt2stub", "ip": "10.0.0.5", "password": "s3cr"}}))
    _, text = await power._run("h1", "status", 5)
    assert "password=***" in text and "s3cr" not in text and "\x1b" not in text and "done" in text
