"""etcd reads and writes for lab commands that run in the machine's root namespace.

The lab's etcd listens only on the controller's plane addresses, which the root namespace cannot
reach; lab commands therefore ask etcdctl inside the controller's netns (one short process per
call: fine for status and for polling every few hundred ms). The daemons use vmha.etcd.client.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from vmha.etcd.auth import ROOT
from vmha.lab.net import LabError, run
from vmha.lab.state import LabState


def _etcdctl(state: LabState, *args: str, timeout: float = 5.0) -> str:
    ctl = state.node("controller")
    tls = state.pki.client(ROOT)  # lab commands administer the lab: etcd's root user
    cmd = ["ip", "netns", "exec", ctl.netns, "env", "ETCDCTL_API=3", "etcdctl",
           f"--endpoints={','.join(state.etcd_control_urls())}", "--dial-timeout=2s",
           f"--cacert={tls.ca}", f"--cert={tls.cert}", f"--key={tls.key}",
           f"--command-timeout={timeout:.0f}s", *args]
    return run(cmd, timeout=timeout + 3).stdout


def get_prefix(state: LabState, prefix: str) -> dict[str, bytes]:
    """Every key under prefix with its raw value."""
    out = json.loads(_etcdctl(state, "get", "--prefix", prefix, "-w", "json") or "{}")
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in out.get("kvs", [])
    }


def get_json_prefix(state: LabState, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """JSON values under prefix, and the keys whose value is not JSON (reported, not fatal)."""
    good: dict[str, Any] = {}
    bad: list[str] = []
    for k, v in get_prefix(state, prefix).items():
        try:
            good[k] = json.loads(v)
        except ValueError:
            bad.append(k)
    return good, bad


def put_json(state: LabState, key: str, value: Any) -> None:
    # "--": a key or value starting with "-" is not taken for an option.
    _etcdctl(state, "put", "--", key, json.dumps(value, sort_keys=True))


def reachable(state: LabState) -> bool:
    try:
        _etcdctl(state, "endpoint", "health", timeout=2.0)
    except LabError:
        return False
    return True
