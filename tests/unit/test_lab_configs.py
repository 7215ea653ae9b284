"""The lab's generated manager config follows the lab's power-fence and rebalancing settings, which
lab.json keeps;
the RTO bench builds its lab under its own prefix and directory, never the demo's."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vmha import config
from vmha.bench.rto import rto
from vmha.lab import controller, libvirtd, novalab
from vmha.lab.cli import up
from vmha.lab.configs import MANAGER_METRICS_PORTS, REBALANCE_COOLDOWN, agent_config, api_url, manager_config
from vmha.lab.guestxml import domain_xml
from vmha.lab.net import HOST_INDEX_BASE
from vmha.lab.state import LabState, NodeState
from vmha.locks.disk_leases import LOCKSPACE as DISK_LOCKSPACE
from vmha.locks.disk_leases import disk_lease_name
from vmha.locks.space import LockSpace


def _power_fence(state: LabState) -> bool:
    return config.load(manager_config(state, "m1")).require_manager().power_fence


def test_power_fence_setting_reaches_the_managers_and_survives_reload(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    assert _power_fence(state)  # the lab's default: its power fence
    state.power_fence = False
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded.power_fence is False
    assert not _power_fence(loaded)


def test_a_lab_recorded_before_the_setting_keeps_its_power_fence(tmp_path: Path) -> None:
    LabState(dir=tmp_path, created=time.time()).save()
    raw = (tmp_path / "lab.json").read_text().replace('"power_fence": true,', "")
    assert "power_fence" not in raw
    (tmp_path / "lab.json").write_text(raw)
    assert LabState.load(tmp_path).power_fence is True


def test_rebalance_setting_reaches_the_managers_and_survives_reload(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    assert not config.load(manager_config(state, "m1")).require_manager().rebalance  # off by default
    state.rebalance = True
    state.save()
    loaded = LabState.load(tmp_path)
    assert loaded.rebalance is True
    settings = config.load(manager_config(loaded, "m1")).require_manager().recovery_settings()
    assert (settings.rebalance, settings.rebalance_cooldown) == (True, REBALANCE_COOLDOWN)


def test_bench_lab_never_shares_the_demo_labs_prefix_or_directory() -> None:
    def defaults(cmd: object) -> dict[str, object]:
        return {p.name: p.default for p in cmd.params}  # type: ignore[attr-defined]

    lab, bench = defaults(up), defaults(rto)
    assert bench["prefix"] != lab["prefix"]
    assert bench["lab_dir"] != lab["lab_dir"]


def test_nova_lab_with_qemu_guests_proves_with_the_disk_lease_libvirt_takes(tmp_path: Path) -> None:
    """The managers (VM = server id) name the same lease libvirt takes for the disk the lab's virt driver
    gives the server (Nova's layout), and the guest's domain carries no <lease> of its own."""
    state = LabState(dir=tmp_path, created=time.time(), nova=True, guests="qemu")
    state.hosts["h1"] = NodeState("h1", HOST_INDEX_BASE + 1)
    mgr = config.load(manager_config(state, "m1"))
    agent = config.load(agent_config(state, "h1"))
    assert mgr.nova is not None and mgr.nova.vm_names == "id"
    assert agent.locks == mgr.locks and agent.libvirt is not None
    virt = json.loads(novalab.virt_config(state, "h1").read_text())
    server = "5f0c9c3e-3d2a-4c1e-9a43-0f6a2b7d1e11"
    disk = Path(virt["instances"]) / server / "disk"  # where vmha.lab.nova.virt puts the server's disk
    space = LockSpace.from_config(mgr.require_locks())
    assert space.name == DISK_LOCKSPACE == state.lockspace
    assert space.resource(server) == disk_lease_name(str(disk))
    assert "<lease" not in domain_xml("vm1", disk, virt["interval"])
    assert (libvirtd.sanlock_conf((mgr.require_locks().path, libvirtd.host_id("h1"), state.io_timeout))
            .count("auto_disk_leases = 1") == 1)


def test_every_lab_daemon_serves_metrics_on_its_own_management_address(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    state.hosts = {h: NodeState(h, i) for i, h in enumerate(["h1", "h2"], start=2)}
    assert sorted(MANAGER_METRICS_PORTS) == sorted(controller.MANAGERS)
    listen = [config.load(manager_config(state, m)).metrics for m in controller.MANAGERS]
    listen += [config.load(agent_config(state, h)).metrics for h in state.hosts]
    addresses = [m.address() for m in listen if m is not None]
    assert len(set(addresses)) == len(addresses) == 4
    assert all(ip.startswith("198.18.") for ip, _ in addresses)


def test_the_lab_managers_alerts_link_to_their_own_api(tmp_path: Path) -> None:
    state = LabState(dir=tmp_path, created=time.time())
    state.hosts = {h: NodeState(h, i) for i, h in enumerate(["h1", "h2"], start=2)}
    apis = [config.load(manager_config(state, m, i)).api for i, m in enumerate(controller.MANAGERS)]
    assert [a.public_url for a in apis if a is not None] == [api_url(state, i) for i in range(len(apis))]
