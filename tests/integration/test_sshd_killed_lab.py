"""sshd killed in the middle of a probe and in the middle of a container start (issue 5, faults).

To kill sshd at a known moment, the test makes one step on the node wait: the node's stand-in
`nvidia-smi` (probe) or its OCI runtime (container start, set in the node's containers.conf) first
touches a marker file and sleeps. When the marker appears, the test kills the node's sshd and every
session on it, as a host going down would. Then: the command fails cleanly with the host and the
cause, nothing stays allocated, and once sshd is back the next command converges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
HOLD_S = 20


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=2, gpus=8, vendor="nvidia")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sshd-killed-home")


def popen(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "GPUFLEET_HOME": str(home), "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.Popen([sys.executable, "-m", "gpufleet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def wait_for(path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def marker_dir(lab, node) -> Path:
    """A folder on the node that the login user (the probe runs as it) and root can write to."""
    d = lab.host_dir(node) / "markers"
    d.mkdir(exist_ok=True)
    d.chmod(0o1777)
    return d


def fleet_rows(cli: Cli, fleet: str) -> dict[str, dict]:
    out = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    return {i["hostname"]: i for f in out if f["name"] == fleet for i in f["instances"]}


def test_sshd_killed_during_the_probe(lab, home):
    cli = Cli(home)
    node = lab.nodes[1]
    fleet = core.fleet_name(lab)
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    d = lab.host_dir(node)
    tool, real = d / "bin" / "nvidia-smi", d / "bin" / "nvidia-smi.real"
    marker = marker_dir(lab, node) / "probe-reached"
    tool.rename(real)
    tool.write_text(f"#!/bin/sh\ntouch {marker}\nsleep {HOLD_S}\nexec {real} \"$@\"\n")
    tool.chmod(0o755)
    try:
        proc = popen(home, "apply", "-f", str(lab.fleet_file), "-y")
        try:
            wait_for(marker)
            core.stop_sshd(lab, node)
            out, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 1, out
        assert node.address in out and "Traceback" not in out, out
        rows = fleet_rows(cli, fleet)
        assert rows[node.address]["status"] in ("unreachable", "error"), rows[node.address]
        assert rows[node.address]["status_text"].strip() != rows[node.address]["status"], rows[node.address]
        assert rows[lab.nodes[0].address]["status"] == "ready"
    finally:
        real.replace(tool)
        marker.unlink(missing_ok=True)
        core.start_sshd(lab, node)
    out = cli("apply", "-f", str(lab.fleet_file), "-y", check=0).stdout
    assert all(r["status"] == "ready" for r in fleet_rows(cli, fleet).values()), out


def test_sshd_killed_during_a_container_start(lab, home, tmp_path):
    cli = Cli(home)
    fleet = core.fleet_name(lab)
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    for node in lab.nodes:  # whichever node the allocator picks holds its container start
        d, markers = lab.host_dir(node), marker_dir(lab, node)
        conf = d / "containers" / "containers.conf"
        hold = d / "bin" / "hold-runc"
        # runc, held at `create` while the flag file exists; it stays the node's runtime afterwards,
        # since containers made with it name it
        hold.write_text("#!/bin/sh\n"
                        f"if [ -e {markers}/hold ]; then case \" $* \" in\n"
                        f"  *\" create \"*) touch {markers}/start-reached; sleep {HOLD_S};;\nesac; fi\n"
                        "exec runc \"$@\"\n")
        hold.chmod(0o755)
        if "holdrunc" not in conf.read_text():
            conf.write_text(conf.read_text().replace('runtime = "runc"', 'runtime = "holdrunc"')
                            + f'[engine.runtimes]\nholdrunc = ["{hold}"]\n')
        (markers / "hold").touch()
    task = tmp_path / "held.yml"
    task.write_text(f"type: task\nname: held\nimage: {core.LAB_IMAGE}\nfleets: [{fleet}]\n"
                    "resources: {gpu: 8}\ncommands: ['echo started', 'sleep 300']\n")
    try:
        proc = popen(home, "apply", "-f", str(task), "-y", "-d")
        try:
            deadline = time.monotonic() + 90
            held = None
            while held is None:
                assert time.monotonic() < deadline, "no container start reached the node's runtime"
                held = next((n for n in lab.nodes if (marker_dir(lab, n) / "start-reached").exists()), None)
                time.sleep(0.1)
            core.stop_sshd(lab, held)
            out, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 1, out
        assert "Traceback" not in out and "failed" in out, out
        runs = {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}
        assert runs["held"]["status"] == "failed", runs["held"]
        # nothing stays allocated without a container
        assert all(r["blocks"]["busy"] == 0 for r in fleet_rows(cli, fleet).values())
    finally:
        for node in lab.nodes:
            (marker_dir(lab, node) / "hold").unlink(missing_ok=True)
            (marker_dir(lab, node) / "start-reached").unlink(missing_ok=True)
            core.start_sshd(lab, node)
    time.sleep(HOLD_S)  # the held runtime call ends by itself; whatever it left is now on the host
    # the next commands converge: a sweep stops any container left running, the run starts again
    cli("ps", "-a", check=0)
    held_host = held
    names = core.host_exec(lab, held_host, ["podman", "ps", "--format", "{{.Names}}"], check=False).stdout
    assert "held" not in names.split(), names
    p = cli("apply", "-f", str(task), "-y", "-d", check=0)
    assert "is running" in p.stdout
    runs = {r["name"]: r for r in json.loads(cli("ps", "--json", check=0).stdout)}
    assert runs["held"]["status"] == "running"
    assert sorted(r["blocks"]["busy"] for r in fleet_rows(cli, fleet).values()) == [0, 8]
    cli("stop", "held", "-y", check=0)
    assert all(r["blocks"]["busy"] == 0 for r in fleet_rows(cli, fleet).values())
