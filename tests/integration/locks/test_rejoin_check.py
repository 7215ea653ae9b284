"""The rejoin check of a fenced host (vmha.manager.rejoin) against two real sanlock hosts (io 1):
host A renewing and holding no lease may rejoin; A holding a recovered VM's lease, a host_id that
does not renew, or a host without a host_id may not."""

from __future__ import annotations

import pytest
from lockhelp import A_HOST_ID, LockCluster

from vmha.manager.rejoin import RejoinRefused, check_rejoin

pytestmark = pytest.mark.integration


def ids(cluster: LockCluster, never_joined: str = "h-gone") -> dict[str, int]:
    return {cluster.a.name: A_HOST_ID, never_joined: 7}


async def check(cluster: LockCluster, host: str, vms: tuple[str, ...]) -> str:
    known = ids(cluster)

    async def host_id_of(h: str) -> int | None:
        return known.get(h)

    return await check_rejoin(cluster.space, host_id_of, host, vms)


async def test_a_renewing_host_holding_no_lease_may_rejoin(cluster: LockCluster) -> None:
    evidence = await check(cluster, cluster.a.name, ("vm1",))
    assert evidence.startswith(f"lockspace renewed (host_id {A_HOST_ID} gen ")
    assert evidence.endswith("holds none of the leases of vm1")


async def test_a_host_holding_a_recovered_vms_lease_may_not(cluster: LockCluster) -> None:
    cluster.a.start("hold", "held", vm="vm1")
    with pytest.raises(RejoinRefused, match=r"it holds the lease of vm1, recovered elsewhere"):
        await check(cluster, cluster.a.name, ("vm1",))


async def test_a_host_id_that_does_not_renew_or_is_unknown_may_not(cluster: LockCluster) -> None:
    with pytest.raises(RejoinRefused, match=r"host_id 7.*is not renewed"):
        await check(cluster, "h-gone", ())
    with pytest.raises(RejoinRefused, match=r"no sanlock host_id registered for 'h-nobody'"):
        await check(cluster, "h-nobody", ())
