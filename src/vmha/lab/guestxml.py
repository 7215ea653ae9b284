"""LAB ONLY: the lab guest's libvirt domain XML, for the plain lab (vmha.lab.libvirtd: explicit <lease>,
vmha metadata) and for the Nova lab's virt driver (vmha.lab.nova.virt: no <lease>, its disk in Nova's
layout, so libvirt's automatic disk lease protects it). Standard library only: the virt driver imports
it inside nova-compute.

on_lockfailure poweroff: when the host loses the lease (its lockspace fails: storage lost), sanlock runs
libvirt's helper, which destroys the domain at once (sanlock's SIGKILL after kill_grace stays the
fallback); libvirt then knows why the guest stopped, and no guest runs on without its lease.

Boot time is recovery time (a restarted guest counts as down until it writes), and under TCG every
instruction of firmware and kernel set-up is emulated: a kernel with only the guest's drivers built in
(scripts/build-guest.sh), booted uncompressed through its PVH entry point, the qboot firmware, no USB
controller, and kernel options that skip work a lab guest does not need (speculation mitigations, TSC
checks). Measured in BENCHMARKS.md ("guest boot").
"""

from __future__ import annotations

import os
from pathlib import Path

GUEST_DIR = Path(os.environ.get("VMHA_GUEST_DIR", "/var/lib/vmha/lab-guest"))
KERNEL = GUEST_DIR / "vmlinux"
INITRD = GUEST_DIR / "initrd.img"
FIRMWARE = "/usr/share/qemu/qboot.rom"  # Debian's qemu-system-data
KERNEL_OPTIONS = "console=ttyS0 quiet mitigations=off tsc=reliable no_timer_check"
CLOCK_SOCKET = Path("/run/vmha/guest-clock.sock")  # in each host's /run/vmha tmpfs
GUEST_MEMORY_MIB = 96
DISK_SIZE = 64 << 20  # a raw disk: ~26 hours of records at 10 writes a second


def domain_xml(vm: str, disk: Path, interval: float, lease: str = "", metadata: str = "") -> str:
    """The guest `vm` (QEMU's `-name guest=<vm>`) writing its records to the raw `disk`, one every
    `interval` s. `lease`: a <lease> element (empty: none, libvirt's disk lease if configured);
    `metadata`: the <metadata> content (empty: none)."""
    meta = f"\n  <metadata>\n    {metadata}\n  </metadata>" if metadata else ""
    lease_el = f"\n    {lease}" if lease else ""
    return f"""<domain type='qemu'>
  <name>{vm}</name>
  <memory unit='MiB'>{GUEST_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>{meta}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader type='rom' readonly='yes'>{FIRMWARE}</loader>
    <kernel>{KERNEL}</kernel>
    <initrd>{INITRD}</initrd>
    <cmdline>{KERNEL_OPTIONS} vmha.vm={vm} vmha.interval={interval}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <on_lockfailure>poweroff</on_lockfailure>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>{lease_el}
    <channel type='unix'>
      <source mode='connect' path='{CLOCK_SOCKET}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target type='virtio' name='org.vmha.clock'/>
    </channel>
    <serial type='file'>
      <source path='/var/log/libvirt/qemu/{vm}.console'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""
