"""Workloads on GPU blocks, on the lab, in real podman containers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Cli, wait_logs

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workloads-home")


@pytest.fixture(scope="module")
def labs(lab_factory, home):
    nvidia = lab_factory(nodes=2, gpus=8, vendor="nvidia")
    amd = lab_factory(nodes=1, gpus=4, vendor="amd")
    cli = Cli(home)
    for lab in (nvidia, amd):
        cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return nvidia, amd


@pytest.fixture()
def wcli(home) -> Cli:
    return Cli(home)


def task(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{body}")
    return path


def fleet_rows(cli: Cli, fleet: str) -> dict[str, dict]:
    out = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    return {i["hostname"]: i for f in out if f["name"] == fleet for i in f["instances"]}


def ps(cli: Cli, all_: bool = True) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(cli("ps", "--json", *(["-a"] if all_ else []), check=0).stdout)}


def test_two_4gpu_tasks_share_a_node_and_see_only_their_gpus(labs, wcli, tmp_path):
    nvidia, _ = labs
    fleet = core.fleet_name(nvidia)
    body = (f"fleets: [{fleet}]\nresources: {{gpu: H100:4}}\ncommands:\n"
            "  - echo \"gpus=$GPUFLEET_GPUS_NUM dstack=$DSTACK_GPUS_NUM name=$DSTACK_RUN_NAME\"\n"
            "  - 'echo devices: $(ls /dev | grep -E \"^nvidia[0-9]+$\" | sort | tr \"\\n\" \" \")'\n"
            "  - sleep 300\n")
    for name in ("t-a", "t-b"):
        p = wcli("apply", "-f", str(task(tmp_path, name, body)), "-y", "-d", check=0)
        assert "is running" in p.stdout
    rows = fleet_rows(wcli, fleet)
    busy = sorted(r["status_text"] for r in rows.values())
    assert busy == ["0/8 busy", "8/8 busy"], busy  # best fit: both on one node
    seen = {}
    for name in ("t-a", "t-b"):
        out = wait_logs(wcli, name, "devices:")
        assert f"gpus=4 dstack=4 name={name}" in out
        devices = out.split("devices:")[1].split()
        assert len(devices) == 4, out
        seen[name] = set(devices)
    assert not seen["t-a"] & seen["t-b"]
    runs = ps(wcli, all_=False)
    assert runs["t-a"]["host"] == runs["t-b"]["host"]
    assert {g["uuid"] for g in runs["t-a"]["gpus"]}.isdisjoint({g["uuid"] for g in runs["t-b"]["gpus"]})

    # a third lands on the other node
    wcli("apply", "-f", str(task(tmp_path, "t-c", body)), "-y", "-d", check=0)
    assert ps(wcli)["t-c"]["host"] != runs["t-a"]["host"]
    assert sorted(r["status_text"] for r in fleet_rows(wcli, fleet).values()) == ["4/8 busy", "8/8 busy"]

    # nothing fits a fourth 8-GPU request now: with --no-queue it is refused with what is free, nothing
    # allocated; without, it waits, saying why, and is cancelled by stop
    path = task(tmp_path, "t-big", f"fleets: [{fleet}]\nresources: {{gpu: H100:8}}\n")
    big = wcli("apply", "-f", str(path), "-y", "-d", "--no-queue")
    assert big.returncode == 1
    assert "no instance has 8 H100 free:" in big.stderr and "0/8 free" in big.stderr and "4/8 free" in big.stderr
    assert "t-big" not in ps(wcli)
    big = wcli("apply", "-f", str(path), "-y", "-d", check=0)
    assert "t-big is queued (#1): waiting for 8 H100:" in big.stdout and "4/8 free" in big.stdout, big.stdout
    assert ps(wcli)["t-big"]["status"] == "pending"
    wcli("stop", "t-big", "-y", check=0)
    assert ps(wcli)["t-big"]["status"] == "stopped"

    # stopping frees the blocks
    wcli("stop", "t-a", "-y", check=0)
    assert ps(wcli)["t-a"]["status"] == "stopped"
    assert sorted(r["status_text"] for r in fleet_rows(wcli, fleet).values()) == ["4/8 busy", "4/8 busy"]
    for name in ("t-b", "t-c"):
        wcli("stop", name, "-y", check=0)
    assert sorted(r["status_text"] for r in fleet_rows(wcli, fleet).values()) == ["0/8 busy", "0/8 busy"]


def test_amd_node_gets_kfd_and_its_render_nodes(labs, wcli, tmp_path):
    _, amd = labs
    body = (f"fleets: [{core.fleet_name(amd)}]\nresources: {{gpu: amd:2}}\ncommands:\n"
            "  - 'echo devices: $(ls /dev/dri | sort | tr \"\\n\" \" \") kfd=$(test -c /dev/kfd && echo yes)'\n")
    p = wcli("apply", "-f", str(task(tmp_path, "t-amd", body)), "-y", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("devices:"))
    assert line.split() == ["devices:", "renderD128", "renderD129", "kfd=yes"]
    run = ps(wcli)["t-amd"]
    assert run["status"] == "done" and run["exit_code"] == 0
    assert fleet_rows(wcli, core.fleet_name(amd))[amd.nodes[0].address]["status_text"] == "0/4 busy"


def test_task_that_exits_on_its_own_is_shown_and_frees_blocks(labs, wcli, tmp_path):
    nvidia, _ = labs
    fleet = core.fleet_name(nvidia)
    body = f"fleets: [{fleet}]\nresources: {{gpu: 2}}\ncommands: ['echo bye', 'exit 3']\n"
    p = wcli("apply", "-f", str(task(tmp_path, "t-exit", body)), "-y", "-d")
    # detached: 0 once it runs; 1 when it ran and ended between two looks (it says so: failed, exit code 3)
    assert p.returncode == 0 or (p.returncode == 1 and "t-exit: failed (exit code 3)" in p.stdout), p
    deadline = time.monotonic() + 30
    while ps(wcli)["t-exit"]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = ps(wcli)["t-exit"]
    assert run["status"] == "failed" and run["exit_code"] == 3
    assert all(r["blocks"]["busy"] == 0 for r in fleet_rows(wcli, fleet).values())


def test_failed_start_leaves_run_failed_and_blocks_free(labs, wcli, tmp_path):
    nvidia, _ = labs
    fleet = core.fleet_name(nvidia)
    path = tmp_path / "t-noimg.yml"
    path.write_text(f"type: task\nname: t-noimg\nimage: localhost/does-not-exist:1\nfleets: [{fleet}]\n"
                    "resources: {gpu: 1}\ncommands: [true]\n")
    p = wcli("apply", "-f", str(path), "-y", "-d")
    assert p.returncode == 1
    run = ps(wcli)["t-noimg"]
    assert run["status"] == "failed" and "does-not-exist" in run["message"]
    assert all(r["blocks"]["busy"] == 0 for r in fleet_rows(wcli, fleet).values())


def test_env_values_reach_the_container_literally(labs, wcli, tmp_path):
    nvidia, _ = labs
    body = (f"fleets: [{core.fleet_name(nvidia)}]\nenv:\n  TEMPLATE: \"{{{{ lookup('pipe', 'id') }}}}\"\n"
            "  SHELL_BITS: '$(touch /tmp/pwned); `id`'\n"
            "commands: ['echo \"T=$TEMPLATE\"', 'echo \"S=$SHELL_BITS\"']\n")
    p = wcli("apply", "-f", str(task(tmp_path, "t-env", body)), "-y", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "T={{ lookup('pipe', 'id') }}" in p.stdout
    assert "S=$(touch /tmp/pwned); `id`" in p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_is_reachable_through_attach(labs, wcli, tmp_path, home):
    nvidia, _ = labs
    port = free_port()
    svc = tmp_path / "svc.yml"
    svc.write_text(f"type: service\nname: web\nimage: {IMAGE}\nport: {port}\nfleets: [{core.fleet_name(nvidia)}]\n"
                   "commands:\n  - mkdir -p /www && echo hello-from-the-lab > /www/index.html\n"
                   f"  - exec httpd -f -p {port} -h /www\n")
    wcli("apply", "-f", str(svc), "-y", check=0)
    env = {**os.environ, "GPUFLEET_HOME": str(home)}
    attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", "web"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = None
        for _ in range(40):  # bounded: about 20 s
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None and "hello-from-the-lab" in body
    finally:
        attach.terminate()
        attach.wait(timeout=10)
        wcli("stop", "web", "-y")
