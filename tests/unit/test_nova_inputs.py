"""The nova driver's reading of what tenants and the API control: server names (vm_names = "name"), the
HA priority, an answer's Retry-After. A stand-in connection answers the listing; what is tested is the
driver's own logic."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import openstack.exceptions as os_exc
import pytest
import requests

from vmha.config import NovaConfig
from vmha.drivers.nova import PRIORITY_SPEC, NovaDriver, _error, duplicate_names


def srv(sid: str, name: str, *, specs: dict[str, str] | None = None, **meta: str) -> Any:
    return SimpleNamespace(id=sid, name=name, compute_host="cmp1", status="ACTIVE", task_state=None, power_state=1,
                           metadata={"HA_Enabled": "true", **meta}, tags=[],
                           flavor={"original_name": "m1", "extra_specs": specs or {}})


def driver(servers: list[Any], vm_names: str = "name") -> NovaDriver:
    compute = SimpleNamespace(servers=lambda **_: list(servers))
    return NovaDriver(NovaConfig(vm_names=vm_names), connection=SimpleNamespace(compute=compute))  # type: ignore[arg-type]


def test_duplicate_names_are_found() -> None:
    assert duplicate_names([srv("b", "web"), srv("a", "web"), srv("c", "db")]) == {"web": ["a", "b"]}


async def test_servers_sharing_a_name_are_alerted_once_and_not_protected(caplog: pytest.LogCaptureFixture) -> None:
    servers = [srv("id1", "web"), srv("id2", "web"), srv("id3", "db")]
    d = driver(servers)
    with caplog.at_level(logging.ERROR, logger="vmha.drivers.nova"):
        assert [v.name for v in await d.vms()] == ["db"]
        assert [v.name for v in await d.vms()] == ["db"]
    alerts = [r.getMessage() for r in caplog.records if "ALERT" in r.getMessage()]
    assert alerts == ["ALERT nova: 2 servers are named 'web' (id1, id2): [nova] vm_names = \"name\" needs unique "
                      "names; they are NOT protected until renamed"]
    assert await d._sid("db") == "id3" and "web" not in d._ids  # no last-writer-wins id for 'web'
    servers.pop(1)  # renamed: protected again
    assert sorted(v.name for v in await d.vms()) == ["db", "web"] and await d._sid("web") == "id1"
    # Named by id, names do not matter.
    assert len(await driver([srv("id1", "web"), srv("id2", "web")], vm_names="id").vms()) == 2


async def test_priority_comes_from_the_flavor_not_from_what_tenants_set() -> None:
    d = driver([srv("a", "a", specs={PRIORITY_SPEC: "7"}), srv("b", "b", HA_Priority="99"),
                srv("c", "c", specs={PRIORITY_SPEC: "high"})])
    assert {v.name: v.priority for v in await d.vms()} == {"a": 7, "b": 0, "c": 0}


@pytest.mark.parametrize(("header", "wait"), [
    ("7", 7.0), ("0.5", 0.5), (None, 0.0), ("Wed, 21 Oct 2026 07:28:00 GMT", 0.0), ("-3", 0.0), ("nan", 0.0),
    ("inf", 0.0),
])  # fmt: skip
def test_retry_after_of_an_answer_is_read_and_untrusted(header: str | None, wait: float) -> None:
    """Retry-After comes from whatever answers on the API's address (Nova, a proxy, a rate limiter)."""
    r = requests.Response()
    r.status_code, r.url, r._content = 429, "http://nova/v2.1/servers/a/action", b"{}"
    if header is not None:
        r.headers["Retry-After"] = header
    err = _error("evacuate a", os_exc.HttpException("rate-limited", response=r))
    assert (err.retryable, err.retry_after) == (True, wait) and "HTTP 429" in str(err)
