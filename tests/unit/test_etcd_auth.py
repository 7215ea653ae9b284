"""The etcd roles setup-auth creates: which keys each role's grants cover (etcd enforces them;
tests/integration/test_etcd_security.py shows it on a real etcd)."""

from __future__ import annotations

from vmha.core.planes import PLANES
from vmha.etcd.auth import READ, Grant, prefix_end, roles
from vmha.etcd.client import PROBE_KEY
from vmha.etcd.keys import Keys

K = Keys("c1")


def writable(grants: list[Grant], key: str) -> bool:
    return any(g.perm != READ and (key == g.key if not g.range_end else g.key <= key < g.range_end) for g in grants)


def test_prefix_end_covers_exactly_the_prefix() -> None:
    assert prefix_end("/vmha/c1/hb/h1/") == "/vmha/c1/hb/h10"
    g = Grant.prefix(READ, "/a/b/")
    assert g.key <= "/a/b/zzz" < g.range_end and not g.key <= "/a/c" < g.range_end


def test_a_host_role_writes_its_own_keys_and_nothing_else() -> None:
    plan = roles("c1", ["h1", "h10", "h2"], ["m1", "m2"])
    users, grants = plan["vmha-c1-host-h1"]
    assert users == ["h1"]
    own = [K.host("h1"), *(K.heartbeat("h1", p) for p in PLANES), K.attest_response("h1", "vm1")]
    assert all(writable(grants, k) for k in own)
    others = [K.host("h10"), K.host("h2"), K.heartbeat("h10", PLANES[0]), K.attest_response("h10", "vm1"),
              K.attest_request("h1", "vm1"), K.task("vm1"), K.leader, K.host_id(1), K.record("vm1", 1),
              K.health("h1"), K.disabled("h1"), K.maintenance("h1"), "/vmha/c2/hosts/h1"]  # fmt: skip
    assert [k for k in others if writable(grants, k)] == []
    assert Grant.prefix(READ, K.root) in grants and Grant.prefix(READ, PROBE_KEY) in grants


def test_managers_write_the_cluster_and_the_operator_nothing() -> None:
    plan = roles("c1", ["h1"], ["m2", "m1"])
    m_users, m_grants = plan["vmha-c1-manager"]
    assert m_users == ["m1", "m2"] and writable(m_grants, K.task("vm1")) and not writable(m_grants, "/vmha/c2/x")
    o_users, o_grants = plan["vmha-c1-operator"]
    assert o_users == ["operator"] and all(g.perm == READ for g in o_grants)
