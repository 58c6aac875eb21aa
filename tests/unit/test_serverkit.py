"""The server's support: settings (file, environment, flags), the API token and the secret key (private
files made once, even by processes racing), sealed secrets, and the systemd unit."""

from __future__ import annotations

import configparser
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError, GpufleetError, UsageError
from gpufleet.server import tokens
from gpufleet.server.settings import ServerSettings, load_settings
from gpufleet.server.systemd import unit
from gpufleet.server.tokens import TOKEN_FILE, ensure_token, read_token, server_dir
from gpufleet.server.vault import KEY_FILE, Vault, VaultError

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
    assert (settings.reconcile_interval, settings.schedule_interval, settings.limits_interval) == (1.0, 2.0, 5.0)
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


# -- the API token ---------------------------------------------------------------------------------


def test_server_dir_is_private(tmp_path: Path, monkeypatch) -> None:
    assert server_dir(tmp_path / "home") == tmp_path / "home" / "server"
    assert mode(tmp_path / "home" / "server") == 0o700
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "env-home"))
    assert server_dir() == tmp_path / "env-home" / "server"
    assert mode(tmp_path / "env-home" / "server") == 0o700


def test_token_made_once_private_and_read_back(tmp_path: Path) -> None:
    d = server_dir(tmp_path)
    assert read_token(d) is None
    token = ensure_token(d)
    assert len(token) >= 43 and token.isascii() and not any(c.isspace() for c in token)
    assert mode(d / TOKEN_FILE) == 0o600
    assert ensure_token(d) == token == read_token(d)
    assert sorted(p.name for p in d.iterdir()) == [TOKEN_FILE]  # no temporary file left
    assert ensure_token(server_dir(tmp_path / "other")) != token


def test_token_open_to_others_is_refused(tmp_path: Path) -> None:
    d = server_dir(tmp_path)
    ensure_token(d)
    os.chmod(d / TOKEN_FILE, 0o640)
    for call in (read_token, ensure_token):
        with pytest.raises(GpufleetError) as e:
            call(d)
        assert str(d / TOKEN_FILE) in str(e.value) and f"chmod 600 {d / TOKEN_FILE}" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"two words\n", b"\xff\xfe", b"x" * 5000])
def test_token_file_without_a_token_is_refused(tmp_path: Path, content: bytes) -> None:
    d = server_dir(tmp_path)
    (d / TOKEN_FILE).write_bytes(content)
    os.chmod(d / TOKEN_FILE, 0o600)
    with pytest.raises(GpufleetError, match="does not hold one API token: remove it and restart the server"):
        read_token(d)


def test_token_file_may_not_be_a_symlink(tmp_path: Path) -> None:
    d = server_dir(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("abc\n")
    os.chmod(target, 0o600)
    (d / TOKEN_FILE).symlink_to(target)
    with pytest.raises(GpufleetError, match="cannot read the API token file"):
        read_token(d)


def test_token_loser_of_a_race_reads_the_winners(tmp_path: Path, monkeypatch) -> None:
    # the other process writes its token between this one's look and its link: the link fails, and
    # this one returns the other's token, not its own
    d = server_dir(tmp_path)
    real = tokens.read_private
    looks = []

    def read_private(path, what, remake=tokens.REMAKE):
        looks.append(path)
        if len(looks) == 1:
            (d / TOKEN_FILE).write_text("the-winners-token\n")
            os.chmod(d / TOKEN_FILE, 0o600)
            return None
        return real(path, what, remake)

    monkeypatch.setattr(tokens, "read_private", read_private)
    assert ensure_token(d) == "the-winners-token"
    assert sorted(p.name for p in d.iterdir()) == [TOKEN_FILE]


def race(code: str, *args: str, n: int = 8) -> list[str]:
    """What ``n`` Python processes running ``code`` at the same moment print (the worktree's gpufleet)."""
    start = time.time() + 1.5  # every process imported and waiting before anyone starts
    prelude = f"import sys, time\nwhile time.time() < {start}: pass\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


def test_token_two_processes_racing_get_one_token(tmp_path: Path) -> None:
    d = server_dir(tmp_path)
    for _ in range(2):
        (d / TOKEN_FILE).unlink(missing_ok=True)
        outs = race("""
            from pathlib import Path
            from gpufleet.server.tokens import ensure_token
            print(ensure_token(Path(sys.argv[1])))
        """, str(d))
        assert len(set(outs)) == 1, outs
        assert (d / TOKEN_FILE).read_text() == outs[0] + "\n"
        assert mode(d / TOKEN_FILE) == 0o600
        assert sorted(p.name for p in d.iterdir()) == [TOKEN_FILE]


# -- the vault -------------------------------------------------------------------------------------

SECRETS = {"HF_TOKEN": "hf_s3cr3t-value", "PASSWORD": "p\u00e4ss w\"o'rd\n$x", "EMPTY": ""}


def test_vault_seals_and_opens(tmp_path: Path) -> None:
    key_file = server_dir(tmp_path) / KEY_FILE
    vault = Vault(key_file)
    assert mode(key_file) == 0o600
    sealed = vault.seal(SECRETS)
    assert isinstance(sealed, str) and sealed.isascii()
    assert not any(v in sealed for v in SECRETS.values() if v) and "HF_TOKEN" not in sealed
    assert vault.open(sealed) == SECRETS
    assert vault.open(vault.seal({})) == {}
    assert Vault(key_file).open(sealed) == SECRETS  # the key is kept: a restarted server opens it
    assert sorted(p.name for p in key_file.parent.iterdir()) == [KEY_FILE]


def test_vault_refuses_values_that_are_not_text(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        Vault(tmp_path / KEY_FILE).seal({"A": 1})  # type: ignore[dict-item]


def test_vault_other_key_error_says_submit_again_and_shows_no_secret(tmp_path: Path) -> None:
    sealed = Vault(server_dir(tmp_path / "a") / KEY_FILE).seal(SECRETS)
    other = Vault(server_dir(tmp_path / "b") / KEY_FILE)
    for bad in (sealed, "not a token", sealed[:-4] + "AAAA", ""):
        with pytest.raises(VaultError) as e:
            other.open(bad)
        error = e.value
        assert isinstance(error, GpufleetError)
        message = str(error)
        assert "secret key" in message and "changed" in message and "submit the run again" in message
        assert str(other.key_file) in message
        shown = message + repr(error) + repr(error.args) + repr(error.__cause__) + repr(error.__context__)
        assert error.__cause__ is None and error.__context__ is None
        for value in list(SECRETS.values()) + list(SECRETS):
            if value:
                assert value not in shown


def test_vault_repr_shows_no_key(tmp_path: Path) -> None:
    vault = Vault(tmp_path / KEY_FILE)
    key = (tmp_path / KEY_FILE).read_text().strip()
    assert key not in repr(vault) and key not in str(vars(vault))
    assert repr(vault) == f"Vault({str(tmp_path / KEY_FILE)!r})"


def test_vault_key_open_to_others_or_broken_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / KEY_FILE
    Vault(key_file)
    os.chmod(key_file, 0o604)
    with pytest.raises(GpufleetError, match=f"secret key file {key_file} is open to other users .* chmod 600"):
        Vault(key_file)
    key_file.write_text("not-a-fernet-key\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(GpufleetError, match="does not hold a Fernet key: remove it .* submitted again"):
        Vault(key_file)


def test_vault_processes_racing_share_one_key(tmp_path: Path) -> None:
    key_file = server_dir(tmp_path) / KEY_FILE
    outs = race("""
        from pathlib import Path
        from gpufleet.server.vault import Vault
        print(Vault(Path(sys.argv[1])).seal({"who": "me"}))
    """, str(key_file))
    assert mode(key_file) == 0o600
    vault = Vault(key_file)
    assert [vault.open(sealed) for sealed in outs] == [{"who": "me"}] * len(outs)
    assert sorted(p.name for p in key_file.parent.iterdir()) == [KEY_FILE]


# -- the systemd unit ------------------------------------------------------------------------------


def parse_unit(text: str) -> configparser.ConfigParser:
    """The unit read the way systemd reads its sections and keys (one value per key here)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(text)
    return parser


def systemd_words(value: str) -> list[str]:
    """A quoted value split into words as systemd unquotes it (specifiers and $ expansion undone)."""
    return [w.replace("%%", "%") for w in shlex.split(value.replace("$$", "$"), posix=True)]


def test_unit_fields(tmp_path: Path) -> None:
    text = unit("/opt/gpufleet/bin/gpufleet", Path("/var/lib/gpufleet"), "gpufleet", Path("/etc/gpufleet/server.yml"))
    u = parse_unit(text)
    assert list(u.sections()) == ["Unit", "Service", "Install"]
    assert "network-online.target" in u["Unit"]["After"].split() and "postgresql.service" in u["Unit"]["After"]
    assert "postgresql" not in u["Unit"].get("Wants", "") and "Requires" not in u["Unit"]
    s = u["Service"]
    assert systemd_words(s["ExecStart"]) == ["/opt/gpufleet/bin/gpufleet", "server", "--config",
                                             "/etc/gpufleet/server.yml"]
    assert systemd_words(s["Environment"]) == ["GPUFLEET_HOME=/var/lib/gpufleet"]
    assert (s["User"], s["Restart"], s["RestartSec"], s["KillSignal"]) == ("gpufleet", "on-failure", "2", "SIGTERM")
    assert int(s["TimeoutStopSec"]) > 0
    assert (s["NoNewPrivileges"], s["PrivateTmp"], s["ProtectSystem"], s["UMask"]) == ("yes", "yes", "full", "0077")
    assert u["Install"]["WantedBy"] == "multi-user.target"
    plain = parse_unit(unit("/usr/bin/gpufleet", Path("/srv/g"), "root", None))
    assert systemd_words(plain["Service"]["ExecStart"]) == ["/usr/bin/gpufleet", "server"]


def test_unit_quotes_paths(tmp_path: Path) -> None:
    home = Path("/srv/gpu fleet/%h $HOME \"q\" back\\slash")
    config = Path("/etc/my gpufleet/$x%i.yml")
    s = parse_unit(unit("/opt/my venv/bin/gpufleet", home, "gpufleet", config))["Service"]
    assert systemd_words(s["ExecStart"]) == ["/opt/my venv/bin/gpufleet", "server", "--config", str(config)]
    # Environment= has specifiers but no $ expansion
    assert [w.replace("%%", "%") for w in shlex.split(s["Environment"])] == [f"GPUFLEET_HOME={home}"]


def test_unit_relative_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = parse_unit(unit("/usr/bin/gpufleet", Path("state"), "gpufleet", Path("server.yml")))["Service"]
    assert systemd_words(s["Environment"]) == [f"GPUFLEET_HOME={tmp_path / 'state'}"]
    assert systemd_words(s["ExecStart"])[-1] == str(tmp_path / "server.yml")


@pytest.mark.parametrize("exe, home, user, match", [
    ("gpufleet", Path("/h"), "u", "absolute path"),
    ("/usr/bin/gpufleet", Path("/h"), "u s", "not a user name"),
    ("/usr/bin/gpufleet", Path("/h"), "%u", "not a user name"),
    ("/usr/bin/gpufleet", Path("/h\nExecStartPre=/bin/evil"), "u", "control character"),
])
def test_unit_refuses_what_systemd_would_misread(exe: str, home: Path, user: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        unit(exe, home, user, None)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own check where it is installed (Debian: the systemd package); where it is not, the
    structural checks of test_unit_fields and test_unit_quotes_paths are what there is."""
    analyze = shutil.which("systemd-analyze")
    folder = tmp_path / "a dir with %h and $x"
    folder.mkdir()
    exe = folder / "gpufleet"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    user = pwd.getpwuid(os.getuid()).pw_name
    path = tmp_path / "gpufleet-server.service"
    path.write_text(unit(str(exe), folder / "home", user, folder / "server.yml"))
    parse_unit(path.read_text())
    if analyze is None:
        return
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # it only warns about a key it does not know or a value it cannot read: those count here too
    assert path.name not in result.stderr + result.stdout, result.stderr


def test_the_servers_connections_send_without_waiting_for_acks():
    """TCP_NODELAY on each accepted connection (asyncio sets it for a socket made as TCP): without it every
    answer on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from gpufleet.server.main import listening_socket

    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(main()) != 0
