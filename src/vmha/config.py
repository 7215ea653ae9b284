"""vmha's configuration: one TOML file, validated at start-up.

A wrong or missing field stops start-up with ConfigError, whose message names the file, the field
and the reason (`vmha config check FILE` prints every error). Every daemon and command reads the same
file; sections a process does not use may be left out (an agent needs [host], a manager needs
[manager]). Numbers are finite and bounded, fields that depend on each other are checked together,
and a file holding secrets (passwords) must not be readable by group or others.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmha.core.health import HealthTimings
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import DEFAULT_POLICY, PolicyError, PolicyTable
from vmha.core.settings import RecoverySettings
from vmha.etcd.client import parse_endpoint
from vmha.etcd.election import ride_out
from vmha.etcd.tls import TlsFiles

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # hosts, managers, clusters: also etcd users and key parts
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=f"^{NAME.pattern}$")]


def _etcd_url(url: str) -> str:
    parse_endpoint(url)  # ValueError naming the URL (its password redacted)
    return url


EtcdUrl = Annotated[str, AfterValidator(_etcd_url)]
Endpoints = Annotated[list[EtcdUrl], Field(min_length=1, max_length=16)]


# fence-agents' option names (see `fence_ipmilan -o metadata`): lowercase words joined by _.
PowerOption = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_USERINFO = re.compile(r"^[a-z]+://[^/@]*:[^/@]*@")  # scheme://user:password@
_URL_PASSWORD = re.compile(r"(://[^/@\s:'\"]*:)[^/@\s]*@")
_SECRET_OPTIONS = frozenset({"password", "passwd"})  # fence-agents' password options (the _script ones are paths)


# Every command reads this file unless VMHA_CONFIG names another; --config wins over both.
DEFAULT_PATH = Path("/etc/vmha/vmha.toml")
CONFIG_ENV = "VMHA_CONFIG"


def default_path() -> Path:
    """The config file a command reads when not given --config: $VMHA_CONFIG, else DEFAULT_PATH."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH)


class ConfigError(Exception):
    """A configuration that vmha refuses to start with; str() is the message for the operator."""


class _Strict(BaseModel):
    # allow_inf_nan=False: TOML's inf and nan are no timing vmha can honour.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClusterConfig(_Strict):
    name: Name


class HostConfig(_Strict):
    name: Name
    domain: Name = "default"  # failure domain (rack / switch) for the fabric-outage guard


class PlaneEndpoints(_Strict):
    # etcd client URLs reachable through this plane only, so a working lease proves the path.
    endpoints: Endpoints


class PlanesConfig(_Strict):
    management: PlaneEndpoints
    storage: PlaneEndpoints
    service: PlaneEndpoints

    def endpoints(self, plane: Plane) -> list[str]:
        ep: PlaneEndpoints = getattr(self, plane.value)
        return ep.endpoints


class EtcdConfig(_Strict):
    # This process's TLS files (PEM): the CA that signed etcd's server certificates, and the client
    # certificate etcd authenticates it by (its CN is the etcd user: the host, manager or operator).
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False  # true: http:// endpoints (plaintext, no client identity) are accepted
    # The etcd cluster's --election-timeout (etcd's default 1000 ms), in seconds: vmha cannot read it
    # from etcd; manager.election_ttl is checked against it.
    election_timeout: float = Field(1.0, gt=0, le=50, description="etcd's --election-timeout, seconds")

    def tls(self) -> TlsFiles | None:
        if self.ca is None or self.cert is None or self.key is None:
            return None
        return TlsFiles(self.ca, self.cert, self.key)


class Timings(_Strict):
    lease_ttl: int = Field(2, ge=2, le=60, description="etcd lease TTL per plane, whole seconds")
    keepalive_interval: float = Field(0.5, gt=0, le=20)
    suspect_after: float = Field(1.2, gt=0, le=120, description="heartbeat unchanged this long: SUSPECT")
    down_grace: float = Field(0.3, ge=0, le=60, description="lease gone this long: DOWN")
    fabric_window: float = Field(5.0, gt=0, le=600, description="losses of one plane this close count together")
    fabric_fraction: float = Field(0.5, gt=0, lt=1, description="more than this share lost: fabric")
    fabric_min_hosts: int = Field(3, ge=2, le=100_000, description="a fabric outage needs at least this many hosts")

    @model_validator(mode="after")
    def _coherent(self) -> Timings:
        if self.keepalive_interval * 2 > self.lease_ttl:
            raise ValueError(
                f"keepalive_interval ({self.keepalive_interval}) must be at most half of lease_ttl "
                f"({self.lease_ttl}), or one late keepalive expires the lease"
            )
        if self.suspect_after <= self.keepalive_interval:
            raise ValueError("suspect_after must be longer than keepalive_interval")
        return self

    def health(self) -> HealthTimings:
        return HealthTimings(**self.model_dump())


class LocksConfig(_Strict):
    # Directory on shared storage (same medium as the VM disks) holding the lockspace and lease files.
    path: Path
    lockspace: Annotated[Name, Field(max_length=48)] = "vmha"  # sanlock's names hold 48 bytes
    io_timeout: int = Field(10, ge=1, le=60)
    max_hosts: int = Field(2000, ge=2, le=2000)  # sanlock's host_id range
    # Whose leases protect the VMs. "vmha": <path>/<vm>.lease in `lockspace` (explicit <lease>
    # elements, the lab's VMs). "libvirt-disk": libvirt's automatic disk leases (qemu-sanlock.conf
    # auto_disk_leases = 1), for domains a cloud's compute service defines without <lease> (Nova):
    # `path` is libvirt's disk_lease_dir, the lockspace its __LIBVIRT__DISKS__, and a VM's lease the
    # one libvirt names after the VM's disk path, `vm_disk` with {vm} replaced by the VM's name.
    leases: Literal["vmha", "libvirt-disk"] = "vmha"
    vm_disk: str = Field("", max_length=4000, description="e.g. /var/lib/nova/instances/{vm}/disk")

    @model_validator(mode="after")
    def _lease_layout(self) -> LocksConfig:
        if self.leases == "vmha":
            if self.vm_disk:
                raise ValueError("vm_disk names libvirt's disk leases: set it only with leases = \"libvirt-disk\"")
            return self
        if "lockspace" in self.model_fields_set:
            raise ValueError("leases = \"libvirt-disk\" uses libvirt's lockspace __LIBVIRT__DISKS__: remove lockspace")
        rest = self.vm_disk.replace("{vm}", "")
        if not self.vm_disk.startswith("/") or self.vm_disk.count("{vm}") != 1 or "{" in rest or "}" in rest:
            raise ValueError(f'leases = "libvirt-disk" needs vm_disk, an absolute path with {{vm}} once (the VM '
                             f"disk's path in its domain XML, e.g. /var/lib/nova/instances/{{vm}}/disk), got "
                             f"{self.vm_disk!r}")
        return self


class ManagerConfig(_Strict):
    name: Name
    endpoints: Endpoints  # etcd, through the management plane
    # The compute driver (manager/daemon.py DRIVERS): no default, a production manager must not
    # drive the lab because a line was left out.
    driver: Literal["nova", "libvirt", "lab"]
    # The manager's term lease: a standby takes over this long (+ up to 0.5 s) after the leader died;
    # it must outlast an etcd leader election (checked against etcd.election_timeout). 4, not the 3
    # that check allows: at 3 a term rides out 2.2 s, 0.2 s above raft's nominal worst case, and CI's
    # loaded 2-core machine took 2.5 s to elect an etcd leader and ended the term (BENCHMARKS.md).
    election_ttl: int = Field(4, ge=2, le=60, description="the leader manager's lease TTL, whole seconds")
    max_parallel: int = Field(8, ge=1, le=10_000)
    max_per_host: int = Field(4, ge=1, le=10_000, description="recoveries running towards one destination host")
    retry_base: float = Field(2.0, gt=0, le=3600)
    retry_cap: float = Field(60.0, gt=0, le=86_400)
    max_attempts: int = Field(5, ge=1, le=1000)
    # A dead host's three leases expire up to ~1 s apart: acting at the first DOWN decides on a
    # partial row (a live-migrate when only service had expired).
    decide_after: float = Field(1.0, ge=0, le=600, description="hold a host's new policy row this long before acting")
    settle_after: float = Field(
        5.0, ge=0, le=3600, description="a host getting better acts on its new row only if it lasts this long"
    )
    recheck_timeout: float = Field(
        5.0, gt=0, le=3600, description="host back before a proof: how long the lease-taken recheck may take"
    )
    power_fence: bool = False  # an out-of-band power fence is configured for every host
    allow_exit_attested: bool = True  # VM disks bypass the host page cache (cache=none / O_DIRECT)
    host_capacity: int = Field(0, ge=0, le=100_000, description="VMs per host; 0: unlimited")
    rejoin_after: float = Field(
        60.0, ge=0, le=86400, description="a host vmha took out rejoins once healthy this long; 0: never"
    )
    quarantine_after: int = Field(
        3, ge=0, le=100, description="failures within quarantine_window that keep a host out; 0: never"
    )
    quarantine_window: float = Field(3600.0, gt=0, le=7 * 86400, description="seconds")
    on_agent_stop: Literal["drain", "alert"] = "alert"  # a clean agent stop: live-migrate its HA VMs first?
    restart_after: float = Field(
        20.0, ge=0, le=86400,
        description="a protected VM seen stopped this long, no recovery in flight, is restarted once proved; 0: never",
    )
    rebalance: bool = False  # once a host is a destination again, live-migrate VMs to even out the load
    rebalance_moves: int = Field(2, ge=1, le=1000, description="live migrations per rebalancing round")
    rebalance_cooldown: float = Field(300.0, ge=1, le=86400, description="seconds between rebalancing rounds")

    @model_validator(mode="after")
    def _coherent(self) -> ManagerConfig:
        if self.retry_cap < self.retry_base:
            raise ValueError(f"retry_cap ({self.retry_cap}) must be at least retry_base ({self.retry_base})")
        return self

    def recovery_settings(self) -> RecoverySettings:
        return RecoverySettings(
            max_parallel=self.max_parallel,
            max_per_host=self.max_per_host,
            retry_base=self.retry_base,
            retry_cap=self.retry_cap,
            max_attempts=self.max_attempts,
            decide_after=self.decide_after,
            settle_after=self.settle_after,
            power_fence=self.power_fence,
            allow_exit_attested=self.allow_exit_attested,
            host_capacity=self.host_capacity,
            recheck_timeout=self.recheck_timeout,
            rejoin_after=self.rejoin_after,
            quarantine_after=self.quarantine_after,
            quarantine_window=self.quarantine_window,
            on_agent_stop=self.on_agent_stop,
            restart_after=self.restart_after,
            rebalance=self.rebalance,
            rebalance_moves=self.rebalance_moves,
            rebalance_cooldown=self.rebalance_cooldown,
        )


class AgentConfig(_Strict):
    # What the agent does with its HA VMs when it loses management and service but keeps storage.
    isolation_response: Literal["stop", "leave"] = "stop"
    isolation_after: float = Field(3.0, ge=0, le=600)


class NovaConfig(_Strict):
    cloud: str = "envvars"  # clouds.yaml entry
    ha_metadata_key: str = "HA_Enabled"
    ha_tag: str = "vmha"
    microversion: str = "2.94"  # 2.95+ leaves evacuated servers stopped
    # What vmha calls a VM (its sanlock lease name): the server id, or its name where the cloud keeps
    # server names unique (the lab with Nova: the server name is the lab VM's name).
    vm_names: Literal["id", "name"] = "id"


class LibvirtConfig(_Strict):
    # Agent: it checks its host's libvirt lock settings at start (vmha.agent.libvirt_locks): QEMU must
    # hold its VM lease through libvirt's sanlock lock manager, or no proof is evidence.
    config_dir: Path = Path("/etc/libvirt")  # holds qemu.conf and qemu-sanlock.conf
    required: bool = True  # false: a host without qemu.conf (no libvirt) is protected all the same
    # Manager (driver = "libvirt"): host -> its libvirtd's URI over the management plane (qemu+tls://
    # or qemu+ssh://): the libvirt driver starts, destroys and live-migrates domains through them.
    hosts: dict[Name, str] = Field(default_factory=dict)
    # libvirt calls a live migration unsafe unless it knows the disks' filesystem as shared (NFS,
    # GFS2, OCFS2, CephFS, GlusterFS...; libvirt 9). Set true only where the storage is shared and
    # the disks use cache="none" (the lab's sshfs storage, which libvirt does not recognise).
    migrate_unsafe: bool = False

    @field_validator("hosts")
    @classmethod
    def _uris(cls, v: dict[str, str]) -> dict[str, str]:
        for host, uri in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9+]*://[^\s]*/system", uri):
                raise ValueError(f"{host}: {uri!r} is not a libvirt system URI (e.g. qemu+tls://HOST/system)")
        return v


def _public_url(url: str) -> str:
    """The API's address as people reach it: a plain http(s) URL, no credentials, query or fragment
    (it goes into every alert); without its trailing slash."""
    _webhook_url(url)
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        shown = _URL_PASSWORD.sub(r"\1***@", url)
        raise ValueError(f"{shown!r}: no user, password, query or fragment here (it is shown in every alert)")
    return url.rstrip("/")


RoleName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f,]+$")]


class KeystoneApiConfig(_Strict):
    # Keystone tokens on the API (vmha.api.keystone): a token in X-Auth-Token is validated against
    # Keystone with vmha's service user, whose credentials come from clouds.yaml (no secret here).
    cloud: str | None = Field(None, min_length=1, max_length=255, description="clouds.yaml entry; absent: [nova] cloud")
    interface: Literal["public", "internal", "admin"] = "public"  # the identity endpoint's, from the catalog
    # Only tokens scoped to this project count: a role elsewhere gives no role here.
    project: str = Field(min_length=1, max_length=64)
    project_domain: str = Field("Default", min_length=1, max_length=64)
    admin_roles: list[RoleName] = Field(default_factory=lambda: ["admin"], min_length=1, max_length=32)
    read_only_roles: list[RoleName] = Field(default_factory=lambda: ["reader"], min_length=1, max_length=32)
    # A valid token is trusted unasked this long (never past its expiry): a revocation waits as long.
    cache_ttl: float = Field(60.0, ge=0, le=3600, description="seconds")
    cache_size: int = Field(10_000, ge=1, le=1_000_000, description="tokens remembered at most")
    timeout: float = Field(5.0, gt=0, le=60, description="seconds one validation may take")

    @model_validator(mode="after")
    def _disjoint(self) -> KeystoneApiConfig:
        both = sorted(set(self.admin_roles) & set(self.read_only_roles))
        if both:
            raise ValueError(f"role(s) {', '.join(both)} in both admin_roles and read_only_roles")
        return self


class ApiConfig(_Strict):
    # The manager's REST API and dashboard (vmha.api): HTTPS only; bearer tokens from tokens_file,
    # one "TOKEN ROLE" a line (role read-only or admin), refused if group or others can read it.
    # [api.keystone]: Keystone tokens (X-Auth-Token) as well.
    listen: Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")] = "0.0.0.0:8443"
    cert: Path
    key: Path
    tokens_file: Path
    # The API's URL as operators reach it (a load balancer's, a DNS name): each alert links to its
    # evidence there. Absent: alerts carry no link.
    public_url: Annotated[str, Field(max_length=2000), AfterValidator(_public_url)] | None = None
    keystone: KeystoneApiConfig | None = None  # absent: file tokens only

    @field_validator("listen")
    @classmethod
    def _port(cls, v: str) -> str:
        if not 0 < int(v.rpartition(":")[2]) < 65536:
            raise ValueError(f"{v!r}: the port must be 1 to 65535")
        return v

    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class LoggingConfig(_Strict):
    # vmha.logsetup: "auto" is journald when stderr goes to the journal (under systemd), else text.
    format: Literal["auto", "text", "json", "journald"] = "auto"


class MetricsConfig(_Strict):
    # This process's Prometheus endpoint (vmha.metrics): "IP:port" or "[IPv6]:port", e.g. an address on
    # the management network.
    listen: str = Field(max_length=64)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _address(v)
        return v

    def address(self) -> tuple[str, int]:
        return _address(self.listen)


def _address(listen: str) -> tuple[str, int]:
    """'IP:port' or '[IPv6]:port' -> (IP, port); ValueError naming what is wrong."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{listen!r} is not IP:port ({host!r} is not an IP address)") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{listen!r}: the port must be 1-65535") from None
    return host, int(port)


def _webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or _CONTROL.search(url):
        shown = _URL_PASSWORD.sub(r"\1***@", url)
        raise ValueError(f"{shown!r} is not an http:// or https:// URL")
    return url


class AlertsConfig(_Strict):
    # The manager POSTs every alert as JSON to each URL (vmha.manager.webhooks).
    webhooks: list[Annotated[str, Field(max_length=2000), AfterValidator(_webhook_url)]] = Field(
        default_factory=list, max_length=16)
    attempts: int = Field(5, ge=1, le=100, description="tries per alert and URL")
    retry_base: float = Field(1.0, gt=0, le=600, description="seconds before the first retry, doubling")
    retry_cap: float = Field(60.0, gt=0, le=3600)
    timeout: float = Field(5.0, gt=0, le=60, description="seconds one POST may take")
    undelivered: Path = Path("/var/lib/vmha/undelivered-alerts.jsonl")  # alerts given up on, one JSON a line


def redact_transport(url: str) -> str:
    """A transport URL with the password of each host's user part replaced by ***."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return scheme + sep + re.sub(r"([^,@/:]*:)[^,@/]*@", r"\1***@", netloc) + slash + path


def _transport_url(url: str) -> str:
    """oslo.messaging's form, rabbit://USER:PASS@HOST:PORT[,USER:PASS@HOST2:PORT]/VHOST: a broker per
    host, tried in order; no query (oslo's driver options are not vmha's)."""
    shown = redact_transport(url)
    scheme, sep, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    if scheme not in ("rabbit", "amqp", "amqps") or not sep or _CONTROL.search(url) or " " in url:
        raise ValueError(f"{shown!r} is not a rabbit:// (or amqp://, amqps://) transport URL")
    if "?" in url or "#" in url:
        raise ValueError(f"{shown!r}: no query or fragment (oslo.messaging's driver options are not read)")
    for host in netloc.split(","):
        try:
            parts = urlsplit(f"amqp://{host}/")
            parts.port  # noqa: B018  (a bad port raises)
        except ValueError:
            parts = None
        if parts is None or not parts.hostname:
            raise ValueError(f"{shown!r}: {host.rpartition('@')[2]!r} is not HOST or HOST:PORT")
    if "/" in path:
        raise ValueError(f"{shown!r}: the virtual host is one path segment")
    return url


_BusName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.-]+$")]


class NotificationsConfig(_Strict):
    # Versioned notifications in Masakari's shape on the OpenStack message bus, for Nova deployments
    # (vmha.manager.notifications): the exchange and topic that oslo.messaging's notifier uses.
    transport_url: Annotated[str, Field(max_length=2000), AfterValidator(_transport_url)]
    topic: _BusName = "versioned_notifications"  # routing key TOPIC.PRIORITY, as oslo.messaging's
    exchange: _BusName = "vmha"  # oslo.messaging's control_exchange of the publishing service
    durable: bool = False  # the exchange and queues durable: the cloud's [oslo_messaging_rabbit] amqp_durable_queues
    attempts: int = Field(5, ge=1, le=100, description="tries per notification")
    retry_base: float = Field(1.0, gt=0, le=600, description="seconds before the first retry, doubling")
    retry_cap: float = Field(60.0, gt=0, le=3600)
    timeout: float = Field(5.0, gt=0, le=60, description="seconds one connect or publish may take")
    undelivered: Path = Path("/var/lib/vmha/undelivered-notifications.jsonl")  # given up on, one JSON a line


class Config(_Strict):
    cluster: ClusterConfig
    planes: PlanesConfig
    host: HostConfig | None = None
    timings: Timings = Timings()
    locks: LocksConfig | None = None
    manager: ManagerConfig | None = None
    agent: AgentConfig = AgentConfig()
    libvirt: LibvirtConfig | None = None  # absent: libvirt's lock settings are not checked
    nova: NovaConfig = NovaConfig()
    logging: LoggingConfig = LoggingConfig()
    etcd: EtcdConfig = EtcdConfig()
    metrics: MetricsConfig | None = None  # absent: no /metrics listener
    alerts: AlertsConfig = AlertsConfig()
    api: ApiConfig | None = None  # absent: the manager serves no API
    notifications: NotificationsConfig | None = None  # absent: nothing on the message bus
    policy: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_POLICY))
    # host -> {agent = "fence_ipmilan", ip = ..., ...}: power fencing (vmha.locks.power.fence_agents)
    power: dict[Name, dict[PowerOption, str | int | bool]] = Field(default_factory=dict)

    @field_validator("power")
    @classmethod
    def _power(cls, v: dict[str, dict[str, str | int | bool]]) -> dict[str, dict[str, str | int | bool]]:
        for host, options in v.items():
            for name, value in options.items():
                # Options go to the agent's stdin one "name=value" line each: a newline would add a line.
                if isinstance(value, str) and _CONTROL.search(value):
                    raise ValueError(f"[power.{host}] {name}: control characters (newlines) are not allowed")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Config:
        errors = []
        t = self.timings
        if self.locks is not None and t.lease_ttl >= 8 * self.locks.io_timeout:
            # A cut storage path must show as a storage lease expiry before sanlock's own lockspace
            # renewal fails (8 x io_timeout) and the host's watchdog acts on its VMs.
            errors.append(f"timings.lease_ttl ({t.lease_ttl}) must be shorter than 8 x locks.io_timeout "
                          f"({8 * self.locks.io_timeout} s)")  # fmt: skip
        if self.agent.isolation_after < t.lease_ttl:
            # A blip shorter than a lease TTL is invisible to the manager: an agent that stopped its
            # VMs for it would leave them stopped, with nobody to restart them.
            errors.append(f"agent.isolation_after ({self.agent.isolation_after}) must be at least "
                          f"timings.lease_ttl ({t.lease_ttl})")  # fmt: skip
        if self.manager is not None and self.manager.decide_after < t.keepalive_interval:
            # A dead host's leases expire up to a keepalive apart: a shorter hold decides on a
            # partial row (the first plane to expire).
            errors.append(f"manager.decide_after ({self.manager.decide_after}) must be at least "
                          f"timings.keepalive_interval ({t.keepalive_interval})")  # fmt: skip
        if self.manager is not None and ride_out(self.manager.election_ttl) < 2 * self.etcd.election_timeout:
            # raft draws each member's election timeout between 1x and 2x the configured one: a shorter
            # term ends on an etcd leader change, leaving no acting manager until the next one is elected.
            need = math.ceil(2 * self.etcd.election_timeout / ride_out(1))
            errors.append(f"manager.election_ttl ({self.manager.election_ttl}) must be at least {need} s to outlast "
                          f"an etcd leader election (up to 2 x etcd.election_timeout = "
                          f"{2 * self.etcd.election_timeout:g} s)")  # fmt: skip
        errors += self._etcd_errors()
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def etcd_urls(self) -> dict[str, list[str]]:
        """Every etcd endpoint list of the file, by field name."""
        urls = {f"planes.{p.value}.endpoints": self.planes.endpoints(p) for p in PLANES}
        if self.manager is not None:
            urls["manager.endpoints"] = self.manager.endpoints
        return urls

    def _etcd_errors(self) -> list[str]:
        e = self.etcd
        schemes = {u.partition("://")[0]: field for field, us in self.etcd_urls().items() for u in us}
        errors = []
        if "http" in schemes and not e.insecure:
            errors.append(f"{schemes['http']}: http:// etcd endpoints are plaintext: use https:// with "
                          f"etcd.ca, etcd.cert and etcd.key, or set etcd.insecure = true")  # fmt: skip
        if "http" in schemes and "https" in schemes:
            errors.append("etcd endpoints mix http:// and https://: use one scheme everywhere")
        if "https" in schemes and e.tls() is None:
            missing = [f"etcd.{f}" for f in ("ca", "cert", "key") if getattr(e, f) is None]
            errors.append(f"https:// etcd endpoints need {', '.join(missing)} (PEM files)")
        if "https" not in schemes and e.tls() is not None:
            errors.append("etcd.ca/cert/key are set but the endpoints are http://: use https://")
        return errors

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: dict[str, str]) -> dict[str, str]:
        merged = dict(DEFAULT_POLICY)
        merged.update(v)
        try:
            PolicyTable.parse(merged)
        except PolicyError as e:
            raise ValueError(str(e)) from e
        return merged

    @property
    def policy_table(self) -> PolicyTable:
        return PolicyTable.parse(self.policy)

    def require_host(self) -> HostConfig:
        if self.host is None:
            raise ConfigError("config: section [host] is missing (name, domain): the agent needs it")
        return self.host

    def require_manager(self) -> ManagerConfig:
        if self.manager is None:
            raise ConfigError("config: section [manager] is missing: the manager needs it")
        return self.manager

    def power_uncovered(self) -> str:
        """With power_fence on and the fence agents taken from this config: the error naming the hosts it
        lists (libvirt.hosts) that have no [power.HOST], '' if none. A host without one would be tried
        with the power method all the same and fail only when it is down."""
        listed = sorted(self.libvirt.hosts) if self.libvirt is not None else []
        missing = [h for h in listed if h not in self.power]
        if self.manager is None or not self.manager.power_fence or not missing:
            return ""
        return (f"manager.power_fence is on but {', '.join(missing)} (libvirt.hosts) "
                f"{'has' if len(missing) == 1 else 'have'} no [power.HOST] section")

    def require_locks(self) -> LocksConfig:
        if self.locks is None:
            raise ConfigError("config: section [locks] is missing (path, io_timeout): locks need it")
        return self.locks


def _format(source: str, err: ValidationError) -> str:
    lines = [f"config error in {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (misspelt?)"
        got = e.get("input")
        quiet = (e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
                 or any(str(p) in _SECRET_OPTIONS or p == "transport_url" for p in e["loc"]))  # fmt: skip
        suffix = "" if quiet else f" (got {got!r})"
        # A password in a URL is no business of the terminal or the log this message goes to.
        lines.append(_URL_PASSWORD.sub(r"\1***@", f"  {field}: {msg}{suffix}"))
    return "\n".join(lines)


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(source, e)) from None


def secrets(cfg: Config) -> list[str]:
    """Where the config holds secrets: passwords in endpoint URLs and in [power.HOST] options."""
    found = [f"{field} (a password in a URL)" for field, us in cfg.etcd_urls().items()
             if any(_USERINFO.search(u) for u in us)]  # fmt: skip
    found += [f"power.{host}.{name}" for host, options in sorted(cfg.power.items()) for name in sorted(options)
              if name in _SECRET_OPTIONS]  # fmt: skip
    if cfg.notifications is not None and _URL_PASSWORD.search(cfg.notifications.transport_url):
        found.append("notifications.transport_url (a password in a URL)")
    return found


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as e:
        hint = f" (no --config given: the default is ${CONFIG_ENV}, else {DEFAULT_PATH})" if p == default_path() else ""
        raise ConfigError(f"config error: cannot read {p}: {e.strerror}{hint}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error in {p}: not valid TOML: {e}") from None
    cfg = parse(data, str(p))
    tls = cfg.etcd.tls()
    refused = [] if tls is None else tls.problems()
    if refused:
        raise ConfigError(f"config error in {p}:\n" + "\n".join(f"  etcd.{u}" for u in refused))
    held = secrets(cfg)
    if held and mode & 0o077:
        raise ConfigError(f"config error in {p}: it holds secrets ({', '.join(held)}) and is readable by "
                          f"group or others (mode {mode & 0o777:o}): chmod 600 it")  # fmt: skip
    return cfg


__all__ = ["CONFIG_ENV", "DEFAULT_PATH", "PLANES", "AlertsConfig", "Config", "ConfigError", "MetricsConfig",
           "default_path", "load", "parse"]
