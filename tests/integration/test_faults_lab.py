"""Faults on the lab: crashes of gpufleet's server itself, containers and hosts that change behind
its back, wrong keys per hop. Each ends with a clear message and consistent state. The server's
loops notice what changed on the hosts by themselves: the tests wait (bounded) for what they see."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-home")


@pytest.fixture(scope="module")
def lab(lab_factory, home):
    lab = lab_factory(nodes=1, gpus=4, vendor="nvidia")
    Cli(home)("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab


@pytest.fixture()
def fcli(home) -> Cli:
    return Cli(home)


def task(tmp_path: Path, name: str, command: str = "sleep 300") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\nresources: {{gpu: 1}}\ncommands: ['{command}']\n")
    return path


def ps(cli: Cli) -> tuple[dict[str, dict], str]:
    p = cli("ps", "-a", "--json", check=0)
    return {r["name"]: r for r in json.loads(p.stdout)}, p.stderr


def busy(cli: Cli) -> str:
    out = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    return out[0]["instances"][0]["status_text"]


def containers(lab) -> str:
    """`name state` lines for the node's containers (podman's JSON has the plain state)."""
    out = core.host_exec(lab, lab.nodes[0], ["podman", "ps", "-a", "--format", "json"]).stdout
    return "\n".join(f"{c['Names'][0]} {c['State']}" for c in json.loads(out or "[]"))


def run_is(cli: Cli, name: str, status: str):
    return lambda: ps(cli)[0].get(name, {}).get("status") == status


def crash_at(cli: Cli, point: str, path: Path) -> str:
    """Submit ``path`` to a server that SIGKILLs itself at ``point`` (a fresh local server started
    with GPUFLEET_FAILPOINT set): the command reports that its server went away."""
    cli("server", "stop", check=0)
    p = cli("apply", "-f", str(path), "-y", "-d", env={"GPUFLEET_FAILPOINT": point})
    assert p.returncode == 1 and "cannot reach the local gpufleet server" in p.stderr, p.stdout + p.stderr
    return p.stderr


def test_a_server_killed_after_taking_blocks_queues_the_run_again(lab, fcli, tmp_path):
    crash_at(fcli, "after-allocate", task(tmp_path, "k1"))
    # the next command starts a new server: the start that never happened goes back to the queue,
    # on blocks chosen anew, and runs
    wait_for("k1 to run", run_is(fcli, "k1", "running"))
    kinds = [(e["kind"], e["message"]) for e in json.loads(fcli("events", "--run", "k1", "--json", check=0).stdout)]
    assert ("queued", "its start was interrupted (the server stopped); waiting again") in kinds, kinds
    assert [k for k, _ in kinds].count("starting") == 2, kinds
    assert "gpufleet-k1 running" in containers(lab)
    assert busy(fcli) == "1/4 busy"
    fcli("stop", "k1", "-y", check=0)
    assert busy(fcli) == "0/4 busy"


def test_a_server_killed_after_starting_a_container_has_it_adopted(lab, fcli, tmp_path):
    crash_at(fcli, "after-start", task(tmp_path, "k2"))
    assert "gpufleet-k2 running" in containers(lab)
    wait_for("k2 to be adopted as running", run_is(fcli, "k2", "running"))
    assert busy(fcli) == "1/4 busy"
    fcli("stop", "k2", "-y", check=0)
    assert busy(fcli) == "0/4 busy"


def test_container_without_allocation_is_stopped_and_reported(lab, fcli, tmp_path):
    fcli("apply", "-f", str(task(tmp_path, "k3")), "-y", "-d", check=0)
    db = sqlite3.connect(fcli.home / "state.db")  # the state lost its record of the run (restored backup)
    with db:
        db.execute("DELETE FROM runs WHERE name = 'k3'")
        db.execute("UPDATE blocks SET run = NULL WHERE run = 'k3'")
    db.close()

    def reported():
        events = json.loads(fcli("events", "--json", check=0).stdout)
        return [e for e in events if e["kind"] == "orphan" and "stopped container gpufleet-k3" in e["message"]]

    [event] = wait_for("the orphan container to be stopped and reported", reported)
    assert "no run holds blocks for it" in event["message"]
    assert "gpufleet-k3 running" not in containers(lab)


def test_container_that_dies_or_vanishes_frees_its_blocks(lab, fcli, tmp_path):
    fcli("apply", "-f", str(task(tmp_path, "k4")), "-y", "-d", check=0)
    fcli("apply", "-f", str(task(tmp_path, "k5")), "-y", "-d", check=0)
    assert busy(fcli) == "2/4 busy"
    core.host_exec(lab, lab.nodes[0], ["podman", "kill", "gpufleet-k4"])  # dies on its own
    # gone, as after a reboot: renamed away in one step (`podman rm -f` kills first, and a look between the
    # kill and the removal rightly sees a container that exited with 137), removed once the server saw it gone
    core.host_exec(lab, lab.nodes[0], ["podman", "rename", "gpufleet-k5", "vanished-k5"])
    wait_for("both to fail", lambda: run_is(fcli, "k4", "failed")() and run_is(fcli, "k5", "failed")())
    core.host_exec(lab, lab.nodes[0], ["podman", "rm", "-f", "vanished-k5"])
    runs, _ = ps(fcli)
    assert runs["k4"]["exit_code"] not in (None, 0)
    assert "is gone" in runs["k5"]["message"], runs["k5"]
    assert busy(fcli) == "0/4 busy"


def test_wrong_keys_are_reported_against_the_right_hop(lab, fcli, tmp_path):
    import subprocess

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    for hop, expected in (("login", f"login node {lab.login.address}:22 unreachable: login refused"),
                          ("node", "login refused by")):
        data = yaml.safe_load(lab.fleet_file.read_text())
        data["name"] = f"wrong-{hop}"
        if hop == "login":
            data["ssh_config"]["proxy_jump"]["identity_file"] = str(other)
        else:
            data["ssh_config"]["identity_file"] = str(other)
        path = tmp_path / f"wrong-{hop}.yml"
        path.write_text(yaml.safe_dump(data))
        p = fcli("apply", "-f", str(path), "-y")
        assert p.returncode == 1
        fleets = json.loads(fcli("fleet", "list", "--json", check=0).stdout)
        inst = next(f for f in fleets if f["name"] == f"wrong-{hop}")["instances"][0]
        assert inst["status"] == "unreachable"
        assert inst["reason"].startswith(expected) and "Permission denied (publickey" in inst["reason"], inst["reason"]
        if hop == "node":
            assert lab.nodes[0].address in inst["reason"]


def test_runs_on_a_down_node_are_shown_not_forgotten(lab, fcli, tmp_path):
    fcli("apply", "-f", str(task(tmp_path, "on-down-node")), "-y", "-d", check=0)
    node = lab.nodes[0]
    core.stop_sshd(lab, node)
    try:
        wait_for("the run to say its host cannot be checked",
                 lambda: "cannot check" in ps(fcli)[0]["on-down-node"]["message"])
        runs, _ = ps(fcli)
        run = runs["on-down-node"]
        # still running as far as anyone knows, its blocks still held, and why it is not checked
        assert run["status"] == "running", run
        assert "cannot check" in run["message"] and node.address in run["message"], run
        events = json.loads(fcli("events", "--json", check=0).stdout)
        assert any(e["kind"] == "host-unreachable" and node.address in e["host"] + e["message"] for e in events), events
        assert busy(fcli).startswith("1/4"), busy(fcli)
        p = fcli("apply", "-f", str(lab.fleet_file), "-y")
        assert p.returncode == 1 and "unreachable" in p.stdout, p.stdout + p.stderr
        out = fcli("ps", check=0).stdout
        assert "on-down-node" in out and "cannot check" in out, out
    finally:
        core.start_sshd(lab, node)
    fcli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    wait_for("the note to go once the host answers", lambda: ps(fcli)[0]["on-down-node"]["message"] == "")
    runs, _ = ps(fcli)
    assert runs["on-down-node"]["status"] == "running"
    events = json.loads(fcli("events", "--json", check=0).stdout)
    assert any(e["kind"] == "host-back" and node.address in e["host"] for e in events), events
    fcli("stop", "on-down-node", "-y", check=0)
    assert busy(fcli).startswith("0/4")
