"""Which config file a command reads: --config, else $VMHA_CONFIG, else /etc/vmha/vmha.toml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_config import example_text

from vmha import config
from vmha.cli import cli


def cluster_config(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(example_text(tmp_path).replace('name = "prod-az1"', f'name = "{name}"'))
    return p


def test_default_path_is_etc_unless_the_environment_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.default_path() == Path("/etc/vmha/vmha.toml")
    monkeypatch.setenv(config.CONFIG_ENV, "/srv/vmha.toml")
    assert config.default_path() == Path("/srv/vmha.toml")
    monkeypatch.setenv(config.CONFIG_ENV, "")  # set but empty: as if unset
    assert config.default_path() == config.DEFAULT_PATH


def test_environment_names_the_file_and_config_option_wins(tmp_path: Path) -> None:
    env_file, flag_file = cluster_config(tmp_path, "from-env"), cluster_config(tmp_path, "from-flag")
    runner = CliRunner()
    env = {config.CONFIG_ENV: str(env_file)}
    for args, cluster in ((["config", "check"], "from-env"), (["config", "check", str(flag_file)], "from-flag")):
        out = runner.invoke(cli, args, env=env)
        assert out.exit_code == 0, out.output
        assert f"cluster {cluster};" in out.output
    # Every command's --config: policy show reads the file and needs no etcd.
    shown = runner.invoke(cli, ["policy", "show", "--json"], env={config.CONFIG_ENV: str(tmp_path / "none.toml")})
    assert shown.exit_code != 0 and "none.toml" in str(shown.exception or shown.output)
    ok = runner.invoke(cli, ["policy", "show", "--json", "--config", str(flag_file)],
                       env={config.CONFIG_ENV: str(tmp_path / "none.toml")})  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["management+service"] == "isolate-evacuate"


def test_missing_default_file_says_how_to_name_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.CONFIG_ENV, "/nonexistent/vmha.toml")
    with pytest.raises(config.ConfigError, match=r"cannot read /nonexistent/vmha.toml.*VMHA_CONFIG"):
        config.load(config.default_path())
    # Named explicitly: no hint about defaults.
    with pytest.raises(config.ConfigError) as e:
        config.load("/nonexistent/other.toml")
    assert "VMHA_CONFIG" not in str(e.value)


def test_every_config_option_reads_the_default() -> None:
    """No command left with a required --config: each falls back to $VMHA_CONFIG and the default."""
    import click

    from vmha.cli import COMMANDS, LazyGroup

    group = cli
    assert isinstance(group, LazyGroup)
    ctx = click.Context(group)
    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                walk(sub, f"{path} {name}")
        for p in cmd.params:
            if isinstance(p, click.Option) and "--config" in p.opts and (p.required or p.envvar != config.CONFIG_ENV):
                missing.append(path)

    for name in sorted(set(COMMANDS) - {"lab", "demo", "bench", "sim"}):  # lab tools name their files
        sub = group.get_command(ctx, name)
        assert sub is not None
        walk(sub, f"vmha {name}")
    assert missing == []
