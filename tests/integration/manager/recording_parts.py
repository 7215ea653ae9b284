"""TEST ONLY: a recording compute driver and prover for `vmha manager` processes under test.

Run as the tests' manager entry point (`python recording_parts.py CONFIG`: a manager given these
parts), or imported by the command tests for its driver.
The failover test checks the recovery queue (no task lost, no finished step repeated,
no VM restarted twice), not compute or fencing, so both are doubles here:
- every call is appended to <VMHA_TEST_DIR>/calls.jsonl as {"pid", "call", "vm"/"host", "phase", "t"};
- the placement of the VMs lives in <VMHA_TEST_DIR>/state.json, shared by both managers under a
  file lock, so an evacuation repeated by a new leader behaves as a real driver's does (idempotent:
  a VM already moved off the source is not restarted again) and the test can count real restarts;
- each step takes VMHA_TEST_DELAY seconds, so a leader can be killed while steps are in flight.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmha.config import Config, load
from vmha.core.fencing import FenceProof, ProofMethod
from vmha.drivers.base import HostInfo, VmInfo
from vmha.etcd.client import EtcdClient
from vmha.manager.cli import serve
from vmha.manager.daemon import Parts

DIR = Path(os.environ.get("VMHA_TEST_DIR", "."))
DELAY = float(os.environ.get("VMHA_TEST_DELAY", "0.5"))


def record(call: str, phase: str, **fields: object) -> None:
    line = json.dumps({"pid": os.getpid(), "call": call, "phase": phase, "t": time.time(), **fields})
    with open(DIR / "calls.jsonl", "a") as f:  # O_APPEND: lines of both managers never interleave
        f.write(line + "\n")


def update_state(change: Callable[[dict[str, Any]], object]) -> object:
    with open(DIR / "state.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads((DIR / "state.json").read_text())
        result = change(state)
        tmp = DIR / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(DIR / "state.json")
        return result


def read_state() -> dict[str, Any]:
    return dict(json.loads((DIR / "state.json").read_text()))


class RecordingDriver:
    name = "recording"

    async def hosts(self) -> Sequence[HostInfo]:
        s = read_state()
        return [HostInfo(h, enabled=h not in s["disabled"], up=True, forced_down=h in s["down"]) for h in s["hosts"]]

    async def vms(self, host: str | None = None) -> Sequence[VmInfo]:
        s = read_state()
        return [VmInfo(vm, h, ha=True) for vm, h in sorted(s["placement"].items()) if host in (None, h)]

    async def _host_call(self, call: str, host: str, key: str) -> None:
        record(call, "start", host=host)

        def change(s: dict[str, Any]) -> None:
            if host not in s[key]:
                s[key].append(host)

        update_state(change)
        record(call, "end", host=host)

    async def disable_host(self, host: str, reason: str) -> None:
        await self._host_call("disable_host", host, "disabled")

    async def mark_host_down(self, host: str) -> None:
        await self._host_call("mark_host_down", host, "down")

    async def enable_host(self, host: str) -> None:
        record("enable_host", "start", host=host)

    async def _move(self, call: str, vm: str, source: str, dest: str | None) -> str:
        record(call, "start", vm=vm, source=source, dest=dest)
        await asyncio.sleep(DELAY)

        def change(s: dict[str, Any]) -> tuple[str, bool]:
            if s["placement"][vm] != source:
                return s["placement"][vm], False  # already moved: what a real driver reports
            s["placement"][vm] = dest or "anywhere"
            s["restarts"][vm] = s["restarts"].get(vm, 0) + 1
            return s["placement"][vm], True

        where, moved = update_state(change)  # type: ignore[misc]
        record(call, "end", vm=vm, dest=where, moved=moved)
        return str(where)

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        return await self._move("evacuate", vm, source, dest)

    async def live_migrate(self, vm: str, source: str, dest: str | None) -> str:
        return await self._move("live_migrate", vm, source, dest)


class RecordingFencer:
    async def prove(self, vm: str, host: str, methods: Sequence[ProofMethod], timeout: float) -> FenceProof:
        started = time.time()
        record("prove", "start", vm=vm, host=host)
        await asyncio.sleep(DELAY)
        record("prove", "end", vm=vm, host=host)
        return FenceProof(vm, host, methods[-1], started, time.time(), {"test": "recording double"})

    async def release(self, vm: str) -> None:
        record("release", "start", vm=vm)
        record("release", "end", vm=vm)


async def parts(cfg: Config, client: EtcdClient) -> Parts:
    return Parts(RecordingDriver(), RecordingFencer())


if __name__ == "__main__":
    # The tests' manager entry point: `python recording_parts.py CONFIG` runs a manager with these parts.
    serve(load(sys.argv[1]), parts)
