"""IpmiSim: a real IPMI BMC (OpenIPMI's ipmi_sim) on 127.0.0.1 whose chassis power is a real process.

    with IpmiSim(tmp_path / "bmc") as bmc:
        bmc.host_pid        # the "host": a process the BMC started at power-on and kills at power-off
        bmc.power_options() # what an operator writes in [power.HOST] for fence_ipmilan

ipmi_sim serves IPMI 1.5 and 2.0 (RMCP+) over UDP. Chassis power control acts on its startcmd only
through the VM serial interface (channel 15): with nothing connected there, a power-off sends SIGTERM
to the startcmd at once (SIGKILL after kill_wait), and "Chassis Power" reads off only once ipmi_sim
has reaped it (OpenIPMI lanserv/bmc_chassis.c, emu.c). So an OFF status means the process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from vmha.procstat import proc_stat
from vmha.testing.etcd import free_ports
from vmha.testing.process import stop_process

IPMI_SIM = "/usr/bin/ipmi_sim"
KILL_WAIT = 2  # s between the BMC's SIGTERM and SIGKILL to the host process


class IpmiSimError(RuntimeError):
    """ipmi_sim did not come up; the message carries the tail of its output."""


def free_udp_port(address: str = "127.0.0.1") -> int:
    """A UDP port free on ``address`` now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


def udp_bound(address: str, port: int) -> bool:
    """Whether some socket is bound to ``address``:``port`` (UDP, IPv4)."""
    # The kernel prints the address as a native-order u32 of its network-order bytes.
    want = f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == want for line in list(f)[1:])


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a reused PID apart), or None if it is gone.
    A zombie counts as gone: it runs no more code."""
    try:
        state, start = proc_stat(pid)
    except FileNotFoundError:
        return None
    return None if state == "Z" else start


class IpmiSim:
    def __init__(self, base: Path | None = None, username: str = "vmha", password: str = "fence-me",
                 address: str = "127.0.0.1", ready_timeout: float = 10.0) -> None:
        # A directory of its own (config, state, output), removed by stop().
        self.base = Path(tempfile.mkdtemp(prefix="vmha-ipmi-")) if base is None else base
        self.username = username
        self.password = password
        self.address = address
        self.port = free_udp_port(address)
        self.ready_timeout = ready_timeout
        self.pid_file = self.base / "host.pid"
        self.log_path = self.base / "ipmi_sim.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_pid = 0
        self.host_start: int | None = None

    def lan_conf(self) -> str:
        # Nothing ever connects to the VM serial port: it is there because chassis control needs it.
        # poweroff_wait must not be 0, which disables the kill altogether (ipmi_lan(5)).
        (serial_port,) = free_ports(1, self.address)
        host = f"/bin/sh -c 'echo $$ > {self.pid_file}; exec sleep 3600'"
        return f"""name "vmha-bmc"
set_working_mc 0x20
  startlan 1
    addr {self.address} {self.port}
    priv_limit admin
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
  endlan
  serial 15 {self.address} {serial_port} codec VM
  startcmd "{host}"
  startnow true
  poweroff_wait 1
  kill_wait {KILL_WAIT}
  user 2 true "{self.username}" "{self.password}" admin 4 md5
"""

    def start(self) -> IpmiSim:
        if self.proc is not None:
            raise RuntimeError(f"ipmi_sim already started (pid {self.proc.pid})")
        state = self.base / "state"
        state.mkdir(parents=True, exist_ok=True)
        (self.base / "lan.conf").write_text(self.lan_conf())
        # One BMC (MC 0x20) with chassis support (0x9f), as OpenIPMI's ipmisim1.emu declares it.
        (self.base / "bmc.emu").write_text(
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n")
        with open(self.log_path, "ab") as log:
            # A session of its own: stop() kills the group, so the host process goes with its BMC.
            self.proc = subprocess.Popen(
                [IPMI_SIM, "-n", "-c", str(self.base / "lan.conf"), "-f", str(self.base / "bmc.emu"),
                 "-s", str(state)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise IpmiSimError(f"ipmi_sim exited with {self.proc.returncode}:\n{self.log_tail()}")
            pid = self.pid_file.read_text().strip() if self.pid_file.exists() else ""
            if pid.isdigit() and udp_bound(self.address, self.port):
                self.host_pid = int(pid)
                self.host_start = start_time(self.host_pid)
                if self.host_start is not None:
                    return self
            time.sleep(0.05)
        raise IpmiSimError(f"ipmi_sim not serving {self.address}:{self.port} with its host process up after "
                           f"{self.ready_timeout} s:\n{self.log_tail()}")

    def host_alive(self) -> bool:
        """The host process started at power-on still exists (same PID and start time, not a zombie)."""
        return self.host_start is not None and start_time(self.host_pid) == self.host_start

    def power_options(self) -> dict[str, str | int | bool]:
        """The [power.HOST] table for fence_ipmilan. IPMI 2.0 (lanplus) with cipher suite 3: ipmi_sim
        does not answer ipmitool's cipher-suite discovery, which costs 10 s per call without it."""
        return {"agent": "fence_ipmilan", "ip": self.address, "ipport": self.port, "username": self.username,
                "password": self.password, "lanplus": True, "cipher": 3}

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM ipmi_sim by PID (SIGKILL after ``timeout``), SIGKILL what is left of its process group
        (ipmi_sim leaves its startcmd running when it exits), then remove the directory."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> IpmiSim:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = ["IPMI_SIM", "IpmiSim", "IpmiSimError", "free_udp_port", "start_time", "udp_bound"]
