"""vmha's configuration: one TOML file, validated at start-up.

A wrong or missing field stops start-up with ConfigError, whose message names the file, the field
and the reason. Every daemon and command reads the same file; sections a process does not use may
be left out (an agent needs [host], a manager needs [manager]).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmha.core.health import HealthTimings
from vmha.core.planes import PLANES, Plane
from vmha.core.policy import DEFAULT_POLICY, PolicyError, PolicyTable
from vmha.core.recovery import RecoverySettings

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ConfigError(Exception):
    """A configuration that vmha refuses to start with; str() is the message for the operator."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConfig(_Strict):
    name: Name


class HostConfig(_Strict):
    name: Name
    domain: Name = "default"  # failure domain (rack / switch) for the fabric-outage guard


class PlaneEndpoints(_Strict):
    # etcd client URLs reachable through this plane only, so a working lease proves the path.
    endpoints: list[str] = Field(min_length=1)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not (url.startswith("http://") or url.startswith("https://")) or ":" not in url[8:]:
                raise ValueError(f"{url!r} is not an etcd URL of the form http://HOST:PORT")
        return v


class PlanesConfig(_Strict):
    management: PlaneEndpoints
    storage: PlaneEndpoints
    service: PlaneEndpoints

    def endpoints(self, plane: Plane) -> list[str]:
        ep: PlaneEndpoints = getattr(self, plane.value)
        return ep.endpoints


class Timings(_Strict):
    lease_ttl: int = Field(2, ge=2, le=60, description="etcd lease TTL per plane, whole seconds")
    keepalive_interval: float = Field(0.5, gt=0, le=20)
    suspect_after: float = Field(1.2, gt=0, description="heartbeat unchanged this long: SUSPECT")
    down_grace: float = Field(0.3, ge=0, description="lease gone this long: DOWN")
    fabric_window: float = Field(5.0, gt=0, description="losses of one plane this close count together")
    fabric_fraction: float = Field(0.5, gt=0, lt=1, description="more than this share lost: fabric")
    fabric_min_hosts: int = Field(3, ge=2, description="a fabric outage needs at least this many hosts")

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
    lockspace: Name = "vmha"
    io_timeout: int = Field(10, ge=1, le=60)
    max_hosts: int = Field(2000, ge=2, le=2000)  # sanlock's host_id range


class ManagerConfig(_Strict):
    name: Name
    endpoints: list[str] = Field(min_length=1)  # etcd, through the management plane
    # The compute driver (manager/daemon.py DRIVERS): no default, a production manager must not
    # drive the lab because a line was left out.
    driver: Literal["nova", "lab"]
    election_ttl: int = Field(2, ge=2, le=60)
    max_parallel: int = Field(8, ge=1)
    max_per_host: int = Field(4, ge=1, description="recoveries running towards one destination host")
    retry_base: float = Field(2.0, gt=0)
    retry_cap: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    # A dead host's three leases expire up to ~1 s apart: acting at the first DOWN decides on a
    # partial row (a live-migrate when only service had expired).
    decide_after: float = Field(1.0, ge=0, description="hold a host's new policy row this long before acting")
    settle_after: float = Field(
        5.0, ge=0, description="a host getting better acts on its new row only if it lasts this long"
    )
    recheck_timeout: float = Field(
        5.0, gt=0, description="host back before a proof: how long the lease-taken recheck may take"
    )
    power_fence: bool = False  # an out-of-band power fence is configured for every host
    allow_exit_attested: bool = True  # VM disks bypass the host page cache (cache=none / O_DIRECT)
    host_capacity: int = Field(0, ge=0, description="VMs per host; 0: unlimited")

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
        )


class AgentConfig(_Strict):
    # What the agent does with its HA VMs when it loses management and service but keeps storage.
    isolation_response: Literal["stop", "leave"] = "stop"
    isolation_after: float = Field(3.0, ge=0)


class NovaConfig(_Strict):
    cloud: str = "envvars"  # clouds.yaml entry
    ha_metadata_key: str = "HA_Enabled"
    ha_tag: str = "vmha"
    microversion: str = "2.94"  # 2.95+ leaves evacuated servers stopped
    # What vmha calls a VM (its sanlock lease name): the server id, or its name where the cloud keeps
    # server names unique (the lab with Nova: the server name is the lab VM's name).
    vm_names: Literal["id", "name"] = "id"


class Config(_Strict):
    cluster: ClusterConfig
    planes: PlanesConfig
    host: HostConfig | None = None
    timings: Timings = Timings()
    locks: LocksConfig | None = None
    manager: ManagerConfig | None = None
    agent: AgentConfig = AgentConfig()
    nova: NovaConfig = NovaConfig()
    policy: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_POLICY))
    # host -> {agent = "fence_ipmilan", ip = ..., ...}: power fencing (vmha.locks.power.fence_agents)
    power: dict[str, dict[str, str | int | bool]] = Field(default_factory=dict)

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
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
        suffix = "" if quiet else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{suffix}")
    return "\n".join(lines)


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(source, e)) from None


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config error: cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error in {p}: not valid TOML: {e}") from None
    return parse(data, str(p))


__all__ = ["PLANES", "Config", "ConfigError", "load", "parse"]
