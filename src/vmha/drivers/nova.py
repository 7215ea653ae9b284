"""The nova driver: ComputeDriver through openstacksdk, the only vmha module importing openstack.

Nova's rules this driver is built around (all seen against a real Nova API):
- evacuate is refused (400) while the source nova-compute service is up: it must be forced down,
  which the manager asks for only after a fence proof (mark_host_down);
- from microversion 2.95 an evacuated server stays stopped at the destination: the connection is
  pinned to config.nova.microversion (2.94), and a server that still ends SHUTOFF is started;
- un-forcing a repaired host is refused (400) until its nova-compute restarted and completed the
  evacuations from it: enable_host surfaces that as a non-retryable DriverError with the reason;
- near the end of a successful evacuation the server shows for a moment no task, ACTIVE, on the
  source host: success and failure are told apart by the migration record, not the server;
- disabling a host whose dead compute Nova still believes up saves the disable, then waits for
  an RPC answer up to rpc_response_timeout (60 s): the driver checks the saved state instead;
  once forced down (or seen down) Nova answers at once.

Desired state (core/desired.py): a protected server is reported desired.STOPPED only when Nova
shows it SHUTOFF, with no task, powered off (power_state SHUTDOWN or CRASHED), and the newest
"stop" in its action history was made by no user: that is the stop nova-compute's power-state sync
(or the libvirt lifecycle event) calls when the guest ended by itself - a crash, its QEMU killed, a
shutdown inside the guest. A stop through the API (`openstack server stop`, by its owner or an
admin) carries the caller's user id: that server is the operator's, reported SHUTOFF, and never
restarted (start it with `openstack server start`; to keep a self-stopped one down, remove its HA
flag first). Everything else is not "stopped": ERROR (a failed operation may leave the guest
running), PAUSED, SUSPENDED, SHELVED (user actions), any state Nova's API does not define (logged,
refused) and a server whose action history cannot be read now. A server on a down compute keeps
the last status that compute reported (ACTIVE while it is dead): the host's failure is the agents'
to detect and the fence proof's to settle, not the inventory's. A stopped server is started on its
own host (evacuate with dest == source: `start`) or, after a proof and mark down, evacuated and
started elsewhere.
openstacksdk blocks, so every call runs in a thread (asyncio.to_thread) under a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import keystoneauth1.exceptions as ks_exc
import openstack
import openstack.exceptions as os_exc

from vmha.config import NovaConfig
from vmha.core.desired import STOPPED
from vmha.drivers.base import DriverError, HostInfo, VmInfo

log = logging.getLogger("vmha.drivers.nova")

T = TypeVar("T")

COMPUTE_BINARY = "nova-compute"
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
# The recovery priority is the flavor extra spec vmha:priority=N: flavors and their extra specs are
# the operator's (admin-only in Nova's default policy), chosen by tenants only among those offered.
# Server metadata and tags are not: any tenant would set its own VMs first in line.
PRIORITY_SPEC = "vmha:priority"
# Nova answers these 400s when the source service is still up; the queue may retry once it is down.
_SERVICE_IN_USE = ("still in use", "ComputeServiceInUse")
_MIGRATION_TYPE = {"evacuation": "evacuation", "live migration": "live-migration"}
_MIGRATION_FAILED = frozenset({"failed", "error", "cancelled"})
_MIGRATION_ACTIVE = frozenset({"accepted", "pre-migrating", "running", "done"})
# Task states of an evacuation (a rebuild on another host) that is under way.
_REBUILDING = frozenset({"rebuilding", "rebuild_block_device_mapping", "rebuild_spawning"})
# The server statuses Nova's API defines; any other word is refused (never read as stopped).
NOVA_STATUSES = frozenset({
    "ACTIVE", "BUILD", "DELETED", "ERROR", "HARD_REBOOT", "MIGRATING", "PASSWORD", "PAUSED", "REBOOT", "REBUILD",
    "RESCUE", "RESIZE", "REVERT_RESIZE", "SHELVED", "SHELVED_OFFLOADED", "SHUTOFF", "SOFT_DELETED", "SUSPENDED",
    "UNKNOWN", "VERIFY_RESIZE",
})
# Nova's power states of a guest that no longer runs (nova.compute.power_state SHUTDOWN, CRASHED).
_POWERED_OFF = frozenset({4, 6})


def stop_by(actions: Sequence[Any]) -> str | None:
    """Who made the server's newest "stop" action: "" for Nova itself (its power-state sync calls
    the stop API with no user, null, when the guest ended by itself), the user id for an API stop,
    None when the history holds no stop."""
    newest = _newest([a for a in actions if getattr(a, "action", None) == "stop"])
    if newest is None:
        return None
    user = getattr(newest, "user_id", None)
    if user is None:
        return ""
    # Anything else that is no user id is not Nova's own stop either: never read as "ended by itself".
    return user if isinstance(user, str) and user else f"(unreadable user id {user!r})"


def _newest(actions: Sequence[Any]) -> Any:
    """The newest of the server actions (by start time; Nova lists them newest first, not promised)."""
    return max(actions, key=lambda a: str(getattr(a, "start_time", "") or ""), default=None)


def ended_by_itself(server: Any, actions: Sequence[Any]) -> bool:
    """Whether the server, with this action history, is desired.STOPPED."""
    return run_state(server.status, server.task_state, server.power_state, stop_by(actions)) == STOPPED


def run_state(status: object, task_state: object, power_state: object, stopped_by: str | None) -> str:
    """The VmInfo.state of a server: desired.STOPPED for a server that ended by itself (SHUTOFF, no
    task, powered off, its newest stop made by no user); "unknown" for a status Nova does not define;
    otherwise Nova's status (an operator's stop stays "SHUTOFF": not restarted)."""
    if not isinstance(status, str) or status not in NOVA_STATUSES:
        return "unknown"
    if status == "SHUTOFF" and task_state is None and power_state in _POWERED_OFF and stopped_by == "":
        return STOPPED
    return status


def connect(cloud: str | None = None, *, microversion: str = "2.94", api_timeout: float = 30.0, **options: Any) -> Any:
    """An openstacksdk connection with the compute API pinned to `microversion`.

    `cloud` names a clouds.yaml entry (OS_CLIENT_CONFIG_FILE or the standard places); `options` are
    passed to openstack.connect as they are (auth_type, auth, endpoint overrides...).
    """
    try:
        return openstack.connect(cloud=cloud, compute_api_version=microversion, api_timeout=api_timeout, **options)
    except os_exc.ConfigException as e:
        raise DriverError(
            f"nova: cannot load cloud {cloud!r} from clouds.yaml: {e} "
            "(set [nova] cloud to an entry of clouds.yaml, or OS_CLIENT_CONFIG_FILE)",
            retryable=False,
        ) from None


def _is_ha(server: Any, key: str, tag: str) -> bool:
    meta = server.metadata or {}
    if str(meta.get(key, "")).strip().lower() in _TRUE_WORDS:
        return True
    return tag in (server.tags or [])


def duplicate_names(servers: Sequence[Any]) -> dict[str, list[str]]:
    """name -> the sorted ids of the servers holding it, for the names more than one server holds."""
    ids: dict[str, list[str]] = {}
    for s in servers:
        ids.setdefault(str(s.name), []).append(str(s.id))
    return {name: sorted(held) for name, held in ids.items() if len(held) > 1}


def _extra_specs(server: Any) -> dict[str, Any]:
    """The extra specs of the server's flavor, as Nova embeds it in the server (microversion >= 2.47)."""
    flavor = server.flavor
    specs = flavor.get("extra_specs") if isinstance(flavor, dict) else getattr(flavor, "extra_specs", None)
    return specs if isinstance(specs, dict) else {}


def _retry_after(e: os_exc.HttpException) -> float:
    """The answer's Retry-After in seconds; 0 for none, an HTTP date, or a value no wait can be
    (negative, not a number): the queue's own backoff then decides."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    try:
        seconds = float(str(headers.get("Retry-After", "")))
    except (AttributeError, ValueError):
        return 0.0
    return seconds if 0.0 <= seconds < math.inf else 0.0


def _error(what: str, e: BaseException) -> DriverError:
    """Map an openstacksdk / keystoneauth failure to DriverError, deciding whether a retry can help."""
    if isinstance(e, os_exc.HttpException):
        code = e.status_code or 0
        detail = e.details or e.message
        text = f"nova: {what}: HTTP {code}: {detail}"
        if code == 400 and any(s in str(detail) for s in _SERVICE_IN_USE):
            # The source service is still up (not forced down yet, or un-forced meanwhile).
            return DriverError(text + " (the source compute service is still up: force it down first)")
        if code == 400 and "No valid host" in str(detail):
            # The scheduler found no room now (hosts disabled, full): capacity may come back.
            return DriverError(text)
        if code in (401, 403):
            return DriverError(text + " (check the credentials and the admin role)", retryable=False)
        if code == 409 and "vm_state" in str(detail):
            # Wrong VM state for the action (e.g. live-migrating a stopped server): a retry won't help.
            return DriverError(text, retryable=False)
        # 409: the server is busy with another task; 5xx and 429: the API is struggling.
        return DriverError(text, retryable=code in (409, 429) or code >= 500, retry_after=_retry_after(e))
    if isinstance(e, ks_exc.ConnectionError | ks_exc.RetriableConnectionFailure):
        return DriverError(f"nova: {what}: cannot reach the API: {e}")
    if isinstance(e, TimeoutError):
        return DriverError(f"nova: {what}: no answer in time")
    return DriverError(f"nova: {what}: {type(e).__name__}: {e}")


class NovaDriver:
    """ComputeDriver for OpenStack Nova. VM names are server ids (config.vm_names "id") or server names
    ("name": names must be unique, as in the lab: servers sharing a name are alerted and not protected);
    HA servers carry the metadata `config.ha_metadata_key`=True (as Masakari users set it) or the tag
    `config.ha_tag`; their recovery priority (higher first, default 0) is their flavor's extra spec
    vmha:priority=N (PRIORITY_SPEC)."""

    name = "nova"

    def __init__(
        self,
        config: NovaConfig | None = None,
        *,
        connection: Any = None,
        call_timeout: float = 30.0,
        evacuate_timeout: float = 300.0,
        migrate_timeout: float = 300.0,
        poll_interval: float = 1.0,
    ) -> None:
        self.config = config or NovaConfig()
        self.call_timeout = call_timeout
        self.evacuate_timeout = evacuate_timeout
        self.migrate_timeout = migrate_timeout
        self.poll_interval = poll_interval
        self._conn = connection
        self._ids: dict[str, str] = {}  # VM name -> server id (config.vm_names "name")
        self._duplicates: dict[str, list[str]] = {}  # name -> ids of the servers sharing it (alerted)
        # server id -> (its `updated` time, who made its newest stop): a history read once per change
        self._stops: dict[str, tuple[str, str | None]] = {}
        self._told: dict[str, str] = {}  # server id -> the state line last logged for it (once per change)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = connect(
                self.config.cloud, microversion=self.config.microversion, api_timeout=self.call_timeout
            )
        return self._conn

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking openstacksdk call in a thread, bounded by call_timeout."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), self.call_timeout)
        except DriverError:
            raise
        except (os_exc.SDKException, ks_exc.ClientException, TimeoutError) as e:
            raise _error(what, e) from e

    # --- reading -----------------------------------------------------------------------------------

    async def hosts(self) -> Sequence[HostInfo]:
        def run() -> list[Any]:
            return list(self.conn.compute.services(binary=COMPUTE_BINARY))

        services = await self._call("list compute services", run)
        return sorted(
            (
                HostInfo(
                    name=s.host,
                    enabled=s.status == "enabled",
                    up=s.state == "up",
                    forced_down=bool(s.is_forced_down),
                )
                for s in services
            ),
            key=lambda h: h.name,
        )

    async def vms(self, host: str | None = None) -> Sequence[VmInfo]:
        query: dict[str, Any] = {"details": True, "all_projects": True}
        if host is not None:
            query["compute_host"] = host

        def run() -> list[Any]:
            return list(self.conn.compute.servers(**query))

        servers = sorted(await self._call(f"list servers on {host or 'all hosts'}", run), key=lambda s: s.id)
        if self.config.vm_names == "name":
            servers = self._unique_names(servers)
        infos = [self._vm_info(s, await self._stopped_by(s)) for s in servers]
        if host is None:
            seen = {str(s.id) for s in servers}
            self._stops = {k: v for k, v in self._stops.items() if k in seen}
            self._told = {k: v for k, v in self._told.items() if k in seen}
        return infos

    async def _stopped_by(self, server: Any) -> str | None:
        """stop_by of a protected server that may have ended by itself (SHUTOFF, no task, powered off),
        its history read once per change of the server; None for every other server, and when the
        history cannot be read now (then it is not "stopped": the next inventory asks again)."""
        if not (_is_ha(server, self.config.ha_metadata_key, self.config.ha_tag) and server.status == "SHUTOFF"
                and server.task_state is None and server.power_state in _POWERED_OFF):
            return None
        sid, updated = str(server.id), str(server.updated_at or "")
        cached = self._stops.get(sid)
        if cached is not None and cached[0] == updated:
            return cached[1]
        try:
            who = stop_by(await self._actions(sid))
        except DriverError as e:
            log.warning("nova: vm=%s SHUTOFF, but its action history is unreadable (%s): not taken as stopped", sid, e)
            return None
        self._stops[sid] = (updated, who)
        return who

    async def _actions(self, sid: str) -> list[Any]:
        """The server's action history (`openstack server event list`)."""

        def run() -> list[Any]:
            return list(self.conn.compute.server_actions(sid))

        return await self._call(f"list actions of server {sid}", run)

    def _unique_names(self, servers: list[Any]) -> list[Any]:
        """The servers whose name no other server has. A name two servers share names no one VM (its
        lease, its recovery): those are alerted, once per change, and left unprotected, not resolved
        last-writer-wins."""
        shared = duplicate_names(servers)
        for name, ids in sorted(shared.items()):
            if self._duplicates.get(name) != ids:
                log.error("ALERT nova: %d servers are named %r (%s): [nova] vm_names = \"name\" needs unique "
                          "names; they are NOT protected until renamed", len(ids), name, ", ".join(ids))
            self._ids.pop(name, None)
        self._duplicates = shared
        unique = [s for s in servers if s.name not in shared]
        self._ids.update({s.name: str(s.id) for s in unique})
        return unique

    def _vm_info(self, server: Any, stopped_by: str | None) -> VmInfo:
        ha = _is_ha(server, self.config.ha_metadata_key, self.config.ha_tag)
        priority = 0
        raw = _extra_specs(server).get(PRIORITY_SPEC)
        if raw is not None:
            try:
                priority = int(str(raw))
            except ValueError:
                log.warning("nova: vm=%s flavor extra spec %s=%r is not an integer: priority 0 used "
                            "(set it to a whole number, higher recovers first)", server.id, PRIORITY_SPEC, raw)
        name = server.name if self.config.vm_names == "name" else server.id
        state = run_state(server.status, server.task_state, server.power_state, stopped_by)
        if ha:
            self._tell(server, state, stopped_by)
        return VmInfo(name=name, host=server.compute_host, ha=ha, priority=priority, state=state)

    def _tell(self, server: Any, state: str, stopped_by: str | None) -> None:
        """One log line when a protected server enters a state the desired state reads specially."""
        sid, host = str(server.id), server.compute_host
        if state == "unknown":
            line = (f"nova: vm={sid} host={host} status {server.status!r} is none Nova defines: "
                    "not taken as stopped, not restarted")
        elif state == STOPPED:
            line = (f"nova: vm={sid} host={host} SHUTOFF, stopped by Nova itself (no user: the guest ended by "
                    f"itself): runs nowhere, the desired state restarts it")
        elif state == "SHUTOFF":
            who = (f"stopped by user {stopped_by}" if stopped_by else
                   f"no stop by Nova itself (power_state {server.power_state}, newest stop: none)")
            line = f"nova: vm={sid} host={host} SHUTOFF, {who}: left stopped (an operator's stop)"
        elif state == "ERROR":
            line = (f"nova: vm={sid} host={host} ERROR: not taken as stopped (its guest may run), not restarted; "
                    f"an operator resets its state {_fault(server)}".rstrip())
        else:
            self._told.pop(sid, None)
            return
        if self._told.get(sid) != line:
            self._told[sid] = line
            (log.error if state == "unknown" else log.warning if state == "ERROR" else log.info)("%s", line)

    async def _sid(self, vm: str) -> str:
        """The server id of VM `vm` (itself, unless VMs are named by server name)."""
        if self.config.vm_names == "id":
            return vm
        if vm in self._ids:
            return self._ids[vm]

        def run() -> list[Any]:
            # Nova filters names by regular expression: anchor it, then keep exact matches only.
            return [s for s in self.conn.compute.servers(all_projects=True, name=f"^{re.escape(vm)}$") if s.name == vm]

        found = await self._call(f"find server named {vm}", run)
        if len(found) != 1:
            raise DriverError(
                f"nova: vm={vm}: {len(found)} servers of that name ([nova] vm_names = \"name\" needs exactly one)",
                retryable=False,
            )
        self._ids[vm] = str(found[0].id)
        return self._ids[vm]

    async def _server(self, vm: str) -> Any:
        return await self._call(f"get server {vm}", self.conn.compute.get_server, await self._sid(vm))

    async def _service(self, host: str) -> Any:
        def run() -> list[Any]:
            return list(self.conn.compute.services(host=host, binary=COMPUTE_BINARY))

        found = await self._call(f"find nova-compute on {host}", run)
        if not found:
            raise DriverError(
                f"nova: host {host}: no nova-compute service of that name "
                "(the host name must match `openstack compute service list`)",
                retryable=False,
            )
        return found[0]

    async def _last_migration(self, vm: str, kind: str) -> Any:
        sid = await self._sid(vm)

        def run() -> list[Any]:
            return list(self.conn.compute.migrations(server_id=sid, migration_type=kind))

        found = await self._call(f"list migrations of {vm}", run)
        return max(found, key=lambda m: (m.created_at or "", str(m.id)), default=None)

    async def _evacuation_in_flight(self, vm: str, source: str) -> bool:
        """An evacuation from `source` not finished yet, though the server may show no task: in its
        last moments ('done', host not yet switched), or between the API and the destination."""
        m = await self._last_migration(vm, "evacuation")
        return m is not None and m.source_compute == source and m.status in _MIGRATION_ACTIVE

    # --- host actions ----------------------------------------------------------------------------

    async def disable_host(self, host: str, reason: str) -> None:
        svc = await self._service(host)
        if svc.status == "disabled":
            # Nova refuses an update that changes only the reason (400 "No updates were requested").
            log.info("nova: host=%s already disabled (reason: %s)", host, svc.disabled_reason)
            return
        try:
            await self._call(
                f"disable nova-compute on {host}",
                self.conn.compute.disable_service,
                svc,
                disabled_reason=f"vmha: {reason}"[:255],
            )
        except DriverError as e:
            if not e.retryable:
                raise
            # Nova saves the disable, then tells the compute over RPC: a dead compute that Nova still
            # believes up (not forced down, heartbeat not yet stale) holds the answer for
            # rpc_response_timeout (60 s). The saved state is what matters.
            if (await self._service(host)).status != "disabled":
                raise
            log.warning("nova: host=%s disabled, but Nova's answer timed out (%s): its compute is unreachable", host, e)
            return
        log.info("nova: host=%s disabled (reason: %s)", host, reason)

    async def mark_host_down(self, host: str) -> None:
        """Force the service down, then disable it: after a fence proof the host takes no new VMs until
        `vmha host enable`, as Masakari leaves a failed host. Forced down first: Nova then answers the
        disable at once instead of waiting for the dead compute's RPC answer."""
        svc = await self._service(host)
        if not svc.is_forced_down:
            await self._call(
                f"force down nova-compute on {host}", self.conn.compute.update_service_forced_down, svc, forced=True
            )
        await self.disable_host(host, "fenced (fence proof held by vmha)")
        log.info("nova: host=%s forced down and disabled (fence proof held by the caller)", host)

    async def enable_host(self, host: str) -> None:
        svc = await self._service(host)
        if svc.is_forced_down:
            try:
                await self._call(
                    f"un-force nova-compute on {host}",
                    self.conn.compute.update_service_forced_down,
                    svc,
                    forced=False,
                )
            except DriverError as e:
                if "evacuation" in str(e):
                    # Nova keeps evacuation records 'done' until the old compute restarts and
                    # deletes its local copies; retrying before that changes nothing.
                    raise DriverError(
                        f"nova: host {host} cannot be brought back yet: {e} "
                        f"(restart nova-compute on {host} so it cleans up the evacuated servers, then retry)",
                        retryable=False,
                    ) from e
                raise
        svc = await self._service(host)
        await self._call(f"enable nova-compute on {host}", self.conn.compute.enable_service, svc)
        if svc.state != "up":
            # Nova tells the compute over RPC only when it sees it up; otherwise the placement trait
            # COMPUTE_STATUS_DISABLED stays until the compute's next periodic resource update.
            log.warning(
                "nova: host=%s enabled while Nova sees its compute down: no new VMs are scheduled to it "
                "before the compute reports again (update_resources_interval)",
                host,
            )
        else:
            log.info("nova: host=%s enabled (forced_down cleared)", host)

    # --- VM actions ------------------------------------------------------------------------------

    async def evacuate(self, vm: str, source: str, dest: str | None) -> str:
        """Elsewhere: Nova's evacuate (a rebuild), and a server that had ended by itself is started
        there. dest == source: a proved-stopped server is started again on its own host."""
        if dest == source:
            return await self._start_in_place(vm, source)
        server = await self._server(vm)
        # Evacuated at 2.94, a stopped server stays stopped there: the operator's stop is kept, a
        # guest that ended by itself is started (desired state).
        # The history read afresh (not the inventory's cache): an operator's stop made since is seen.
        start = server.status != "SHUTOFF" or ended_by_itself(server, await self._actions(str(server.id)))
        if server.compute_host != source and server.task_state is None and (
            server.status == "ACTIVE" or (server.status == "SHUTOFF" and not start)
        ):
            # Already done (a previous leader's attempt, or a retry after a lost answer).
            log.info("nova: vm=%s already on host=%s (not %s): evacuation done before", vm, server.compute_host, source)
            return str(server.compute_host)
        if server.task_state in _REBUILDING or (
            server.task_state is None and await self._evacuation_in_flight(vm, source)
        ):
            # An evacuation already in flight (a retry after a timeout or a lost answer): wait for it.
            # If its destination died, the server stays 'rebuilding' until an operator resets it.
            log.info("nova: vm=%s evacuation already in progress (task_state=%s): waiting", vm, server.task_state)
            return await self._wait_moved(vm, source, self.evacuate_timeout, "evacuation", start=True)
        if server.compute_host != source and server.task_state is None and server.status == "SHUTOFF":
            # Evacuated before (a lost answer), not started yet.
            return await self._wait_moved(vm, source, self.evacuate_timeout, "evacuation", start=True)
        if server.task_state is not None:
            # A task left over from the dead host (e.g. 'migrating' or 'powering-off') blocks the
            # evacuation with 409; resetting the state clears the task. The host is fenced already.
            log.info(
                "nova: vm=%s task_state=%s on fenced host=%s: reset state to active", vm, server.task_state, source
            )
            await self._call(f"reset state of {vm}", self.conn.compute.reset_server_state, server.id, "active")
        await self._call(
            f"evacuate {vm} from {source} to {dest or 'scheduler choice'}",
            self.conn.compute.evacuate_server,
            server.id,
            host=dest,
        )
        log.info("nova: vm=%s evacuate requested from host=%s to %s", vm, source, dest or "scheduler choice")
        return await self._wait_moved(vm, source, self.evacuate_timeout, "evacuation", start=start)

    async def _start_in_place(self, vm: str, host: str) -> str:
        """Start a server that ended by itself on its own host (the caller holds the proof that no copy
        runs). Idempotent: a server ACTIVE elsewhere, or ACTIVE here after a start (a previous attempt),
        is done; ACTIVE here with no start since is a guest Nova has not seen end yet: retried."""
        server = await self._server(vm)
        where, task, status = server.compute_host, server.task_state, server.status
        if where != host and task is None and status == "ACTIVE":
            log.info("nova: vm=%s already ACTIVE on host=%s: restart done before", vm, where)
            return str(where)
        if where != host:
            raise DriverError(f"nova: vm={vm} is on host {where}, not {host}: not restarted in place", retryable=False)
        if task == "powering-on":
            log.info("nova: vm=%s start already in progress on host=%s: waiting", vm, host)
        elif task is not None:
            raise DriverError(f"nova: vm={vm} is busy (task_state={task}): restart later")
        else:
            actions = await self._actions(str(server.id))
            last = getattr(_newest(actions), "action", None)
            if status == "ACTIVE" and last == "start":
                log.info("nova: vm=%s ACTIVE on host=%s after a start: restart done before", vm, host)
                return host
            if status == "ACTIVE":
                raise DriverError(f"nova: vm={vm} Nova still shows it ACTIVE on host={host} (newest action "
                                  f"{last}): its compute has not seen the guest end yet; restart later")
            if not ended_by_itself(server, actions):
                # An operator's stop since the inventory (or a state that is not "stopped"): theirs.
                raise DriverError(f"nova: vm={vm} on host={host} is {status} and did not end by itself "
                                  "(an operator's stop, or not stopped): not restarted", retryable=False)
            await self._call(f"start {vm}", self.conn.compute.start_server, server.id)
            log.info("nova: vm=%s start requested on its host=%s (ended by itself, proved stopped)", vm, host)
        deadline = time.monotonic() + self.evacuate_timeout
        while True:
            s = await self._server(vm)
            if s.task_state is None and s.status == "ACTIVE":
                log.info("nova: vm=%s restarted on host=%s", vm, s.compute_host)
                return str(s.compute_host)
            # The API sets task_state powering-on before it answers: no task and not ACTIVE is a failure.
            failed = s.task_state is None
            if failed or time.monotonic() >= deadline:
                why = "failed" if failed else f"not done after {self.evacuate_timeout:.0f} s"
                raise DriverError(f"nova: vm={vm} start on {host} {why}: host={s.compute_host} status={s.status} "
                                  f"task_state={s.task_state} {_fault(s)}".rstrip())
            await asyncio.sleep(self.poll_interval)

    async def live_migrate(self, vm: str, source: str, dest: str | None) -> str:
        _check_dest(vm, source, dest)
        server = await self._server(vm)
        if server.compute_host != source and server.task_state is None:
            log.info("nova: vm=%s already on host=%s (not %s): migration done before", vm, server.compute_host, source)
            return str(server.compute_host)
        if server.task_state not in (None, "migrating"):
            raise DriverError(f"nova: vm={vm} is busy (task_state={server.task_state}): live migration later")
        if server.task_state is None:
            await self._call(
                f"live-migrate {vm} from {source} to {dest or 'scheduler choice'}",
                self.conn.compute.live_migrate_server,
                server.id,
                host=dest,
                block_migration="auto",
            )
            log.info("nova: vm=%s live migration requested from host=%s to %s", vm, source, dest or "scheduler choice")
        return await self._wait_moved(vm, source, self.migrate_timeout, "live migration", start=False)

    async def _wait_moved(self, vm: str, source: str, timeout: float, what: str, *, start: bool) -> str:
        """Poll until the server runs on another host with no task; `start`: it must end ACTIVE.

        The server alone cannot tell a failure: near the end of a successful evacuation Nova shows
        it for a moment with no task, ACTIVE, still on the source host (seen against the real API).
        So the server's latest migration record of this kind decides: failed/error means failed.
        """
        kind = _MIGRATION_TYPE[what]
        deadline = time.monotonic() + timeout
        started = False
        while True:
            try:
                s = await self._server(vm)
                # Back on the source with no task: only the migration record tells done from failed.
                back = s.task_state is None and s.compute_host == source
                migration = await self._last_migration(vm, kind) if back else None
            except DriverError as e:
                if not e.retryable or time.monotonic() >= deadline:
                    raise
                # A read that failed (429, 5xx, no answer) says nothing of the move under way: read
                # again. Failing here would cost the queue an attempt per API hiccup while Nova works.
                log.warning("nova: vm=%s %s: reading its state failed (%s): polling again", vm, what, e)
                await asyncio.sleep(min(max(self.poll_interval, e.retry_after), deadline - time.monotonic()))
                continue
            host, task, status = s.compute_host, s.task_state, s.status
            if task is None and host != source:
                if status == "ACTIVE" or (status == "SHUTOFF" and not start):
                    log.info("nova: vm=%s %s done: host=%s status=%s", vm, what, host, status)
                    return str(host)
                if status == "SHUTOFF" and not started:
                    # Evacuated at microversion >= 2.95 (connection not pinned): start it.
                    log.info("nova: vm=%s evacuated but SHUTOFF on host=%s: starting it", vm, host)
                    await self._call(f"start {vm}", self.conn.compute.start_server, s.id)
                    started = True
                elif status == "ERROR":
                    raise DriverError(f"nova: vm={vm} {what} to {host} ended in ERROR {_fault(s)}".rstrip())
            elif back and (status == "ERROR" or (migration is not None and migration.status in _MIGRATION_FAILED)):
                state = "none" if migration is None else migration.status
                raise DriverError(
                    f"nova: vm={vm} {what} from {source} failed: status={status} migration={state} "
                    f"{_fault(s)}".rstrip()
                )
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"nova: vm={vm} {what} not finished after {timeout:.0f} s "
                    f"(host={host} status={status} task_state={task})"
                )
            await asyncio.sleep(self.poll_interval)


def _check_dest(vm: str, source: str, dest: str | None) -> None:
    if dest == source:
        raise DriverError(f"nova: vm={vm}: destination {dest} is the source host: pick another", retryable=False)


def _fault(server: Any) -> str:
    fault = server.fault or {}
    msg = fault.get("message") if isinstance(fault, dict) else None
    return f"(fault: {msg})" if msg else ""
