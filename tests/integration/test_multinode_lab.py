"""Multi-node tasks on a cluster fleet of the lab: gang allocation, cluster addresses, environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode-home")


@pytest.fixture(scope="module")
def lab(lab_factory, home):
    lab = lab_factory(nodes=2, gpus=8, vendor="nvidia")
    Cli(home)("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab


@pytest.fixture()
def mcli(home) -> Cli:
    return Cli(home)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    return path


def busy(cli: Cli) -> list[str]:
    out = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    return sorted(i["status_text"] for f in out for i in f["instances"])


def ps(cli: Cli) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}


def test_two_node_task_ranks_talk_over_the_cluster_network(lab, mcli, tmp_path):
    task = write(tmp_path, "dist", f"""type: task
name: dist
image: {IMAGE}
nodes: 2
commands:
  - echo "rank=$GPUFLEET_NODE_RANK nodes=$GPUFLEET_NODES_NUM master=$GPUFLEET_MASTER_NODE_IP dstack=$DSTACK_NODE_RANK"
  - echo "gpus_per_node=$GPUFLEET_GPUS_PER_NODE gpus=$GPUFLEET_GPUS_NUM"
  - cat "$GPUFLEET_MPI_HOSTFILE"
  - |
    if [ "$GPUFLEET_NODE_RANK" = 0 ]; then
      echo "got: $(nc -l -p 29500)"
    else
      echo hello-from-rank-1 > /tmp/msg  # a file, not a pipe: nc reads it before it sees the listener close
      for i in $(seq 1 50); do
        nc -w 1 "$GPUFLEET_MASTER_NODE_IP" 29500 < /tmp/msg && break; sleep 0.2
      done
      echo sent
    fi
""")
    p = mcli("apply", "-f", str(task), "-y", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    ips = [n.address for n in lab.nodes]
    rank0 = mcli("logs", "dist", "--node", "0", check=0).stdout
    rank1 = mcli("logs", "dist", "--node", "1", check=0).stdout
    assert f"rank=0 nodes=2 master={ips[0]} dstack=0" in rank0
    assert f"rank=1 nodes=2 master={ips[0]} dstack=1" in rank1
    assert "gpus_per_node=8 gpus=16" in rank0  # whole hosts by default
    assert f"{ips[0]} slots=8\n{ips[1]} slots=8" in rank0
    assert "got: hello-from-rank-1" in rank0 and "sent" in rank1
    run = ps(mcli)["dist"]
    assert run["status"] == "done" and len(run["nodes"]) == 2
    assert busy(mcli) == ["0/8 busy", "0/8 busy"]


def test_blocks_per_node_beside_a_single_node_task(lab, mcli, tmp_path):
    gang = write(tmp_path, "gang", f"type: task\nname: gang\nimage: {IMAGE}\nnodes: 2\n"
                                   "resources: {gpu: 4}\ncommands: ['sleep 300']\n")
    single = write(tmp_path, "single", f"type: task\nname: single\nimage: {IMAGE}\n"
                                       "resources: {gpu: 4}\ncommands: ['sleep 300']\n")
    mcli("apply", "-f", str(gang), "-y", "-d", check=0)
    assert busy(mcli) == ["4/8 busy", "4/8 busy"]
    assert [len(n["gpus"]) for n in ps(mcli)["gang"]["nodes"]] == [4, 4]
    mcli("apply", "-f", str(single), "-y", "-d", check=0)
    assert busy(mcli) == ["4/8 busy", "8/8 busy"]
    mcli("stop", "gang", "-y", check=0)
    assert busy(mcli) == ["0/8 busy", "4/8 busy"]
    mcli("stop", "single", "-y", check=0)
    assert busy(mcli) == ["0/8 busy", "0/8 busy"]


def test_too_many_nodes_refused_and_failed_start_rolls_back(lab, mcli, tmp_path):
    three = write(tmp_path, "three", f"type: task\nname: three\nimage: {IMAGE}\nnodes: 3\ncommands: [true]\n")
    p = mcli("apply", "-f", str(three), "-y", "-d")
    assert p.returncode == 1 and "has 2 ready instances, the task needs 3" in p.stderr
    assert "three" not in ps(mcli)

    # an image only node 0 has: node 0 starts, node 1 fails, node 0 is stopped, all blocks freed
    core.host_exec(lab, lab.nodes[0], ["podman", "tag", IMAGE, "localhost/only-node0:1"])
    half = write(tmp_path, "half", "type: task\nname: half\nimage: localhost/only-node0:1\nnodes: 2\n"
                                   "commands: ['sleep 300']\n")
    p = mcli("apply", "-f", str(half), "-y", "-d")
    assert p.returncode == 1
    run = ps(mcli)["half"]
    assert run["status"] == "failed" and run["message"].startswith(f"node 1 ({lab.nodes[1].address}):")
    assert busy(mcli) == ["0/8 busy", "0/8 busy"]
    listed = core.host_exec(lab, lab.nodes[0], ["podman", "ps", "-a", "--format", "{{.Names}}"]).stdout
    assert "gpufleet-half" not in listed
