"""Every value read from etcd is untrusted: the strict models (etcd/values.py) and the parsers built on
them either return a value or raise BadValue naming the key, never another exception, whatever the
bytes. The regressions of issue 12 ("Why"), then property-based fuzzing of every parser."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmha.core.fencing import FenceProof, ProofMethod
from vmha.core.planes import Plane
from vmha.core.queue import Step, Task, TaskKind, TaskState
from vmha.etcd import health_store, hostids, values
from vmha.etcd.attest import AttestResponse
from vmha.etcd.client import KV, BadValue, decode_json
from vmha.etcd.election import leader_name
from vmha.etcd.keys import Keys
from vmha.etcd.records import _event
from vmha.etcd.registry import parse_host
from vmha.etcd.tasks import parse_task

K = Keys("c")


def kv(key: str, value: Any, revision: int = 7, lease: int = 0) -> KV:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return KV(key, raw, revision, 1, 1, lease)


def evacuating_task() -> dict[str, Any]:
    t = Task("vm1", "h1", TaskKind.EVACUATE, 1, 0, "storage", "fence-evacuate", {"storage": 3.0}, created=3.0,
             state=TaskState.EVACUATING, since=5.0, dest="h2",
             proof=FenceProof("vm1", "h1", ProofMethod.HOST_DEAD, 3.5, 4.0, {"trail": "dead"}))
    t.begin(Step.PROVE, 3.5)
    t.finish(Step.PROVE, 4.0, "ok")
    t.begin(Step.EVACUATE, 5.0)
    return t.to_dict()


def test_a_task_as_vmha_writes_it_is_read_back() -> None:
    d = evacuating_task()
    assert parse_task(kv(K.task("vm1"), d)).to_dict() == d


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        ({"steps": ["x"]}, "steps.0"),
        ({"dest": None}, "needs a destination"),
        ({"proof": {**evacuating_task()["proof"], "details": ["a", "b"]}}, "proof.details"),
        ({"proof": None}, "needs its fence proof"),
        ({"proof": {**evacuating_task()["proof"], "host": "h9"}}, "the proof is for vm"),
        ({"state": "evacuated"}, "state"),
        ({"recovery": "1"}, "recovery"),
        ({"created": True}, "created"),
        ({"state": "retry-wait", "retry_at": None}, "retry_at"),
        ({"kind": "migrate"}, "a migration cannot be"),
    ],
)
def test_a_malformed_task_is_refused_naming_key_and_fault(change: dict[str, Any], fault: str) -> None:
    # Issue 12: "steps": ["x"], a missing dest, or details a list crashed every manager on start.
    with pytest.raises(BadValue, match=r"etcd key /vmha/c/tasks/vm1: .*") as e:
        parse_task(kv(K.task("vm1"), {**evacuating_task(), **change}))
    assert fault in str(e.value)


def test_a_number_out_of_range_is_refused_when_decoded() -> None:
    # Issue 12: "seq": 1e400 put the manager's heartbeat loop into a restart cycle.
    with pytest.raises(BadValue, match="1e400 is out of range"):
        decode_json(K.heartbeat("h1", Plane.STORAGE),
                    b'{"host":"h1","plane":"storage","seq":1e400,"t":1.0}')
    for raw in (b"NaN", b'{"t": Infinity}', b"-Infinity"):
        with pytest.raises(BadValue):
            decode_json("k", raw)


def test_a_deeply_nested_host_record_is_refused_not_a_crash() -> None:
    # Issue 12: a deeply nested value under hosts/ left the manager with 0 hosts registered.
    deep = b'{"domain":"r1","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadValue, match="nested more than"):
        parse_host(K, kv(K.host("h1"), deep), decode_json(K.host("h1"), deep))
    assert parse_host(K, kv(K.host("h1"), {"domain": "r1", "x": [[1]]}), {"domain": "r1", "x": [[1]]}).domain == "r1"
    with pytest.raises(BadValue, match="bytes, more than"):
        decode_json("k", b'"' + b"a" * (1 << 20) + b'"')


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert decode_json("k", json.dumps({"a": "[" * 100 + '\\"{' * 50}).encode()) == {"a": "[" * 100 + '\\"{' * 50}


def test_host_record_checks() -> None:
    with pytest.raises(BadValue, match="agent_stopped"):
        parse_host(K, kv(K.host("h1"), {}), {"domain": "r1", "agent_stopped": "yes"})
    with pytest.raises(BadValue, match="names host"):
        parse_host(K, kv(K.host("h1"), {}), {"domain": "r1", "host": "h2"})
    with pytest.raises(BadValue, match="domain"):
        parse_host(K, kv(K.host("h1"), {}), {"domain": "r1\nERROR forged log line"})
    assert parse_host(K, kv(K.host("h1"), {}), {"domain": "r1", "agent_stopped": 5}).agent_stopped == 5.0


def test_a_refused_value_is_reported_once_per_key_and_revision(caplog: pytest.LogCaptureFixture) -> None:
    e = BadValue("/vmha/c/hb/once/storage", "bad")
    with caplog.at_level(logging.ERROR, "vmha.etcd.values"):
        assert values.refused(e, kv(e.key, {}, revision=11))
        assert not values.refused(e, kv(e.key, {}, revision=11))
        assert values.refused(e, kv(e.key, {}, revision=12))
        # Another etcd (restored, or a test's fresh one) reuses revision 12: another value is reported.
        assert values.refused(e, kv(e.key, b"\x00garbage", revision=12))
    assert [r.getMessage().startswith("ALERT etcd key /vmha/c/hb/once/storage") for r in caplog.records] == [True] * 3


class _Ids:
    """A client holding hostid/ keys (hostids only calls get_prefix)."""

    def __init__(self, ids: dict[str, Any]) -> None:
        self.kvs = [kv(K.host_id_prefix + n, v) for n, v in ids.items()]

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        return self.kvs, 1


async def test_host_id_0_and_non_canonical_ids_are_refused_and_duplicates_are_an_error() -> None:
    client: Any = _Ids({"0": {"host": "h1"}, "007": {"host": "h2"}, "3": {"host": "h3"}, "2001": {"host": "h4"}})
    assert await hostids.host_ids(client, K) == {3: "h3"}
    assert await hostids.lookup(client, K, "h1") is None
    client = _Ids({"3": {"host": "h3"}, "9": {"host": "h3"}})
    with pytest.raises(BadValue, match=r"host h3 has several host_ids \[3, 9\]"):
        await hostids.lookup(client, K, "h3")


# -- fuzzing: any JSON, any bytes -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _must_parse_or_refuse(parser: Callable[[KV, Any], object], key: str, value: Any) -> None:
    try:
        parser(kv(key, value), value)
    except BadValue as e:
        assert e.key.startswith("/vmha/c/")


PARSERS: dict[str, tuple[str, Callable[[KV, Any], object]]] = {
    "task": (K.task("vm1"), lambda k, v: parse_task(k)),
    "host": (K.host("h1"), lambda k, v: parse_host(K, k, v)),
    "event": (K.event(1), lambda k, v: _event(k, v)),
    "attest response": (K.attest_response("h1", "vm1"), AttestResponse.parse),
    "leader": (K.leader, lambda k, v: leader_name(k)),
    "health": (K.health("h1"), lambda k, v: health_store._health(k)),
    "fabric": (K.fabric(Plane.STORAGE, None),
               lambda k, v: health_store._fabric(k)),
    **{m.__name__: (K.lab("x"), lambda k, v, m=m: values.parse(m, k, v))  # type: ignore[misc]
       for m in (values.HeartbeatValue, values.HostIdValue, values.AttestRequestValue, values.LabHostValue,
                 values.LabVmValue, values.LibvirtHostValue, values.LibvirtDomainValue)},
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(value=json_values)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_gives_a_value_or_a_clean_refusal(name: str, value: Any) -> None:
    key, parser = PARSERS[name]
    _must_parse_or_refuse(parser, key, value)


@given(field=st.sampled_from(sorted(evacuating_task())), value=json_values)
@settings(max_examples=400, deadline=None)
def test_a_task_with_any_one_field_replaced_parses_or_is_refused(field: str, value: Any) -> None:
    # Near-valid tasks reach the consistency checks and Task.from_dict, which arbitrary JSON rarely does.
    _must_parse_or_refuse(lambda k, v: parse_task(k), K.task("vm1"), {**evacuating_task(), field: value})


@given(raw=st.binary(max_size=200) | st.text(alphabet='[]{}"\\:,0123456789.eE+-aINfNnt', max_size=200).map(str.encode))
@settings(max_examples=400, deadline=None)
def test_any_bytes_decode_or_are_refused(raw: bytes) -> None:
    for parser, key in ((lambda k, v: parse_task(k), K.task("vm1")), (lambda k, v: leader_name(k), K.leader)):
        with contextlib.suppress(BadValue):
            parser(KV(key, raw, 1, 1, 1, 0), None)
