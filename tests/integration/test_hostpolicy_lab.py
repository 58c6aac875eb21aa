"""What a run may touch on a host (the fleet's `policy`), on the lab, in real podman containers.

A project member (a user with a token and no key of any host, talking to the server) is refused
at submit a run that breaks the fleet's policy, with the rule it breaks; gpufleet.hostpolicy's
answers are checked against the fleet file as the lab applies it, and the host side with the
container module's `volume_roots` (symlinks resolved on the host). The containers are started by the
real server and start playbook: no-new-privileges, a network namespace of their own, an allowed
path mounted and readable, nothing of the host's keys or another run's files visible.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import Cli, wait_logs

from gpufleet import hostpolicy
from gpufleet.config import load_fleet
from gpufleet.lab import core
from gpufleet.runconfig import load_run

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    """A one-node lab whose fleet lets runs mount only DATA (and project admins also /), applied."""
    lab = lab_factory(nodes=1, gpus=8, vendor="nvidia")
    work = tmp_path_factory.mktemp("hostpolicy-work")
    data = work / "data"
    data.mkdir()
    (data / "hello.txt").write_text("hello-from-an-allowed-path\n")
    (data / "escape").symlink_to("/")  # what a run with DATA mounted read-write could leave behind
    (work / "database").mkdir()  # a sibling whose name starts like DATA's
    fleet = yaml.safe_load(lab.fleet_file.read_text())
    fleet["policy"] = {"volumes": [str(data)], "admins": {"volumes": ["/"], "privileged": True}}
    fleet_file = work / "fleet.yml"
    fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))
    cli = Cli(tmp_path_factory.mktemp("hostpolicy-home") / "home")
    cli("apply", "-f", str(fleet_file), "-y", check=0)
    return {"lab": lab, "work": work, "data": data, "cli": cli, "fleet": fleet["name"], "fleet_file": fleet_file}


@pytest.fixture(scope="module")
def member(site, tmp_path_factory):
    """`gpufleet` as mia, a member of project default with a token and no key or fleet file, through
    the site's server (its local server, wherever it listens now)."""
    cli = site["cli"]
    token = json.loads(cli("user", "add", "mia", "--json", check=0).stdout)["token"]
    cli("project", "member", "add", "default", "mia", check=0)
    home = tmp_path_factory.mktemp("member-home") / "home"

    def as_mia(*args: str, **kw):
        cli("ps", check=0)  # the local server is up (it exits when idle): ask it where it listens
        url = json.loads((cli.home / "server" / "local.json").read_text())["url"]
        return Cli(home, server=url)(*args, env={"GPUFLEET_TOKEN": token}, **kw)

    return as_mia


def test_a_members_run_outside_the_policy_is_refused_at_submit(site, member):
    work, cli = site["work"], site["cli"]
    for name, body, rule in (("m-root", "volumes: ['/:/host']\ncommands: ['ls /host']\n", "policy.volumes"),
                             ("m-priv", "privileged: true\ncommands: ['true']\n", "policy.privileged"),
                             ("m-net", "network: host\ncommands: ['true']\n", "policy.host_network")):
        p = member("apply", "-f", str(run_file(work, name, body)), "-y", "-d")
        assert p.returncode == 3, p.stdout + p.stderr
        assert rule in p.stderr and f"fleet {site['fleet']}" in p.stderr, p.stderr
        assert name not in cli("ps", "-a", check=0).stdout  # nothing of it was kept
    # the same run from the server's admin (who holds the fleet's keys anyway) is not limited
    p = cli("apply", "-f", str(run_file(work, "a-root", "volumes: ['/:/host:ro']\ncommands: ['ls /host/etc']\n")),
            "-y", timeout=180)
    assert p.returncode == 0 and "hostname" in p.stdout, p.stdout + p.stderr


def run_file(work: Path, name: str, body: str) -> Path:
    path = work / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{body}")
    return path


def test_root_mount_and_privileged_break_the_fleets_policy(site):
    fleet = load_fleet(site["fleet_file"])
    work, data, name = site["work"], site["data"], site["fleet"]
    root = load_run(run_file(work, "p-root", "volumes: ['/:/host']\ncommands: ['ls /host']\n")).config
    priv = load_run(run_file(work, "p-priv", "privileged: true\ncommands: ['true']\n")).config
    dind = load_run(run_file(work, "p-dind", "docker: true\ncommands: ['true']\n")).config
    sibling = load_run(run_file(work, "p-sib", f"volumes: ['{work}/database:/db']\n")).config
    dots = load_run(run_file(work, "p-dots", f"volumes: ['{data}/../database:/db']\n")).config
    hostnet = load_run(run_file(work, "p-net", "network: host\ncommands: ['true']\n")).config
    policy = fleet.config.policy
    assert hostpolicy.violations(root, policy, "member", fleet=name) == [
        f"volume /:/host: fleet {name} lets runs mount only {data} (policy.volumes)"]
    assert hostpolicy.violations(priv, policy, "member", fleet=name) == [
        f"privileged: fleet {name} does not allow privileged runs (policy.privileged)"]
    assert "docker: true needs" in hostpolicy.violations(dind, policy, "member", fleet=name)[0]
    assert hostpolicy.violations(sibling, policy, "member", fleet=name) != []
    assert "'..' is not allowed" in hostpolicy.violations(dots, policy, "member", fleet=name)[0]
    assert "policy.host_network" in hostpolicy.violations(hostnet, policy, "member", fleet=name)[0]
    # a project admin gets the policy's `admins` additions; a server admin is not limited
    assert hostpolicy.violations(root, policy, "admin", fleet=name) == []
    assert hostpolicy.violations(priv, policy, "admin", fleet=name) == []
    assert hostpolicy.violations(hostnet, policy, "admin", fleet=name) != []
    assert hostpolicy.violations(hostnet, policy, "server-admin", fleet=name) == []


def _start(site, monkeypatch, name: str, volumes: list[str], roots: list[str] | None):
    """The start playbook with `volume_roots` (as launch passes them), straight to the node."""
    from gpufleet.paths import FleetFiles
    from gpufleet.runner import run_playbook
    monkeypatch.setenv("GPUFLEET_HOME", str(site["cli"].home))
    fleet = load_fleet(site["fleet_file"])
    alias = fleet.targets[0].alias
    variables = {"workload_name": f"gpufleet-{name}", "workload_run_id": name, "workload_image": IMAGE,
                 "workload_command": ["/bin/sh", "-c", "ls /mnt"], "workload_volumes": volumes,
                 "workload_volume_roots": roots, "workload_network": "bridge"}
    result = run_playbook("start", FleetFiles.of(site["fleet"]).require().inventory, limit=[alias],
                          unsafe_vars=variables)
    return result.hosts[alias]


def test_the_host_refuses_a_volume_whose_real_path_is_outside_the_roots(site, monkeypatch):
    data = site["data"]
    out = _start(site, monkeypatch, "vr-escape", [f"{data}/escape:/mnt"], [str(data)])
    assert out.status.bad and "really /" in out.message and "is not below" in out.message, out.message
    out = _start(site, monkeypatch, "vr-sibling", [f"{site['work']}/database:/mnt"], [str(data)])
    assert out.status.bad and "is not below" in out.message, out.message
    node = site["lab"].nodes[0]
    names = core.host_exec(site["lab"], node, ["podman", "ps", "-a", "--format", "{{.Names}}"]).stdout
    assert "vr-escape" not in names and "vr-sibling" not in names  # refused before anything was created
    out = _start(site, monkeypatch, "vr-ok", [f"{data}:/mnt:ro"], [str(data)])
    assert not out.status.bad, out.message
    core.host_exec(site["lab"], node, ["podman", "rm", "-f", "gpufleet-vr-ok"], check=False)


def test_a_members_run_sees_its_allowed_path_and_nothing_of_the_host_or_other_runs(site, member):
    cli, work, data, lab = site["cli"], site["work"], site["data"], site["lab"]
    node = lab.nodes[0]
    host_key = lab.host_dir(node) / "ssh_host_ed25519_key"
    fleet_key = lab.key("node")  # the fleet's private key for the node (this machine is every lab host)
    secret = "other-runs-secret-" + str(time.time_ns())
    # run A keeps a file in its container and on a volume of its own, and waits
    body_a = (f"resources: {{gpu: 1}}\ncommands:\n  - echo {secret} > /tmp/a-file\n  - mkdir -p /scratch-a\n"
              f"  - echo {secret} > /scratch-a/a-file\n  - echo ready\n  - sleep 300\n")
    cli("apply", "-f", str(run_file(work, "pol-a", body_a)), "-y", "-d", check=0)
    wait_logs(cli, "pol-a", "ready")
    body_b = ("resources: {gpu: 1}\n"
              f"volumes: ['{data}:/data:ro']\n"
              "commands:\n"
              "  - echo \"read=$(cat /data/hello.txt)\"\n"
              "  - echo \"nnp=$(grep NoNewPrivs /proc/self/status | tr -d ' \\t')\"\n"
              "  - echo \"capeff=$(grep CapEff /proc/self/status | tr -d ' \\t')\"\n"
              f"  - echo \"hostkey=$(cat {host_key} 2>/dev/null | head -c 40 || true)\"\n"
              f"  - echo \"fleetkey=$(cat {fleet_key} 2>/dev/null | head -c 40 || true)\"\n"
              "  - echo \"etcssh=$(ls /etc/ssh 2>/dev/null || true)\"\n"
              f"  - echo \"other=$(grep -rl {secret} /tmp /scratch-a /var /root /home /etc 2>/dev/null "
              "| head -c 200 || true)\"\n"
              "  - echo \"procs=$(ps -o comm | grep -c sleep || true)\"\n"
              "  - echo \"addrs=$(ip -4 -o addr | grep -v ' lo ' | tr -s ' ' | cut -d' ' -f4 | tr '\\n' ' ')\"\n")
    p = member("apply", "-f", str(run_file(work, "pol-b", body_b)), "-y", timeout=180)  # mia, through the server
    assert p.returncode == 0, p.stdout + p.stderr
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in p.stdout.splitlines() if "=" in line}
    assert lines["read"] == "hello-from-an-allowed-path"
    assert lines["nnp"] == "NoNewPrivs:1"
    assert lines["capeff"] != "CapEff:000001ffffffffff"  # not every capability
    assert lines["hostkey"] == "" and lines["fleetkey"] == "" and lines["etcssh"] == ""
    assert lines["other"] == ""  # run A's files are in A's container only
    assert lines["procs"] == "0"  # nor does B see A's processes
    addrs = lines["addrs"].split()
    assert addrs and not [a for a in addrs if a.startswith(node.address.rsplit(".", 1)[0] + ".")], addrs
    # the host's key material never reached the output
    key_line = [x for x in host_key.read_text().splitlines() if not x.startswith("-----")][0]
    assert key_line not in p.stdout
    assert host_key.exists() and fleet_key.exists()  # they are there on the host, just not in the container
    cli("stop", "pol-a", "-y", check=0)


def test_a_host_network_run_is_on_the_hosts_network(site):
    """`network: host` (the policy would refuse it for a member; the check is not wired yet) runs on the
    host's network; without it, the run has its own (the test above)."""
    cli, work, lab = site["cli"], site["work"], site["lab"]
    node = lab.nodes[0]
    body = ("network: host\ncommands:\n"
            "  - echo \"addrs=$(ip -4 -o addr | tr -s ' ' | cut -d' ' -f4 | tr '\\n' ' ')\"\n"
            "  - echo \"nnp=$(grep NoNewPrivs /proc/self/status | tr -d ' \\t')\"\n")
    p = cli("apply", "-f", str(run_file(work, "pol-hostnet", body)), "-y", timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{node.address}/" in p.stdout and "nnp=NoNewPrivs:1" in p.stdout, p.stdout
