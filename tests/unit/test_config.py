"""Config validation: every error names the field and the reason; the example file loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from vmha import config
from vmha.config import LocksConfig
from vmha.core.planes import Plane
from vmha.core.policy import Action

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example.toml"


def minimal() -> dict[str, object]:
    ep = {"endpoints": ["http://198.18.1.1:2379"]}
    return {"cluster": {"name": "c1"}, "planes": {"management": ep, "storage": ep, "service": ep},
            "etcd": {"insecure": True}}


def error_of(data: dict[str, object]) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "test.toml")
    return str(e.value)


def test_example_file_loads() -> None:
    # parse, not load: the example's certificate files exist on no test machine.
    cfg = config.parse(tomllib.loads(EXAMPLE.read_text()), str(EXAMPLE))
    assert cfg.require_host().domain == "rack-12"
    assert cfg.planes.endpoints(Plane.STORAGE)[0].startswith("https://10.1.")
    assert cfg.etcd.tls() is not None
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


def manager(**fields: object) -> dict[str, object]:
    return {**minimal(), "manager": {"name": "m1", "endpoints": ["http://198.18.1.1:2379"], "driver": "nova",
                                     **fields}}  # fmt: skip


def test_numbers_are_finite_and_bounded_and_related_fields_agree() -> None:
    assert "timings.suspect_after" in error_of({**minimal(), "timings": {"suspect_after": float("inf")}})
    assert "manager.retry_base" in error_of(manager(retry_base=float("nan")))
    assert "manager.decide_after" in error_of(manager(decide_after=1e9))
    assert "retry_cap (1.0) must be at least retry_base (2.0)" in error_of(manager(retry_cap=1.0))
    err = error_of({**minimal(), "locks": {"path": "/l", "io_timeout": 1}, "timings": {"lease_ttl": 8}})
    assert "lease_ttl (8) must be shorter than 8 x locks.io_timeout (8 s)" in err
    assert "isolation_after (1.0) must be at least timings.lease_ttl (2)" in error_of(
        {**minimal(), "agent": {"isolation_after": 1.0}})
    assert "decide_after (0.1) must be at least timings.keepalive_interval (0.5)" in error_of(manager(decide_after=0.1))


def test_the_manager_term_must_outlast_an_etcd_leader_election() -> None:
    assert config.parse(manager()).manager.election_ttl == 4  # type: ignore[union-attr]
    assert ("manager.election_ttl (2) must be at least 3 s to outlast an etcd leader election (up to 2 x "
            "etcd.election_timeout = 2 s)") in error_of(manager(election_ttl=2))
    slow_etcd = {"insecure": True, "election_timeout": 2.5}
    assert "election_ttl (4) must be at least 7 s" in error_of({**manager(), "etcd": slow_etcd})
    config.parse({**manager(election_ttl=7), "etcd": slow_etcd})
    config.parse({**manager(election_ttl=2), "etcd": {"insecure": True, "election_timeout": 0.5}})
    assert "etcd.election_timeout" in error_of({**minimal(), "etcd": {"insecure": True, "election_timeout": 0}})


def test_lockspace_fits_sanlock_and_every_endpoint_list_is_checked() -> None:
    assert "locks.lockspace" in error_of({**minimal(), "locks": {"path": "/l", "lockspace": "x" * 49}})
    config.parse({**minimal(), "locks": {"path": "/l", "lockspace": "x" * 48}})
    assert "manager.endpoints.0" in error_of(manager(endpoints=["10.0.0.1:2379"]))
    err = error_of(manager(endpoints=["http://u:s3cret@[::1:2379"]))
    assert "manager.endpoints.0" in err and "s3cret" not in err


def test_the_driver_is_required_and_a_closed_set() -> None:
    from typing import get_args

    from vmha.manager.daemon import DRIVERS

    data = manager()
    del data["manager"]["driver"]  # type: ignore[attr-defined]
    assert "manager.driver: required field is missing" in error_of(data)
    assert "manager.driver" in error_of(manager(driver="lab2"))
    assert set(get_args(config.ManagerConfig.model_fields["driver"].annotation)) == set(DRIVERS)


def test_power_options_refuse_control_characters_and_unknown_names() -> None:
    power = {"h1": {"agent": "fence_ipmilan", "ip": "10.0.0.1", "password": "x\naction=on"}}
    assert "[power.h1] password: control characters" in error_of({**minimal(), "power": power})
    assert "power.h1.Bad-Name" in error_of({**minimal(), "power": {"h1": {"agent": "fence_ipmilan", "Bad-Name": 1}}})


def test_power_fence_covers_every_listed_host(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vmha.config_cli import config_group

    data = manager(power_fence=True)
    data["libvirt"] = {"hosts": {h: f"qemu+tls://{h}/system" for h in ("h1", "h2", "h3")}}
    data["power"] = {"h2": {"agent": "fence_ipmilan", "ip": "10.0.0.2"}}
    want = "manager.power_fence is on but h1, h3 (libvirt.hosts) have no [power.HOST] section"
    assert config.parse(data).power_uncovered() == want
    path = tmp_path / "vmha.toml"
    path.write_text(example_text(tmp_path).split("[manager]")[0] + '[manager]\nname = "m1"\ndriver = "libvirt"\n'
                    'power_fence = true\nendpoints = ["https://198.18.1.1:2379"]\n[libvirt.hosts]\n'
                    'h1 = "qemu+tls://h1/system"\nh3 = "qemu+tls://h3/system"\n'
                    '[power.h2]\nagent = "fence_ipmilan"\n')
    path.chmod(0o600)
    out = CliRunner().invoke(config_group, ["check", str(path)])
    assert out.exit_code == 1 and "h1, h3 (libvirt.hosts) have no [power.HOST]" in out.output, out.output
    data["power"] = {h: {"agent": "fence_ipmilan", "ip": "10.0.0.9"} for h in ("h1", "h2", "h3")}
    assert config.parse(data).power_uncovered() == ""
    data["manager"]["power_fence"] = False  # type: ignore[index]
    data["power"] = {}
    assert config.parse(data).power_uncovered() == ""  # no power fence: no [power] needed

def example_text(tmp_path: Path) -> str:
    """The example file with its [etcd] files made (empty: load() only checks they can be read)."""
    text = EXAMPLE.read_text()
    for name in ("ca.crt", "compute-017.crt", "compute-017.key"):
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o600)
        text = text.replace(f"/etc/vmha/pki/{name}", str(tmp_path / name))
    return text


def test_etcd_tls_is_required_unless_insecure(tmp_path: Path) -> None:
    plain = minimal()
    del plain["etcd"]
    assert "http:// etcd endpoints are plaintext" in error_of(plain)
    https = {**minimal(), "planes": {p: {"endpoints": ["https://198.18.1.1:2379"]} for p in ("management", "storage",
                                                                                           "service")}}  # fmt: skip
    assert "https:// etcd endpoints need etcd.ca, etcd.cert, etcd.key" in error_of(https)
    partial = {**https, "etcd": {"ca": "/x/ca.crt", "cert": "/x/h.crt"}}
    assert "need etcd.key (PEM files)" in error_of(partial)
    mixed = {**minimal(), "manager": {"name": "m1", "endpoints": ["https://198.18.1.1:2379"], "driver": "lab"}}
    assert "mix http:// and https://" in error_of(mixed)
    path = tmp_path / "vmha.toml"
    path.write_text(example_text(tmp_path))
    config.load(path)
    (tmp_path / "compute-017.key").chmod(0o640)  # the host's etcd identity, readable by its group
    with pytest.raises(config.ConfigError, match=rf"etcd.key = '{tmp_path}/compute-017.key': readable by group or "
                       r"others \(mode 640\): chmod 600 it"):
        config.load(path)
    (tmp_path / "compute-017.key").unlink()
    (tmp_path / "ca.crt").unlink()  # a directory in its place (tests run as root: a mode 000 file reads)
    (tmp_path / "ca.crt").mkdir()
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert f"etcd.key = '{tmp_path}/compute-017.key': No such file or directory" in str(e.value)
    assert f"etcd.ca = '{tmp_path}/ca.crt': Is a directory" in str(e.value)
    assert "etcd.cert" not in str(e.value)


def test_a_config_with_secrets_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "vmha.toml"
    example = example_text(tmp_path)
    path.write_text(example.replace("https://10.0.0.11:2379", "https://vmha:s3cret@10.0.0.11:2379"))
    path.chmod(0o644)
    with pytest.raises(config.ConfigError, match=r"holds secrets \(planes.management.endpoints .*chmod 600") as e:
        config.load(path)
    assert "s3cret" not in str(e.value)
    path.chmod(0o600)
    config.load(path)
    path.write_text(example)
    path.chmod(0o644)
    config.load(path)  # no secret in it: readable is fine


def test_redacted_urls() -> None:
    from vmha.etcd.client import EtcdClient, redact_url

    assert redact_url("https://vmha:s3cret@10.0.0.1:2379") == "https://vmha:***@10.0.0.1:2379"
    assert redact_url("http://10.0.0.1:2379") == "http://10.0.0.1:2379"
    assert EtcdClient(["http://a:b@127.0.0.1:2379"]).endpoint == "http://a:***@127.0.0.1:2379"


def test_config_check_names_every_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vmha.cli import cli

    path = tmp_path / "bad.toml"
    path.write_text(EXAMPLE.read_text().replace("max_parallel = 8", "max_parallel = 0\nretry_base = inf")
                    .replace('lockspace = "vmha"', f'lockspace = "{"x" * 49}"'))  # fmt: skip
    r = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert r.exit_code == 1
    for field in ("manager.max_parallel", "manager.retry_base", "locks.lockspace"):
        assert field in r.output
    r = CliRunner().invoke(cli, ["config", "check", str(EXAMPLE)])  # its certificate files are not here
    assert r.exit_code == 1 and "etcd.ca = '/etc/vmha/pki/ca.crt': No such file" in r.output
    path.write_text(example_text(tmp_path))
    r = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert r.exit_code == 0 and "ok" in r.output


def test_libvirt_disk_leases_need_the_vm_disk_path_and_libvirts_lockspace() -> None:
    ok = LocksConfig(path=Path("/leases"), leases="libvirt-disk", vm_disk="/var/lib/nova/instances/{vm}/disk")
    assert ok.vm_disk.endswith("{vm}/disk")
    for kwargs, error in [
        ({"leases": "libvirt-disk"}, r"needs vm_disk, an absolute path with \{vm\} once .* got ''"),
        ({"leases": "libvirt-disk", "vm_disk": "instances/{vm}/disk"}, "needs vm_disk"),
        ({"leases": "libvirt-disk", "vm_disk": "/i/{vm}/{vm}"}, "needs vm_disk"),
        ({"leases": "libvirt-disk", "vm_disk": "/i/{uuid}/disk"}, "needs vm_disk"),
        ({"leases": "libvirt-disk", "vm_disk": "/i/{vm}/disk", "lockspace": "vmha"},
         "uses libvirt's lockspace __LIBVIRT__DISKS__: remove lockspace"),
        ({"vm_disk": "/i/{vm}/disk"}, r"set it only with leases = \"libvirt-disk\""),
        ({"leases": "auto"}, "leases"),
    ]:
        with pytest.raises(ValidationError, match=error):
            LocksConfig(path=Path("/leases"), **kwargs)
