"""Inventory and ssh_config generation: one Host entry per hop, ProxyJump chains, host keys kept on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from conftest import tool

from gpufleet.config import load_fleet
from gpufleet.inventory import write_fleet_files


def fleet_file(tmp_path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    path = tmp_path / "f.yml"
    path.write_text(f"""
type: fleet
name: lambda
ssh_config:
  user: ubuntu
  identity_file: {tmp_path}/k
  proxy_jump: {{hostname: 203.0.113.5, user: head, identity_file: {tmp_path}/k}}
  hosts:
    - node-1
    - node-2
    - {{hostname: node-2, port: 2222}}
    - hostname: deep
      proxy_jump: [{{hostname: gw.example, user: ops}}, {{hostname: 203.0.113.5, user: head}}]
""")
    return path


def ssh_G(config: Path, alias: str) -> dict[str, str]:
    """What ssh itself makes of our config for ``alias`` (ssh -G parses, connects nowhere)."""
    out = subprocess.run(["ssh", "-G", "-F", str(config), alias], capture_output=True, text=True, check=True).stdout
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, value)
    return values


def test_ssh_config_is_read_by_ssh_as_intended(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    files = write_fleet_files(load_fleet(fleet_file(tmp_path)))
    jumps = [e.alias for e in files.plan.jumps]
    assert jumps == ["lambda-jump0", "lambda-jump1", "lambda-jump2"]  # login, gateway, login-via-gateway
    n1 = ssh_G(files.ssh_config, "node-1")
    assert n1["hostname"] == "node-1" and n1["user"] == "ubuntu" and n1["port"] == "22"
    assert n1["proxyjump"] == "lambda-jump0"
    assert n1["stricthostkeychecking"] == "accept-new"
    assert n1["userknownhostsfile"].startswith(str(files.known_hosts))
    assert n1["identitiesonly"] == "yes"
    login = ssh_G(files.ssh_config, "lambda-jump0")
    assert login["hostname"] == "203.0.113.5" and login["user"] == "head"
    assert login["controlmaster"] == "auto" and login["controlpersist"] != "no"
    assert "proxyjump" not in login or login["proxyjump"] == "none"
    # both node-2 entries and node-1 share one login-node connection
    assert ssh_G(files.ssh_config, "node-2-2222")["port"] == "2222"
    assert ssh_G(files.ssh_config, "node-2-22")["proxyjump"] == "lambda-jump0"
    # two hops: deep -> jump2 (login) -> jump1 (gateway)
    assert ssh_G(files.ssh_config, "deep")["proxyjump"] == "lambda-jump2"
    assert ssh_G(files.ssh_config, "lambda-jump2")["proxyjump"] == "lambda-jump1"
    assert ssh_G(files.ssh_config, "lambda-jump1")["hostname"] == "gw.example"
    for f in (files.ssh_config, files.inventory, files.known_hosts):
        assert f.stat().st_mode & 0o077 == 0


def test_inventory_is_valid_for_ansible(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    files = write_fleet_files(load_fleet(fleet_file(tmp_path)))
    inv = yaml.safe_load(files.inventory.read_text())
    group = inv["all"]["children"]["fleet_lambda"]
    assert list(group["hosts"]) == ["node-1", "node-2-22", "node-2-2222", "deep"]
    assert group["vars"]["ansible_ssh_host_key_checking"] is True
    assert group["vars"]["ansible_ssh_common_args"] == f"-F {files.ssh_config}"
    out = subprocess.run([tool("ansible-inventory"), "-i", str(files.inventory), "--graph"],
                         capture_output=True, text=True, check=True).stdout
    assert "@fleet_lambda:" in out and "node-2-2222" in out
