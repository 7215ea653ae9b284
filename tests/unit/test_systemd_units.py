"""The systemd units: `systemd-analyze verify` finds nothing to say, and they keep the promises the
daemons rely on (notify, watchdog, restart, ordering) without hardening that would cut the agent off
from sanlock, libvirt or the lease storage."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
NAMES = ["vmha-agent.service", "vmha-manager.service"]


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing: scripts/setup.sh installs the systemd package")  # fmt: skip
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # The packaged units run /usr/bin/vmha; verify checks the command exists, so point it at ours.
    vmha = Path(sys.executable).with_name("vmha")
    copies = []
    for name in NAMES:
        copy = tmp_path / name
        copy.write_text((UNITS / name).read_text().replace("ExecStart=/usr/bin/vmha", f"ExecStart={vmha}"))
        copies.append(copy)
    r = verify(copies)
    # verify exits 0 on many mistakes (an unknown Type= is "ignored"): anything it prints is a finding.
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.parametrize("name", NAMES)
def test_units_notify_watchdog_restart(name: str) -> None:
    s = unit(name)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] and s["Restart"] == "on-failure"
    assert s["ExecStart"].split()[:2] == ["/usr/bin/vmha", name.removeprefix("vmha-").removesuffix(".service")]


def test_agent_ordered_after_sanlock_wdmd_libvirtd() -> None:
    u = unit("vmha-agent.service")["Unit"]
    for dep in ("sanlock.service", "wdmd.service", "libvirtd.service"):
        assert dep in u["After"].split() and dep in u["Wants"].split()


@pytest.mark.parametrize("name", NAMES)
def test_hardening_keeps_sanlock_libvirt_and_storage(name: str) -> None:
    s = unit(name)["Service"]
    # root: sanlock's and libvirt's sockets, signals to lease holders
    assert "User" not in s and "DynamicUser" not in s
    # lease files on shared storage at any path, block devices included
    assert s.get("ProtectSystem") in ("full", "yes") and "PrivateDevices" not in s
    assert "PrivateNetwork" not in s and "AF_UNIX" in s["RestrictAddressFamilies"].split()
    assert s.get("NoNewPrivileges") == "yes"
