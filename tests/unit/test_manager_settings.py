"""ManagerConfig -> RecoverySettings: every knob reaches the core, and the defaults match."""

from __future__ import annotations

from dataclasses import fields

import pytest

from vmha import config
from vmha.core.settings import RecoverySettings


def manager(**fields_: object) -> config.ManagerConfig:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    cfg = config.parse({"cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
            "etcd": {"insecure": True},
                        "manager": {"name": "m1", "endpoints": ["http://198.18.1.1:2379"], "driver": "nova",
                                    **fields_}})
    return cfg.require_manager()


def test_defaults_are_the_cores_defaults() -> None:
    s = manager().recovery_settings()
    assert s == RecoverySettings()
    assert s.decide_after == 1.0  # a dead host's three leases expire up to ~1 s apart


def test_every_setting_is_passed_through() -> None:
    changed = {"max_parallel": 3, "max_per_host": 2, "retry_base": 0.5, "retry_cap": 9.0, "max_attempts": 7,
               "decide_after": 2.5, "settle_after": 8.0, "power_fence": True, "allow_exit_attested": False,
               "host_capacity": 11, "recheck_timeout": 3.0, "rejoin_after": 30.0,
               "quarantine_after": 2, "quarantine_window": 600.0, "on_agent_stop": "drain",
               "restart_after": 7.0, "rebalance": True, "rebalance_moves": 3, "rebalance_cooldown": 40.0}
    assert set(changed) == {f.name for f in fields(RecoverySettings)}, "a RecoverySettings field has no knob"
    s = manager(**changed).recovery_settings()
    assert {k: getattr(s, k) for k in changed} == changed


def test_a_negative_settle_after_is_refused_naming_the_field() -> None:
    with pytest.raises(config.ConfigError, match=r"manager\.settle_after"):
        manager(settle_after=-1)
