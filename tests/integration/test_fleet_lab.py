"""Fleets end to end on the local lab: real sshd hosts in network namespaces behind a real login node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import tool

from gpufleet.lab import core

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=3, gpus=8, vendor="nvidia")


def fleet_yaml(lab, tmp_path: Path, nodes: list[int], **extra) -> Path:
    data = yaml.safe_load(lab.fleet_file.read_text())
    data["ssh_config"]["hosts"] = [lab.nodes[i].address for i in nodes]
    data.update(extra)
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def instances(cli, name: str) -> dict[str, dict]:
    out = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    fleet = next(f for f in out if f["name"] == name)
    return {i["hostname"]: i for i in fleet["instances"]}


def test_direct_ssh_fails_and_apply_through_login_node_works(lab, cli, tmp_path):
    node = lab.nodes[0]
    direct = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o",
                             "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/kh",
                             "-i", str(lab.key("node")), f"{core.LAB_USER}@{node.address}", "true"],
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 255, direct.stderr

    p = cli("apply", "-f", str(fleet_yaml(lab, tmp_path, [0, 1])), "-y", check=0)
    assert p.stdout.count("0/8 busy") == 2, p.stdout
    assert "8xH100 (80GB)" in p.stdout
    found = instances(cli, core.fleet_name(lab))
    assert set(found) == {lab.nodes[0].address, lab.nodes[1].address}
    for inst in found.values():
        assert inst["status"] == "ready" and inst["blocks"] == {"total": 8, "busy": 0}
        assert inst["runtime"]["name"] == "podman" and inst["runtime"]["usable"]
    # the probe saw exactly the GPUs the lab made: uuids, memory and NUMA nodes
    for i in (0, 1):
        probed = found[lab.nodes[i].address]["gpus"]
        assert [(g["uuid"], g["memory_mib"], g["numa_node"]) for g in probed] == \
            [(g["uuid"], g["memory_mib"], g["numa_node"]) for g in lab.nodes[i].gpus]
        assert [g["numa_node"] for g in probed] == [0, 0, 0, 0, 1, 1, 1, 1]

    # the generated inventory works with plain ansible-playbook (no gpufleet in between)
    inventory = cli.home / "fleets" / core.fleet_name(lab) / "inventory.yml"
    run = subprocess.run([tool("ansible-playbook"), "-i", str(inventory), "playbooks/probe.yml"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok=" in run.stdout and "unreachable=0" in run.stdout and "failed=0" in run.stdout


def test_blocks_that_do_not_divide_give_a_host_error(lab, cli, tmp_path):
    p = cli("apply", "-f", str(fleet_yaml(lab, tmp_path, [2], blocks=3)), "-y")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "error: 8 GPUs cannot be split into 3 blocks" in p.stdout
    inst = instances(cli, core.fleet_name(lab))[lab.nodes[2].address]
    assert inst["status"] == "error" and inst["blocks"]["total"] == 0
    p = cli("apply", "-f", str(fleet_yaml(lab, tmp_path, [2], blocks=2)), "-y", check=0)
    assert "0/2 busy" in p.stdout


def test_reapply_adds_and_removes_hosts(lab, cli, tmp_path):
    cli("apply", "-f", str(fleet_yaml(lab, tmp_path, [0, 1])), "-y", check=0)
    before = instances(cli, core.fleet_name(lab))
    p = cli("apply", "-f", str(fleet_yaml(lab, tmp_path, [1, 2])), "-y", check=0)
    assert "remove" in p.stdout and "add" in p.stdout and "re-probe" in p.stdout
    after = instances(cli, core.fleet_name(lab))
    assert set(after) == {lab.nodes[1].address, lab.nodes[2].address}
    # the kept host keeps its instance number; the new one takes the free number
    assert after[lab.nodes[1].address]["instance"] == before[lab.nodes[1].address]["instance"] == 1
    assert after[lab.nodes[2].address]["instance"] == 0
    assert all(i["status"] == "ready" for i in after.values())


def test_changed_host_key_is_refused(lab, cli, tmp_path):
    path = fleet_yaml(lab, tmp_path, [0])
    cli("apply", "-f", str(path), "-y", check=0)
    known_hosts = cli.home / "fleets" / core.fleet_name(lab) / "known_hosts"
    assert lab.nodes[0].address in known_hosts.read_text()
    before = known_hosts.read_text()
    core.rotate_host_key(lab, lab.nodes[0])
    subprocess.run(["ssh", "-O", "exit", "-F", str(cli.home / "fleets" / core.fleet_name(lab) / "ssh_config"),
                    lab.nodes[0].address], capture_output=True)
    p = cli("apply", "-f", str(path), "-y")
    assert p.returncode == 1
    inst = instances(cli, core.fleet_name(lab))[lab.nodes[0].address]
    assert inst["status"] == "unreachable"
    assert "host key" in inst["reason"] and str(known_hosts) in inst["reason"], inst["reason"]
    assert known_hosts.read_text() == before  # never replaced behind the user's back


def test_down_node_is_unreachable_and_others_are_applied(lab, cli, tmp_path):
    path = fleet_yaml(lab, tmp_path, [1, 2])
    core.stop_sshd(lab, lab.nodes[2])
    try:
        p = cli("apply", "-f", str(path), "-y")
        assert p.returncode == 1
        found = instances(cli, core.fleet_name(lab))
        assert found[lab.nodes[1].address]["status"] == "ready"
        assert found[lab.nodes[2].address]["status"] == "unreachable"
        assert "Connection refused" in found[lab.nodes[2].address]["reason"]
    finally:
        core.start_sshd(lab, lab.nodes[2])
    cli("apply", "-f", str(path), "-y", check=0)
    assert instances(cli, core.fleet_name(lab))[lab.nodes[2].address]["status"] == "ready"


def test_login_node_down_names_the_login_node(lab, cli, tmp_path):
    path = fleet_yaml(lab, tmp_path, [0, 1])
    core.stop_sshd(lab, lab.login)
    try:  # stopping sshd also ended every session, so no multiplexed master survives
        p = cli("apply", "-f", str(path), "-y", timeout=120)
        assert p.returncode == 1
        for inst in instances(cli, core.fleet_name(lab)).values():
            assert inst["status"] == "unreachable"
            assert inst["reason"].startswith(f"login node {lab.login.address}:22 unreachable"), inst["reason"]
    finally:
        core.start_sshd(lab, lab.login)


def test_lab_up_twice_and_down_twice_are_harmless(tmp_path):
    lab = core.up(tmp_path / "l", nodes=1, gpus=0, vendor="none", log=lambda *_: None)
    again = core.up(tmp_path / "l", nodes=1, gpus=0, vendor="none", log=lambda *_: None)
    assert again.index == lab.index and core.is_up(again)
    assert core.down(tmp_path / "l", log=lambda *_: None) is True
    assert core.down(tmp_path / "l", log=lambda *_: None) is False
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{lab.prefix}-" not in netns
    assert not (core.RUN_ROOT / str(lab.index)).exists()


def test_every_vendor_and_mixed_models_are_reported_as_they_are(lab_factory, cli):
    mixed = lab_factory(nodes=6, gpus=8, vendor="mixed")
    p = cli("apply", "-f", str(mixed.fleet_file), "-y", check=0)
    found = instances(cli, core.fleet_name(mixed))
    resources = [found[n.address]["resources"] for n in mixed.nodes]
    assert resources == ["8xH100 (80GB)", "8xMI300X (192GB)", "4xH100 (80GB), 4xL40S (45GB)",
                         "8xGaudi2 (96GB)", "8xn300 (12GB)", "cpu=2 mem=" + resources[5].split("mem=")[1]]
    assert p.stdout.count("0/8 busy") == 5 and "idle" in p.stdout
    vendors = [{g["vendor"] for g in found[n.address]["gpus"]} for n in mixed.nodes]
    assert vendors == [{"nvidia"}, {"amd"}, {"nvidia"}, {"intel"}, {"tenstorrent"}, set()]
    # the two-model host: every GPU, not GPU 0 repeated; blocks keep models apart
    two = found[mixed.nodes[2].address]["gpus"]
    assert [g["model"] for g in two] == ["H100"] * 4 + ["L40S"] * 4
    assert len({g["uuid"] for g in two}) == 8
    # container GPU support the lab provides: a CDI spec on NVIDIA nodes, /dev/kfd on the AMD node
    assert found[mixed.nodes[0].address]["runtime"]["gpu_support"]["nvidia"] == "cdi"
    assert found[mixed.nodes[1].address]["runtime"]["gpu_support"]["amd"] is True


def test_ctrl_c_stops_apply_cleanly(lab, cli, tmp_path):
    """Ctrl-C while the probe runs (node 0's nvidia-smi is held at a marker, so the interrupt
    cannot come too late): exit 130, no traceback, no ansible-playbook left behind."""
    import os
    import signal
    import sys
    import time

    path = fleet_yaml(lab, tmp_path, [0, 1, 2])
    d = lab.host_dir(lab.nodes[0])
    tool, real = d / "bin" / "nvidia-smi", d / "bin" / "nvidia-smi.real"
    markers = d / "markers"
    markers.mkdir(exist_ok=True)
    markers.chmod(0o1777)  # the probe runs as the lab's login user
    marker = markers / "ctrl-c-probe-reached"
    tool.rename(real)
    tool.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 120\nexec {real} \"$@\"\n")
    tool.chmod(0o755)
    env = {**os.environ, "GPUFLEET_HOME": str(cli.home)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "apply", "-f", str(path), "-y"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 90
            while not marker.exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the probe never reached node 0"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    finally:
        real.replace(tool)
        marker.unlink(missing_ok=True)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "interrupted" in err
    # the server sees its client go and cancels the probe: its playbook and workers end (bounded wait)
    deadline = time.monotonic() + 20
    while True:
        leftovers = subprocess.run(["pgrep", "-f", f"ansible-playbook.*{cli.home}"], capture_output=True, text=True)
        if leftovers.stdout == "" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert leftovers.stdout == "", cli.server_log()


def test_lab_needs_root_and_names_missing_packages(monkeypatch):
    from gpufleet.errors import UsageError

    monkeypatch.setattr(core.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        core.preflight()
    monkeypatch.setattr(core.os, "geteuid", lambda: 0)
    real_which = core.shutil.which
    monkeypatch.setattr(core.shutil, "which", lambda name: None if name == "podman" else real_which(name))
    with pytest.raises(UsageError, match=r"apt-get install -y podman"):
        core.preflight()
