"""Fleet configuration: the dstack schema accepted as is, and bad config refused with file:line:column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed"


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    for name in ("id", "login"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    return tmp_path


def write(tmp_path: Path, text: str, name: str = "fleet.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_fleet(path)
    return [str(p) for p in e.value.problems]


def test_seed_examples_parse_unchanged(tmp_path: Path, monkeypatch) -> None:
    # the two YAMLs of the seed page, verbatim; their keys live under ~/.ssh
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    for name in ("hotaisle_id_rsa", "lambda_node_id_rsa", "lambda_head_id_rsa"):
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f",
                        str(tmp_path / ".ssh" / name)], check=True)
    hot = load_fleet(SEED / "my-hotaisle-fleet.dstack.yml")
    assert hot.name == "my-hotaisle-fleet" and hot.placement == "cluster"
    assert [(t.hostname, t.port, t.blocks) for t in hot.targets] == [
        ("ssh.hotaisle.cloud", 22013, "auto"), ("ssh.hotaisle.cloud", 22014, "auto")]
    lam = load_fleet(SEED / "my-lambda-fleet.dstack.yml")
    assert len(lam.targets) == 4
    t = lam.targets[0]
    assert t.user == "ubuntu" and t.identity_file.endswith("lambda_node_id_rsa") and t.blocks == 1
    assert len(t.jumps) == 1 and t.jumps[0].hostname == "12.34.567.890"
    assert t.jumps[0].identity_file.endswith("lambda_head_id_rsa")


def test_per_host_values_override_fleet_values(tmp_path: Path, keys: Path) -> None:
    path = write(tmp_path, f"""
type: fleet
name: f
blocks: 2
ssh_config:
  user: ubuntu
  port: 2200
  identity_file: {keys}/id
  proxy_jump: {{hostname: login.example, identity_file: {keys}/login}}
  hosts:
    - a
    - hostname: b
      user: admin
      port: 22
      blocks: auto
      proxy_jump: [{{hostname: gw.example, user: ops}}, {{hostname: login2.example, port: 2022}}]
""")
    f = load_fleet(path)
    a, b = f.targets
    assert (a.user, a.port, a.blocks) == ("ubuntu", 2200, 2)
    assert [(j.hostname, j.port, j.user) for j in a.jumps] == [("login.example", 22, "ubuntu")]
    assert (b.user, b.port, b.blocks) == ("admin", 22, "auto")
    assert [(j.hostname, j.port, j.user) for j in b.jumps] == [("gw.example", 22, "ops"),
                                                               ("login2.example", 2022, "ubuntu")]


BAD = [
    ("unknown key", "type: fleet\nssh_config:\n  hosts: [a]\n  user: u\n  hostz: 1\n",
     "fleet.yml:5:3: ssh_config.hostz: unknown field 'hostz'; did you mean 'hosts'?"),
    ("wrong type", "type: fleet\nssh_config:\n  user: u\n  port: abc\n  hosts: [a]\n",
     "fleet.yml:4:9: ssh_config.port:"),
    ("blocks zero", "type: fleet\nblocks: 0\nssh_config:\n  user: u\n  hosts: [a]\n",
     "fleet.yml:2:9: blocks: must be \"auto\" or a whole number >= 1 (got 0)"),
    ("host blocks", "type: fleet\nssh_config:\n  user: u\n  hosts:\n    - hostname: a\n      blocks: many\n",
     "fleet.yml:6:15: ssh_config.hosts[0].blocks: must be \"auto\""),
    ("option host", "type: fleet\nssh_config:\n  user: u\n  hosts: ['-oProxyCommand=touch /tmp/x']\n",
     "ssh_config.hosts[0].hostname: '-oProxyCommand=touch /tmp/x' starts with '-'"),
    ("space host", "type: fleet\nssh_config:\n  user: u\n  hosts: ['a b']\n",
     "ssh_config.hosts[0].hostname: 'a b' is not a valid host name"),
    ("control char", "type: fleet\nssh_config:\n  user: \"u\\nProxyCommand x\"\n  hosts: [a]\n",
     "ssh_config.user:"),
    ("option user", "type: fleet\nssh_config:\n  user: -lroot\n  hosts: [a]\n",
     "fleet.yml:3:9: ssh_config.user: '-lroot' starts with '-'"),
    ("jump no hostname", "type: fleet\nssh_config:\n  user: u\n  hosts: [a]\n  proxy_jump:\n    user: u\n",
     "fleet.yml:6:5: ssh_config.proxy_jump.hostname: required field 'hostname' is missing"),
    ("duplicate host", "type: fleet\nssh_config:\n  user: u\n  hosts: [a, b, a]\n",
     "ssh_config.hosts[2]: a:22 is listed twice (first as hosts[0])"),
    ("port range", "type: fleet\nssh_config:\n  user: u\n  hosts: [{hostname: a, port: 70000}]\n",
     "ssh_config.hosts[0].port: Input should be less than or equal to 65535"),
    ("no hosts", "type: fleet\nssh_config:\n  user: u\n  hosts: []\n", "ssh_config.hosts:"),
    ("no user", "type: fleet\nssh_config:\n  hosts: [a]\n", "ssh_config.hosts[0]: no user"),
    ("wrong type field", "type: task\nssh_config:\n  user: u\n  hosts: [a]\n", "fleet.yml:1:7: type:"),
    ("cloud field", "type: fleet\nnodes: 2\nssh_config:\n  user: u\n  hosts: [a]\n",
     "fleet.yml:2:1: nodes: a dstack field that gpufleet does not support: 'nodes'; a dstack cloud-fleet field"),
    ("broken yaml", "type: fleet\nssh_config: [\n", "fleet.yml:3:1: invalid YAML"),
    ("duplicate key", "type: fleet\ntype: fleet\nssh_config: {user: u, hosts: [a]}\n",
     "fleet.yml:2:1: type: duplicate key 'type'"),
    ("not a mapping", "- a\n- b\n", "fleet.yml:1:1: a fleet configuration must be a mapping"),
    ("placement", "type: fleet\nplacement: everywhere\nssh_config: {user: u, hosts: [a]}\n",
     "fleet.yml:2:12: placement:"),
    ("bool port", "type: fleet\nssh_config: {user: u, port: true, hosts: [a]}\n", "ssh_config.port: must be a whole"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config_is_refused_with_position(tmp_path: Path, text: str, expected: str) -> None:
    found = errors(write(tmp_path, text))
    assert any(expected in line for line in found), found


def test_identity_file_problems(tmp_path: Path, keys: Path, monkeypatch) -> None:
    base = "type: fleet\nssh_config:\n  user: u\n  hosts: [a]\n  identity_file: {}\n"
    assert "does not exist" in errors(write(tmp_path, base.format(keys / "nope")))[0]
    assert "is a public key; identity_file needs the private key (use" in \
        errors(write(tmp_path, base.format(keys / "id.pub")))[0]
    (keys / "id").chmod(0o644)
    assert "chmod 600" in errors(write(tmp_path, base.format(keys / "id")))[0]
    (keys / "id").chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(keys / "enc")], check=True)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    found = errors(write(tmp_path, base.format(keys / "enc")))
    assert found[0].startswith(f"{tmp_path / 'fleet.yml'}:5:18: ssh_config.identity_file:")
    assert "no ssh-agent" in found[0]
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    assert load_fleet(write(tmp_path, base.format(keys / "enc"))).targets[0].identity_file == str(keys / "enc")


def test_same_hostname_different_ports_is_fine(tmp_path: Path) -> None:
    f = load_fleet(write(tmp_path, "type: fleet\nssh_config:\n  user: u\n  hosts:\n"
                                   "    - {hostname: h, port: 22013}\n    - {hostname: h, port: 22014}\n"))
    assert [t.address for t in f.targets] == ["h:22013", "h:22014"]


def test_huge_and_binary_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yml"
    big.write_bytes(b"a: " + b"x" * (10 * 1024 * 1024) + b"\n")
    assert "may be at most" in errors(big)[0]
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"type: fleet\nname: \xff\xfe\n")
    assert errors(binary)[0].startswith(f"{binary}:2:7: not valid UTF-8")


def test_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "type: fleet\nblocks: 0\nssh_config: {user: u, hosts: [a]}\n")
    p = subprocess.run([sys.executable, "-m", "gpufleet", "apply", "-f", str(path), "-y"],
                       capture_output=True, text=True,
                       env={"GPUFLEET_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "blocks: must be" in p.stderr
    assert f"{path}:2:9" in p.stderr
