"""Config validation: every error names the field and the reason; the example file loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmha import config
from vmha.core.planes import Plane
from vmha.core.policy import Action

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example.toml"


def minimal() -> dict[str, object]:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    return {"cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep}}


def error_of(data: dict[str, object]) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "test.toml")
    return str(e.value)


def test_example_file_loads() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.require_host().domain == "rack-12"
    assert cfg.planes.endpoints(Plane.STORAGE)[0].startswith("http://10.1.")
    assert cfg.policy_table.rows["management+service"] == Action.ISOLATE_EVACUATE
    assert cfg.timings.health().lease_ttl == 2


def test_missing_field_is_named() -> None:
    data = minimal()
    del data["cluster"]
    assert "cluster: required field is missing" in error_of(data)


def test_wrong_value_names_field_and_reason() -> None:
    data = minimal()
    data["timings"] = {"lease_ttl": 1}
    msg = error_of(data)
    assert "test.toml" in msg and "timings.lease_ttl" in msg and "greater than or equal to 2" in msg


def test_keepalive_too_slow_for_ttl() -> None:
    data = minimal()
    data["timings"] = {"lease_ttl": 2, "keepalive_interval": 1.5}
    assert "at most half of lease_ttl" in error_of(data)


def test_misspelt_field_is_refused() -> None:
    data = minimal()
    data["timings"] = {"lease_tll": 3}
    assert "timings.lease_tll: unknown field" in error_of(data)


def test_bad_endpoint() -> None:
    data = minimal()
    data["planes"] = dict(data["planes"])  # type: ignore[call-overload]
    data["planes"]["storage"] = {"endpoints": ["198.18.2.1"]}  # type: ignore[index]
    assert "planes.storage.endpoints" in error_of(data)


def test_policy_unknown_action_and_combination() -> None:
    data = minimal()
    data["policy"] = {"storage": "reboot"}
    assert "policy.storage: unknown action 'reboot'" in error_of(data)
    data["policy"] = {"mgmt": "alert"}
    assert "unknown combination(s) mgmt" in error_of(data)


def test_policy_refuses_storage_fence_without_storage() -> None:
    data = minimal()
    data["policy"] = {"storage+service": "isolate-evacuate"}
    assert "needs the host's storage plane" in error_of(data)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname=1")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)


def test_sections_required_by_role() -> None:
    cfg = config.parse(minimal())
    with pytest.raises(config.ConfigError, match=r"\[host\] is missing"):
        cfg.require_host()
    with pytest.raises(config.ConfigError, match=r"\[manager\] is missing"):
        cfg.require_manager()
