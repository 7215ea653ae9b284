"""Two real manager processes on a real etcd; the leader is SIGKILLed mid-queue.

Real: etcd, the managers (election, HealthMonitor, RecoveryCore, task store, records), the hosts'
heartbeats (the agent's PlaneHeartbeat code, run in this process). Test doubles: the compute driver
and the prover (recording_parts.py, whose main runs a Manager given them: the tests' entry point), since
what is tested is the queue surviving its manager, not compute or fencing.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from manager_config import config_text

from vmha.core.planes import PLANES, PlaneState
from vmha.core.queue import Step, Task
from vmha.etcd import health_store, hostids
from vmha.etcd.client import EtcdClient
from vmha.etcd.election import leader_name
from vmha.etcd.heartbeat import PlaneHeartbeat
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog, RecordStore
from vmha.etcd.registry import register
from vmha.etcd.tasks import TaskStore
from vmha.testing.etcd import EtcdProcess
from vmha.testing.proxy import TcpProxy
from vmha.testing.wait import until

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
CLUSTER = "vt5"
KEYS = Keys(CLUSTER)
HOSTS = ["h1", "h2", "h3", "h4"]
FAILED = "h1"
VMS = [f"vm{i:02d}" for i in range(1, 13)]  # all on h1
DELAY = 0.6  # each prove / evacuation takes this long: the queue runs for several seconds


def write_config(path: Path, name: str, etcd: EtcdProcess, url: str) -> Path:
    """Manager ``name``'s config, reaching etcd at ``url`` as etcd user ``name`` (its certificate)."""
    path.write_text(
        config_text(etcd, name, f"""[manager]
name = "{name}"
endpoints = ["{url}"]
driver = "lab"  # replaced by the recording double (recording_parts.py)
election_ttl = 3  # the least that outlasts an etcd leader election at etcd's default timeout
max_parallel = 2
max_per_host = 1
# A dead host's three heartbeat leases expire up to ~1 s apart; acting at the first DOWN would act
# on a partial row (e.g. service only: live-migrate). Hold the decision until the row settled.
decide_after = 1.0
[locks]  # the lockspace is the recording double's; the leader still allocates the hosts' host_ids
path = "{path.parent / "shared"}"
io_timeout = 1
""", cluster=CLUSTER, url=url)
    )
    return path


class ManagerProcess:
    def __init__(self, name: str, cfg: Path, workdir: Path) -> None:
        env = {
            **os.environ,
            "VMHA_TEST_DIR": str(workdir),
            "VMHA_TEST_DELAY": str(DELAY),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        self.name = name
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "recording_parts.py"), str(cfg)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def calls(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "calls.jsonl"
    # Whole lines only: polled while a manager may be appending one.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


async def sees_all_up(client: EtcdClient, manager: str) -> bool:
    """The manager's persisted health view holds every host, each plane UP: its monitor has seen them beat."""
    view = await health_store.load(client, KEYS)
    return sorted(view.hosts) == HOSTS and all(
        s.manager == manager and all(p.state == PlaneState.UP for p in s.health.planes.values())
        for s in view.hosts.values()
    )


async def heartbeats(etcd: EtcdProcess) -> AsyncIterator[dict[str, list[PlaneHeartbeat]]]:
    """Each host's heartbeats, as its agent sends them: with its own certificate (its etcd user)."""
    beats = {h: [PlaneHeartbeat(KEYS, h, p, etcd.client_urls, ttl=2, interval=0.5, tls=etcd.tls(h)) for p in PLANES]
             for h in HOSTS}
    for hb in (b for bs in beats.values() for b in bs):
        hb.start()
    try:
        yield beats
    finally:
        for hb in (b for bs in beats.values() for b in bs):
            await hb.stop(revoke=True)
            await hb.client.close()


def _log_time(log: Path, text: str) -> float:
    """Unix time of the first line of a manager log that contains `text` (logging's asctime)."""
    for line in log.read_text().splitlines():
        if text in line:
            return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{log.name}: no line with {text!r}")


@pytest.mark.parametrize("fault", ["kill", "partition"])
async def test_leader_lost_mid_queue(etcd: EtcdProcess, tmp_path: Path, fault: str) -> None:
    """kill: the leader is SIGKILLed. partition: the leader's path to etcd silently drops everything
    (a TCP proxy in between, blackholed) while its process runs on: it must stop acting by itself."""
    url = etcd.client_urls[0]
    proxy = await TcpProxy.to(url)
    (tmp_path / "state.json").write_text(
        json.dumps(
            {"hosts": HOSTS, "placement": dict.fromkeys(VMS, FAILED), "restarts": {}, "disabled": [], "down": []}
        )
    )
    client = EtcdClient([url], timeout=2.0, tls=etcd.tls())
    managers: list[ManagerProcess] = []
    beats_gen = heartbeats(etcd)
    try:
        # Auth on: each host and manager writes as itself, with what its role allows.
        await etcd.setup_auth(CLUSTER, HOSTS, ["mgr-a", "mgr-b"])
        # setup-auth allocated the hosts' sanlock host_ids; removed, so that what is checked below
        # is the leader allocating them for registered hosts (as for a host added later).
        await client.delete_prefix(KEYS.host_id_prefix)
        for h in HOSTS:
            await register(client, KEYS, h, "default")
        beats = await anext(beats_gen)
        a_url = proxy.url if fault == "partition" else url
        a = ManagerProcess("mgr-a", write_config(tmp_path / "a.toml", "mgr-a", etcd, a_url), tmp_path)
        managers.append(a)

        async def leader() -> str | None:
            return leader_name(await client.get(KEYS.leader))

        await until(lambda: _is(leader, "mgr-a"), "mgr-a to lead", timeout=20, interval=0.2)
        b = ManagerProcess("mgr-b", write_config(tmp_path / "b.toml", "mgr-b", etcd, url), tmp_path)
        managers.append(b)
        # b campaigns and stands by; a's monitor sees every host UP (its persisted view): the events,
        # not a fixed sleep, so that h1's crash below is seen by a leader that knew h1 was up.
        await until(lambda: "manager mgr-b: standby, leader is mgr-a" in b.log.read_text(), "mgr-b standing by",
                    timeout=20, interval=0.2)  # fmt: skip

        await until(lambda: sees_all_up(client, "mgr-a"), "mgr-a's view: every host UP", timeout=20, interval=0.2)

        async def host_ids_allocated() -> bool:
            return sorted((await hostids.host_ids(client, KEYS)).values()) == HOSTS

        # Only managers allocate host_ids (the agents read theirs): the leader gave each registered host one.
        await until(host_ids_allocated, "a host_id for every host, from the leader", timeout=10, interval=0.2)

        # h1 crashes: its heartbeats stop, its leases expire.
        for hb in beats[FAILED]:
            await hb.stop(revoke=False)

        async def evacuated_by_a() -> bool:
            return sum(1 for c in calls(tmp_path) if c["call"] == "evacuate" and c["phase"] == "end") >= 3

        await until(evacuated_by_a, "a few evacuations by the leader", timeout=60, interval=0.2)
        faulted = time.monotonic()
        if fault == "kill":
            a.proc.kill()  # SIGKILL, by PID, mid-queue
            a.proc.wait(5)
            left_by_a: dict[str, Task] | None = {t.vm: t for t in await TaskStore(client, KEYS).load()}
            assert len(left_by_a) == len(VMS), "every VM of the failed host had its task before the kill"
        else:
            await proxy.cut(blackhole=True)
            left_by_a = None  # a may still be finishing a write: its last state is not known here

        await until(lambda: _is(leader, "mgr-b"), "mgr-b to lead", timeout=20, interval=0.2)
        print(f"\nleader {fault} -> standby elected: {time.monotonic() - faulted:.2f} s (election_ttl 3)")

        async def all_done() -> bool:
            tasks = await TaskStore(client, KEYS).load()
            return len(tasks) == len(VMS) and all(t.state.value == "done" for t in tasks)

        await until(all_done, "every task done", timeout=90, interval=0.2)
        print(f"leader {fault} -> queue finished by the standby: {time.monotonic() - faulted:.2f} s")

        # No task lost: every VM restarted exactly once, off the failed host; each has its evidence.
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["restarts"] == dict.fromkeys(VMS, 1)
        assert all(state["placement"][vm] != FAILED for vm in VMS)
        records = RecordStore(client, KEYS)
        for vm in VMS:
            recs = await records.records(vm)
            assert [(r.recovery, r.state.value) for r in recs] == [(1, "done")], vm
            assert recs[0].proof is not None and recs[0].proof.host == FAILED

        all_calls = calls(tmp_path)
        b_calls = [c for c in all_calls if c["pid"] == b.proc.pid and c["phase"] == "start"]
        assert b_calls, "the standby did part of the queue"
        if left_by_a is not None:
            # None run twice: no step the killed leader had recorded as done was run by the new leader,
            # except that a proof the killed leader held is not the new leader's lease: a VM not yet on
            # its destination is proved (and released) again, and still restarted once (above).
            reproved = {c["vm"] for c in b_calls if c["call"] == "prove"}
            for c in b_calls:
                if "vm" in c:
                    step = Step(c["call"])
                    if c["vm"] in reproved and step in (Step.PROVE, Step.RELEASE):
                        continue
                    assert not left_by_a[c["vm"]].done(step), f"{c['vm']}: {step} repeated by the new leader"
        else:
            # The cut-off leader stopped acting before the standby was elected, and never acted again.
            lost = _log_time(a.log, "leadership lost")
            elected = _log_time(b.log, "elected leader")
            print(f"cut-off leader stopped {elected - lost:.2f} s before the standby was elected")
            assert lost < elected
            assert all(c["t"] < lost for c in all_calls if c["pid"] == a.proc.pid and c["phase"] == "start")
            assert a.proc.poll() is None, "the cut-off manager keeps running (as a candidate)"
        resumed = sorted({c["vm"] for c in b_calls if "vm" in c})
        print(f"VMs the standby worked on (in flight or not started at the {fault}): {resumed}")

        # The decision stream shows both leaders' work.
        shown, _ = await EventLog(client, KEYS).tail(1000)
        assert any("loaded 12 task(s)" in e.text for e in shown)

        # A clean stop resigns at once: the leader key goes with the revoked lease.
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
        assert await client.get(KEYS.leader) is None
    finally:
        for m in managers:
            m.stop()
        await beats_gen.aclose()
        await client.close()
        await proxy.close()
        for m in managers:
            if m.proc.returncode not in (0, -signal.SIGKILL):
                print(f"--- {m.name} (exit {m.proc.returncode}):\n{m.log.read_text()[-3000:]}")


async def _is(get: Any, expected: str) -> bool:
    return bool(await get() == expected)
