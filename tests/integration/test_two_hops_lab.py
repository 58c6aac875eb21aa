"""A jump chain of two real hops: the lab's gateway in front of its login node (`gpufleet lab up --hops 2`),
each with its own sshd, key and host key; the nodes are reachable only through both. Apply, a run, its
logs and attach go through the chain; a wrong key, a changed host key or a down sshd on either hop is
reported against that hop, with what to do."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import Cli, lab_available, wait_for, wait_logs
from test_containeropts_lab import attached

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("lab-two-hops")
    lab = core.up(d, nodes=2, gpus=2, vendor="nvidia", hops=2, log=lambda *_: None)
    yield lab
    core.down(d, log=lambda *_: None)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("two-hops-home")


@pytest.fixture()
def hcli(home) -> Cli:
    return Cli(home)


def ssh(lab, *args: str, key: str) -> subprocess.CompletedProcess:
    """Plain ssh with the lab's ``key``, trusting whatever host key (only reachability is asked)."""
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(lab.key(key))]
    return subprocess.run(["ssh", *opts, *args], capture_output=True, text=True, timeout=30)


def instances(cli: Cli, name: str) -> list[dict]:
    fleets = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    return next(f for f in fleets if f["name"] == name)["instances"]


def fleet_file(lab, tmp_path: Path, name: str, hop: int | None = None, key: Path | None = None) -> Path:
    """The lab's fleet as ``name``; with ``hop``, that hop's identity_file replaced by ``key``."""
    data = yaml.safe_load(lab.fleet_file.read_text())
    data["name"] = name
    if hop is not None:
        data["ssh_config"]["proxy_jump"][hop]["identity_file"] = str(key)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def apply_fails(cli: Cli, path: Path, name: str) -> list[str]:
    """Apply ``path`` expecting it to fail on every host as unreachable; the hosts' reasons."""
    p = cli("apply", "-f", str(path), "-y")
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    found = instances(cli, name)
    assert [i["status"] for i in found] == ["unreachable"] * 2, found
    return [i["reason"] for i in found]


def test_apply_goes_through_both_real_hops(lab, hcli):
    gw, login = lab.gateway, lab.login
    assert [h.role for h in lab.jump_hosts] == ["gateway", "login"]
    # from this machine: the gateway answers, the login node and the nodes do not...
    assert ssh(lab, f"{core.LAB_USER}@{gw.address}", "hostname", key="gateway").stdout.strip() == "gateway"
    direct = ssh(lab, f"{core.LAB_USER}@{login.address}", "true", key="login")
    assert direct.returncode == 255 and "No route to host" in direct.stderr, direct.stderr
    # ...but the login node does through the gateway (with its own key)
    hop = shlex.join(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                      "UserKnownHostsFile=/dev/null", "-i", str(lab.key("gateway")), "-W", "%h:%p",
                      f"{core.LAB_USER}@{gw.address}"])
    through = ssh(lab, "-o", f"ProxyCommand={hop}", f"{core.LAB_USER}@{login.address}", "hostname", key="login")
    assert through.stdout.strip() == "login", through.stderr

    p = hcli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    assert p.stdout.count("0/2 busy") == 2, p.stdout
    assert f"{gw.address}:22 -> {login.address}:22" in p.stdout  # the VIA column: both hops in order
    found = instances(hcli, core.fleet_name(lab))
    assert {i["hostname"] for i in found} == {n.address for n in lab.nodes}
    assert all(i["status"] == "ready" for i in found), found
    # each hop has its own master (its own ControlPath), open now, one through the other
    config = hcli.home / "fleets" / core.fleet_name(lab) / "ssh_config"
    paths = []
    for alias in (f"{core.fleet_name(lab)}-jump0", f"{core.fleet_name(lab)}-jump1"):
        check = subprocess.run(["ssh", "-F", str(config), "-O", "check", alias], capture_output=True, text=True)
        assert "Master running" in check.stderr, (alias, check.stderr)
        g = subprocess.run(["ssh", "-F", str(config), "-G", alias], capture_output=True, text=True).stdout
        paths.append(re.search(r"^controlpath (.+)$", g, re.M).group(1))
    assert paths[0] != paths[1] and all(Path(p).is_socket() for p in paths), paths
    # what each sshd saw: the gateway was logged into from this machine, the login node from the
    # gateway's side of their network, the nodes from the login node's bridge
    log = {h.role: (lab.host_dir(h) / "sshd.log").read_text() for h in (gw, login, lab.nodes[0])}
    assert f"Accepted publickey for {core.LAB_USER} from {lab.uplink_address}" in log["gateway"]
    assert f"Accepted publickey for {core.LAB_USER} from {lab.middle_network}.1" in log["login"]
    assert f"Accepted publickey for {core.LAB_USER} from {lab.cluster_gateway}" in log["node"]


def test_a_run_its_logs_and_attach_work_through_both_hops(lab, hcli, tmp_path):
    hcli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    task = tmp_path / "web.yml"
    task.write_text(f"type: task\nname: web2\nimage: {IMAGE}\nresources: {{gpu: 1}}\nports: ['*:8000']\n"
                    "commands:\n  - echo hello-through-two-hops\n"
                    "  - mkdir -p /www && echo I-am-web2 > /www/index.html\n  - exec httpd -f -p 8000 -h /www\n")
    hcli("apply", "-f", str(task), "-y", "-d", check=0)
    try:
        wait_logs(hcli, "web2", "hello-through-two-hops")
        with attached(hcli, "web2") as port:
            body = wait_for("the run's answer through both hops", lambda: _get(port), timeout=30)
            assert body.strip() == "I-am-web2"
    finally:
        hcli("stop", "web2", "-y", check=0)


def _get(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def test_a_wrong_key_is_reported_against_its_hop(lab, hcli, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    for hop, host, name in ((0, lab.gateway, "gateway"), (1, lab.login, "login node")):
        fleet = f"wrong-key-{hop}"
        for reason in apply_fails(hcli, fleet_file(lab, tmp_path, fleet, hop, other), fleet):
            assert reason.startswith(f"{name} {host.address}:22 (hop {hop + 1} of 2) unreachable: "
                                     f"login refused by {host.address}:22 (Permission denied (publickey)): "
                                     f"check the user and identity_file of ssh_config.proxy_jump[{hop}]"), reason


def test_a_changed_host_key_is_reported_against_its_hop(lab, hcli):
    name = core.fleet_name(lab)
    hcli("apply", "-f", str(lab.fleet_file), "-y", check=0)  # every host key recorded
    known_hosts = hcli.home / "fleets" / name / "known_hosts"
    for hop, host, kind in ((1, lab.gateway, "gateway"), (2, lab.login, "login node")):
        core.rotate_host_key(lab, host)
        reasons = apply_fails(hcli, lab.fleet_file, name)
        fix = f"ssh-keygen -R {host.address} -f {known_hosts}"
        for reason in reasons:
            assert reason.startswith(f"{kind} {host.address}:22 (hop {hop} of 2) unreachable: host key of "
                                     f"{host.address}:22 changed since it was recorded in {known_hosts}"), reason
            assert f"(if the host was reinstalled: {fix}, then re-apply)" in reason, reason
        # doing what it says lets the next apply through (and records the new key)
        subprocess.run(shlex.split(fix), check=True, capture_output=True)
        hcli("apply", "-f", str(lab.fleet_file), "-y", check=0)


@contextmanager
def down(lab, host):
    core.stop_sshd(lab, host)
    try:
        yield
    finally:
        core.start_sshd(lab, host)


def test_a_down_gateway_and_a_down_login_node_are_told_apart(lab, hcli):
    name = core.fleet_name(lab)
    gw, login = lab.gateway.address, lab.login.address
    with down(lab, lab.gateway):
        for reason in apply_fails(hcli, lab.fleet_file, name):
            assert reason == (f"gateway {gw}:22 (hop 1 of 2) unreachable: "
                              f"ssh: connect to host {gw} port 22: Connection refused"), reason
    with down(lab, lab.login):
        for reason in apply_fails(hcli, lab.fleet_file, name):
            assert reason == (f"login node {login}:22 (hop 2 of 2) unreachable: "
                              f"gateway {gw}:22 (hop 1 of 2) cannot reach it: Connection refused"), reason
    p = hcli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    assert p.stdout.count("0/2 busy") == 2, p.stdout
