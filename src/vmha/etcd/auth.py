"""etcd users and roles of a vmha cluster (`vmha etcd setup-auth`), for client-certificate auth.

etcd takes the user of a TLS connection from its client certificate's CN (--client-cert-auth), so
each user is named after its certificate and has no password:

  host H      role vmha-<cluster>-host-H: reads the cluster's keys; writes only its own: its host
              record hosts/H, its heartbeats hb/H/..., its attestation answers attest/resp/H/...
  manager M   role vmha-<cluster>-manager: reads and writes every key of the cluster
  operator    role vmha-<cluster>-operator: reads every key of the cluster, writes none
  root        etcd's root role (user and role administration, auth enable)

A host therefore cannot forge another host's heartbeats or record, tasks, evidence records, the
leader key or sanlock host ids; setup-auth allocates each host's host_id (hostid/<n>) itself, since
hosts may not. Every role may read the key EtcdClient.revision() probes (liveness of a connection).
Running it again adds what is missing (roles, users, grants) and changes nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc

from vmha.etcd import hostids
from vmha.etcd.client import PROBE_KEY, EtcdClient, EtcdError
from vmha.etcd.keys import Keys

READ, WRITE, READWRITE = 0, 1, 2  # etcd's authpb.Permission.Type
ROOT = "root"
OPERATOR = "operator"


def prefix_end(prefix: str) -> str:
    """The range_end that makes [prefix, end) every key starting with prefix (ASCII keys)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True, slots=True)
class Grant:
    perm: int  # READ, WRITE or READWRITE
    key: str
    range_end: str = ""  # "": the key alone

    @classmethod
    def prefix(cls, perm: int, prefix: str) -> Grant:
        return cls(perm, prefix, prefix_end(prefix))

    def __str__(self) -> str:
        return f"{('read', 'write', 'readwrite')[self.perm]} {self.key!r}{'*' if self.range_end else ''}"


def host_role(keys: Keys, cluster: str, host: str) -> tuple[str, list[Grant]]:
    return f"vmha-{cluster}-host-{host}", [
        Grant.prefix(READ, keys.root),
        Grant(READWRITE, keys.host(host)),
        Grant.prefix(READWRITE, keys.heartbeats_of(host)),
        Grant.prefix(READWRITE, keys.attest_responses_prefix(host)),
        Grant.prefix(READ, PROBE_KEY),
    ]


def roles(cluster: str, hosts: Sequence[str], managers: Sequence[str]) -> dict[str, tuple[list[str], list[Grant]]]:
    """role -> (its users, its grants), for the given host and manager names."""
    keys = Keys(cluster)
    out: dict[str, tuple[list[str], list[Grant]]] = {}
    for h in sorted(set(hosts)):
        name, grants = host_role(keys, cluster, h)
        out[name] = ([h], grants)
    out[f"vmha-{cluster}-manager"] = (sorted(set(managers)), [Grant.prefix(READWRITE, keys.root),
                                                             Grant.prefix(READ, PROBE_KEY)])  # fmt: skip
    out[f"vmha-{cluster}-operator"] = ([OPERATOR], [Grant.prefix(READ, keys.root), Grant.prefix(READ, PROBE_KEY)])
    return out


async def _ignore_exists(stub_call: Any, request: Any) -> None:
    try:
        await stub_call(request)
    except rpc.AioRpcError as e:
        if "already exists" not in (e.details() or ""):
            raise


async def setup_auth(client: EtcdClient, cluster: str, hosts: Sequence[str], managers: Sequence[str],
                     max_hosts: int = 2000) -> list[str]:  # fmt: skip
    """Create what is missing of roles() and the root user, allocate each host's host_id, enable
    auth. ``client`` must connect as root (or to an etcd with auth still off). Returns one line
    per role for the operator."""
    keys = Keys(cluster)
    for h in dict.fromkeys(hosts):  # in the order given: the first host gets the lowest free id
        await hostids.allocate(client, keys, h, max_hosts)  # logs a new allocation
    plan = roles(cluster, hosts, managers)

    # One bounded call per step (each role is a few writes): hundreds of hosts take longer than any
    # one call's timeout, and a step that fails is redone by running the command again.
    await _step(client, _root_user)
    for role, (users, grants) in plan.items():
        await _step(client, functools.partial(_role, role=role, users=users, grants=grants))
    await _step(client, lambda stub: stub.AuthEnable(rpc.AuthEnableRequest()))
    return [f"{role}: users {', '.join(users) or '-'}; " + "; ".join(map(str, grants))
            for role, (users, grants) in plan.items()]  # fmt: skip


async def _step(client: EtcdClient, body: Callable[[Any], Awaitable[Any]]) -> None:
    """body(AuthStub) through client.call; a refusal (not a connectivity failure) is an EtcdError."""

    async def op(c: aetcd.Client) -> None:
        await c.connect()
        try:
            await body(rpc.AuthStub(c.channel))
        except rpc.AioRpcError as e:
            if e.code() in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # connectivity: EtcdUnavailable
            raise EtcdError(f"setup-auth: {e.code().name}: {e.details()}") from None

    await client.call(op, timeout=max(client.timeout, 10.0))


def _user(name: str) -> Any:
    return rpc.AuthUserAddRequest(name=name, options=rpc.UserAddOptions(no_password=True))  # CN auth only


async def _root_user(stub: Any) -> None:
    await _ignore_exists(stub.UserAdd, _user(ROOT))
    await _ignore_exists(stub.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=ROOT, role=ROOT))


async def _role(stub: Any, role: str, users: list[str], grants: list[Grant]) -> None:
    await _ignore_exists(stub.RoleAdd, rpc.AuthRoleAddRequest(name=role))
    for g in grants:
        perm = rpc.Permission(permType=g.perm, key=g.key.encode(), range_end=g.range_end.encode())
        await stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm))
    for user in users:
        await _ignore_exists(stub.UserAdd, _user(user))
        await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role))

__all__ = ["Grant", "roles", "setup_auth"]
