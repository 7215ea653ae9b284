"""`vmha bench rto --etcd`: the conditions are checked before any lab is built, and the report gives
each condition its own table and detection p50 / p99 (issue 14). The run itself is a lab bench."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vmha.bench import rto as rto_module
from vmha.bench.rto import EtcdTrials, etcd_report, rto
from vmha.lab.scenario import Timeline


def _tl(kind: str, detected: float | None) -> Timeline:
    return Timeline(kind, "h1", 1000.0, ["vm1"], detected=None if detected is None else 1000.0 + detected)


def test_unknown_repeated_or_mixed_with_rounds_conditions_are_refused_before_any_lab(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lab(*args: object, **kwargs: object) -> None:
        raise AssertionError("a lab was about to be built")

    monkeypatch.setattr(rto_module, "_run", no_lab)  # a missed refusal must not build a lab here
    runner = CliRunner()
    for args, text in ((["--etcd", "healthy,bogus"], "unknown condition(s) ['bogus']"),
                       (["--etcd", "healthy,healthy"], "a condition twice"),
                       (["--etcd", "healthy", "--rounds", "9"], "not with --rounds")):
        r = runner.invoke(rto, args)
        assert r.exit_code == 2, r.output
        assert text in r.output


def test_each_condition_has_its_rows_and_detection_percentiles() -> None:
    healthy = EtcdTrials({"storage": [_tl("storage", 2.0), _tl("storage", 2.4)], "power-off": [_tl("power-off", 2.2)]})
    change = EtcdTrials({"storage": [_tl("storage", 4.9)], "power-off": [_tl("power-off", None)]}, [0.52])
    report = etcd_report({"healthy": healthy, "leader-change": change})
    json.dumps(report)  # it goes out with --json
    conditions = report["conditions"]
    assert isinstance(conditions, dict) and list(conditions) == ["healthy", "leader-change"]
    assert conditions["healthy"]["detected"] == {"p50": 2.2, "p99": 2.4, "n": 3}
    assert conditions["leader-change"]["detected"] == {"p50": 4.9, "p99": 4.9, "n": 1}  # the undetected one left out
    assert conditions["leader-change"]["crashed_before"] == [0.52]
    assert [r["class"] for r in conditions["healthy"]["rows"]] == ["storage", "power-off"]
    assert conditions["healthy"]["rows"][0]["detected"] == {"p50": 2.0, "p95": 2.4, "n": 2}
    assert report["leader_crash_before"] == 0.5
