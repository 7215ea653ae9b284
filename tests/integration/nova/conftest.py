"""The Nova rig for the nova driver's tests: one real Nova control plane per test session.

Started once (40 to 115 s here: the schema setup dominates and slows when the machine is busy)
and stopped at the end of the session, also on failure. Without scripts/setup-nova.sh (no
/opt/vmha-nova) the tests are skipped with that instruction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmha.config import NovaConfig
from vmha.drivers import nova
from vmha.lab.nova.rig import FLAVOR, IMAGE_ID, VENV, NovaRig


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NovaRig]:
    if not (VENV / "bin" / "nova-manage").exists():
        pytest.skip(f"the Nova rig is not installed in {VENV}: run `bash scripts/setup-nova.sh`")
    # Under pytest's temporary directory the rig's logs survive the session (data is removed).
    r = NovaRig(hosts=("cmp1", "cmp2", "cmp3"), workdir=tmp_path_factory.mktemp("nova-rig"))
    r.start()
    print(f"\nnova rig started in {r.timings['total']} s: {r.timings}")
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def admin(rig: NovaRig) -> Any:
    """An admin openstacksdk connection pinned to 2.94, for the tests' own setup and checks."""
    return nova.connect(**rig.connect_options())


@pytest.fixture
def driver(rig: NovaRig, monkeypatch: pytest.MonkeyPatch) -> nova.NovaDriver:
    """The driver as vmha runs it: credentials from clouds.yaml through [nova] cloud."""
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(rig.clouds_yaml))
    return nova.NovaDriver(NovaConfig(cloud=rig.cloud), poll_interval=0.3, evacuate_timeout=90, migrate_timeout=90)


@pytest.fixture
def boot(cleanup: list[str]) -> Callable[..., Any]:
    """Boot a server on `host` (microversion 2.74 `host`; the rig's policy lets members do it), wait
    until ACTIVE; deleted after the test."""

    def run(
        conn: Any, host: str, name: str, metadata: dict[str, str] | None = None, tags: list[str] | None = None,
        flavor_name: str = FLAVOR,
    ) -> Any:
        flavor = conn.compute.find_flavor(flavor_name, ignore_missing=False)
        server = conn.compute.create_server(
            name=name, image_id=IMAGE_ID, flavor_id=flavor.id, networks="none", host=host,
            metadata=metadata or {}, tags=tags or [],
        )  # fmt: skip
        cleanup.append(server.id)
        return conn.compute.wait_for_server(server, status="ACTIVE", interval=0.3, wait=60)

    return run


@pytest.fixture
def project_conn(rig: NovaRig) -> Callable[[str, str], Any]:
    """A connection as a member of a project: token "user:project"."""
    return lambda user, project: nova.connect(**rig.connect_options(f"{user}:{project}"))


@pytest.fixture
def cleanup(admin: Any) -> Iterator[list[str]]:
    """Server ids to delete after the test (as admin, across projects)."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        admin.compute.delete_server(sid, ignore_missing=True, force=True)


@pytest.fixture
def fault_cmp1(rig: NovaRig, admin: Any) -> Iterator[None]:
    """cmp1's nova-compute killed for the test; afterwards running, un-forced and enabled again."""
    yield
    if not rig.computes["cmp1"].alive():
        rig.start_compute("cmp1")
    (svc,) = admin.compute.services(host="cmp1", binary="nova-compute")
    if svc.is_forced_down or svc.status != "enabled":
        rig.wait_evacuations_completed("cmp1", timeout=60)
        admin.compute.update_service_forced_down(svc, forced=False)
        admin.compute.enable_service(svc)
    rig.wait_compute("cmp1", up=True, timeout=60)
    # Re-enabled while Nova saw its compute down, cmp1 is offered to the scheduler again only after
    # the compute's next resource update (the rig: every 10 s).
    rig.wait_schedulable("cmp1", timeout=60)
