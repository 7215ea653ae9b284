"""The nova driver against a real Nova API (the rig: nova-api, conductor, scheduler, placement and
three nova-compute processes with the fake virt driver). Nothing here is mocked; the only stand-ins
are the rig's Glance and Neutron, which the driver never calls."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from vmha.config import NovaConfig
from vmha.drivers import nova
from vmha.drivers.base import DriverError
from vmha.lab.nova.rig import NovaRig
from vmha.testing.wait import until

ProjectConn = Callable[[str, str], Any]
Boot = Callable[..., Any]  # conftest's boot(conn, host, name, metadata=None, tags=None)

pytestmark = [pytest.mark.integration, pytest.mark.nova]


def server(admin: Any, sid: str) -> Any:
    return admin.compute.get_server(sid)


def service(admin: Any, host: str) -> Any:
    (svc,) = admin.compute.services(host=host, binary="nova-compute")
    return svc


async def test_hosts_lists_every_compute(driver: nova.NovaDriver) -> None:
    hosts = await driver.hosts()
    assert [h.name for h in hosts] == ["cmp1", "cmp2", "cmp3"]
    assert all(h.enabled and h.up and not h.forced_down for h in hosts)


async def test_ha_servers_on_a_host_across_projects(
    driver: nova.NovaDriver, admin: Any, boot: Boot, project_conn: ProjectConn, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = project_conn("alice", "proj-a"), project_conn("bob", "proj-b")
    prio7 = admin.compute.find_flavor("vmha-prio7") or admin.compute.create_flavor(
        name="vmha-prio7", ram=64, vcpus=1, disk=1)
    admin.compute.create_flavor_extra_specs(prio7, {nova.PRIORITY_SPEC: "7"})  # the operator's, admin-only
    meta = boot(alice, "cmp2", "meta", metadata={"HA_Enabled": "True"})
    tagged = boot(bob, "cmp2", "tagged", tags=["vmha"])
    plain = boot(alice, "cmp2", "plain")
    prio = boot(bob, "cmp2", "prio", metadata={"HA_Enabled": "true"}, flavor_name="vmha-prio7")
    # What a tenant sets on its own server is no priority: it would put itself first in line.
    tagprio = boot(alice, "cmp2", "tagprio", tags=["vmha", "HA_Priority=3"])
    both = boot(bob, "cmp2", "both", metadata={"HA_Enabled": "True", "HA_Priority": "99"}, flavor_name="vmha-prio7")
    badprio = boot(alice, "cmp2", "badprio", metadata={"HA_Enabled": "True", "HA_Priority": "high"})
    elsewhere = boot(bob, "cmp3", "elsewhere", metadata={"HA_Enabled": "True"})

    with caplog.at_level(logging.WARNING, logger="vmha.drivers.nova"):
        on_cmp2 = {v.name: v for v in await driver.vms("cmp2")}
    assert set(on_cmp2) == {meta.id, tagged.id, plain.id, prio.id, badprio.id, tagprio.id, both.id}
    assert {n for n, v in on_cmp2.items() if v.ha} == {meta.id, tagged.id, prio.id, badprio.id, tagprio.id, both.id}
    assert on_cmp2[prio.id].priority == 7  # the flavor's extra spec
    assert on_cmp2[tagprio.id].priority == 0
    assert on_cmp2[both.id].priority == 7  # the tenant's metadata changes nothing
    assert on_cmp2[tagged.id].priority == 0
    assert on_cmp2[badprio.id].priority == 0
    assert all(v.host == "cmp2" and v.state == "ACTIVE" for v in on_cmp2.values())

    everywhere = {v.name: v for v in await driver.vms()}
    assert everywhere[elsewhere.id].host == "cmp3" and everywhere[elsewhere.id].ha
    # A project's own view shows only its servers: the driver's list really is across projects.
    assert {s.id for s in alice.compute.servers()} == {meta.id, plain.id, badprio.id, tagprio.id}


async def test_servers_sharing_a_name_are_not_protected(
    rig: NovaRig, monkeypatch: pytest.MonkeyPatch, boot: Boot, project_conn: ProjectConn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vm_names = "name": two tenants name a server alike; neither is taken for the other."""
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(rig.clouds_yaml))
    by_name = nova.NovaDriver(NovaConfig(cloud=rig.cloud, vm_names="name"))
    a = boot(project_conn("alice", "proj-a"), "cmp1", "twin", metadata={"HA_Enabled": "True"})
    b = boot(project_conn("bob", "proj-b"), "cmp3", "twin", metadata={"HA_Enabled": "True"})
    solo = boot(project_conn("bob", "proj-b"), "cmp3", "solo", metadata={"HA_Enabled": "True"})
    with caplog.at_level(logging.ERROR, logger="vmha.drivers.nova"):
        names = [v.name for v in await by_name.vms()]
    assert "twin" not in names and "solo" in names
    assert f"servers are named 'twin' ({', '.join(sorted([a.id, b.id]))})" in caplog.text
    assert await by_name._sid("solo") == solo.id
    with pytest.raises(DriverError, match="2 servers of that name"):
        await by_name._sid("twin")


async def test_disable_force_down_and_enable_a_running_host(driver: nova.NovaDriver, admin: Any) -> None:
    await driver.disable_host("cmp3", "management plane down")
    svc = service(admin, "cmp3")
    assert (svc.status, svc.disabled_reason, svc.is_forced_down) == ("disabled", "vmha: management plane down", False)

    await driver.mark_host_down("cmp3")
    (cmp3,) = [h for h in await driver.hosts() if h.name == "cmp3"]
    assert (cmp3.enabled, cmp3.up, cmp3.forced_down) == (False, False, True)

    # No evacuation happened from cmp3: Nova lets it back at once.
    await driver.enable_host("cmp3")
    (cmp3,) = [h for h in await driver.hosts() if h.name == "cmp3"]
    assert (cmp3.enabled, cmp3.up, cmp3.forced_down) == (True, True, False)

    # Marked down without a disable before (a fence-evacuate row): forced down AND disabled, so the
    # host takes no new VMs until `vmha host enable`, whatever Nova thinks of its service meanwhile.
    await driver.mark_host_down("cmp3")
    svc = service(admin, "cmp3")
    assert (svc.status, svc.disabled_reason, svc.is_forced_down) == (
        "disabled", "vmha: fenced (fence proof held by vmha)", True)
    await driver.mark_host_down("cmp3")  # a new leader repeating the step
    await driver.enable_host("cmp3")
    svc = service(admin, "cmp3")
    assert (svc.status, svc.is_forced_down) == ("enabled", False)


async def test_live_migration(driver: nova.NovaDriver, admin: Any, boot: Boot) -> None:
    vm = boot(admin, "cmp2", "lm", metadata={"HA_Enabled": "True"})

    assert await driver.live_migrate(vm.id, "cmp2", "cmp3") == "cmp3"
    s = server(admin, vm.id)
    assert (s.compute_host, s.status, s.task_state) == ("cmp3", "ACTIVE", None)
    # Repeating the step (a new leader unsure whether it ran) reports where the VM is.
    assert await driver.live_migrate(vm.id, "cmp2", "cmp3") == "cmp3"

    picked = await driver.live_migrate(vm.id, "cmp3", None)
    assert picked in ("cmp1", "cmp2")
    assert server(admin, vm.id).compute_host == picked

    with pytest.raises(DriverError) as err:
        await driver.live_migrate(vm.id, picked, picked)
    assert not err.value.retryable and "is the source host" in str(err.value)
    with pytest.raises(DriverError) as err:
        await driver.live_migrate(vm.id, picked, "nosuchhost")
    assert not err.value.retryable and "HTTP 400" in str(err.value)

    # Refused by the scheduler (destination disabled): the server stays ACTIVE where it was and the
    # driver reports a failure the queue may retry once capacity is back.
    other = "cmp2" if picked == "cmp1" else "cmp1"
    await driver.disable_host(other, "test: refuse migrations")
    try:
        with pytest.raises(DriverError) as err:
            await driver.live_migrate(vm.id, picked, other)
        assert err.value.retryable and "No valid host" in str(err.value)
    finally:
        await driver.enable_host(other)
    assert server(admin, vm.id).compute_host == picked

    admin.compute.stop_server(vm.id)
    admin.compute.wait_for_server(server(admin, vm.id), status="SHUTOFF", interval=0.3, wait=60)
    with pytest.raises(DriverError) as err:
        await driver.live_migrate(vm.id, picked, None)
    assert not err.value.retryable and "HTTP 409" in str(err.value)


async def test_vms_named_by_server_name(rig: NovaRig, admin: Any, boot: Boot, project_conn: ProjectConn,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """[nova] vm_names = "name" (the lab with Nova: a server's name is its lease's name): VMs are listed
    and moved by name; a name that is not unique is refused, never guessed."""
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(rig.clouds_yaml))
    by_name = nova.NovaDriver(NovaConfig(cloud=rig.cloud, vm_names="name"), poll_interval=0.3, migrate_timeout=90)
    vm = boot(project_conn("carol", "proj-c"), "cmp2", "named-vm", metadata={"HA_Enabled": "True"})

    listed = {v.name: v for v in await by_name.vms("cmp2")}
    assert listed["named-vm"].ha and listed["named-vm"].host == "cmp2"
    assert vm.id not in listed
    assert await nova.NovaDriver(NovaConfig(cloud=rig.cloud, vm_names="name"), poll_interval=0.3,
                                 migrate_timeout=90).live_migrate("named-vm", "cmp2", "cmp3") == "cmp3"
    assert server(admin, vm.id).compute_host == "cmp3"

    boot(admin, "cmp1", "twice")
    boot(admin, "cmp1", "twice")
    with pytest.raises(DriverError) as err:
        await by_name.live_migrate("twice", "cmp1", None)
    assert not err.value.retryable and "2 servers of that name" in str(err.value)


async def test_evacuation_after_fence(
    driver: nova.NovaDriver,
    admin: Any,
    rig: NovaRig,
    boot: Boot,
    project_conn: ProjectConn,
    fault_cmp1: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = project_conn("alice", "proj-a")
    a = boot(alice, "cmp1", "evac-a", metadata={"HA_Enabled": "True"})
    b = boot(admin, "cmp1", "evac-b", tags=["vmha"])
    c = boot(admin, "cmp1", "evac-c", tags=["vmha"])
    d = boot(alice, "cmp1", "evac-d", metadata={"HA_Enabled": "True"})
    e = boot(admin, "cmp1", "evac-e", tags=["vmha"])

    rig.kill_compute("cmp1")  # the host loses power
    # A stop sent now reaches nobody: the server keeps task_state powering-off, which would block
    # its evacuation (409) until the driver resets the state.
    admin.compute.stop_server(d.id)
    assert server(admin, d.id).task_state == "powering-off"

    # Nova still sees cmp1's service up (no missed heartbeats yet): evacuation is refused.
    with pytest.raises(DriverError) as err:
        await driver.evacuate(a.id, "cmp1", "cmp2")
    assert err.value.retryable and "still in use" in str(err.value)

    # Disabling needs no proof. Nova saves it, then calls the (dead) compute over RPC and answers
    # only after its RPC timeout (60 s): the driver gives up waiting and checks the saved state.
    hurried = nova.NovaDriver(NovaConfig(cloud=rig.cloud), call_timeout=3)
    with caplog.at_level(logging.WARNING, logger="vmha.drivers.nova"):
        await hurried.disable_host("cmp1", "power loss")
    assert "host=cmp1 disabled, but Nova's answer timed out" in caplog.text
    assert service(admin, "cmp1").status == "disabled"

    # The manager holds a fence proof now: force down.
    await driver.mark_host_down("cmp1")
    # Once forced down, Nova no longer calls the compute: a disable answers at once.
    await driver.disable_host("cmp1", "power loss, fence proof host-dead")
    (cmp1,) = [h for h in await driver.hosts() if h.name == "cmp1"]
    assert (cmp1.enabled, cmp1.up, cmp1.forced_down) == (False, False, True)

    with pytest.raises(DriverError) as err:
        await driver.evacuate(a.id, "cmp1", "nosuchhost")
    assert not err.value.retryable and "HTTP 404" in str(err.value)

    # To a named host, and the repeat of a finished step.
    assert await driver.evacuate(a.id, "cmp1", "cmp2") == "cmp2"
    assert (server(admin, a.id).compute_host, server(admin, a.id).status) == ("cmp2", "ACTIVE")
    assert await driver.evacuate(a.id, "cmp1", "cmp2") == "cmp2"

    # Scheduler's choice.
    dest_b = await driver.evacuate(b.id, "cmp1", None)
    assert dest_b in ("cmp2", "cmp3")
    assert (server(admin, b.id).compute_host, server(admin, b.id).status) == (dest_b, "ACTIVE")

    # Waiting is bounded: with cmp3's compute frozen the rebuild cannot finish.
    frozen = rig.computes["cmp3"]
    frozen.signal(signal.SIGSTOP)
    try:
        impatient = nova.NovaDriver(NovaConfig(cloud=rig.cloud), poll_interval=0.3, evacuate_timeout=3)
        with pytest.raises(DriverError) as err:
            await impatient.evacuate(c.id, "cmp1", "cmp3")
        assert err.value.retryable and "not finished after 3 s" in str(err.value)
        # The retry finds the evacuation in flight and waits for it instead of starting another.
        with caplog.at_level(logging.INFO, logger="vmha.drivers.nova"):
            retry = asyncio.create_task(driver.evacuate(c.id, "cmp1", "cmp3"))
            await until(lambda: f"vm={c.id} evacuation already in progress" in caplog.text or retry.done(),
                        "the retry finding the evacuation in flight", timeout=10, interval=0.1)  # fmt: skip
            assert f"vm={c.id} evacuation already in progress" in caplog.text
            frozen.signal(signal.SIGCONT)
            assert await retry == "cmp3"
    finally:
        frozen.signal(signal.SIGCONT)
    assert server(admin, c.id).status == "ACTIVE"

    # A task left over from the dead host: reset, then evacuated.
    with caplog.at_level(logging.INFO, logger="vmha.drivers.nova"):
        dest_d = await driver.evacuate(d.id, "cmp1", None)
    assert f"vm={d.id} task_state=powering-off on fenced host=cmp1: reset state to active" in caplog.text
    assert (server(admin, d.id).compute_host, server(admin, d.id).status) == (dest_d, "ACTIVE")

    # A connection at microversion 2.95 (openstacksdk's default here) leaves the evacuated server
    # stopped: the driver starts it.
    unpinned = nova.NovaDriver(
        connection=nova.connect(microversion="2.95", **rig.connect_options()), poll_interval=0.3, evacuate_timeout=90
    )
    with caplog.at_level(logging.INFO, logger="vmha.drivers.nova"):
        dest_e = await unpinned.evacuate(e.id, "cmp1", "cmp2")
    assert f"vm={e.id} evacuated but SHUTOFF on host=cmp2: starting it" in caplog.text
    assert (dest_e, server(admin, e.id).status) == ("cmp2", "ACTIVE")

    # The repaired host cannot come back before its nova-compute restarted and cleaned up.
    with pytest.raises(DriverError) as err:
        await driver.enable_host("cmp1")
    assert not err.value.retryable and "restart nova-compute on cmp1" in str(err.value)
    assert service(admin, "cmp1").is_forced_down

    rig.start_compute("cmp1")
    rig.wait_evacuations_completed("cmp1", timeout=60)
    await driver.enable_host("cmp1")
    svc = service(admin, "cmp1")
    assert (svc.status, svc.is_forced_down) == ("enabled", False)
    rig.wait_compute("cmp1", up=True, timeout=60)
    # The old copies are gone from the restarted compute; the servers stay where they were evacuated.
    assert {v.name for v in await driver.vms("cmp1")}.isdisjoint({a.id, b.id, c.id, d.id, e.id})


async def test_evacuation_failing_on_no_valid_host(
    driver: nova.NovaDriver, admin: Any, rig: NovaRig, boot: Boot, fault_cmp1: None
) -> None:
    vm = boot(admin, "cmp1", "novalid", tags=["vmha"])
    rig.kill_compute("cmp1")
    await driver.mark_host_down("cmp1")
    # Every other host refuses new servers: the scheduler finds none, Nova puts the server in ERROR.
    for h in ("cmp2", "cmp3"):
        await driver.disable_host(h, "test: no capacity")
    try:
        with pytest.raises(DriverError) as err:
            await driver.evacuate(vm.id, "cmp1", None)
        assert err.value.retryable and "failed: status=ERROR" in str(err.value)
    finally:
        for h in ("cmp2", "cmp3"):
            await driver.enable_host(h)
    # The queue's retry: from ERROR the evacuation is allowed again and now succeeds.
    assert await driver.evacuate(vm.id, "cmp1", None) in ("cmp2", "cmp3")
    assert server(admin, vm.id).status == "ACTIVE"


async def test_unknown_host_and_unknown_server_are_not_retryable(driver: nova.NovaDriver) -> None:
    with pytest.raises(DriverError) as err:
        await driver.disable_host("nosuchhost", "x")
    assert not err.value.retryable and "no nova-compute service" in str(err.value)
    with pytest.raises(DriverError) as err:
        await driver.evacuate("00000000-0000-0000-0000-000000000000", "cmp1", None)
    assert not err.value.retryable and "HTTP 404" in str(err.value)


async def test_wrong_credentials_are_not_retryable(rig: NovaRig) -> None:
    bad = nova.NovaDriver(connection=nova.connect(**rig.connect_options("nobody")))  # malformed token: 401
    with pytest.raises(DriverError) as err:
        await bad.hosts()
    assert not err.value.retryable and "HTTP 401" in str(err.value)
    member = nova.NovaDriver(connection=nova.connect(**rig.connect_options("alice:proj-a")))  # not admin: 403
    with pytest.raises(DriverError) as err:
        await member.mark_host_down("cmp1")
    assert not err.value.retryable and "HTTP 403" in str(err.value)


def test_missing_cloud_is_a_clear_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    (tmp_path / "clouds.yaml").write_text("clouds: {}\n")
    with pytest.raises(DriverError) as err:
        _ = nova.NovaDriver(NovaConfig(cloud="prod")).conn
    assert not err.value.retryable and "cannot load cloud 'prod' from clouds.yaml" in str(err.value)


async def test_an_api_that_does_not_answer_times_out() -> None:
    """Not the rig: a real socket that accepts and never answers (a hung nova-api)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v2.1"
        conn = nova.connect(
            auth_type="admin_token",
            auth={"endpoint": url, "token": "admin:admin"},
            compute_endpoint_override=url,
            api_timeout=1.0,  # so the abandoned worker thread ends soon after the test
        )
        driver = nova.NovaDriver(connection=conn, call_timeout=1.0)
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    accepted.append(listener.accept()[0])
                except TimeoutError:
                    continue

        t = threading.Thread(target=accept)
        t.start()
        try:
            with pytest.raises(DriverError) as err:
                await driver.hosts()
            assert err.value.retryable and "no answer in time" in str(err.value)
        finally:
            stop.set()
            t.join(5)
            for s in accepted:
                s.close()
