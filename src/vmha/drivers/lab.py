"""The lab compute driver: lab VMs are `vmha-vm` processes inside the lab's host namespaces.

Placement records live in etcd (keys.lab("vms", VM): {"vm", "host", "ha", "priority"}), host
records next to them (keys.lab("hosts", HOST): {"enabled", "forced_down", "reason"}); where a VM
really runs is where its process is (vmha.lab.procs). The lab itself (anchors of the hosts, paths)
is read from <lab dir>/lab.json, the directory given by VMHA_LAB_DIR (set by `vmha lab up` for the
managers it starts).

Starting a copy never bypasses the lease: vmha-vm takes the VM's sanlock lease before its first
write and exits (status 3) when it cannot, so a driver bug cannot make a split-brain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmha.drivers.base import DriverError, HostInfo, VmInfo
from vmha.etcd import values
from vmha.etcd.client import BadValue, EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.lab.net import LabError, pid_alive
from vmha.lab.procs import EXIT_LEASE_REFUSED, VmProcess, vm_processes
from vmha.lab.state import DEFAULT_DIR, LabState
from vmha.lab.vm import incoming_marker
from vmha.lab.vms import start_copy, writing_on

log = logging.getLogger("vmha.drivers.lab")

START_TIMEOUT = 30.0  # a copy takes its lease (sanlock acquire: ~1 s) and writes within this
MIGRATE_WAIT = 30.0  # a migration destination waits this long for the source to release


class LabDriver:
    name = "lab"

    def __init__(self, client: EtcdClient, keys: Keys, lab_dir: Path | None = None) -> None:
        self.client = client
        self.keys = keys
        self.lab_dir = lab_dir or Path(os.environ.get("VMHA_LAB_DIR", str(DEFAULT_DIR)))
        # Copies this driver started: polled so they do not linger as zombies once they exit.
        self._children: list[subprocess.Popen[bytes]] = []

    def state(self) -> LabState:
        try:
            return LabState.load(self.lab_dir)
        except LabError as e:
            raise DriverError(str(e), retryable=False) from None

    async def _json_prefix(self, prefix: str, model: type[values.LabHostValue | values.LabVmValue]
                           ) -> dict[str, dict[str, Any]]:
        """The records under prefix that `model` accepts (as stored: fields it does not know are kept)."""
        try:
            kvs, _ = await self.client.get_prefix(prefix)
        except EtcdError as e:
            raise DriverError(f"lab driver: etcd: {e}") from None
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            try:
                value = kv.json()
                values.parse(model, kv, value)
            except BadValue as e:
                values.refused(e, kv)  # skipped; `vmha lab status` shows what is left
                continue
            out[kv.key[len(prefix) :]] = value
        return out

    async def _put(self, key: str, value: dict[str, Any]) -> None:
        try:
            await self.client.put_json(key, value)
        except EtcdError as e:
            raise DriverError(f"lab driver: etcd: {e}") from None

    async def _host_record(self, host: str) -> dict[str, Any]:
        return (await self._json_prefix(self.keys.lab("hosts", ""), values.LabHostValue)).get(host, {})

    # ComputeDriver --------------------------------------------------------------------------------
    async def hosts(self) -> Sequence[HostInfo]:
        state = self.state()
        records = await self._json_prefix(self.keys.lab("hosts", ""), values.LabHostValue)
        out = []
        for name in sorted(state.hosts):
            ns = state.hosts[name]
            rec = records.get(name, {})
            up = ns.power == "on" and pid_alive(ns.anchor)
            out.append(HostInfo(name, enabled=bool(rec.get("enabled", True)), up=up,
                                forced_down=bool(rec.get("forced_down", False))))
        return out

    async def vms(self, host: str | None = None) -> Sequence[VmInfo]:
        state = self.state()
        placed = await self._json_prefix(self.keys.lab("vms", ""), values.LabVmValue)
        running = {(p.vm, p.host) for p in vm_processes(state.prefix) if p.active}
        out = []
        for vm in sorted(placed):
            rec = placed[vm]
            where = rec.get("host")
            if host is not None and where != host:
                continue
            out.append(VmInfo(vm, where if isinstance(where, str) else None, bool(rec.get("ha", True)),
                              int(rec.get("priority", 0)),
                              "running" if (vm, where) in running else "stopped"))
        return out

    async def disable_host(self, host: str, reason: str) -> None:
        rec = await self._host_record(host)
        await self._put(self.keys.lab("hosts", host), {**rec, "enabled": False, "reason": reason})

    async def mark_host_down(self, host: str) -> None:
        rec = await self._host_record(host)
        await self._put(self.keys.lab("hosts", host), {**rec, "enabled": False, "forced_down": True})

    async def enable_host(self, host: str) -> None:
        rec = await self._host_record(host)
        await self._put(self.keys.lab("hosts", host), {**rec, "enabled": True, "forced_down": False,
                                                        "reason": ""})

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        state = self.state()
        copies = self._copies(state, vm)
        elsewhere = [p for p in copies if p.host != source and p.active]
        if elsewhere:
            # Already done (a new leader repeating the step): report where it runs.
            await self._place(vm, str(elsewhere[0].host))
            return str(elsewhere[0].host)
        if any(p.host == source for p in copies):
            # The caller holds a fence proof, yet the old copy still runs: never start a second one.
            raise DriverError(f"evacuate {vm}: a copy still runs on {source} (pids "
                              f"{[p.pid for p in copies if p.host == source]}); refusing", retryable=True)
        errors: list[str] = []
        target = await self._start_first(state, vm, await self._targets(state, dest, exclude={source}), errors)
        if target is None:
            raise DriverError(f"evacuate {vm}: no host could run it: {'; '.join(errors)}")
        await self._place(vm, target)
        return target

    async def live_migrate(self, vm: str, source: str, dest: str | None) -> str:
        state = self.state()
        copies = [p for p in self._copies(state, vm) if p.active]
        if copies and all(p.host != source for p in copies):
            await self._place(vm, str(copies[0].host))
            return str(copies[0].host)
        if not copies:
            # Nothing to hand over: a VM that no longer runs needs a fence proof and an evacuation.
            raise DriverError(f"live migration of {vm}: no running copy on {source} to hand over")
        errors = []
        for target in await self._targets(state, dest, exclude={source}):
            started = time.time()
            proc = self._start(state, vm, target, incoming=MIGRATE_WAIT)
            try:
                await self._wait_incoming(state, vm, target, proc, started)
                break
            except DriverError as e:
                errors.append(str(e))
        else:
            raise DriverError(f"live migration of {vm}: no destination could take it: {'; '.join(errors)}")
        # Hand over: the source stops writing and releases; the destination then takes the lease.
        for p in copies:
            if p.host == source:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGUSR1)
        try:
            await self._wait_writing(state, vm, target, started, proc, MIGRATE_WAIT + START_TIMEOUT)
        except DriverError as e:
            # The source has stopped and released the lease but the destination copy died: the VM
            # runs nowhere. Restarting it is safe (the lease is free and every copy takes it first).
            await self._wait_gone(state, vm, source)
            errors = [f"the handover failed ({e})"]
            restarted = await self._start_first(state, vm, await self._targets(state, None, {source}), errors)
            if restarted is None:
                raise DriverError(f"{vm}: not running anywhere: {'; '.join(errors)}") from None
            # The task records a live migration; say plainly that the VM restarted (its state lost).
            log.warning("lab: vm=%s live migration from host=%s failed (%s): RESTARTED on host=%s, not migrated",
                        vm, source, e, restarted)  # fmt: skip
            target = restarted
        await self._place(vm, target)
        await self._wait_gone(state, vm, source)
        return target

    async def _start_first(self, state: LabState, vm: str, targets: list[str], errors: list[str]) -> str | None:
        """Starts the VM on the first of `targets` where a copy comes up writing; None if none did
        (the reasons are appended to `errors`)."""
        for target in targets:
            try:
                await self._start_and_wait(state, vm, target, incoming=0.0)
            except DriverError as e:
                errors.append(str(e))
                continue
            return target
        return None

    async def _wait_gone(self, state: LabState, vm: str, host: str) -> None:
        """Until the VM's copy on `host` has exited (it stopped writing before it released the lease)."""
        deadline = time.monotonic() + START_TIMEOUT
        while any(p.host == host for p in self._copies(state, vm)):
            if time.monotonic() > deadline:
                raise DriverError(f"live migration of {vm}: the source copy on {host} has not exited after "
                                  f"{START_TIMEOUT:.0f} s (it no longer holds the lease)")
            await asyncio.sleep(0.05)

    # helpers ---------------------------------------------------------------------------------------
    def _copies(self, state: LabState, vm: str) -> list[VmProcess]:
        self._children = [c for c in self._children if c.poll() is None]
        return [p for p in vm_processes(state.prefix) if p.vm == vm]

    async def _place(self, vm: str, host: str) -> None:
        placed = await self._json_prefix(self.keys.lab("vms", ""), values.LabVmValue)
        rec = placed.get(vm, {"vm": vm, "ha": True, "priority": 0})
        await self._put(self.keys.lab("vms", vm), {**rec, "host": host})

    async def _targets(self, state: LabState, dest: str | None, exclude: set[str]) -> list[str]:
        """[dest] when the caller chose one; else the enabled, powered hosts, least loaded first (ties:
        by name): the next is tried when one cannot run the copy (e.g. its lockspace is lost)."""
        if dest is not None:
            return [dest]
        load: dict[str, int] = {}
        for p in vm_processes(state.prefix):
            if p.host is not None:
                load[p.host] = load.get(p.host, 0) + 1
        candidates = [h.name for h in await self.hosts() if h.enabled and h.up and h.name not in exclude]
        if not candidates:
            raise DriverError("no enabled, powered lab host to run on")
        return sorted(candidates, key=lambda h: (load.get(h, 0), h))

    def _start(self, state: LabState, vm: str, host: str, incoming: float) -> subprocess.Popen[bytes]:
        try:
            proc = start_copy(state, vm, host, incoming)
        except (LabError, OSError) as e:
            raise DriverError(f"start {vm} on {host}: {e}") from None
        self._children.append(proc)
        return proc

    async def _wait_incoming(self, state: LabState, vm: str, host: str, proc: subprocess.Popen[bytes],
                             since: float) -> None:
        """Until the destination copy is up and waiting for the lease (its marker, seen through its
        own mount namespace), so the source stops only when the handover can follow at once. A free
        lease (the source already gone) is taken at once: then the copy is writing already."""
        marker = Path(f"/proc/{proc.pid}/root") / incoming_marker(vm).relative_to("/")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if marker.exists() or writing_on(state, vm, host, since):
                return
            code = proc.poll()
            if code is not None:
                raise DriverError(f"live migration of {vm}: destination copy on {host} exited ({code}) before the "
                                  "handover")
            await asyncio.sleep(0.02)
        proc.terminate()
        raise DriverError(f"live migration of {vm}: destination copy on {host} not ready in {START_TIMEOUT:.0f} s")

    async def _start_and_wait(self, state: LabState, vm: str, host: str, incoming: float) -> None:
        started = time.time()
        proc = self._start(state, vm, host, incoming)
        await self._wait_writing(state, vm, host, started, proc, START_TIMEOUT)

    async def _wait_writing(self, state: LabState, vm: str, host: str, since: float,
                            proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if writing_on(state, vm, host, since):
                return
            code = proc.poll()
            if code is not None:
                why = "its lease is held elsewhere" if code == EXIT_LEASE_REFUSED else f"exit {code}"
                raise DriverError(f"{vm} on {host} did not start: {why} (log: {state.logs}/vm-{vm}.log)")
            await asyncio.sleep(0.05)
        proc.terminate()
        raise DriverError(f"{vm} on {host}: no write within {timeout:.0f} s (log: {state.logs}/vm-{vm}.log)")
