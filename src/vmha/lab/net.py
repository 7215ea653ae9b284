"""The lab's networks: a fabric namespace with one bridge per plane, a controller and N hosts.

Layout (prefix "vl" for the lab, another prefix for test-only labs):
  <prefix>-fabric   bridges br-management, br-storage, br-service (attached to no real interface)
  <prefix>-ctl      controller: 198.18.<plane>.1 on each plane
  <prefix>-<host>   host i: 198.18.<plane>.(10+i); its NICs are named after the planes

The bridges live in a namespace of their own because the root namespace has
bridge-nf-call-iptables=1, and deleting that namespace removes every bridge and veth end at once.

Every node (controller or host) has an anchor: a long-lived process in the node's netns owning a
private mount namespace with tmpfs on /run/sanlock and /run/vmha. Everything of that node runs via
`nsenter -t ANCHOR -m -n` (see `Node.enter`), so several sanlock daemons and sshfs mounts coexist on
one machine and all die with the node's processes (a power-off).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmha.core.planes import PLANES, Plane
from vmha.procstat import proc_stat

# Third octet of each plane's /24 inside 198.18.0.0/15 (reserved for benchmarks: never routed).
PLANE_OCTET: dict[Plane, int] = {Plane.MANAGEMENT: 1, Plane.STORAGE: 2, Plane.SERVICE: 3}
CONTROLLER_INDEX = 1
HOST_INDEX_BASE = 10
RUN_DIRS: tuple[str, ...] = ("/run/sanlock", "/run/vmha")


class LabError(Exception):
    """A lab operation failed; the message says what and how to fix it."""


def plane_address(plane: Plane, index: int) -> str:
    return f"198.18.{PLANE_OCTET[plane]}.{index}"


# Variables that point a process at one sanlock daemon or one holder-record directory. A lab host's
# processes use those of the host's own mount namespace, never the caller's (a manager, or a test
# process that talks to a daemon of its own, runs with them set).
_CALLER_ONLY = ("SANLOCK_RUN_DIR", "VMHA_RUN_DIR")


def host_env(base: Mapping[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    """The environment for a lab process: `base` (default: the caller's), without _CALLER_ONLY, plus `extra`."""
    env = os.environ if base is None else base
    return {**{k: v for k, v in env.items() if k not in _CALLER_ONLY}, **extra}


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Sockets opened in the block belong to network namespace `netns` (None: no change). A lab
    command runs in the root namespace; the lab's services listen only on lab addresses, reachable
    from the controller's namespace. setns(2) on a network namespace moves the calling thread only:
    other threads are not affected, and the thread is moved back at the end."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{netns}", "rb") as there:
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise LabError(f"setns into {netns}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                raise LabError(f"setns back from {netns}: {os.strerror(ctypes.get_errno())}")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Runs a short command, raising LabError with its stderr when it fails."""
    try:
        cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                            env=host_env())  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: no answer within {timeout:.0f} s") from None
    if check and cp.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): look at its state.
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def kill_pids(pids: Sequence[int], *, grace: float | None = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds for whatever still runs; waits until all are gone.
    grace None: SIGKILL at once (a power loss: nobody gets to clean up)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if grace is None and sig == signal.SIGTERM:
            continue
        live = [p for p in pids if pid_alive(p)]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + ((grace or 0.0) if sig == signal.SIGTERM else 5.0)
        while live and time.monotonic() < deadline:
            _reap(live)
            live = [p for p in live if pid_alive(p)]
            if live:
                time.sleep(0.05)
        if not live:
            return
    raise LabError(f"processes {live} survived SIGKILL")


def _reap(pids: Sequence[int]) -> None:
    """Collects those of `pids` that are exited children of ours, so they do not linger as zombies."""
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, os.WNOHANG)


def _admin_up(cmd: Sequence[str]) -> bool:
    """Whether `ip -o link show` reports the interface administratively up (flag UP in <...>)."""
    cp = run(cmd, check=False)
    m = re.search(r"<([^>]*)>", cp.stdout)
    return cp.returncode == 0 and m is not None and "UP" in m.group(1).split(",")


@dataclass(frozen=True, slots=True)
class Node:
    """A controller or host: its netns, index (address suffix) and anchor pid (0: not running)."""

    name: str
    netns: str
    index: int
    anchor: int = 0

    def address(self, plane: Plane) -> str:
        return plane_address(plane, self.index)

    def enter(self) -> list[str]:
        """Command prefix running a program inside this node's network and mount namespaces."""
        if not self.anchor:
            raise LabError(f"{self.name}: no anchor process (is the host powered off? `vmha lab fault "
                           f"{self.name} power-on`)")
        return ["nsenter", "-t", str(self.anchor), "-m", "-n", "--"]

    def pids(self) -> list[int]:
        """Every process in the node's netns (its anchor, daemons and VMs)."""
        cp = run(["ip", "netns", "pids", self.netns], check=False)
        return sorted(int(x) for x in cp.stdout.split() if x.strip().isdigit())


def spawn(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Starts a long-lived lab process in a session of its own (a Ctrl-C of the lab command does not
    reach it), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=host_env() if env is None else env)


class LabNet:
    """Creates and removes the lab's namespaces, links and anchors. Every method is idempotent."""

    def __init__(self, prefix: str = "vl", log_dir: Path | None = None) -> None:
        if not prefix or len(prefix) > 6:
            raise LabError(f"netns prefix {prefix!r}: 1 to 6 characters")
        self.prefix = prefix
        self.fabric = f"{prefix}-fabric"
        self.log_dir = log_dir

    # names -------------------------------------------------------------------------------------
    def node(self, name: str, index: int, anchor: int = 0) -> Node:
        netns = f"{self.prefix}-ctl" if index == CONTROLLER_INDEX else f"{self.prefix}-{name}"
        return Node(name=name, netns=netns, index=index, anchor=anchor)

    def controller(self, anchor: int = 0) -> Node:
        return self.node("controller", CONTROLLER_INDEX, anchor)

    def host(self, i: int, anchor: int = 0) -> Node:
        """Host number i (1-based), named h<i>."""
        if not 1 <= i <= 200:
            raise LabError(f"host number {i}: 1 to 200")
        return self.node(f"h{i}", HOST_INDEX_BASE + i, anchor)

    @staticmethod
    def bridge(plane: Plane) -> str:
        return f"br-{plane.value}"

    @staticmethod
    def fabric_port(node: Node, plane: Plane) -> str:
        # Interface names are at most 15 characters; these live only inside the fabric namespace.
        short = "ctl" if node.index == CONTROLLER_INDEX else node.name
        return f"{short}-{plane.value[:4]}"

    def existing_netns(self) -> list[str]:
        cp = run(["ip", "netns", "list"])
        names = [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]
        return sorted(n for n in names if n.startswith(f"{self.prefix}-"))

    # building ----------------------------------------------------------------------------------
    def _add_netns(self, name: str) -> None:
        if name not in self.existing_netns():
            run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def create_fabric(self) -> None:
        self._add_netns(self.fabric)
        for plane in PLANES:
            br = self.bridge(plane)
            if run(["ip", "-n", self.fabric, "link", "show", br], check=False).returncode != 0:
                # No STP and no forward delay: a port forwards as soon as its link is up.
                run(["ip", "-n", self.fabric, "link", "add", br, "type", "bridge",
                     "stp_state", "0", "forward_delay", "0"])
            run(["ip", "-n", self.fabric, "link", "set", br, "up"])

    def add_node(self, node: Node) -> None:
        """The node's netns with one veth per plane into the fabric bridges, addressed and up."""
        self.create_fabric()
        self._add_netns(node.netns)
        for plane in PLANES:
            port = self.fabric_port(node, plane)
            if run(["ip", "-n", self.fabric, "link", "show", port], check=False).returncode != 0:
                run(["ip", "-n", node.netns, "link", "del", plane.value], check=False)
                run(["ip", "-n", self.fabric, "link", "add", port, "type", "veth",
                     "peer", "name", plane.value, "netns", node.netns])
            run(["ip", "-n", self.fabric, "link", "set", port, "master", self.bridge(plane), "up"])
            run(["ip", "-n", node.netns, "addr", "replace", f"{node.address(plane)}/24", "dev", plane.value])
            run(["ip", "-n", node.netns, "link", "set", plane.value, "up"])

    def start_anchor(self, node: Node) -> Node:
        """Starts the node's anchor (unless its recorded one still runs); returns the node with its pid."""
        if node.anchor and pid_alive(node.anchor) and self._in_netns(node.anchor, node.netns):
            return node
        for d in RUN_DIRS:
            Path(d).mkdir(parents=True, exist_ok=True)  # mount points; the tmpfs hides their content
        mounts = " && ".join(f"mount -t tmpfs -o mode=0755 vmha-lab {d}" for d in RUN_DIRS)
        # ip netns exec and unshare both exec in place and sh execs sleep: Popen's pid is the anchor.
        cmd = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", "slave", "--",
               "sh", "-c", f"{mounts} && exec sleep infinity"]
        log = self.log_dir / f"anchor-{node.name}.log" if self.log_dir else Path(os.devnull)
        proc = spawn(cmd, log)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{node.name}: anchor exited with {proc.returncode} (log: {self.log_dir})")
            if self._anchor_ready(proc.pid):
                return Node(node.name, node.netns, node.index, proc.pid)
            time.sleep(0.02)
        raise LabError(f"{node.name}: anchor did not mount its tmpfs within 10 s")

    @staticmethod
    def _anchor_ready(pid: int) -> bool:
        try:
            mounts = Path(f"/proc/{pid}/mounts").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return False
        points = {line.split()[1] for line in mounts.splitlines()}
        return comm == "sleep" and all(d in points for d in RUN_DIRS)

    @staticmethod
    def _in_netns(pid: int, netns: str) -> bool:
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
        except OSError:
            return False

    # faults ------------------------------------------------------------------------------------
    def set_link(self, node: Node, plane: Plane, up: bool) -> None:
        """The node's NIC on that plane up or down (the bridge side follows: carrier lost)."""
        run(["ip", "-n", node.netns, "link", "set", plane.value, "up" if up else "down"])

    def set_bridge(self, plane: Plane, up: bool) -> None:
        """A whole plane's switch up or down: a fabric outage."""
        run(["ip", "-n", self.fabric, "link", "set", self.bridge(plane), "up" if up else "down"])

    def link_up(self, node: Node, plane: Plane) -> bool:
        return _admin_up(["ip", "-n", node.netns, "-o", "link", "show", plane.value])

    def bridge_up(self, plane: Plane) -> bool:
        return _admin_up(["ip", "-n", self.fabric, "-o", "link", "show", self.bridge(plane)])

    # teardown ----------------------------------------------------------------------------------
    def kill_node(self, node: Node, *, grace: float | None = None) -> list[int]:
        """Kills every process in the node's netns (anchor included); returns their pids. grace None:
        SIGKILL at once, as a power loss; otherwise SIGTERM first and SIGKILL after `grace` seconds."""
        killed: list[int] = []
        # Repeat: a process may fork while we kill (an agent starting a child, a shell).
        for _ in range(5):
            pids = [p for p in node.pids() if p != os.getpid()]
            if not pids:
                break
            kill_pids(pids, grace=grace)
            killed.extend(pids)
        if node.pids():
            raise LabError(f"{node.name}: processes {node.pids()} still run in {node.netns}")
        return sorted(set(killed))

    def destroy(self) -> None:
        """Kills every process in every <prefix>- namespace, then deletes the namespaces."""
        names = self.existing_netns()
        for ns in names:
            self.kill_node(Node(ns, ns, 0), grace=2.0)
        for ns in names:
            run(["ip", "netns", "del", ns], check=False)
        left = self.existing_netns()
        if left:
            raise LabError(f"namespaces left after removal: {', '.join(left)}")
