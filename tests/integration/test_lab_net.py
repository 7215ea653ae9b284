"""The lab's networks and shared storage on real namespaces (prefix vt4): each plane reaches the
controller only through its own bridge, a link or bridge fault cuts exactly that plane, the storage
mount follows the storage plane, power-off leaves no process, and `lab down` removes everything even
without the lab's state file (a crashed run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha.core.planes import PLANES, Plane
from vmha.lab import cluster, controller
from vmha.lab.hosts import boot_host, power_off
from vmha.lab.net import LabNet, Node, run
from vmha.lab.state import LabState, NodeState
from vmha.lab.storage import MOUNT_POINT, SharedStorage
from vmha.testing.wait import until_sync

pytestmark = pytest.mark.integration

ACCEPT = "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 7777)); s.listen(); s.settimeout(20); " \
         "[s.accept()[0].close() for _ in range(int(sys.argv[2]))]"


def reaches(src: Node, addr: str) -> bool:
    cp = run([*src.enter(), sys.executable, "-c",
              f"import socket; socket.create_connection(('{addr}', 7777), timeout=1).close()"], check=False)
    return cp.returncode == 0


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[LabNet, Node, Node, Node]]:
    n = LabNet("vt4", tmp_path / "logs")
    try:
        ctl = n.controller()
        n.add_node(ctl)
        ctl = n.start_anchor(ctl)
        hosts = []
        for i in (1, 2):
            h = n.host(i)
            n.add_node(h)
            hosts.append(n.start_anchor(h))
        yield n, ctl, hosts[0], hosts[1]
    finally:
        n.destroy()


def test_a_link_fault_cuts_exactly_that_plane(net: tuple[LabNet, Node, Node, Node]) -> None:
    n, ctl, h1, h2 = net
    servers = [subprocess.Popen([*ctl.enter(), sys.executable, "-c", ACCEPT, ctl.address(p), "50"]) for p in PLANES]
    try:
        # The servers listening (each accepts 50: the polls before they all listen use some up).
        until_sync(lambda: all(reaches(h1, ctl.address(p)) for p in PLANES), "h1 reaching every plane", timeout=20)
        n.set_link(h1, Plane.STORAGE, up=False)
        assert not n.link_up(h1, Plane.STORAGE)
        assert [reaches(h1, ctl.address(p)) for p in PLANES] == [True, False, True]
        assert reaches(h2, ctl.address(Plane.STORAGE))  # the other host keeps the plane
        n.set_link(h1, Plane.STORAGE, up=True)
        n.set_bridge(Plane.SERVICE, up=False)
        assert not n.bridge_up(Plane.SERVICE)
        assert not reaches(h1, ctl.address(Plane.SERVICE))
        assert not reaches(h2, ctl.address(Plane.SERVICE))
        assert reaches(h1, ctl.address(Plane.STORAGE))
        n.set_bridge(Plane.SERVICE, up=True)
        assert reaches(h2, ctl.address(Plane.SERVICE))
    finally:
        for s in servers:
            s.kill()
            s.wait()


def test_each_anchor_has_its_own_run_dirs(net: tuple[LabNet, Node, Node, Node]) -> None:
    _, _, h1, h2 = net
    run([*h1.enter(), "touch", "/run/sanlock/only-h1"])
    assert run([*h1.enter(), "ls", "/run/sanlock"]).stdout.split() == ["only-h1"]
    assert run([*h2.enter(), "ls", "/run/sanlock"]).stdout.split() == []
    assert not Path("/run/sanlock/only-h1").exists()


def test_storage_follows_the_storage_plane(net: tuple[LabNet, Node, Node, Node], tmp_path: Path) -> None:
    n, ctl, h1, _ = net
    st = SharedStorage(tmp_path / "export", tmp_path / "state", tmp_path / "logs")
    st.start_server(ctl)
    sshfs = st.mount(h1, ctl.address(Plane.STORAGE))
    write = ["dd", "if=/dev/zero", f"of={MOUNT_POINT}/f", "bs=4096", "count=1", "oflag=direct,append",
             "conv=notrunc"]
    run([*h1.enter(), *write])
    assert (tmp_path / "export" / "f").stat().st_size == 4096
    n.set_link(h1, Plane.STORAGE, up=False)
    t = time.monotonic()
    assert run([*h1.enter(), *write], check=False, timeout=30).returncode != 0
    print(f"write failed {time.monotonic() - t:.1f} s after the cut (ServerAliveInterval=1, CountMax=3)")
    n.set_link(h1, Plane.STORAGE, up=True)
    until_sync(lambda: run([*h1.enter(), *write], check=False, timeout=30).returncode == 0,
               "a write through the reconnected mount", timeout=60, interval=0.5)  # fmt: skip
    st.unmount(h1, sshfs)
    assert not st.is_mounted(h1)


def test_power_off_and_down_without_state_file(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path / "lab", prefix="vt4", io_timeout=1, created=time.time())
    state.hosts = {"h1": NodeState("h1", 11)}
    state.save()
    try:
        controller.boot_network(state)
        controller.start_services(state)
        boot_host(state, state.hosts["h1"])
        node = state.node("h1")
        assert len(node.pids()) >= 4  # anchor, sshfs (+ssh), sanlock, agent
        killed = power_off(state, "h1")
        assert killed and not node.pids()
        assert state.hosts["h1"].power == "off"
        (state.dir / "lab.json").unlink()  # a crashed run: only the names are left
    finally:
        removed = cluster.down(state.dir, prefix="vt4")
    assert "vt4-ctl" in removed
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith("vt4-")]
