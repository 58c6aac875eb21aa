"""The lab's GPUs driven by a workload, end to end: a run (through gpufleet, real podman, given its GPU
by CDI) runs gpu-burn and makes that GPU read busy in the host's nvidia-smi, asked over ssh as the
metrics sampler asks it, with a host PID in the run's container; gpu-burn started by hand on the host
holds another GPU with a PID in no container; `gpufleet lab fault` makes a GPU report a fault."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Cli, wait_for

from gpufleet.lab import core
from gpufleet.metrics import hostcmd

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=4, vendor="nvidia")
    cli = Cli(tmp_path_factory.mktemp("gpuburn-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab, cli


def on_host(lab, cli: Cli, argv: list[str]) -> str:
    """``argv`` run on the lab node over the fleet's own ssh config (through the login node), as the
    metrics sampler runs the vendor tools."""
    config = cli.home / "fleets" / core.fleet_name(lab) / "ssh_config"
    p = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", lab.nodes[0].address, shlex.join(argv)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def gpus(lab, cli) -> list[list[str]]:
    return [line.split(", ") for line in on_host(lab, cli, ["nvidia-smi", *hostcmd.NVIDIA_GPUS]).splitlines()]


def apps(lab, cli) -> list[list[str]]:
    return [line.split(", ", 3) for line in on_host(lab, cli, ["nvidia-smi", *hostcmd.NVIDIA_APPS]).splitlines()]


def test_a_run_and_a_stray_job_make_their_gpus_busy(site, tmp_path):
    lab, cli = site
    node = lab.nodes[0]
    assert [r[2] for r in gpus(lab, cli)] == ["0"] * 4 and apps(lab, cli) == []
    spec = tmp_path / "burn.yml"
    spec.write_text(f"type: task\nname: burn\nimage: {core.LAB_IMAGE}\nresources: {{gpu: 1}}\n"
                    "commands: ['gpu-burn --seconds 60 --percent 70']\n")
    cli("apply", "-f", str(spec), "-y", "-d", check=0)

    rows = wait_for("the run's GPU to read 70 %", lambda: [r for r in gpus(lab, cli) if r[2] == "70"], timeout=60)
    [busy] = rows
    index, uuid = int(busy[0]), busy[1]
    assert [r[2] for r in gpus(lab, cli) if r[0] != busy[0]] == ["0"] * 3
    # the container was given exactly that GPU by CDI (named by the host's index), and the driver's state
    containers = json.loads(core.host_exec(lab, node, ["podman", "ps", "--format", "json"]).stdout)
    [container] = containers
    cid = container["Id"]
    seen = core.host_exec(lab, node, ["podman", "exec", cid, "sh", "-c", "ls /dev; ls /run/gpufleet-lab-gpu"]).stdout
    assert re.findall(r"^nvidia\d+$", seen, re.M) == [f"nvidia{index}"] and "holders" in seen
    tamper = core.host_exec(lab, node, ["podman", "exec", cid, "sh", "-c", "echo x > /run/gpufleet-lab-gpu/gpus"],
                            check=False)
    assert tamper.returncode != 0 and "Read-only" in tamper.stderr  # a run may not change the host's GPUs
    [[app_uuid, pid, mib, name]] = apps(lab, cli)
    assert app_uuid == uuid and name == "/usr/bin/gpu-burn" and int(mib) == 81559 * 9 // 10
    assert cid in Path(f"/proc/{pid}/cgroup").read_text()  # a host PID, in the run's container

    # a job started by hand on the host, outside gpufleet, on another GPU
    other = (index + 1) % 4
    stray = core.start_gpu_burn(lab, node, "--gpus", str(other), "--percent", "30")
    try:
        readings = {int(r[0]): r[2] for r in gpus(lab, cli)}
        assert readings[index] == "70" and readings[other] == "30"
        held = {a[0]: int(a[1]) for a in apps(lab, cli)}
        assert held[node.gpus[other]["uuid"]] == stray.pid
        cgroup = Path(f"/proc/{stray.pid}/cgroup").read_text()
        assert "libpod" not in cgroup and cid not in cgroup
        assert Path(f"/proc/{stray.pid}/status").read_text().count(f"Uid:\t{_uid(core.LAB_USER)}") == 1
    finally:
        stray.stop()
    assert {int(r[0]): r[2] for r in gpus(lab, cli)}[other] == "0"

    cli("stop", "burn", "-y", check=0)
    wait_for("the GPUs to read idle", lambda: [r[2] for r in gpus(lab, cli)] == ["0"] * 4, timeout=60)
    assert apps(lab, cli) == []


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def test_lab_fault_marks_a_gpu(site):
    lab, cli = site

    def fault(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpufleet", "lab", "fault", "--dir", lab.dir, *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    p = fault("--node", "0", "--gpu", "3", "--kind", "ecc")
    assert p.returncode == 0 and "GPU 3 of node-0" in p.stdout, p.stderr
    assert gpus(lab, cli)[3][7:] == ["2", "[N/A]", "Yes", "No", "Reset"]
    assert gpus(lab, cli)[2][7:] == ["0", "[N/A]", "No", "No", "None"]
    p = fault("--node", "0", "--gpu", "9")
    assert p.returncode == 2 and "no nvidia GPU 9" in p.stderr and "Traceback" not in p.stderr
    assert fault("--node", "0", "--gpu", "3", "--clear").returncode == 0
    assert gpus(lab, cli)[3][7:] == ["0", "[N/A]", "No", "No", "None"]
