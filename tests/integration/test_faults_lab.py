"""Faults on the lab: crashes of gpufleet itself, containers and hosts that change behind its back,
wrong keys per hop. Each ends with a clear message and consistent state."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import Cli

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


def crash_at(cli: Cli, point: str, path: Path) -> int:
    import subprocess
    import sys

    env = {**os.environ, "GPUFLEET_HOME": str(cli.home), "GPUFLEET_FAILPOINT": point}
    p = subprocess.run([sys.executable, "-m", "gpufleet", "apply", "-f", str(path), "-y", "-d"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stdout + p.stderr
    return p.returncode


def test_killed_after_allocating_is_released_on_next_command(lab, fcli, tmp_path):
    assert crash_at(fcli, "after-allocate", task(tmp_path, "k1")) == -9
    assert busy(fcli) == "1/4 busy"  # allocated, no container: state on disk is consistent, not half-written
    runs, _ = ps(fcli)
    assert runs["k1"]["status"] == "failed" and "did not complete" in runs["k1"]["message"]
    assert busy(fcli) == "0/4 busy"
    assert "gpufleet-k1" not in containers(lab)


def test_killed_after_starting_is_adopted(lab, fcli, tmp_path):
    assert crash_at(fcli, "after-start", task(tmp_path, "k2")) == -9
    assert "gpufleet-k2 running" in containers(lab)
    runs, _ = ps(fcli)
    assert runs["k2"]["status"] == "running"
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
    runs, err = ps(fcli)
    assert "stopped container gpufleet-k3" in err and "no run holds blocks for it" in err
    assert "gpufleet-k3 running" not in containers(lab)


def test_container_that_dies_or_vanishes_frees_its_blocks(lab, fcli, tmp_path):
    fcli("apply", "-f", str(task(tmp_path, "k4")), "-y", "-d", check=0)
    fcli("apply", "-f", str(task(tmp_path, "k5")), "-y", "-d", check=0)
    assert busy(fcli) == "2/4 busy"
    core.host_exec(lab, lab.nodes[0], ["podman", "kill", "gpufleet-k4"])  # dies on its own
    core.host_exec(lab, lab.nodes[0], ["podman", "rm", "-f", "gpufleet-k5"])  # as after a reboot
    runs, _ = ps(fcli)
    assert runs["k4"]["status"] == "failed" and runs["k4"]["exit_code"] not in (None, 0)
    assert runs["k5"]["status"] == "failed" and "is gone" in runs["k5"]["message"]
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
        runs, _ = ps(fcli)
        run = runs["on-down-node"]
        # still running as far as anyone knows, its blocks still held, and why it is not checked
        assert run["status"] == "running", run
        assert "cannot check" in run["message"] and node.address in run["message"], run
        assert busy(fcli).startswith("1/4"), busy(fcli)
        p = fcli("apply", "-f", str(lab.fleet_file), "-y")
        assert p.returncode == 1 and "unreachable" in p.stdout, p.stdout + p.stderr
        out = fcli("ps", check=0).stdout
        assert "on-down-node" in out and "cannot check" in out, out
    finally:
        core.start_sshd(lab, node)
    fcli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    runs, _ = ps(fcli)
    assert runs["on-down-node"]["status"] == "running" and runs["on-down-node"]["message"] == ""
    fcli("stop", "on-down-node", "-y", check=0)
    assert busy(fcli).startswith("0/4")
