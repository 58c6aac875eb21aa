"""64 nodes behind one login node whose sshd keeps its default MaxStartups (10:30:100): every node
is probed and none is lost to a dropped connection (issue 5). A naive fan-out of 64 ssh handshakes
through the login node would have sshd drop some of them; gpufleet opens one multiplexed master
to the login node before the fan-out and every node's connection is a channel inside it.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
NODES = 64


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=NODES, gpus=8, vendor="nvidia")


def test_login_node_keeps_sshds_default_max_startups(lab):
    # the lab does not raise the limit: what gpufleet must live with on a stock login node
    config = (lab.host_dir(lab.login) / "sshd_config").read_text()
    assert "MaxStartups" not in config
    effective = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(lab.host_dir(lab.login) / "sshd_config")],
                               capture_output=True, text=True)
    assert "maxstartups 10:30:100" in effective.stdout, effective.stdout + effective.stderr


def test_sixty_four_nodes_are_all_probed(lab, tmp_path):
    cli = Cli(tmp_path / "home")
    p = cli("apply", "-f", str(lab.fleet_file), "-y", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    fleets = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    instances = [i for f in fleets if f["name"] == core.fleet_name(lab) for i in f["instances"]]
    assert len(instances) == NODES
    not_ready = [(i["hostname"], i["status"], i.get("status_text")) for i in instances if i["status"] != "ready"]
    assert not not_ready, not_ready
    assert all(len(i["gpus"]) == 8 and i["blocks"]["total"] == 8 for i in instances)
    assert len({g["uuid"] for i in instances for g in i["gpus"]}) == NODES * 8  # each node's own GPUs
    # and a re-apply (warm) also loses none
    p = cli("apply", "-f", str(lab.fleet_file), "-y", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
