"""A dev environment's `ssh RUN-NAME` (gpufleet.devssh): `ide` and the sshd port at load, the start
script's sshd lines (run by a real sh against a stand-in sshd), the register script's answer, the
user's ssh entry (an include file, the user's own config kept, the host key pinned) and the IDE links
in dstack's forms."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from gpufleet import devssh
from gpufleet.errors import ConfigError
from gpufleet.launch import container_vars, dev_sshd, published_ports, run_command
from gpufleet.models import RUN_CONFIG, HostFacts, RunRequest
from gpufleet.runconfig import UNSUPPORTED, parse_run


def dev(**fields):
    return RUN_CONFIG.validate_python({"type": "dev-environment", "image": "localhost/x:1", **fields})


@pytest.mark.parametrize("ide", ["vscode", "cursor", "windsurf", "zed"])
def test_dstacks_ide_values_load(ide):
    assert dev(ide=ide).ide == ide


def test_an_unknown_ide_and_the_sshd_port_are_refused_with_the_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_run("type: dev-environment\nimage: x\nide: emacs\n", str(tmp_path / "d.yml"))
    assert "3:" in str(e.value.problems[0]) and "ide" in str(e.value.problems[0])
    with pytest.raises(ConfigError) as e:
        parse_run("type: dev-environment\nimage: x\nports: ['8022:10022']\n", str(tmp_path / "d.yml"))
    assert "10022 is the dev environment's SSH server's" in str(e.value.problems[0])
    assert "ide" not in UNSUPPORTED["dev-environment"] and "version" in UNSUPPORTED["dev-environment"]


def test_the_sshd_port_is_published_and_the_host_key_travels_as_a_secret():
    private, public = devssh.new_host_key()
    cfg = dev(ide="vscode", ports=[8000])
    assert published_ports(cfg) == ["8000", "10022"]
    req = RunRequest(name="d", source="d.yml", config=cfg, secrets={devssh.HOST_KEY_ENV: private})
    facts = HostFacts()
    v = container_vars(req, "r1", {}, facts, [], 0, 0, set())
    assert v["workload_secret_env"] == {devssh.HOST_KEY_ENV: private}
    assert private not in "".join(v["workload_command"]) and public in v["workload_command"][2]
    assert v["workload_ports"] == ["8000", "10022"]
    # on the host's network: loopback, a port of its own
    host = dev(network="host")
    script, _ = dev_sshd(RunRequest(name="h", source="h.yml", config=host), "run-id")
    port = devssh.sshd_port(True, "run-id")
    assert f"Port {port}" in script and "ListenAddress 127.0.0.1" in script and 10022 <= port < 20000


def start(tmp_path: Path, required: bool, with_sshd: bool) -> tuple[subprocess.CompletedProcess, Path]:
    """The dev environment's start script (as run_command makes it) run by sh in a scratch root: the
    sshd lines write to ``SSHD_DIR`` under it; /usr/sbin/sshd is a stand-in that writes its pid file."""
    root = tmp_path / "root"
    private, public = devssh.new_host_key()
    _, argv = run_command(dev(ide="vscode" if required else None, init=["echo init-ran"]),
                          devssh.sshd_script(public, 10022, False, required))
    script = argv[2].replace(devssh.SSHD_DIR, str(root / "sshd")).replace("while :; do sleep 3600; done", "")
    fake = root / "bin"
    fake.mkdir(parents=True)
    if with_sshd:
        sshd = fake / "sshd"
        sshd.write_text(f'#!/bin/sh\necho "$@" > {root}/sshd-args\necho $$ > {root}/sshd/sshd.pid\n')
        sshd.chmod(0o755)
        script = script.replace(" ".join(devssh.SSHD_PATHS), str(sshd))
    else:
        script = script.replace(" ".join(devssh.SSHD_PATHS), str(fake / "none"))
    # no package manager here: the commands are found nowhere
    script = script.replace("command -v apt-get", "command -v gf-no-apt").replace("command -v dnf", "command -v x-1")
    script = script.replace("command -v yum", "command -v x-2").replace("command -v apk", "command -v x-3")
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", devssh.HOST_KEY_ENV: private, "RUN_VAR": "it's $x",
                            "TERM": "dumb"})
    return p, root


def test_the_start_script_starts_sshd_with_the_host_key_and_the_runs_environment(tmp_path):
    p, root = start(tmp_path, required=True, with_sshd=True)
    assert p.returncode == 0 and "init-ran" in p.stdout, p.stderr
    d = root / "sshd"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "host_key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    config = (d / "sshd_config").read_text()
    assert "PasswordAuthentication no" in config and "PermitRootLogin prohibit-password" in config
    assert (root / "sshd-args").read_text().split()[:2] == ["-f", f"{d}/sshd_config"]
    environment = (d / "environment").read_text()
    assert devssh.HOST_KEY_ENV not in environment  # taken out before anything else runs
    assert "TERM" not in environment  # the session's own
    shown = subprocess.run(["sh", "-c", f'. {shlex.quote(str(d / "environment"))}; printf %s "$RUN_VAR"'],
                           capture_output=True, text=True).stdout
    assert shown == "it's $x"


def test_without_sshd_ide_fails_with_the_reason_and_no_ide_goes_on(tmp_path):
    p, _ = start(tmp_path / "a", required=True, with_sshd=False)
    assert p.returncode == devssh.NO_SSHD_EXIT and "init-ran" not in p.stdout
    assert "has no sshd and could not install openssh-server: no /usr/sbin/sshd, and" in p.stderr
    p, root = start(tmp_path / "b", required=False, with_sshd=False)
    assert p.returncode == 0 and "init-ran" in p.stdout and (root / "sshd" / "no-sshd").exists()


def test_the_register_answer():
    _, public = devssh.new_host_key()
    assert devssh.read_register_answer(f"ok\n{public}\n/workflow\nroot\n") == {
        "ok": True, "host_key": public, "workdir": "/workflow", "user": "root"}
    assert devssh.read_register_answer("no-sshd\nno /usr/sbin/sshd\n") == {"ok": False, "why": "no /usr/sbin/sshd"}
    with pytest.raises(ValueError):
        devssh.check_public_key("ssh-ed25519 AAAA; rm -rf /")


def test_ide_links_in_dstacks_forms():
    assert devssh.ide_link("vscode", "dev", "/workflow") == "vscode://vscode-remote/ssh-remote+dev/workflow"
    assert devssh.ide_link("cursor", "dev", "/w") == "cursor://vscode-remote/ssh-remote+dev/w"
    assert devssh.ide_link("windsurf", "dev", "/w") == "windsurf://vscode-remote/ssh-remote+dev/w"
    assert devssh.ide_link("zed", "dev", "/w") == "zed://ssh/dev/w"
    assert devssh.ide_link(None, "dev", "/") == "vscode://vscode-remote/ssh-remote+dev/"


def test_entries_are_written_kept_apart_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "g h"))
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "config").write_text("Host *\n  ServerAliveInterval 5\n")
    os.chmod(ssh / "config", 0o640)
    identity, public = devssh.user_key(tmp_path / "g h")
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600 and devssh.user_key(tmp_path / "g h")[1] == public
    _, k1 = devssh.new_host_key()
    _, k2 = devssh.new_host_key()
    devssh.write_entry("one", 10022, "root", k1, identity, "http://a")
    devssh.write_entry("two", 10022, "ubuntu", k2, identity, "http://a")
    devssh.write_entry("one", 10022, "root", k2, identity, "http://a")  # again: replaced, not doubled
    devssh.write_entry("other", 10022, "root", k1, identity, "http://b")
    user = (ssh / "config").read_text()
    assert user.count("Include") == 1 and user.endswith("Host *\n  ServerAliveInterval 5\n")
    assert user.splitlines()[1] == f"Include {ssh / 'gpufleet' / 'config'}"
    assert stat.S_IMODE((ssh / "config").stat().st_mode) == 0o640  # the user's file keeps its mode
    config = (ssh / "gpufleet" / "config").read_text()
    assert config.count("Host one") == 1 and "User ubuntu" in config
    proxy = next(line for line in config.splitlines() if "ProxyCommand" in line and "ssh-proxy one" in line)
    assert f"'GPUFLEET_HOME={tmp_path / 'g h'}'" in proxy  # quoted for the shell ssh runs it with
    assert (ssh / "gpufleet" / "known_hosts").read_text().splitlines() == [
        f"gpufleet-two {k2}", f"gpufleet-one {k2}", f"gpufleet-other {k1}"]
    # `ssh -G` reads the entry as ssh will use it
    g = subprocess.run(["ssh", "-G", "-F", str(ssh / "config"), "one"], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path / "home")})
    assert g.returncode == 0, g.stderr
    assert "stricthostkeychecking true" in g.stdout and "hostkeyalias gpufleet-one" in g.stdout
    assert devssh.remove_entries(keep={"two"}, server="http://a") == ["one"]  # another server's kept
    assert "Host one" not in (ssh / "gpufleet" / "config").read_text()
    assert (ssh / "gpufleet" / "known_hosts").read_text() == f"gpufleet-two {k2}\ngpufleet-other {k1}\n"
    assert devssh.remove_entries(drop={"two", "other"}, server="http://a") == ["two"]


# ------------------------------------------------------------------------------- inactivity_duration

@pytest.mark.parametrize(("value", "seconds"), [("30m", 1800.0), (90, 90.0), ("2h", 7200.0), ("off", None),
                                                (False, None), (True, None), (None, None), (0, 0.0)])
def test_inactivity_duration_in_dstacks_forms(value, seconds):
    assert dev(inactivity_duration=value).inactivity_duration == seconds


def test_a_bad_inactivity_duration_points_at_its_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_run("type: dev-environment\nimage: x\ninactivity_duration: 1h30m\n", str(tmp_path / "d.yml"))
    assert "3:" in str(e.value.problems[0]) and "not a duration" in str(e.value.problems[0])
    assert "inactivity_duration" not in UNSUPPORTED["dev-environment"]


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2726 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0A580002:2726 0A580001:B3C2 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0A580002:1F40 0A580001:B3C4 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


def test_connections_count_established_sshd_sockets_and_attach_shells():
    mark = devssh.ATTACH_MARK
    assert devssh.connections(TCP + mark + "\n", 10022) == 1  # the listener and port 8000 are not counted
    assert devssh.connections(TCP.replace(" 01 ", " 06 ") + mark + "\n", 10022) == 0  # TIME_WAIT
    shells = "41 (sh) S 0 41 41 34816\n57 (my (odd) prog) S 41 57 41 0\n"  # the shell, and its child
    assert devssh.connections(mark + "\n" + shells, 10022) == 1
    assert devssh.connections(mark + "\n" + shells.splitlines()[1], 10022) == 0  # left behind by a shell
