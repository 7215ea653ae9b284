"""LAB / TEST ONLY: the rig's virt driver, a Nova FakeDriver that keeps its node identity and, in the
lab, runs the lab VMs.

Nova's stock FakeDriver invents a new node UUID in every process, so a restarted fake compute
refuses to start (its compute node record no longer matches). FakeDriverWithoutFakeNodes reads and
writes the UUID in `state_path/compute_id`, as real drivers do. Nova loads drivers only from the
nova.virt package: vmha.lab.nova.compute registers this module as nova.virt.vmha_lab before starting.

In the lab (`vmha lab up --nova`) each host's nova-compute runs inside the host's namespaces with
VMHA_LAB_VIRT naming a JSON file ({"host", "vm_binary", "disks", "config", "logs"}); then a server
is a lab VM process, `vmha-vm <server name> --host H --disk ... --config ...` (the same arguments as
the plain lab, so disks, leases and verify are the same):
- spawn (boot, and an evacuation's rebuild on the destination) starts it and returns once it holds
  the VM's sanlock lease (its disk open); a copy that cannot take the lease (held elsewhere, or the
  host not in the lockspace) exits, and spawn fails: the instance goes to ERROR, never two writers;
- destroy stops the host's copy (SIGTERM, wait until gone: the lease is released); nothing to stop
  is fine (a restarted compute destroys the copies evacuated while it was off);
- get_info reports a running instance whose copy ended behind Nova's back (killed, crashed, ended
  by sanlock) as SHUTDOWN, as a hypervisor would: nova-compute's power-state sync then calls the
  stop API itself, with no user (the "ended by itself" the nova driver's desired state restarts);
- live migration is the lab's handover: the destination copy starts with --incoming and waits for
  the lease, the source copy is told (SIGUSR1) to stop writing and release, the destination takes
  the lease and continues the disk.
With QEMU guests (`lab up --nova --guests qemu`, {"guests": "qemu", "instances", "interval", "libvirt"} in
the same file) a server is a QEMU guest of the host's libvirtd (vmha.lab.libvirtd), defined as Nova's
libvirt driver defines one: its disk in Nova's layout, <instances>/<uuid>/disk on the shared storage,
and no <lease> element, so libvirt's automatic disk lease (named after that path) is what QEMU holds;
the domain is named after the server (QEMU's `-name guest=<name>`, as the lab's `ps` contract wants) and
runs the lab guest (vmha.lab.guestxml), writing the same disk records. disks/<name>.disk links to the
server's disk, so the lab's tools read it where they read every lab VM's disk. spawn is `virsh create`
(libvirt takes the lease before the CPUs run; a lease held elsewhere fails it, the instance goes to
ERROR), destroy is `virsh destroy`, a live migration libvirt's own (peer to peer, shared storage).
Like a hypervisor's defined domains, the instances a compute knows survive its restart (a file in
state_path), so Nova can destroy evacuated ones when the host comes back. Without VMHA_LAB_VIRT
(the rig of the driver tests) it is the plain fake driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nova import exception  # type: ignore[import-not-found, unused-ignore]
from nova.compute import power_state  # type: ignore[import-not-found, unused-ignore]
from nova.conf import CONF  # type: ignore[import-not-found, unused-ignore]
from nova.virt import fake, hardware  # type: ignore[import-not-found, unused-ignore]
from oslo_log import log as logging  # type: ignore[import-not-found, unused-ignore]

from vmha.lab.guestxml import DISK_SIZE, domain_xml
from vmha.lab.procs import EXIT_LEASE_REFUSED, VmProcess, copies_here

LOG = logging.getLogger(__name__)

CONFIG_ENV = "VMHA_LAB_VIRT"
START_TIMEOUT = 30.0  # a copy takes its lease (sanlock acquire: about 1 s at io_timeout 1) within this
STOP_TIMEOUT = 20.0  # a copy told to stop releases its lease and exits within this (then SIGKILL)
HANDOVER_TIMEOUT = 30.0  # live migration: the destination copy waits this long for the lease
INCOMING_DIR = Path("/run/vmha")  # the host's tmpfs, where an incoming copy marks that it waits


class LabFakeDriver(fake.FakeDriverWithoutFakeNodes):  # type: ignore[misc, unused-ignore]
    """One node per nova-compute, named after its host, with a UUID that survives restarts; in the
    lab, every instance is a running `vmha-vm` process on the host."""

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi, read_only)
        path = os.environ.get(CONFIG_ENV)
        self.lab: dict[str, Any] | None = json.loads(Path(path).read_text()) if path else None
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # vm -> the copy this process started
        self.qemu = self.lab is not None and self.lab.get("guests") == "qemu"

    # --- the instances this "hypervisor" knows, across restarts ------------------------------------

    @property
    def _known_file(self) -> Path:
        return Path(CONF.state_path) / "lab-instances.json"

    def _track(self, instance: Any) -> None:
        """Remembers (in state_path) the instances this host has, with their lab VM names."""
        if self.lab is None:
            return
        known = self._known()
        if instance.uuid in self.instances:
            known[instance.uuid] = {"name": instance.name, "vm": instance.display_name}
        else:
            known.pop(instance.uuid, None)
        tmp = self._known_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, self._known_file)

    def _known(self) -> dict[str, dict[str, str]]:
        try:
            known: dict[str, dict[str, str]] = json.loads(self._known_file.read_text())
        except FileNotFoundError:
            return {}
        return known

    def init_host(self, host: str) -> None:
        super().init_host(host)
        if self.lab is None:
            return
        for uuid, rec in self._known().items():
            running = any(p.active for p in copies_here(rec["vm"], self.lab["host"]))
            state = power_state.RUNNING if running else power_state.SHUTDOWN
            self.instances[uuid] = fake.FakeInstance(rec["name"], state, uuid)

    # --- the lab VM processes --------------------------------------------------------------------

    def _reap(self) -> None:
        for vm, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[vm]

    def _copies(self, vm: str) -> list[VmProcess]:
        assert self.lab is not None
        self._reap()
        return copies_here(vm, self.lab["host"])

    def _start(self, vm: str, incoming: float) -> subprocess.Popen[bytes]:
        assert self.lab is not None
        lab = self.lab
        cmd = [lab["vm_binary"], vm, "--host", lab["host"], "--disk", f"{lab['disks']}/{vm}.disk",
               "--config", lab["config"]]  # fmt: skip
        if incoming:
            cmd += ["--incoming", str(incoming)]
        LOG.info("lab: vm=%s host=%s starting %s", vm, lab["host"], "incoming copy" if incoming else "copy")
        with open(Path(lab["logs"]) / f"vm-{vm}.log", "ab") as out:
            # A session of its own: the copy outlives a restart of this nova-compute, as a guest does.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self._children[vm] = proc
        return proc

    def _wait(self, vm: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float,
              what: str) -> None:
        """Until `ready()`; fails (stopping the copy) when the copy exits or the time is up."""
        deadline = time.monotonic() + timeout
        while not ready():
            code = proc.poll()
            if code is not None:
                why = (
                    "its sanlock lease cannot be taken here (held elsewhere, or this host is not in the lockspace)"
                    if code == EXIT_LEASE_REFUSED
                    else f"exit status {code}"
                )
                raise exception.NovaException(f"lab VM {vm} on {self._host}: {what} failed: {why}")
            if time.monotonic() > deadline:
                proc.terminate()
                raise exception.NovaException(f"lab VM {vm} on {self._host}: {what}: not done in {timeout:.0f} s")
            time.sleep(0.05)

    def _holds_lease(self, vm: str, pid: int) -> bool:
        # vmha-vm opens its disk only once it holds the lease.
        return any(p.pid == pid and p.active for p in self._copies(vm))

    def _run_copy(self, instance: Any) -> None:
        vm = instance.display_name
        running = [p for p in self._copies(vm) if p.active]
        if running:
            LOG.info("lab: vm=%s already runs on host=%s (pid %s)", vm, self._host, running[0].pid)
            return
        if self.qemu:
            self._start_guest(instance)
            return
        proc = self._start(vm, incoming=0.0)
        try:
            self._wait(vm, proc, lambda: self._holds_lease(vm, proc.pid), START_TIMEOUT, "start")
        except exception.NovaException as e:
            raise exception.BuildAbortException(instance_uuid=instance.uuid, reason=str(e)) from None
        LOG.info("lab: vm=%s host=%s running (pid %s, lease held)", vm, self._host, proc.pid)

    def _virsh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        # This process runs in the host's namespaces: qemu:///system is the host's libvirtd.
        return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def _start_guest(self, instance: Any) -> None:
        """The server's QEMU guest, defined as Nova's libvirt driver defines it (no <lease>: libvirt's disk
        lease), started once libvirt holds that lease."""
        assert self.lab is not None
        vm = instance.display_name
        base = Path(self.lab["instances"]) / instance.uuid
        disk = base / "disk"
        base.mkdir(parents=True, exist_ok=True)
        if not disk.exists():  # an evacuation's rebuild finds it: the records go on
            with disk.open("wb") as f:
                f.truncate(DISK_SIZE)
        link = Path(self.lab["disks"]) / f"{vm}.disk"
        # Relative: the same on the controller's export. Made at the boot; an evacuation keeps the uuid
        # and finds it (the lab's sshfs answers readlink with EPERM: only whether it exists is asked).
        if not os.path.lexists(link):
            link.symlink_to(os.path.relpath(disk, link.parent))
        xml = base / "libvirt.xml"  # where Nova's libvirt driver keeps it
        xml.write_text(domain_xml(vm, disk, float(self.lab["interval"])))
        t0 = time.monotonic()
        cp = self._virsh("create", str(xml))
        if cp.returncode != 0:
            why = cp.stderr.strip() or f"virsh exit status {cp.returncode}"
            raise exception.BuildAbortException(instance_uuid=instance.uuid,
                                                reason=f"lab guest {vm} on {self._host}: {why}")
        LOG.info("lab: vm=%s host=%s guest started in %.1f s (libvirt holds its disk lease %s)", vm, self._host,
                 time.monotonic() - t0, disk)

    def _stop_copies(self, vm: str, sig: signal.Signals, why: str) -> None:
        """Signals the host's copies of `vm`, waits until they are gone (SIGKILL after STOP_TIMEOUT)."""
        copies = self._copies(vm)
        if not copies:
            LOG.info("lab: vm=%s host=%s %s: no copy runs here (nothing to stop)", vm, self._host, why)
            return
        if self.qemu:  # libvirt ends QEMU and so releases the disk lease
            cp = self._virsh("destroy", vm)
            if cp.returncode != 0:
                LOG.warning("lab: vm=%s host=%s %s: virsh destroy: %s", vm, self._host, why, cp.stderr.strip())
        else:
            for p in copies:
                self._signal(p.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._copies(vm):
            if time.monotonic() > deadline:
                LOG.warning("lab: vm=%s host=%s %s: copy did not exit in %.0f s: SIGKILL", vm, self._host, why,
                            STOP_TIMEOUT)
                for p in self._copies(vm):
                    self._signal(p.pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT
            time.sleep(0.05)
        LOG.info("lab: vm=%s host=%s %s: copy pids %s gone (lease released)", vm, self._host, why,
                 [p.pid for p in copies])

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    # --- the virt driver interface -----------------------------------------------------------------

    def get_info(self, instance: Any, use_cache: bool = True) -> Any:
        info = super().get_info(instance, use_cache)
        if self.lab is None or info.state != power_state.RUNNING:
            return info
        if any(p.active for p in self._copies(instance.display_name)):
            return info
        LOG.warning("lab: vm=%s host=%s no copy runs here although Nova started it: reported SHUTDOWN",
                    instance.display_name, self._host)
        self.instances[instance.uuid].state = power_state.SHUTDOWN
        return hardware.InstanceInfo(state=power_state.SHUTDOWN)

    def spawn(self, context: Any, instance: Any, image_meta: Any, injected_files: Any, admin_password: Any,
              allocations: Any, network_info: Any = None, block_device_info: Any = None, power_on: bool = True,
              accel_info: Any = None) -> None:
        if self.lab is None:
            super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                          network_info, block_device_info, power_on, accel_info)
            return
        if power_on:
            self._run_copy(instance)
        super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                      network_info, block_device_info, power_on, accel_info)
        self._track(instance)

    def destroy(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None,
                destroy_disks: bool = True, destroy_secrets: bool = True) -> None:
        if self.lab is not None:
            self._stop_copies(instance.display_name, signal.SIGTERM, "destroy")
        super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)
        self._track(instance)

    def power_off(self, instance: Any, timeout: int = 0, retry_interval: int = 0) -> None:
        if self.lab is not None:
            self._stop_copies(instance.display_name, signal.SIGTERM, "power off")
        super().power_off(instance, timeout, retry_interval)

    def power_on(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None,
                 accel_info: Any = None, share_info: Any = None) -> None:
        if self.lab is not None:
            self._run_copy(instance)
        super().power_on(context, instance, network_info, block_device_info, accel_info, share_info)

    def pre_live_migration(self, context: Any, instance: Any, block_device_info: Any, network_info: Any,
                           disk_info: Any, migrate_data: Any) -> Any:
        """Destination: a copy waiting for the lease, ready before the source is told to hand over (QEMU
        guests: libvirt starts the incoming QEMU itself)."""
        if self.lab is not None and not self.qemu:
            vm = instance.display_name
            proc = self._start(vm, incoming=HANDOVER_TIMEOUT)
            # This process runs in the host's mount namespace: the host's /run/vmha is ours too.
            marker = INCOMING_DIR / f"vm-{vm}.incoming"
            self._wait(vm, proc, lambda: marker.exists() or self._holds_lease(vm, proc.pid), START_TIMEOUT,
                       "incoming copy")
            LOG.info("lab: vm=%s host=%s incoming copy waits for the lease (pid %s)", vm, self._host, proc.pid)
        return migrate_data

    def live_migration(self, context: Any, instance: Any, dest: str, post_method: Any, recover_method: Any,
                       block_migration: bool = False, migrate_data: Any = None) -> None:
        """Source: the copy stops writing and releases its lease (SIGUSR1); the destination takes it. QEMU
        guests: libvirt's peer-to-peer live migration (it hands the disk lease over at the switch)."""
        if self.qemu:
            assert self.lab is not None
            vm = instance.display_name
            t0 = time.monotonic()
            # --unsafe: the lab's sshfs storage is shared (cache="none"), libvirt 9 does not know it.
            cp = self._virsh("migrate", "--live", "--p2p", "--unsafe", vm, self.lab["libvirt"][dest], timeout=300)
            if cp.returncode != 0:
                LOG.error("lab: vm=%s host=%s live migration to %s failed: %s", vm, self._host, dest,
                          cp.stderr.strip())
                recover_method(context, instance, dest, migrate_data)
                return
            LOG.info("lab: vm=%s host=%s live migration to %s done in %.1f s", vm, self._host, dest,
                     time.monotonic() - t0)
        if self.lab is not None:
            if not self.qemu:
                self._stop_copies(instance.display_name, signal.SIGUSR1, f"handover to {dest}")
            # The guest has left this host, as a migrated libvirt domain does: an evacuation back here
            # later must not find it ("already exists").
            fake.FakeDriver.destroy(self, context, instance, None)
            self._track(instance)
        super().live_migration(context, instance, dest, post_method, recover_method, block_migration, migrate_data)

    def post_live_migration_at_destination(self, context: Any, instance: Any, network_info: Any,
                                           block_migration: bool = False, block_device_info: Any = None) -> None:
        if self.lab is not None:
            vm = instance.display_name
            proc = self._children.get(vm)
            if proc is None or self.qemu:
                # libvirt's migration finished (QEMU), or this compute restarted since pre_live_migration:
                # any copy that holds the lease.
                if not any(p.active for p in self._copies(vm)):
                    raise exception.NovaException(f"lab VM {vm} on {self._host}: no incoming copy after the handover")
            else:
                self._wait(vm, proc, lambda: self._holds_lease(vm, proc.pid), HANDOVER_TIMEOUT, "handover")
            LOG.info("lab: vm=%s host=%s took the lease: migration done", vm, self._host)
            super().spawn(context, instance, None, None, None, None)
            self._track(instance)
            return
        super().post_live_migration_at_destination(context, instance, network_info, block_migration,
                                                   block_device_info)

    def rollback_live_migration_at_destination(self, context: Any, instance: Any, network_info: Any,
                                               block_device_info: Any, destroy_disks: bool = True,
                                               migrate_data: Any = None) -> None:
        if self.lab is not None and not self.qemu:  # QEMU: libvirt ended its incoming QEMU itself
            vm = instance.display_name
            waiting = [p for p in self._copies(vm) if not p.active]
            for p in waiting:
                # Only a copy still waiting: one that took the lease is the VM now, stopping it would
                # leave the VM running nowhere.
                self._signal(p.pid, signal.SIGTERM)
        super().rollback_live_migration_at_destination(context, instance, network_info, block_device_info,
                                                       destroy_disks, migrate_data)
