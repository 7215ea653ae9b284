"""LAB / TEST ONLY: Masakari (API and engine, masakari==22.0.0 from PyPI) on a running NovaRig.

    with NovaRig(hosts=...) as rig, Masakari(rig, MasakariSettings()) as m:
        seg = m.segment("bench", hosts)                   # every host in one 'auto' segment
        m.notify(host_failure_notification("cmp1", datetime.now(UTC)))

Masakari runs from the rig's venv (scripts/setup-nova.sh installs it there: its requirements add
packages to Nova 34's set and change none) on the rig's MariaDB (database `masakari`) and RabbitMQ.
Authentication, as the rig arranges it without Keystone: Masakari's API runs with its own noauth2
(every caller admin); its Nova client, which always authenticates its privileged user against
Keystone, gets the keystoneauth plugin vmha.lab.nova.masakari_auth instead (auth_type `vmha_rig`,
registered by an entry point written here): the same options, the rig's token "admin:admin" for
the Nova URL. Everything else is Masakari's own code with its own configuration.
Standard library only (this module runs in vmha's venv; Masakari's processes in the rig's).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from vmha.lab.nova.masakari_auth import ENTRY_POINT
from vmha.lab.nova.rig import SRC, NovaRig, RigError, _Proc, _wait, stop_procs
from vmha.testing.etcd import free_ports

# masakari-monitors' host monitor (hostmonitor/host_handler/handle_host.py, _make_event): a node
# gone offline is STOPPED; host_status NORMAL once IPMI confirms the power is off, else UNKNOWN,
# which the engine ignores ("unsafe evacuation").
HOST_STATUSES = ("NORMAL", "UNKNOWN")


@dataclass(frozen=True, slots=True)
class MasakariSettings:
    """The engine's waits and threads (masakari/conf/engine.py; defaults as shipped)."""

    wait_period_after_service_update: int = 180  # sleep after disabling the failed host's service
    host_failure_recovery_threads: int = 3  # evacuations at once, per notification
    # a failed notification (status error) is run once more by this periodic task
    process_unfinished_notifications_interval: int = 120
    wait_period_after_evacuation: int = 90  # per server: how long its evacuation is polled
    verify_interval: int = 1  # the poll period
    # the API sleeps up to this long (random) before it records a notification, without coordination
    notification_delay_max: int = 5

    @classmethod
    def shortest(cls) -> MasakariSettings:
        """The shortest waits the options accept: no sleep after the disable (no minimum declared),
        no random delay in the API (minimum 0). The rest as shipped: threads, the poll limit and
        period are no waits, and the periodic retry of a failed notification runs it only once more
        (then it is 'failed' for good), so a shorter spacing only fails sooner while Nova still
        sees the dead compute up."""
        return cls(wait_period_after_service_update=0, notification_delay_max=0)

    def label(self) -> str:
        return (f"wait_period_after_service_update={self.wait_period_after_service_update} "
                f"host_failure_recovery_threads={self.host_failure_recovery_threads} "
                f"process_unfinished_notifications_interval={self.process_unfinished_notifications_interval} "
                f"notification_delay_max={self.notification_delay_max}")


def host_failure_notification(host: str, generated: datetime, host_status: str = "NORMAL") -> dict[str, Any]:
    """The body masakari-monitors' host monitor POSTs to /v1/notifications when `host` goes offline."""
    if host_status not in HOST_STATUSES:
        raise ValueError(f"host_status must be one of {', '.join(HOST_STATUSES)}, got {host_status!r}")
    if generated.utcoffset() is not None:
        # The monitor sends oslo's utcnow(): naive UTC.
        generated = (generated - generated.utcoffset()).replace(tzinfo=None)  # type: ignore[operator]
    return {
        "notification": {
            "type": "COMPUTE_HOST",
            "hostname": host,
            "generated_time": generated.isoformat(),
            "payload": {"event": "STOPPED", "cluster_status": "OFFLINE", "host_status": host_status},
        }
    }


class Masakari:
    """masakari-api and masakari-engine for `rig`, started by start() (or `with`), stopped by stop()."""

    def __init__(self, rig: NovaRig, settings: MasakariSettings) -> None:
        self.rig = rig
        self.settings = settings
        self.dir = rig.dir / "masakari"
        self.port = free_ports(1)[0]
        self.procs: list[_Proc] = []

    @property
    def url(self) -> str:
        return f"http://{self.rig.bind}:{self.port}"

    def _write(self) -> Path:
        plugins = self.dir / "plugins" / "vmha_rig_auth-1.0.dist-info"
        plugins.mkdir(parents=True, exist_ok=True)
        # An installed-distribution record on the processes' path: stevedore finds the auth plugin there.
        (plugins / "METADATA").write_text("Metadata-Version: 2.1\nName: vmha-rig-auth\nVersion: 1.0\n")
        (plugins / "entry_points.txt").write_text(f"[keystoneauth1.plugin]\n{ENTRY_POINT}\n")
        s, rig = self.settings, self.rig
        conf = self.dir / "masakari.conf"
        conf.write_text(
            f"""[DEFAULT]
transport_url = {rig.transport_url}
auth_strategy = noauth2
masakari_api_listen = {rig.bind}
masakari_api_listen_port = {self.port}
masakari_api_workers = 1
os_privileged_user_name = admin
os_privileged_user_password = unused
os_privileged_user_tenant = admin
os_privileged_user_auth_url = {rig.nova_url}
os_region_name = RegionOne
wait_period_after_service_update = {s.wait_period_after_service_update}
host_failure_recovery_threads = {s.host_failure_recovery_threads}
process_unfinished_notifications_interval = {s.process_unfinished_notifications_interval}
wait_period_after_evacuation = {s.wait_period_after_evacuation}
verify_interval = {s.verify_interval}
notification_delay_max = {s.notification_delay_max}
debug = false
[wsgi]
api_paste_config = {rig.venv}/etc/masakari/api-paste.ini
[database]
connection = {rig.db_url("masakari")}
[taskflow]
connection = {rig.db_url("masakari")}
[keystone_authtoken]
auth_type = vmha_rig
[oslo_concurrency]
lock_path = {self.dir}/locks
"""
        )
        return conf

    def _env(self) -> dict[str, str]:
        return {"PYTHONPATH": f"{SRC}:{self.dir / 'plugins'}"}

    def start(self, timeout: float = 120.0) -> Masakari:
        """Database and schema, then API and engine, ready when the API answers; stops what started on failure."""
        if not (self.rig.venv / "bin" / "masakari-engine").exists():
            raise RigError(f"masakari: {self.rig.venv} has no Masakari: run scripts/setup-nova.sh first")
        try:
            conf = self._write()
            # A fresh database per start: no segment, host or notification of an earlier run.
            self.rig._sql("DROP DATABASE IF EXISTS masakari; CREATE DATABASE masakari")
            self.rig._run("masakari-manage db sync", ["masakari-manage", "--config-file", str(conf), "db", "sync"], 300)
            for name in ("masakari-api", "masakari-engine"):
                self.procs.append(self.rig._spawn(name, [name, "--config-file", str(conf)], **self._env()))
            _wait("masakari-api", lambda: self.rig._http_ok(self.url), timeout, self.procs)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            self.rig.procs.pop(p.name, None)
        stop_procs(procs, grace=3.0)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-Auth-Token": "admin:admin", "Content-Type": "application/json"},
        )
        with self.rig._net(), urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def segment(self, name: str, hosts: list[str]) -> str:
        """A failover segment (recovery_method auto: Nova's scheduler picks) holding `hosts`; its uuid."""
        seg = self.api("POST", "/v1/segments", {"segment": {
            "name": name, "service_type": "COMPUTE", "recovery_method": "auto",
            "description": "vmha bench"}})["segment"]  # fmt: skip
        for h in hosts:
            self.api("POST", f"/v1/segments/{seg['uuid']}/hosts",
                     {"host": {"name": h, "type": "COMPUTE", "control_attributes": "SSH"}})
        return str(seg["uuid"])

    def notify(self, body: dict[str, Any]) -> str:
        """POST the notification; its uuid."""
        return str(self.api("POST", "/v1/notifications", body)["notification"]["notification_uuid"])

    def notification(self, uuid: str) -> dict[str, Any]:
        got: dict[str, Any] = self.api("GET", f"/v1/notifications/{uuid}")["notification"]
        return got

    def __enter__(self) -> Masakari:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
