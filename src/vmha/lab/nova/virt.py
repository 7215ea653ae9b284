"""LAB / TEST ONLY: the rig's virt driver, a Nova FakeDriver that keeps its node identity.

Nova's stock FakeDriver invents a new node UUID in every process, so a restarted fake compute
refuses to start (its compute node record no longer matches). FakeDriverWithoutFakeNodes reads and
writes the UUID in `state_path/compute_id`, as real drivers do; this subclass is where the lab
will hook VM processes in later (issue 6 item 3). Nova loads drivers only from the nova.virt
package: vmha.lab.nova.compute registers this module as nova.virt.vmha_lab before starting.
"""

from __future__ import annotations

from nova.virt import fake  # type: ignore[import-not-found, unused-ignore]


class LabFakeDriver(fake.FakeDriverWithoutFakeNodes):  # type: ignore[misc, unused-ignore]
    """One node per nova-compute, named after its host, with a UUID that survives restarts."""
