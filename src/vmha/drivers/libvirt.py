"""The libvirt compute driver: plain libvirt/KVM clusters without OpenStack.

The manager reaches each host's libvirtd over the management plane with the URI the config gives
per host ([libvirt.hosts]: qemu+tls:// or qemu+ssh:// in production). Which domains are protected,
and their priority, come from the domain's own metadata:

    <metadata><vmha:protect xmlns:vmha="https://vmha.org/xmlns/domain/1" priority="5"/></metadata>

Inventory (etcd, keys.driver("libvirt", ...)): every protected domain seen running is recorded with
the host it runs on and its definition (XML), so that it can be started on a host it never ran on,
also when the host it ran on is gone; host flags (enabled, forced_down) live next to it, since
libvirt has no notion of a disabled host. Domains are started transient from the recorded
definition: a powered-off host keeps no stale definition that could come back.

Desired state (core/desired.py): like Proxmox's ha-manager, vmha keeps a protected domain running. A
recorded protected domain that its recorded host, answering, no longer runs (a guest crash, QEMU
killed, `virsh destroy` or shutdown outside vmha) is reported stopped, and the manager restarts it
once proved stopped; a host that cannot be asked is no evidence of a stop (domain_state). To stop
one for good, remove its metadata from the running domain first (`virsh metadata DOMAIN
https://vmha.org/xmlns/domain/1 --remove --live`) and stop it after the next inventory, which
drops its record.

Starting a guest never bypasses its lease: with libvirt's sanlock lock manager, libvirt acquires the
domain's lease before the guest's CPUs run and refuses to start it while another host holds it.
Every libvirt call is blocking: they run in a pool of their own, bounded by CALL_TIMEOUT, so an
unreachable host cannot starve the threads the sanlock calls use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt
from pydantic import ValidationError

from vmha.core.desired import STOPPED
from vmha.drivers.base import DriverError, HostInfo, VmInfo
from vmha.etcd import values
from vmha.etcd.client import BadValue, EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.values import DOMAIN_XML_MAX, LibvirtDomainValue, LibvirtHostValue

log = logging.getLogger("vmha.drivers.libvirt")

METADATA_NS = "https://vmha.org/xmlns/domain/1"
CALL_TIMEOUT = 30.0  # a libvirt call that changes something (create); a migration gets MIGRATE_TIMEOUT
QUERY_TIMEOUT = 3.0  # connecting to a host and listing its domains: a failed host must not stall a recovery
MIGRATE_TIMEOUT = 120.0
UNREACHABLE_RETRY = 5.0  # a host whose libvirtd did not answer is not asked again for this long
KEEPALIVE = (1, 3)  # libvirt keepalive: probe every 1 s, a connection with 3 unanswered probes is closed
T = TypeVar("T")
M = TypeVar("M", LibvirtDomainValue, LibvirtHostValue)


def protection(xml: str) -> int | None:
    """The domain's HA priority when its metadata protects it, else None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{{{METADATA_NS}}}protect")
    if el is None:
        return None
    try:
        return max(0, min(1000, int(el.get("priority", "0"))))
    except ValueError:
        return 0


def domain_state(vm: str, recorded: str, scan: Mapping[str, Mapping[str, str] | None]) -> str:
    """The state of a recorded protected domain that was not recorded as running in this scan:
    desired.STOPPED only when its recorded host answered and no host that answered runs it (a crash,
    a killed QEMU, `virsh destroy` or shutdown outside vmha: vmha restarts it, like Proxmox's
    ha-manager). A host that did not answer (scan None), or a domain of its name running anywhere
    (its definition refused, or its protection just removed), is no evidence of a stop: "unknown"."""
    if scan.get(recorded) is None or any(running and vm in running for running in scan.values()):
        return "unknown"
    return STOPPED


def protected_per_host(scan: Mapping[str, Mapping[str, str] | None],
                       records: Mapping[str, LibvirtDomainValue]) -> dict[str, int]:
    """Protected domains per host: those running there in this scan, and those recorded there and not
    seen running anywhere (a stopped one comes back where it was)."""
    seen = {vm: h for h, running in scan.items() for vm, xml in (running or {}).items() if protection(xml) is not None}
    out: dict[str, int] = {}
    for vm in set(seen) | set(records):
        host = seen.get(vm) or records[vm].host
        out[host] = out.get(host, 0) + 1
    return out


class LibvirtDriver:
    name = "libvirt"

    def __init__(self, client: EtcdClient, keys: Keys, uris: Mapping[str, str], *,
                 migrate_unsafe: bool = False) -> None:
        if not uris:
            raise DriverError("libvirt driver: no hosts configured ([libvirt.hosts])", retryable=False)
        self.client = client
        self.keys = keys
        self.uris = dict(uris)
        self.migrate_unsafe = migrate_unsafe
        self._conns: dict[str, Any] = {}
        self._unreachable: dict[str, float] = {}  # host -> monotonic time until which it is not asked
        # Threads stuck on an unreachable host's TCP connection must not block the others' calls.
        self._pool = ThreadPoolExecutor(max_workers=4 * len(uris) + 4, thread_name_prefix="libvirt")
        _start_event_loop()

    # blocking calls, off the event loop --------------------------------------------------------------
    async def _call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._pool, fn), timeout)

    async def _conn(self, host: str) -> Any:
        """The host's connection, opened on demand; DriverError when its libvirtd does not answer."""
        if host not in self.uris:
            raise DriverError(f"libvirt: host {host} is not in [libvirt.hosts]", retryable=False)
        conn = self._conns.get(host)
        if conn is not None:
            try:
                if await self._call(conn.isAlive):
                    return conn
            except (libvirt.libvirtError, TimeoutError):
                pass
            self._drop(host)
        if self._unreachable.get(host, 0.0) > time.monotonic():
            raise DriverError(f"libvirt: {host} ({self.uris[host]}) did not answer recently")

        def connect() -> Any:
            c = libvirt.open(self.uris[host])
            c.setKeepAlive(*KEEPALIVE)  # a host that stops answering fails its calls within seconds
            return c

        try:
            conn = await self._call(connect, QUERY_TIMEOUT)
        except (libvirt.libvirtError, TimeoutError) as e:
            self._unreachable[host] = time.monotonic() + UNREACHABLE_RETRY
            raise DriverError(f"libvirt: cannot reach {host} at {self.uris[host]}: {_why(e)}") from None
        self._unreachable.pop(host, None)
        self._conns[host] = conn
        return conn

    def _drop(self, host: str) -> None:
        conn = self._conns.pop(host, None)
        if conn is not None:
            self._pool.submit(_close, conn)

    async def _running(self, host: str) -> dict[str, str]:
        """Domains running on the host, protected or not: name -> definition (XML)."""
        conn = await self._conn(host)

        def scan() -> dict[str, str]:
            return {dom.name(): dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
                    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}

        try:
            return await self._call(scan, QUERY_TIMEOUT)
        except (libvirt.libvirtError, TimeoutError) as e:
            self._drop(host)
            self._unreachable[host] = time.monotonic() + UNREACHABLE_RETRY
            raise DriverError(f"libvirt: listing the domains of {host}: {_why(e)}") from None

    async def _scan(self) -> dict[str, dict[str, str] | None]:
        """Every host at once: its running domains, or None when it cannot be asked now."""
        hosts = sorted(self.uris)
        results = await asyncio.gather(*(self._running(h) for h in hosts), return_exceptions=True)
        out: dict[str, dict[str, str] | None] = {}
        for host, res in zip(hosts, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, DriverError):
                raise res
            out[host] = None if isinstance(res, BaseException) else res
        return out

    @staticmethod
    def _where(vm: str, scan: Mapping[str, Mapping[str, str] | None]) -> list[str]:
        """Hosts where the VM runs, of those that answer. One that does not answer may run it too: the
        lease, which libvirt takes before the CPUs run, keeps a second copy from starting."""
        return [h for h, doms in scan.items() if doms is not None and vm in doms]

    # inventory in etcd ------------------------------------------------------------------------------
    async def _records(self, kind: str, model: type[M]) -> dict[str, M]:
        """The driver's records of one kind that `model` accepts; a refused one is reported and skipped."""
        prefix = self.keys.driver(self.name, kind, "")
        try:
            kvs, _ = await self.client.get_prefix(prefix)
        except EtcdError as e:
            raise DriverError(f"libvirt driver: etcd: {e}") from None
        out: dict[str, M] = {}
        for kv in kvs:
            try:
                out[kv.key[len(prefix):]] = values.read(model, kv)
            except BadValue as e:
                values.refused(e, kv)
        return out

    async def _put(self, kind: str, name: str, value: dict[str, Any]) -> None:
        try:
            await self.client.put_json(self.keys.driver(self.name, kind, name), value)
        except EtcdError as e:
            raise DriverError(f"libvirt driver: etcd: {e}") from None

    @staticmethod
    def _domain(vm: str, records: Mapping[str, LibvirtDomainValue]) -> LibvirtDomainValue:
        rec = records.get(vm)
        if rec is None or protection(rec.xml) is None:
            raise DriverError(f"libvirt: no recorded definition of protected domain {vm}", retryable=False)
        return rec

    async def _place(self, vm: str, host: str, xml: str | None = None,
                     known: Mapping[str, LibvirtDomainValue] | None = None) -> None:
        """Records where the VM runs (and its definition, when given), unless recorded so already."""
        rec = (known if known is not None else await self._records("domains", LibvirtDomainValue)).get(vm)
        xml = xml or (rec.xml if rec else None)
        if xml is None:
            return
        new = LibvirtDomainValue(vm=vm, host=host, priority=protection(xml) or 0, xml=xml)
        if new != rec:
            await self._put("domains", vm, new.model_dump())

    # ComputeDriver ----------------------------------------------------------------------------------
    async def hosts(self) -> Sequence[HostInfo]:
        flags = await self._records("hosts", LibvirtHostValue)
        scan = await self._scan()
        out = []
        for host in sorted(self.uris):
            rec = flags.get(host, LibvirtHostValue())
            out.append(HostInfo(host, enabled=rec.enabled, up=scan[host] is not None, forced_down=rec.forced_down))
        return out

    async def vms(self, host: str | None = None) -> Sequence[VmInfo]:
        """Protected domains: those seen running now (recorded with their definition), and those
        recorded before and not seen running (see domain_state)."""
        records = await self._records("domains", LibvirtDomainValue)
        seen: dict[str, str] = {}
        xmls: dict[str, str] = {}
        scan = await self._scan()
        for h, running in scan.items():
            for vm, xml in (running or {}).items():
                if protection(xml) is None:
                    rec = records.get(vm)
                    if rec is not None and rec.host == h:
                        await self._unprotect(vm, h, records)
                    continue
                if len(xml) > DOMAIN_XML_MAX:
                    log.error("libvirt: domain %s on %s: definition of %d bytes refused (max %d)", vm, h,
                              len(xml), DOMAIN_XML_MAX)
                    continue
                try:
                    await self._place(vm, h, xml, records)
                except ValidationError as e:  # a name or definition vmha cannot record (a '/', too long)
                    log.error("libvirt: domain %r on %s: not recorded, skipped: %s", vm, h, e.errors()[0]["msg"])
                    continue
                seen[vm], xmls[vm] = h, xml
        out = []
        for vm in sorted(set(records) | set(seen)):
            rec = records.get(vm)
            where = seen.get(vm) or (rec.host if rec else None)
            if where is None or (host is not None and where != host):
                continue
            out.append(VmInfo(vm, where, True, protection(xmls[vm]) or 0 if vm in xmls else rec.priority if rec else 0,
                              "running" if vm in seen else domain_state(vm, where, scan)))
        return out

    async def _unprotect(self, vm: str, host: str, records: dict[str, LibvirtDomainValue]) -> None:
        """The recorded domain runs on its host without vmha's metadata: the operator removed its
        protection (the way to stop a protected domain for good). Its record goes, so that its stop is
        not taken for a crash."""
        try:
            await self.client.delete(self.keys.driver(self.name, "domains", vm))
        except EtcdError as e:
            raise DriverError(f"libvirt driver: etcd: {e}") from None
        del records[vm]
        log.info("libvirt: vm=%s host=%s runs without vmha:protect metadata: no longer protected, record "
                 "removed", vm, host)

    async def _flag(self, host: str, **change: Any) -> None:
        rec = (await self._records("hosts", LibvirtHostValue)).get(host, LibvirtHostValue())
        await self._put("hosts", host, rec.model_copy(update=change).model_dump())

    async def disable_host(self, host: str, reason: str) -> None:
        await self._flag(host, enabled=False, reason=reason)

    async def mark_host_down(self, host: str) -> None:
        await self._flag(host, enabled=False, forced_down=True)

    async def enable_host(self, host: str) -> None:
        await self._flag(host, enabled=True, forced_down=False, reason="")

    async def _targets(self, dest: str | None, exclude: set[str], scan: Mapping[str, Mapping[str, str] | None],
                       records: Mapping[str, LibvirtDomainValue]) -> list[str]:
        """[dest] when the caller chose one; else enabled, reachable hosts, least loaded first. From the
        caller's scan: one round of questions to every libvirtd per move, not one per step of it."""
        if dest is not None:
            return [dest]
        flags = await self._records("hosts", LibvirtHostValue)
        ok = [h for h in sorted(self.uris) if h not in exclude and scan.get(h) is not None
              and (f := flags.get(h, LibvirtHostValue())).enabled and not f.forced_down]
        if not ok:
            raise DriverError("libvirt: no enabled, reachable host to run on")
        per_host = protected_per_host(scan, records)
        return sorted(ok, key=lambda h: (per_host.get(h, 0), h))

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        began = time.monotonic()
        scan = await self._scan()
        running = self._where(vm, scan)
        if source in running:
            # The caller holds a fence proof, yet the old copy still runs: never start a second one.
            raise DriverError(f"evacuate {vm}: it still runs on {source}; refusing")
        if running:  # already done (a new leader repeating the step)
            await self._place(vm, running[0])
            return running[0]
        records = await self._records("domains", LibvirtDomainValue)
        rec = self._domain(vm, records)
        errors = []
        for target in await self._targets(dest, {source}, scan, records):
            try:
                conn = await self._conn(target)
                create = time.monotonic()
                await self._call(functools.partial(conn.createXML, rec.xml, 0))
                created = time.monotonic()
            except (DriverError, libvirt.libvirtError, TimeoutError) as e:
                errors.append(f"{target}: {_why(e)}")
                continue
            await self._place(vm, target, known=records)
            log.info("libvirt: %s started on %s in %.2f s (createXML %.2f s)", vm, target, created - began,
                     created - create)
            return target
        raise DriverError(f"evacuate {vm}: no host could start it: {'; '.join(errors)}")

    async def live_migrate(self, vm: str, source: str, dest: str | None) -> str:
        scan = await self._scan()
        running = self._where(vm, scan)
        if running and source not in running:
            await self._place(vm, running[0])
            return running[0]
        if source not in running:
            raise DriverError(f"live migration of {vm}: no running copy on {source} to move")
        conn = await self._conn(source)
        errors = []
        records = await self._records("domains", LibvirtDomainValue)
        for target in await self._targets(dest, {source}, scan, records):
            flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
            if self.migrate_unsafe:
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            try:
                dom = await self._call(lambda: conn.lookupByName(vm))
                if await self._call(dom.isPersistent):
                    flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                await self._call(functools.partial(dom.migrateToURI3, self.uris[target], {}, flags), MIGRATE_TIMEOUT)
            except (libvirt.libvirtError, TimeoutError) as e:
                errors.append(f"{target}: {_why(e)}")
                continue
            await self._place(vm, target, known=records)
            log.info("libvirt: %s live-migrated from %s to %s", vm, source, target)
            return target
        raise DriverError(f"live migration of {vm} from {source}: {'; '.join(errors)}")


_loop_started = False


def _start_event_loop() -> None:
    """libvirt's own event loop, in a daemon thread: it runs the connections' keepalive probes."""
    global _loop_started
    if _loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _loop_started = True


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, libvirt.libvirtError):
        return str(e.get_error_message() or e)
    return str(e)


def _close(conn: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
