"""`vmha policy show`, `vmha recovery show`, `vmha events`, `vmha host enable` against a real etcd.

`host enable` calls the compute driver: here the recording double (recording_parts.py, put in place
of the configured driver), since what is tested is the cleanliness check, not compute.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from manager_config import config_text

from vmha.cli import cli
from vmha.core.health import HostHealth, PlaneStatus
from vmha.core.planes import PLANES, Plane, PlaneState
from vmha.etcd import health_store
from vmha.etcd.client import EtcdClient
from vmha.etcd.election import Election, Leadership
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog
from vmha.etcd.tasks import TaskStore
from vmha.manager import daemon
from vmha.testing.etcd import EtcdProcess, free_ports

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
KEYS = Keys("vt5")


def _task(vm: str, state: str, source: str = "h1", recovery: int = 1) -> dict[str, object]:
    return {
        "vm": vm, "source": source, "kind": "evacuate", "recovery": recovery, "priority": 5, "row": "storage",
        "action": "fence-evacuate", "failed": {"storage": 100.0}, "created": 100.0, "state": state,
        "steps": [{"step": "prove", "started": 100.0, "finished": 101.5, "result": "ok", "detail": "host-dead"}],
        "proof": {"vm": vm, "host": source, "method": "host-dead", "started": 100.0, "proved": 101.5,
                  "details": {"host_states": "+0.0s dead"}},
        "running_on": "h2" if state == "done" else None,
        "dest": "h2",
    }  # fmt: skip


@pytest.fixture
async def managers(etcd: EtcdProcess) -> EtcdProcess:
    """Auth on, with this file's managers: mgr-cli (the commands' config) and mgr-test (the leader)."""
    await etcd.setup_auth("vt5", managers=["mgr-cli", "mgr-test"])
    return etcd


@pytest.fixture
def cfg_path(managers: EtcdProcess, tmp_path: Path) -> Path:
    """The commands run as the manager mgr-cli (host enable writes: the operator's role only reads)."""
    url = managers.client_urls[0]
    path = tmp_path / "vmha.toml"
    path.write_text(
        config_text(managers, "mgr-cli", f"""[manager]
name = "mgr-cli"
endpoints = ["{url}"]
driver = "lab"
[policy]
management = "alert"
""")
    )
    return path


@pytest.fixture
async def leader(managers: EtcdProcess) -> AsyncIterator[tuple[EtcdClient, Leadership]]:
    client = EtcdClient(managers.client_urls, tls=managers.tls("mgr-test"), timeout=2.0)
    election = Election(client, KEYS.leader, "mgr-test", 2)
    lead = await election.campaign()
    try:
        yield client, lead
    finally:
        await election.resign()
        await client.close()


async def vmha(*args: str) -> Result:
    # The commands run their own event loop: run them in a thread, outside the test's loop.
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), catch_exceptions=False)


async def test_policy_show(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = await vmha("policy", "show", "--config", str(cfg_path), "--json")
    assert r.exit_code == 0, r.output
    table = json.loads(r.output)
    assert table["management"] == "alert"  # from the config
    assert table["storage"] == "fence-evacuate"  # default
    assert table["fabric"] == "alert"
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    r = await vmha("policy", "show", "--config", str(cfg_path))
    rows = {cells[0]: cells[1:] for line in r.output.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 4}
    # Each row as the issue words it: what is done, and which fence proof the evacuating rows wait for.
    assert rows["management"] == ["alert", "alert only: its VMs are left running", "-"]
    assert rows["service"][0] == "live-migrate" and "without a restart (no fence proof needed)" in rows["service"][1]
    assert rows["storage"][2] == "lease-taken, then exit-attested, then host-dead"
    assert rows["management+service"][:1] + rows["management+service"][2:] == [
        "isolate-evacuate", "lease-taken, then request-force, then host-dead"]
    assert rows["management+storage+service"][2] == "lease-taken, then host-dead"  # no power fence configured
    assert rows["fabric"] == ["alert", "alert only: its VMs are left running", "-"]
    assert rows["agent-stopped"][0] == "alert"
    powered = cfg_path.with_name("powered.toml")
    powered.write_text(cfg_path.read_text().replace('name = "mgr-cli"', 'name = "mgr-cli"\npower_fence = true'))
    r = await vmha("policy", "show", "--config", str(powered))
    assert "│ lease-taken, then power, then host-dead" in r.output  # all down: power fence if configured


async def test_recovery_show_and_events(cfg_path: Path, leader: tuple[EtcdClient, Leadership]) -> None:
    client, lead = leader
    store = TaskStore(client, KEYS)
    await store.write(lead, {}, [("vm1", 1, _task("vm1", "done"))])
    await store.write(lead, {"vm1": _task("vm1", "proving", recovery=2)})
    events = EventLog(client, KEYS)
    await events.start()
    await events.append(lead, [("warn", "manager", "host 'h1': row storage -> fence-evacuate", "log")], 1.0)
    await events.append(lead, [("err", "manager", "vm 'vm9' recovery FAILED", "alert")], 2.0)

    r = await vmha("recovery", "show", "vm1", "--config", str(cfg_path), "--all")
    assert r.exit_code == 0, r.output
    assert "vm 'vm1' recovery 1: done" in r.output and "proof: host-dead" in r.output
    assert "running on 'h2'" in r.output
    assert "vm 'vm1' recovery 2: proving" in r.output and "(in progress)" in r.output
    r = await vmha("recovery", "show", "vm1", "--config", str(cfg_path), "--json")
    assert [t["recovery"] for t in json.loads(r.output)] == [2]  # only the newest by default

    r = await vmha("recovery", "show", "vm-unknown", "--config", str(cfg_path))
    assert r.exit_code == 1 and "no recovery recorded" in r.output

    r = await vmha("events", "--config", str(cfg_path), "-n", "10")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 2 and "row storage -> fence-evacuate" in lines[0] and "ALERT vm 'vm9'" in lines[1]
    r = await vmha("events", "--config", str(cfg_path), "-n", "1", "--json")
    assert json.loads(r.output)["seq"] == 2


async def _health(client: EtcdClient, host: str, down: Plane | None = None) -> None:
    planes = {p: PlaneStatus(PlaneState.DOWN if p == down else PlaneState.UP, 1.0, "test") for p in PLANES}
    await health_store.save_host(client, KEYS, HostHealth(host, "default", planes), 1.0, "test")


@pytest.fixture
def recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recording driver double for the commands (in this process): HA VM vm7 on host h1."""
    monkeypatch.setenv("VMHA_TEST_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("recording_parts", None)  # read VMHA_TEST_DIR afresh
    import recording_parts

    monkeypatch.setattr(daemon, "compute_driver", lambda cfg, client: recording_parts.RecordingDriver())
    (tmp_path / "state.json").write_text(json.dumps({"hosts": ["h1"], "placement": {"vm7": "h1"}, "restarts": {}}))
    return tmp_path


async def test_recovery_show_explains_why_not(
    cfg_path: Path, leader: tuple[EtcdClient, Leadership], recording: Path
) -> None:
    client, _ = leader
    await _health(client, "h1", down=Plane.MANAGEMENT)
    r = await vmha("recovery", "show", "vm7", "--config", str(cfg_path))
    assert r.exit_code == 1
    assert "vm 'vm7' on host 'h1' (management down, storage up, service up): row management: alert" in r.output
    assert "left running" in r.output
    r = await vmha("recovery", "show", "vm-nowhere", "--config", str(cfg_path))
    assert "the compute driver does not know this VM" in r.output


async def test_host_enable_checks_the_host_is_clean(
    cfg_path: Path, leader: tuple[EtcdClient, Leadership], recording: Path
) -> None:
    client, lead = leader
    tmp_path = recording
    await client.put_json(KEYS.disabled("h1"), {"op": "mark-down"})

    r = await vmha("host", "enable", "h1", "--config", str(cfg_path))
    assert r.exit_code != 0 and "not in the manager's health view" in r.output

    await _health(client, "h1", down=Plane.STORAGE)
    r = await vmha("host", "enable", "h1", "--config", str(cfg_path))
    assert r.exit_code != 0 and "storage down" in r.output

    await _health(client, "h1")
    store = TaskStore(client, KEYS)
    await store.write(lead, {"vm1": {**_task("vm1", "evacuating"), "dest": None}})  # unreadable: no dest
    r = await vmha("host", "enable", "h1", "--config", str(cfg_path))
    assert r.exit_code != 0 and f"unreadable task(s) {KEYS.task('vm1')}" in r.output
    await store.write(lead, {"vm1": _task("vm1", "evacuating")})
    r = await vmha("host", "enable", "h1", "--config", str(cfg_path))
    assert r.exit_code != 0 and "vm1 (evacuating)" in r.output
    assert not (tmp_path / "calls.jsonl").exists(), "the driver was called although the host is not clean"

    await store.load()
    await store.write(lead, {"vm1": _task("vm1", "done")})
    r = await vmha("host", "enable", "h1", "--config", str(cfg_path))
    assert r.exit_code == 0, r.output
    assert "host 'h1' enabled (manager leader: mgr-test)" in r.output
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [(c["call"], c["host"]) for c in calls] == [("enable_host", "h1")]
    assert await client.get(KEYS.disabled("h1")) is None


async def test_status_exit_codes_for_monitors(cfg_path: Path, etcd: EtcdProcess, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("COLUMNS", "250")
    client = EtcdClient(etcd.client_urls, tls=etcd.tls("mgr-test"), timeout=2.0)
    election = Election(client, KEYS.leader, "mgr-test", 2)
    try:
        r = await vmha("status", "--config", str(cfg_path))
        assert r.exit_code == 2 and r.output.startswith("VMHA CRITICAL - no active manager"), r.output
        await election.campaign()
        for h in ("h1", "h2"):
            await _health(client, h)
        r = await vmha("status", "--config", str(cfg_path))
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[0] == "VMHA OK - 2 hosts, all planes up, leader mgr-test"

        await _health(client, "h1", down=Plane.STORAGE)
        r = await vmha("status", "--config", str(cfg_path))
        assert r.exit_code == 1, r.output
        assert r.output.splitlines()[0] == "VMHA DEGRADED - 1 host degraded"
        # Local time and relative (the test's plane went down at t=1.0: in 1970).
        assert "DEGRADED host 'h1': storage DOWN since 1970-01-01 " in r.output and " days ago)" in r.output
        r = await vmha("status", "--config", str(cfg_path), "--json")
        data = json.loads(r.output)
        assert r.exit_code == 1 and data["status"]["code"] == 1 and data["status"]["level"] == "degraded"
        assert {h["host"]: h["failed"] for h in data["hosts"]} == {"h1": ["storage"], "h2": []}  # the old shape
        assert data["hosts"][0]["planes"]["storage"]["since"] == 1.0  # raw numbers in JSON

        await election.resign()
        r = await vmha("status", "--config", str(cfg_path))
        assert r.exit_code == 2, r.output
        assert r.output.splitlines()[0] == "VMHA CRITICAL - no active manager; 1 host degraded"
    finally:
        await election.resign()
        await client.close()
    # etcd unreachable: nothing can be told (Nagios UNKNOWN), in one line.
    unreachable = tmp_path / "unreachable.toml"
    port = etcd.client_urls[0].rsplit(":", 1)[1]
    unreachable.write_text(cfg_path.read_text().replace(f":{port}", f":{free_ports(1)[0]}"))
    r = await vmha("status", "--config", str(unreachable))
    assert r.exit_code == 3, r.output
    assert r.output.startswith("VMHA UNKNOWN - cannot read etcd (https://") and len(r.output.splitlines()) == 1


async def test_recovery_list_shows_a_malformed_task_by_its_key(
    cfg_path: Path, leader: tuple[EtcdClient, Leadership], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, lead = leader
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    await TaskStore(client, KEYS).write(lead, {"vm1": _task("vm1", "evacuating"), "vm2": _task("vm2", "done")})
    await client.put(KEYS.task("vm3"), b'{"vm": "vm3", "state": "exploded"')  # not even JSON
    r = await vmha("recovery", "list", "--config", str(cfg_path))
    assert r.exit_code == 0, r.output
    rows = {cells[0]: cells[1:] for line in r.output.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 8}  # fmt: skip
    assert rows["vm1"][:5] == ["h1", "evacuating", "evacuate (fence-evacuate)", "host-dead", "to h2"]
    assert rows["vm2"][4] == "runs on h2"
    assert rows["vm1"][5].endswith("ago)") and "1970" in rows["vm1"][5]  # local time and relative, not 100.0
    assert rows[KEYS.task("vm3")][1] == "UNREADABLE" and "not JSON" in rows[KEYS.task("vm3")][6]
    r = await vmha("recovery", "list", "--config", str(cfg_path), "--json")
    data = json.loads(r.output)
    assert [t["vm"] for t in data["tasks"]] == ["vm1", "vm2"] and data["tasks"][0]["since"] == 0.0
    assert data["unreadable"] == [KEYS.task("vm3")] and "not JSON" in data["unreadable_why"][KEYS.task("vm3")]
