"""LAB / TEST ONLY: NovaRig, a real Nova control plane on loopback, started and stopped by PID.

    with NovaRig(hosts=("cmp1", "cmp2", "cmp3")) as rig:   # about a minute to start
        rig.clouds_yaml, rig.cloud                          # for openstacksdk / vmha's nova driver
        rig.kill_compute("cmp1"); rig.start_compute("cmp1")

Processes: MariaDB (127.0.0.1), epmd + RabbitMQ (127.0.0.1), Glance/Neutron stand-ins, placement
and nova-api under gunicorn, nova-conductor, nova-scheduler, one nova-compute per host with the
rig's fake virt driver (each its own `host` and `state_path`). Authentication: no Keystone; the
rig's paste filter (vmha.lab.nova.auth) turns a token "user:project[:roles]" into identity
headers, and placement runs with noauth2. Nova's default policy holds, except that project members
may boot on a named host (policy.yaml), so tests place servers of several projects. Every process
is started in a session of its own and stopped by its process group id (SIGTERM, then SIGKILL),
so nothing outlives stop().
Needs scripts/setup-nova.sh (Debian packages and the venv, VMHA_NOVA_VENV, default /opt/vmha-nova).
Standard library only: this module runs in vmha's venv.

`python -m vmha.lab.nova.rig [--hosts cmp1,cmp2,cmp3] [--dir DIR]` starts a rig, prints how to
reach it and runs until interrupted, then stops everything.

In the lab (`vmha lab up --nova`, vmha.lab.novalab) the same rig runs inside the controller's
namespaces: `bind` is the controller's management address, `enter` the command prefix that enters
its namespaces, `netns` the namespace the rig's own probes connect from, and computes=False: the lab
starts one nova-compute per host inside the host's namespaces (compute_command, compute_env). The
rig's ports and address are kept in rig.json so later lab commands reach it again (NovaRig.attach).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from vmha.lab.net import in_netns
from vmha.testing.etcd import free_ports

VENV = Path(os.environ.get("VMHA_NOVA_VENV", "/opt/vmha-nova"))
SRC = Path(__file__).resolve().parents[3]  # the directory holding the vmha package
IMAGE_ID = "6f7b9c1e-2d3a-4b5c-8d9e-0a1b2c3d4e5f"
FLAVOR = "rig.small"
ADMIN_TOKEN = "admin:admin"
CLOUD = "vmha-rig"  # the rig's entry in its clouds.yaml
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = "/usr/bin/epmd"
SYNC_POWER_STATE_INTERVAL = 3  # seconds


class RigError(RuntimeError):
    """The rig could not start (the message names the step and carries the log tail)."""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Proc:
    """One rig process in a session of its own: stop() signals its whole process group."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        # The group may hold children (gunicorn workers, Erlang helpers) after the leader exited.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_procs(procs: Iterable[_Proc], grace: float = 5.0) -> None:
    """SIGTERM every group, wait up to `grace` for all, SIGKILL what is left, reap the leaders."""
    procs = list(procs)
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.group_alive() for p in procs):
        for p in procs:
            p.popen.poll()  # reap the leader so its group can end
        time.sleep(0.1)
    for p in procs:
        if p.group_alive():
            p.signal(signal.SIGKILL)
    for p in procs:
        try:
            p.popen.wait(5)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(5)
    # Members of a group may outlive the leader's reaping by a moment: wait for them, bounded.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.group_alive() for p in procs):
        time.sleep(0.05)


def _wait(
    what: str, check: Callable[[], bool], timeout: float, procs: Sequence[_Proc] = (), step: float = 0.3
) -> float:
    """Poll `check` until true; fail early when one of `procs` died. Returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        for p in procs:
            if not p.alive():
                raise RigError(f"rig: {p.name} exited ({p.popen.returncode}) while waiting for {what}:\n{_tail(p.log)}")
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            logs = "\n".join(f"--- {p.name}:\n{_tail(p.log)}" for p in procs)
            raise RigError(f"rig: {what} not ready after {timeout:.0f} s\n{logs}")
        time.sleep(step)


class NovaRig:
    def __init__(
        self,
        hosts: Sequence[str] = ("cmp1", "cmp2", "cmp3"),
        workdir: str | Path | None = None,
        venv: Path = VENV,
        report_interval: int = 5,
        service_down_time: int = 30,
        bind: str = "127.0.0.1",
        enter: Sequence[str] = (),
        netns: str | None = None,
        computes: bool = True,
    ) -> None:
        self.hosts = tuple(hosts)
        self.bind = bind
        self.enter = list(enter)
        self.netns = netns
        self.own_computes = computes
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="vmha-nova-")) if workdir is None else Path(workdir)
        self.venv = venv
        self.report_interval = report_interval
        self.service_down_time = service_down_time
        names = ("db", "amqp", "epmd", "dist", "placement", "nova", "glance", "neutron")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.procs: dict[str, _Proc] = {}
        self.computes: dict[str, _Proc] = {}
        self.timings: dict[str, float] = {}
        self.cloud = CLOUD
        self._lock = threading.Lock()

    # --- addresses -------------------------------------------------------------------------------

    @property
    def nova_url(self) -> str:
        return f"http://{self.bind}:{self.ports['nova']}/v2.1"

    @property
    def placement_url(self) -> str:
        return f"http://{self.bind}:{self.ports['placement']}"

    @property
    def clouds_yaml(self) -> Path:
        return self.dir / "clouds.yaml"

    @property
    def transport_url(self) -> str:
        return f"rabbit://guest:guest@{self.bind}:{self.ports['amqp']}/"

    def db_url(self, name: str) -> str:
        return f"mysql+pymysql://root@{self.bind}:{self.ports['db']}/{name}?charset=utf8"

    def connect_options(self, token: str = ADMIN_TOKEN) -> dict[str, Any]:
        """openstack.connect() arguments for `token` ("user:project[:roles]") on this rig."""
        return {
            "auth_type": "admin_token",
            "auth": {"endpoint": self.nova_url, "token": token},
            "compute_endpoint_override": self.nova_url,
            "region_name": "RegionOne",
        }

    # --- files -----------------------------------------------------------------------------------

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON"))}
        env.update(
            PATH=f"{self.venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            PYTHONPATH=str(SRC),
            OS_NOVA_CONFIG_DIR=str(self.dir / "etc" / "nova"),
            OS_PLACEMENT_CONFIG_DIR=str(self.dir / "etc" / "placement"),
        )
        env.update(extra)
        return env

    def _write_configs(self) -> None:
        etc = self.dir / "etc"
        (etc / "nova").mkdir(parents=True, exist_ok=True)
        (etc / "placement").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        p = self.ports
        admin_auth = f"auth_type = admin_token\ntoken = {ADMIN_TOKEN}\nregion_name = RegionOne\n"
        (etc / "nova" / "nova.conf").write_text(
            f"""[DEFAULT]
transport_url = {self.transport_url}
state_path = {self.dir}/state
my_ip = {self.bind}
host = controller
compute_driver = vmha_lab.LabFakeDriver
report_interval = {self.report_interval}
service_down_time = {self.service_down_time}
heal_instance_info_cache_interval = -1
# A re-enabled host whose compute Nova saw down keeps its COMPUTE_STATUS_DISABLED trait (no
# scheduling to it) until this periodic resource update: 60 s by default, 10 s in the rig.
update_resources_interval = 10
use_rootwrap_daemon = false
debug = false
[api]
auth_strategy = keystone
[api_database]
connection = {self.db_url("nova_api")}
[database]
connection = {self.db_url("nova")}
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1
[quota]
driver = nova.quota.NoopQuotaDriver
[oslo_concurrency]
lock_path = {self.dir}/state/locks
[oslo_messaging_notifications]
driver = noop
[oslo_policy]
enforce_scope = true
enforce_new_defaults = true
policy_file = policy.yaml
[vnc]
enabled = false
[placement]
{admin_auth}endpoint = {self.placement_url}
endpoint_override = {self.placement_url}
[neutron]
{admin_auth}endpoint = http://{self.bind}:{p["neutron"]}
endpoint_override = http://{self.bind}:{p["neutron"]}
[glance]
endpoint_override = http://{self.bind}:{p["glance"]}
[cinder]
os_region_name = RegionOne
[service_user]
send_service_user_token = false
"""
        )
        # Tests boot servers of several projects on a named host: let members request a host.
        (etc / "nova" / "policy.yaml").write_text(
            '"compute:servers:create:requested_destination": "rule:project_member_api"\n'
        )
        paste = (self.venv / "etc" / "nova" / "api-paste.ini").read_text()
        ours = "[filter:authtoken]\npaste.filter_factory = vmha.lab.nova.auth:filter_factory\n"
        start = paste.index("[filter:authtoken]")
        end = paste.find("\n[", start + 1)
        (etc / "nova" / "api-paste.ini").write_text(paste[:start] + ours + ("" if end < 0 else paste[end:]))
        (etc / "placement" / "placement.conf").write_text(
            f"""[DEFAULT]
debug = false
[api]
auth_strategy = noauth2
[placement_database]
connection = {self.db_url("placement")}
"""
        )
        self.clouds_yaml.write_text(
            json.dumps(  # JSON is YAML: no yaml writer needed
                {
                    "clouds": {
                        self.cloud: {
                            "auth_type": "admin_token",
                            "auth": {"endpoint": self.nova_url, "token": ADMIN_TOKEN},
                            "compute_endpoint_override": self.nova_url,
                            "region_name": "RegionOne",
                        }
                    }
                },
                indent=2,
            )
        )
        for h in self.hosts:
            d = self.dir / "compute" / h
            (d / "state" / "locks").mkdir(parents=True, exist_ok=True)
            (d / "compute.conf").write_text(
                f"[DEFAULT]\nhost = {h}\nstate_path = {d}/state\ninstances_path = {d}/state/instances\n"
                # A guest that ended by itself is seen (and stopped by Nova) within seconds, as libvirt's
                # lifecycle events make it on a real compute (the fake driver sends none; default 600 s).
                f"sync_power_state_interval = {SYNC_POWER_STATE_INTERVAL}\n"
                f"[oslo_concurrency]\nlock_path = {d}/state/locks\n"
            )
        (self.dir / "state" / "locks").mkdir(parents=True, exist_ok=True)
        (self.dir / "rig.json").write_text(
            json.dumps({"ports": self.ports, "bind": self.bind, "hosts": list(self.hosts), "venv": str(self.venv)})
        )

    @classmethod
    def attach(cls, workdir: Path, enter: Sequence[str] = (), netns: str | None = None) -> NovaRig:
        """The rig started earlier in `workdir` (by another process), for its API and computes."""
        try:
            d = json.loads((Path(workdir) / "rig.json").read_text())
        except (OSError, ValueError) as e:
            raise RigError(f"rig: no rig recorded in {workdir}: {e}") from None
        rig = cls(hosts=d["hosts"], workdir=workdir, venv=Path(d["venv"]), bind=d["bind"], enter=enter,
                  netns=netns, computes=False)
        rig.ports = {k: int(v) for k, v in d["ports"].items()}
        return rig

    # --- processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: Sequence[str], **env: str) -> _Proc:
        proc = _Proc(name, [*self.enter, *cmd], self.dir / "logs" / f"{name}.log", self._env(**env), self.dir)
        with self._lock:
            self.procs[name] = proc
        return proc

    def _run(self, what: str, cmd: Sequence[str], timeout: float = 120.0) -> str:
        try:
            r = subprocess.run(
                [*self.enter, *cmd], capture_output=True, text=True, timeout=timeout, env=self._env(), cwd=self.dir
            )
        except subprocess.TimeoutExpired:
            raise RigError(f"rig: {what} did not finish in {timeout:.0f} s") from None
        if r.returncode != 0:
            raise RigError(f"rig: {what} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r.stdout

    def _timed(self, name: str, fn: Callable[[], object]) -> None:
        t0 = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t0, 1)

    def _sql(self, sql: str) -> None:
        self._run(
            "mariadb client",
            # Through the socket: root may log in over TCP only once granted below.
            ["mariadb", f"--socket={self.dir}/mysql.sock", "-u", "root", "-e", sql],
            timeout=30,
        )

    def _port_open(self, port: int, address: str | None = None) -> bool:
        import socket

        with self._net(), socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((address or self.bind, port)) == 0

    def _net(self) -> contextlib.AbstractContextManager[None]:
        """The rig's own connections (probes, API calls) from its network namespace."""
        return in_netns(self.netns)

    def _start_mariadb(self) -> None:
        data = self.dir / "mysql"
        self._run(
            "mariadb-install-db",
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            timeout=120,
        )  # fmt: skip
        proc = self._spawn(
            "mariadb",
            ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.dir}/mysql.sock",
             f"--port={self.ports['db']}", f"--bind-address={self.bind}", "--skip-name-resolve", "--user=root",
             f"--pid-file={self.dir}/mysql.pid", "--skip-log-bin", "--max-connections=1000",
             # a throwaway test database: durability is not worth the schema setup time
             "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--sync-binlog=0",
             "--innodb-buffer-pool-size=128M"],
        )  # fmt: skip
        _wait("mariadb", lambda: self._port_open(self.ports["db"]), 60, [proc])
        self._sql(
            "CREATE DATABASE nova_api; CREATE DATABASE nova; CREATE DATABASE nova_cell0; CREATE DATABASE placement; "
            # The services connect over TCP to the bind address (the lab's management address).
            "CREATE USER IF NOT EXISTS 'root'@'%'; GRANT ALL PRIVILEGES ON *.* TO 'root'@'%';"
        )

    def _start_rabbit(self) -> None:
        base = self.dir / "rabbit"
        for sub in ("mnesia", "log", "home"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            # The lab's computes connect over the management plane: guest may log in from anywhere.
            f"listeners.tcp.default = {self.bind}:{self.ports['amqp']}\nloopback_users = none\n"
        )
        epmd_env = {"ERL_EPMD_PORT": str(self.ports["epmd"]), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        # Our own epmd, in the foreground: the one Erlang would start daemonises and outlives us.
        # Erlang talks to it on loopback (the lab controller's own), whatever the AMQP address.
        epmd = self._spawn("epmd", [EPMD, "-port", str(self.ports["epmd"]), "-address", "127.0.0.1"], **epmd_env)
        _wait("epmd", lambda: self._port_open(self.ports["epmd"], "127.0.0.1"), 10, [epmd])
        name = f"vmha{self.ports['amqp']}@localhost"
        proc = self._spawn(
            "rabbitmq",
            [RABBITMQ_SERVER],
            **epmd_env,
            HOME=str(base / "home"),
            RABBITMQ_NODENAME=name,
            RABBITMQ_NODE_IP_ADDRESS=self.bind,
            RABBITMQ_NODE_PORT=str(self.ports["amqp"]),
            RABBITMQ_DIST_PORT=str(self.ports["dist"]),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_LOGS="-",
        )
        _wait("rabbitmq", lambda: self._port_open(self.ports["amqp"]), 90, [proc])

    def _schema(self) -> None:
        nm = ["nova-manage", "--config-file", str(self.dir / "etc" / "nova" / "nova.conf")]
        with ThreadPoolExecutor(2) as ex:
            placement = ex.submit(
                self._run,
                "placement-manage db sync",
                ["placement-manage", "--config-file", str(self.dir / "etc" / "placement" / "placement.conf"),
                 "db", "sync"],
                300,
            )  # fmt: skip
            self._run("nova-manage api_db sync", [*nm, "api_db", "sync"], 300)
            self._run(
                "nova-manage cell_v2 map_cell0",
                [*nm, "cell_v2", "map_cell0", "--database_connection", self.db_url("nova_cell0")],
            )
            self._run("nova-manage cell_v2 create_cell", [*nm, "cell_v2", "create_cell", "--name", "cell1"])
            self._run("nova-manage db sync", [*nm, "db", "sync"], 300)
            placement.result()

    def _http_ok(self, url: str) -> bool:
        try:
            with self._net(), urllib.request.urlopen(url, timeout=2) as r:
                return int(r.status) < 400
        except (urllib.error.URLError, OSError):
            return False

    def _apis_ok(self) -> bool:
        return self._http_ok(self.placement_url) and self._http_ok(self.nova_url)

    def _gunicorn(self, name: str, port: int, app: str) -> _Proc:
        return self._spawn(
            name,
            ["gunicorn", "-b", f"{self.bind}:{port}", "-w", "1", "--threads", "4", "--timeout", "120",
             "--graceful-timeout", "3", app],
        )  # fmt: skip

    def compute_command(self, host: str) -> list[str]:
        """nova-compute for `host` with the rig's virt driver (the rig's configs must be written)."""
        return [f"{self.venv}/bin/python", "-m", "vmha.lab.nova.compute",
                "--config-file", str(self.dir / "etc" / "nova" / "nova.conf"),
                "--config-file", str(self.dir / "compute" / host / "compute.conf")]  # fmt: skip

    def compute_env(self, **extra: str) -> dict[str, str]:
        return self._env(**extra)

    def start_compute(self, host: str) -> _Proc:
        """Start (or restart) nova-compute for `host`; does not wait for it to report up."""
        old = self.computes.get(host)
        if old is not None and old.alive():
            raise RigError(f"rig: nova-compute {host} is already running (pid {old.pid})")
        proc = self._spawn(f"compute-{host}", self.compute_command(host))
        self.computes[host] = proc
        return proc

    def kill_compute(self, host: str) -> None:
        """SIGKILL nova-compute of `host`, as a host losing power would."""
        proc = self.computes[host]
        proc.signal(signal.SIGKILL)
        proc.popen.wait(10)

    def start(self, timeout: float = 300.0) -> NovaRig:
        """The whole rig, computes included (computes=True), up and ready; stops what started on failure."""
        t_start = time.monotonic()
        try:
            self.start_control()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - t_start, 1)
        return self

    def start_control(self) -> None:
        """Database, broker, schema, stand-ins, APIs, conductor, scheduler (and the computes when the
        rig owns them), without waiting for the services to report up. Stops nothing on failure."""
        if not (self.venv / "bin" / "nova-manage").exists():
            raise RigError(f"rig: {self.venv} has no Nova: run scripts/setup-nova.sh first")
        self._write_configs()
        with ThreadPoolExecutor(3) as ex:
            futs = [
                ex.submit(self._timed, "mariadb", self._start_mariadb),
                ex.submit(self._timed, "rabbitmq", self._start_rabbit),
            ]
            for f in futs:
                f.result()
        self._timed("schema", self._schema)
        self._spawn(
            "stubs",
            [f"{self.venv}/bin/python", "-m", "vmha.lab.nova.stubs",
             str(self.ports["glance"]), str(self.ports["neutron"]), IMAGE_ID, self.bind],
        )  # fmt: skip
        self._gunicorn("placement", self.ports["placement"], "vmha.lab.nova.wsgi:placement_api()")
        self._gunicorn("nova-api", self.ports["nova"], "vmha.lab.nova.wsgi:nova_api()")
        self._spawn("conductor", ["nova-conductor", "--config-file", str(self.dir / "etc/nova/nova.conf")])
        self._spawn("scheduler", ["nova-scheduler", "--config-file", str(self.dir / "etc/nova/nova.conf")])
        if self.own_computes:
            for h in self.hosts:
                self.start_compute(h)

    def start_broker(self) -> NovaRig:
        """RabbitMQ alone, as the rig runs it (for the tests of what vmha publishes on the bus; needs
        Debian's rabbitmq-server only); stop() stops it."""
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self._start_rabbit()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until the APIs answer, every service (a compute per host) is up, the hosts are discovered
        and the rig's flavor exists. Fails early when a process the rig started exits."""
        core = [self.procs[n] for n in ("placement", "nova-api", "conductor", "scheduler") if n in self.procs]
        core += self.computes.values()
        self.timings["apis"] = round(_wait("placement and nova-api", self._apis_ok, timeout, core), 1)
        self.timings["services_up"] = round(
            _wait("every nova service up", self._all_services_up, timeout, core, step=1.0), 1
        )
        self._timed("discover_hosts", self.discover_hosts)
        self.timings["hypervisors"] = round(_wait("hypervisors", self._all_hypervisors, timeout, core, step=1.0), 1)
        self._ensure_flavor()

    def discover_hosts(self) -> None:
        self._run(
            "nova-manage cell_v2 discover_hosts",
            ["nova-manage", "--config-file", str(self.dir / "etc/nova/nova.conf"), "cell_v2", "discover_hosts"],
        )

    # --- the API, for the rig's own checks (tests use openstacksdk) --------------------------------

    def api(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN, timeout: float = 10) -> Any:
        req = urllib.request.Request(
            self.nova_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "X-Auth-Token": token,
                "Content-Type": "application/json",
                "OpenStack-API-Version": "compute 2.94",
            },
        )
        with self._net(), urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def services(self) -> list[dict[str, Any]]:
        try:
            svcs: list[dict[str, Any]] = self.api("GET", "/os-services")["services"]
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return svcs

    def service_up(self, host: str, binary: str = "nova-compute") -> bool | None:
        for s in self.services():
            if s["host"] == host and s["binary"] == binary:
                return bool(s["state"] == "up")
        return None

    def _all_services_up(self) -> bool:
        up = {(s["binary"], s["host"]) for s in self.services() if s["state"] == "up"}
        want = {("nova-conductor", "controller"), ("nova-scheduler", "controller")}
        want |= {("nova-compute", h) for h in self.hosts}
        return want <= up

    def _all_hypervisors(self) -> bool:
        try:
            hyps = self.api("GET", "/os-hypervisors")["hypervisors"]
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return {h["hypervisor_hostname"] for h in hyps} >= set(self.hosts)

    def wait_compute(self, host: str, up: bool, timeout: float) -> float:
        """Wait until Nova reports `host`'s compute up (or down); returns the seconds waited."""
        procs = [self.computes[host]] if up else []
        return _wait(
            f"nova-compute {host} {'up' if up else 'down'}", lambda: self.service_up(host) is up, timeout, procs
        )

    def wait_evacuations_completed(self, host: str, timeout: float) -> float:
        """Wait until no evacuation from `host` is left 'done': its restarted nova-compute has cleaned
        up, which Nova requires before it un-forces the host. Returns the seconds waited."""

        def clean() -> bool:
            try:
                migs = self.api("GET", f"/os-migrations?source_compute={host}&migration_type=evacuation")
            except (urllib.error.URLError, OSError, ValueError):
                return False
            return not any(m["status"] == "done" for m in migs["migrations"])

        procs = [self.computes[host]] if host in self.computes else []
        return _wait(f"evacuations from {host} completed", clean, timeout, procs)

    def _placement(self, path: str) -> Any:
        req = urllib.request.Request(
            self.placement_url + path,
            headers={"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": "placement 1.6"},
        )
        with self._net(), urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def schedulable(self, host: str) -> bool:
        """Placement would offer `host` to the scheduler: its provider lacks COMPUTE_STATUS_DISABLED."""
        try:
            rps = self._placement(f"/resource_providers?name={host}")["resource_providers"]
            if not rps:
                return False
            traits = self._placement(f"/resource_providers/{rps[0]['uuid']}/traits")["traits"]
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return "COMPUTE_STATUS_DISABLED" not in traits

    def wait_schedulable(self, host: str, timeout: float) -> float:
        procs = [self.computes[host]] if host in self.computes else []
        return _wait(f"{host} schedulable", lambda: self.schedulable(host), timeout, procs, step=0.5)

    def _ensure_flavor(self) -> None:
        flavors = self.api("GET", "/flavors")["flavors"]
        if not any(f["name"] == FLAVOR for f in flavors):
            self.api("POST", "/flavors", {"flavor": {"name": FLAVOR, "ram": 64, "vcpus": 1, "disk": 1}})

    # --- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (Nova services first, the database and broker last), remove the dir."""
        with self._lock:
            procs = dict(self.procs)
            self.procs.clear()
        last = [procs.pop(n) for n in ("rabbitmq", "mariadb", "epmd") if n in procs]
        stop_procs(procs.values(), grace=3.0)
        stop_procs(last, grace=10.0)
        self.computes.clear()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            # A given directory keeps the configs and logs (for a failed test); the data goes.
            for sub in ("mysql", "rabbit", "state", "compute"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def __enter__(self) -> NovaRig:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the Nova test rig until interrupted (LAB / TEST ONLY).")
    ap.add_argument("--hosts", default="cmp1,cmp2,cmp3", help="compute host names, comma-separated")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one, removed at exit)")
    args = ap.parse_args()
    rig = NovaRig(hosts=[h for h in args.hosts.split(",") if h], workdir=args.dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with rig:
        print(f"rig up in {rig.timings['total']} s: {rig.timings}")
        print(f"nova: {rig.nova_url}  (X-Auth-Token {ADMIN_TOKEN})")
        print(f"OS_CLIENT_CONFIG_FILE={rig.clouds_yaml} OS_CLOUD={rig.cloud}")
        print(f"logs: {rig.dir}/logs; Ctrl-C stops everything")
        stop.wait()


if __name__ == "__main__":
    main()
