"""The libvirt driver's placement load (drivers.libvirt.protected_per_host): protected domains per
host, from one scan of every libvirtd and the inventory's records, so that a move asks each host once."""

from __future__ import annotations

from vmha.drivers.libvirt import protected_per_host
from vmha.etcd.values import LibvirtDomainValue

PROTECTED = '<domain><metadata><vmha:protect xmlns:vmha="https://vmha.org/xmlns/domain/1"/></metadata></domain>'
PLAIN = "<domain/>"


def rec(vm: str, host: str) -> LibvirtDomainValue:
    return LibvirtDomainValue(vm=vm, host=host, priority=0, xml=PROTECTED)


def test_running_protected_domains_count_where_they_run() -> None:
    scan = {"h1": {"vm1": PROTECTED, "vm2": PROTECTED, "tool": PLAIN}, "h2": {"vm3": PROTECTED}, "h3": {}}
    assert protected_per_host(scan, {}) == {"h1": 2, "h2": 1}


def test_a_recorded_domain_counts_where_it_runs_now_else_where_it_was() -> None:
    scan = {"h1": {"vm1": PROTECTED}, "h2": {}, "h3": None}
    records = {"vm1": rec("vm1", "h2"), "vm2": rec("vm2", "h2"), "vm3": rec("vm3", "h3")}
    # vm1 moved to h1 (seen there); vm2 is stopped on h2 (comes back there); h3 did not answer
    assert protected_per_host(scan, records) == {"h1": 1, "h2": 1, "h3": 1}
