"""The etcd key layout of a vmha cluster; every key is built here.

/vmha/<cluster>/
  hosts/<host>                  host registration (domain, sanlock host_id), no lease
  hb/<host>/<plane>             heartbeat {"host","plane","seq","t"}, on that plane's lease
  health/<host>                 the manager's current health view of the host
  fabric/<plane>[/<domain>]     active fabric outages
  hostid/<n>                    sanlock host_id n -> host (create-if-absent allocation)
  manager/leader                leader election key (on the leader's lease)
  tasks/<vm>                    recovery queue: one task per VM, CAS on mod_revision
  records/<vm>/<n>              evidence record of recovery n of the VM
  events/<seq>                  decision stream for `vmha events` (bounded, oldest pruned)
  attest/req/<host>/<vm>        manager asks the host's agent to attest the VM's exit
  attest/resp/<host>/<vm>       the agent's answer
  disabled/<host>               hosts vmha disabled (re-enabled by `vmha host enable`)
  pause                         present while recoveries are paused cluster-wide (`vmha pause`)
  lab/...                       lab-only state (VM placement of the lab driver)
"""

from __future__ import annotations

from vmha.core.planes import Plane


class Keys:
    def __init__(self, cluster: str) -> None:
        self.root = f"/vmha/{cluster}/"

    def host(self, host: str) -> str:
        return f"{self.root}hosts/{host}"

    @property
    def hosts_prefix(self) -> str:
        return f"{self.root}hosts/"

    def heartbeat(self, host: str, plane: Plane) -> str:
        return f"{self.root}hb/{host}/{plane.value}"

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.root}hb/"

    def heartbeats_of(self, host: str) -> str:
        """Prefix of the host's heartbeat keys (its etcd role may write under it)."""
        return f"{self.heartbeat_prefix}{host}/"

    def parse_heartbeat(self, key: str) -> tuple[str, Plane] | None:
        """(host, plane) of a heartbeat key, None for anything else (logged and skipped by callers)."""
        if not key.startswith(self.heartbeat_prefix):
            return None
        parts = key[len(self.heartbeat_prefix) :].split("/")
        if len(parts) != 2:
            return None
        try:
            return parts[0], Plane(parts[1])
        except ValueError:
            return None

    def health(self, host: str) -> str:
        return f"{self.root}health/{host}"

    @property
    def health_prefix(self) -> str:
        return f"{self.root}health/"

    def fabric(self, plane: Plane, domain: str | None) -> str:
        return f"{self.root}fabric/{plane.value}" + (f"/{domain}" if domain else "")

    @property
    def fabric_prefix(self) -> str:
        return f"{self.root}fabric/"

    def host_id(self, n: int) -> str:
        return f"{self.root}hostid/{n}"

    @property
    def host_id_prefix(self) -> str:
        return f"{self.root}hostid/"

    @property
    def leader(self) -> str:
        return f"{self.root}manager/leader"

    def task(self, vm: str) -> str:
        return f"{self.root}tasks/{vm}"

    @property
    def tasks_prefix(self) -> str:
        return f"{self.root}tasks/"

    def record(self, vm: str, n: int) -> str:
        return f"{self.root}records/{vm}/{n:06d}"

    def records_prefix(self, vm: str | None = None) -> str:
        return f"{self.root}records/" + (f"{vm}/" if vm else "")

    def event(self, seq: int) -> str:
        return f"{self.root}events/{seq:012d}"

    @property
    def events_prefix(self) -> str:
        return f"{self.root}events/"

    def attest_request(self, host: str, vm: str) -> str:
        return f"{self.root}attest/req/{host}/{vm}"

    def attest_requests_prefix(self, host: str) -> str:
        return f"{self.root}attest/req/{host}/"

    def attest_response(self, host: str, vm: str) -> str:
        return f"{self.attest_responses_prefix(host)}{vm}"

    def attest_responses_prefix(self, host: str) -> str:
        return f"{self.root}attest/resp/{host}/"

    def disabled(self, host: str) -> str:
        return f"{self.root}disabled/{host}"

    @property
    def disabled_prefix(self) -> str:
        return f"{self.root}disabled/"

    def quarantined(self, host: str) -> str:
        """Present while the manager keeps the host out after repeated failures (until `vmha host enable`)."""
        return f"{self.root}quarantined/{host}"

    @property
    def quarantined_prefix(self) -> str:
        return f"{self.root}quarantined/"

    def maintenance(self, host: str) -> str:
        """Present while the operator keeps the host in maintenance (`vmha host maintenance`)."""
        return f"{self.root}maintenance/{host}"

    @property
    def maintenance_prefix(self) -> str:
        return f"{self.root}maintenance/"

    @property
    def pause(self) -> str:
        """Present while recoveries are paused cluster-wide (`vmha pause` / the API): the leader honours it."""
        return f"{self.root}pause"

    def driver(self, driver: str, *parts: str) -> str:
        """A compute driver's own records (the libvirt driver's inventory and host flags)."""
        return f"{self.root}driver/{driver}/" + "/".join(parts)

    def lab(self, *parts: str) -> str:
        return f"{self.root}lab/" + "/".join(parts)
