"""The server's support: settings (file, environment, flags), the API token and the secret key (private
files made once, even by processes racing), sealed secrets, and the systemd unit."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.server.settings import ServerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def config_errors(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_settings(**kwargs)
    return [str(p) for p in e.value.problems]


# -- settings --------------------------------------------------------------------------------------


def test_settings_default_without_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    settings = load_settings(env={})
    assert settings == ServerSettings()
    assert (settings.host, settings.port, settings.database_url, settings.workers) == ("127.0.0.1", 8300, None, 8)
    assert (settings.reconcile_interval, settings.schedule_interval, settings.limits_interval) == (5.0, 2.0, 5.0)
    assert (settings.idle_exit, settings.leader_retry) == (600.0, 1.0)
    assert all(f.description for f in ServerSettings.model_fields.values())


def test_settings_read_server_yml_in_the_state_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    (tmp_path / "server.yml").write_text("port: 9000\nidle_exit: 0\n")
    settings = load_settings(env={})
    assert (settings.port, settings.idle_exit) == (9000, 0)
    (tmp_path / "server.yml").write_text("{}\n")
    assert load_settings(env={}) == ServerSettings()


def test_settings_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    path = tmp_path / "server.yml"
    path.write_text("host: 0.0.0.0\nport: 9000\ndatabase_url: sqlite:////from/file.db\nworkers: 4\n")
    env = {"GPUFLEET_DATABASE_URL": "postgresql+psycopg://gpufleet@db/gpufleet"}

    assert load_settings(path, env={}).database_url == "sqlite:////from/file.db"
    settings = load_settings(path, overrides={"port": 9100, "host": None, "workers": None}, env=env)
    assert settings.port == 9100  # flag over file
    assert settings.host == "0.0.0.0" and settings.workers == 4  # a flag not given (None) leaves the file's
    assert settings.database_url == "postgresql+psycopg://gpufleet@db/gpufleet"  # env over file
    assert settings.schedule_interval == 2.0  # default
    flagged = load_settings(path, overrides={"database_url": "sqlite:////flag.db"}, env=env)
    assert flagged.database_url == "sqlite:////flag.db"  # flag over env
    assert load_settings(path, env={"GPUFLEET_DATABASE_URL": ""}).database_url == "sqlite:////from/file.db"


def test_settings_env_is_read_from_the_process_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "sqlite:////env.db")
    assert load_settings().database_url == "sqlite:////env.db"


def test_settings_bad_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    path.write_text("host: 127.0.0.1\nport: 70000\nreconcile_intervall: 3\nschedule_interval: 0\n")
    assert config_errors(path=path, env={}) == [
        f"{path}:2:7: port: Input should be less than or equal to 65535",
        f"{path}:3:1: reconcile_intervall: unknown field 'reconcile_intervall'; did you mean 'reconcile_interval'?",
        f"{path}:4:20: schedule_interval: Input should be greater than 0",
    ]


@pytest.mark.parametrize("text, message", [
    ("idle_exit: -1\n", "idle_exit: Input should be greater than or equal to 0"),
    ("leader_retry: .inf\n", "leader_retry: Input should be a finite number"),
    ("workers: 0\n", "workers: Input should be greater than or equal to 1"),
    ("port: [1]\n", "port: Input should be a valid integer"),
    ("port: yes\n", "port: Input should be a valid integer"),
    ("idle_exit: true\n", "idle_exit: Input should be a valid number"),
    ("- port: 1\n", "server settings must be a mapping"),
])
def test_settings_bad_values(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "server.yml"
    path.write_text(text)
    (error,) = config_errors(path=path, env={})
    assert error.startswith(f"{path}:1:") and message in error


def test_settings_a_given_file_must_exist(tmp_path: Path) -> None:
    assert config_errors(path=tmp_path / "nope.yml", env={}) == [f"{tmp_path / 'nope.yml'}: no such file"]


def test_settings_bad_flag_or_env_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    assert config_errors(overrides={"port": 70000}, env={}) == [
        "command line: port: Input should be less than or equal to 65535"]
    assert config_errors(overrides={"reconcile_interval": 0}, env={}) == [
        "command line: reconcile_interval: Input should be greater than 0"]
    assert load_settings(overrides={"port": 0}, env={}).port == 0  # a local server picks a free port
