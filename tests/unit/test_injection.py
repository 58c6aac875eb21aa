"""Option and template injection, without a lab.

Hostile host, user, port, identity and jump values (``-oProxyCommand=...``, ``$(...)``, ``;...``,
newlines) are refused before anything runs: that is the bad-input corpus (test_bad_input.py,
tests/fixtures/bad-configs/fleet-*-option-injection.yml, *-cmd-subst.yml, *-semicolon.yml, ...).

Here: values that are VALID but odd, and what gpufleet GENERATES from them.

- ssh_config: ``ssh -G`` (parses the config, connects nowhere) shows every value exactly as given,
  and no ProxyCommand or LocalCommand appears.
- The vars file of a run (``gpufleet.runner.write_unsafe_vars`` of ``gpufleet.workload.container_vars``)
  is loaded by a real local Ansible play, and the hostile strings come out literal: written back by
  a ``copy`` task, and as the argument vector the real ``workload`` role hands to the container
  runtime (a stand-in ``podman`` first on PATH records it). No marker file ever appears.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tool

from gpufleet import runner
from gpufleet.config import load_fleet
from gpufleet.inventory import write_fleet_files
from gpufleet.launch import container_vars
from gpufleet.models import GPU, HostFacts
from gpufleet.runconfig import load_run

ROOT = Path(__file__).resolve().parents[2]


def ssh_G(config: Path, alias: str) -> dict[str, list[str]]:
    """What ssh makes of ``config`` for ``alias``: ssh -G only prints, it never connects."""
    p = subprocess.run(["ssh", "-G", "-F", str(config), alias], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and "percent_expand" not in p.stderr, p.stderr
    values: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


def keygen(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def assert_no_commands(g: dict[str, list[str]]) -> None:
    assert g.get("proxycommand", ["none"]) == ["none"], g.get("proxycommand")
    assert "localcommand" not in g, g.get("localcommand")
    assert g.get("permitlocalcommand", ["no"]) == ["no"]
    assert "remotecommand" not in g


def test_ssh_config_keeps_odd_paths_and_names_exact(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    marker = tmp_path / "pwned"
    # a key path with spaces and ssh_config %-tokens (%h, %d, %C, a lone % at the end)
    key = keygen(tmp_path / "my keys %h" / "id 100%d %C %")
    login_key = keygen(tmp_path / "login keys" / "id%%r")
    fleet = tmp_path / "odd.yml"
    fleet.write_text(f"""
type: fleet
name: odd
ssh_config:
  user: ubuntu_1.x-y
  port: 65535
  identity_file: "{key}"
  hosts:
    - node_1.example
    - hostname: 10.0.0.7
      port: 1
      user: a.b-c
    - "::1"
  proxy_jump:
    - {{hostname: gw-1.example, user: ops, port: 2222, identity_file: "{login_key}"}}
    - {{hostname: 192.0.2.1}}
""")
    files = write_fleet_files(load_fleet(fleet))
    text = files.ssh_config.read_text()
    for alias, hostname, user, port, identity in [
        ("node_1.example", "node_1.example", "ubuntu_1.x-y", "65535", key),
        ("10.0.0.7", "10.0.0.7", "a.b-c", "1", key),
        ("::1", "::1", "ubuntu_1.x-y", "65535", key),
        ("odd-jump0", "gw-1.example", "ops", "2222", login_key),
        ("odd-jump1", "192.0.2.1", "ubuntu_1.x-y", "22", key),
    ]:
        g = ssh_G(files.ssh_config, alias)
        assert g["hostname"] == [hostname] and g["user"] == [user] and g["port"] == [port]
        # ssh -G prints IdentityFile before its %-expansion: every % of the path doubled (%% -> %),
        # so ssh reads exactly the file named, with no token expanded
        assert g["identityfile"] == [str(identity).replace("%", "%%")], g["identityfile"]
        assert_no_commands(g)
        assert g["stricthostkeychecking"] == ["accept-new"] and g["batchmode"] == ["yes"]
    assert ssh_G(files.ssh_config, "node_1.example")["proxyjump"] == ["odd-jump1"]
    assert ssh_G(files.ssh_config, "odd-jump1")["proxyjump"] == ["odd-jump0"]
    assert "ProxyCommand" not in text and "LocalCommand" not in text
    assert not marker.exists()


@pytest.mark.parametrize("hostname", ["fe80::1%eth0", "node%h"])
def test_ssh_config_keeps_a_percent_in_a_hostname(tmp_path: Path, monkeypatch, hostname: str) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    fleet = tmp_path / "pct.yml"
    fleet.write_text(f"type: fleet\nname: pct\nssh_config:\n  user: u\n  hosts: ['{hostname}']\n"
                     f"  proxy_jump: {{hostname: 'login%p'}}\n")
    files = write_fleet_files(load_fleet(fleet))
    g = ssh_G(files.ssh_config, hostname)
    assert g["hostname"] == [hostname]
    assert ssh_G(files.ssh_config, "pct-jump0")["hostname"] == ["login%p"]
    assert_no_commands(g)


# ------------------------------------------------------------------ the vars file of a run

def hostile_run(tmp_path: Path, marker: Path):
    touch = f"touch {marker}"
    path = tmp_path / "odd.yml"
    path.write_text(json.dumps({  # JSON is YAML: every value below is exactly this string
        "type": "task",
        "name": "odd",
        "image": "localhost/gpufleet-lab:latest",
        "commands": [f"$({touch})", f"echo {{{{ lookup('pipe','{touch}') }}}}", f"`{touch}`", "true"],
        "env": {
            "PIPE": f"{{{{ lookup('pipe','{touch}') }}}}",
            "SUBST": f"$({touch})",
            "SEMI": f";{touch}",
            "OPTION": f"-oProxyCommand={touch}",
            "JINJA_BLOCK": "{% for x in [1] %}{{ x }}{% endfor %}{# c #}",
            "UNSAFE_TAG": "!unsafe {{ 7 * 7 }}",
            "NEWLINE": "a\nb\n--privileged",
            "BOOLISH": "true",
            "NUMISH": "0123",
            "NULLISH": "null",
            "QUOTES": "'\"\\",
        },
        "working_dir": f"/w/{{{{ lookup('pipe','{touch}') }}}}",
        "volumes": [f"/data/$({touch}):/data:ro"],
    }))
    return load_run(path)


@pytest.fixture()
def run_vars(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    marker = tmp_path / "pwned"
    run = hostile_run(tmp_path, marker)
    fleet_env = {"FLEET_PIPE": f"{{{{ lookup('pipe','touch {marker}') }}}}"}
    probe = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    gpus = [GPU(vendor="nvidia", index=0, uuid="GPU-0")]
    variables = container_vars(run, "run-1", fleet_env, probe, gpus, 2, 1024, set())
    vars_file = runner.write_unsafe_vars(variables)
    assert vars_file.stat().st_mode & 0o077 == 0
    return run, variables, vars_file, marker


def ansible_env(tmp_path: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **runner.ansible_env(), "ANSIBLE_REMOTE_TMP": str(tmp_path / "remote-tmp"),
           "ANSIBLE_HOME": str(tmp_path / "ansible-home")}
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env['PATH']}"
    return env


def play(tmp_path: Path, playbook: Path, vars_file: Path, *extra: str, path: Path | None = None):
    cmd = [tool("ansible-playbook"), "-i", "localhost,", "-c", "local",
           "-e", f"@{vars_file}", "-e", f"ansible_python_interpreter={sys.executable}", *extra, str(playbook)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ansible_env(tmp_path, path), cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def test_vars_file_reaches_ansible_literally(tmp_path: Path, run_vars) -> None:
    run, variables, vars_file, marker = run_vars
    out = tmp_path / "out"
    out.mkdir()
    playbook = tmp_path / "echo.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: each variable, as Ansible sees it
      ansible.builtin.copy:
        content: "{{{{ {{'env': workload_env, 'command': workload_command, 'workdir': workload_workdir,
                     'volumes': workload_volumes, 'name': workload_name, 'image': workload_image,
                     'labels': workload_labels}} | to_json }}}}"
        dest: {out}/all.json
    - name: one string on its own, templated directly
      ansible.builtin.copy:
        content: "{{{{ workload_env.PIPE }}}}"
        dest: {out}/pipe.txt
    - name: the command's script on its own
      ansible.builtin.copy:
        content: "{{{{ workload_command[2] }}}}"
        dest: {out}/script.txt
    - ansible.builtin.debug:
        var: workload_env.PIPE
""")
    p = play(tmp_path, playbook, vars_file)
    seen = json.loads((out / "all.json").read_text())
    expected = {"env": variables["workload_env"], "command": variables["workload_command"],
                "workdir": variables["workload_workdir"], "volumes": variables["workload_volumes"],
                "name": variables["workload_name"], "image": variables["workload_image"],
                "labels": variables["workload_labels"]}
    assert seen == expected
    env = seen["env"]
    assert env["PIPE"] == f"{{{{ lookup('pipe','touch {marker}') }}}}"
    assert env["FLEET_PIPE"] == env["PIPE"]
    assert env["SUBST"] == f"$(touch {marker})" and env["SEMI"] == f";touch {marker}"
    assert env["JINJA_BLOCK"] == "{% for x in [1] %}{{ x }}{% endfor %}{# c #}"
    assert env["UNSAFE_TAG"] == "!unsafe {{ 7 * 7 }}"
    assert (env["BOOLISH"], env["NUMISH"], env["NULLISH"]) == ("true", "0123", "null")  # still strings
    assert seen["command"][2].startswith(f"set -e\n$(touch {marker})\necho {{{{ lookup(")
    assert seen["workdir"] == f"/w/{{{{ lookup('pipe','touch {marker}') }}}}"
    assert (out / "pipe.txt").read_text() == env["PIPE"]
    assert (out / "script.txt").read_text() == variables["workload_command"][2]
    assert f"lookup('pipe','touch {marker}')" in p.stdout  # debug shows it, unevaluated
    assert not marker.exists()


FAKE_PODMAN = """#!{python}
# stand-in for podman: records each call's argument vector; no container exists
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["container", "inspect"]:
    sys.stderr.write("Error: no such container " + sys.argv[3] + "\\n")
    sys.exit(125)
sys.exit(0)
"""


def test_workload_role_hands_the_runtime_literal_values(tmp_path: Path, run_vars) -> None:
    """The real playbooks/start.yml and role `workload`, on localhost: the runtime's argv holds the
    hostile strings exactly, each inside its own option, after `--` where it is the command."""
    run, variables, vars_file, marker = run_vars
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "podman.log"
    fake = bin_dir / "podman"
    fake.write_text(FAKE_PODMAN.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    play(tmp_path, ROOT / "playbooks" / "start.yml", vars_file, "-e", "workload_runtime=podman",
         "-e", "workload_become=false", path=bin_dir)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [c for c in calls if c and c[0] == "run"]
    assert len(runs) == 1, calls
    argv = runs[0]
    env = variables["workload_env"]
    for name in ("PIPE", "FLEET_PIPE", "SUBST", "SEMI", "OPTION", "JINJA_BLOCK", "UNSAFE_TAG", "NEWLINE",
                 "BOOLISH", "NUMISH", "NULLISH", "QUOTES"):
        assert f"--env={name}={env[name]}" in argv, (name, argv)
    assert f"--workdir=/w/{{{{ lookup('pipe','touch {marker}') }}}}" in argv
    assert f"--volume=/data/$(touch {marker}):/data:ro" in argv
    assert "--device=nvidia.com/gpu=GPU-0" in argv
    dash = argv.index("--")
    assert argv[dash + 1:] == ["localhost/gpufleet-lab:latest", *variables["workload_command"]]
    assert not any(a.startswith("-oProxyCommand") or a == "--privileged" for a in argv[:dash])
    assert not marker.exists()
