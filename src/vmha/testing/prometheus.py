"""PrometheusServer: a real Prometheus (Debian's /usr/bin/prometheus) scraping given targets, started
with a temporary config and storage directory and stopped by PID; PromQL through its HTTP API.

    with PrometheusServer(workdir, {"manager": ["127.0.0.1:9101"], "agent": ["127.0.0.1:9102"]}) as prom:
        prom.query('vmha_plane_up{host="h1",plane="storage"}')      # [(labels, value), ...]
        prom.value('sum(vmha_recovery_phase_seconds_count{phase="recover"})')   # one number or None

With `netns` (a lab's controller namespace, where the lab's daemons are reachable), Prometheus runs
in that network namespace and the queries are made from it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from vmha.lab.net import in_netns
from vmha.testing.etcd import free_ports
from vmha.testing.process import stop_process

PROMETHEUS = "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed; the message says why (and the log's tail)."""


class PrometheusServer:
    def __init__(self, workdir: Path, targets: Mapping[str, Sequence[str]], *, scrape_interval: float = 1.0,
                 ready_timeout: float = 60.0, netns: str | None = None) -> None:  # fmt: skip
        self.dir = workdir
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.ready_timeout = ready_timeout
        self.netns = netns
        with in_netns(netns):  # free there
            self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        # Prometheus reads YAML, a superset of JSON: no YAML writer needed.
        interval = f"{int(self.scrape_interval * 1000)}ms"
        return json.dumps({
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(hosts)}]}
                               for job, hosts in sorted(self.targets.items())],
        }, indent=2)  # fmt: skip

    def start(self) -> PrometheusServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "prometheus.yml"
        config.write_text(self._config())
        with open(self.log, "wb") as out:
            enter = ["ip", "netns", "exec", self.netns] if self.netns is not None else []  # it execs: PID kept
            self.proc = subprocess.Popen(
                [*enter, PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self.proc.returncode}): {self._tail()}")
            try:
                with in_netns(self.netns), urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready within {self.ready_timeout} s: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant PromQL query: each series' labels and value (a scalar: one series, no labels)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with in_netns(self.netns), urllib.request.urlopen(url, timeout=10) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"query {expr!r}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {answer}")
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series (None: no series)."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"query {expr!r}: {len(result)} series, expected one: {result}")
        return result[0][1] if result else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


__all__ = ["PROMETHEUS", "PrometheusError", "PrometheusServer"]
