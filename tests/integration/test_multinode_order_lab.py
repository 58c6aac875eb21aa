"""dstack's `startup_order`, `stop_criteria` and `groups` on a cluster fleet of the lab (2 nodes): the
order the containers start in (the runtime's own StartedAt, one clock: the lab's hosts share the
kernel), each group's commands with the nodes' addresses filled, a master that exits before the
workers start, and a run ended by its master."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode-order-home")


@pytest.fixture(scope="module")
def lab(lab_factory, home):
    lab = lab_factory(nodes=2, gpus=2, vendor="nvidia")
    Cli(home)("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab


@pytest.fixture()
def mcli(home) -> Cli:
    return Cli(home)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\nnodes: 2\n{body}")
    return path


def ps(cli: Cli) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}


def inspect(lab, node: int, name: str) -> dict | None:
    """The container ``name`` on lab node ``node`` as the runtime reports it (None: there is none)."""
    p = core.host_exec(lab, lab.nodes[node], ["podman", "inspect", f"gpufleet-{name}"], check=False)
    return json.loads(p.stdout)[0] if p.returncode == 0 else None


def started_at(lab, node: int, name: str) -> datetime:
    return timestamp(inspect(lab, node, name)["State"]["StartedAt"])


def timestamp(text: str) -> datetime:
    """A time of the runtime's inspect: RFC 3339 with nanoseconds (or Go's form)."""
    m = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(\.\d{1,6})?\d*\s*(Z|[+-]\d\d:?\d\d)?", text)
    assert m, text
    zone = {None: "+00:00", "Z": "+00:00"}.get(m.group(4), m.group(4))
    return datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}{m.group(3) or ''}{zone}")


def test_groups_with_master_first_run_their_own_commands_and_reach_each_other(lab, mcli, tmp_path):
    # the worker sends once, without retrying: master-first has the master listening before it starts.
    # It sends from a file, not `echo | nc`: busybox nc on an empty pipe sees the listener's end
    # (it has no stdin) first and exits 0 without sending, a race that lost the message under load
    path = tmp_path / "mfirst.yml"
    path.write_text(f"""type: task
name: mfirst
image: {IMAGE}
startup_order: master-first
groups:
  - name: head
    commands:
      - echo "head $GPUFLEET_NODE_RANK sees worker ${{{{ groups[1].nodes[0].IP_ADDRESS }}}}"
      - echo "got=$(nc -l -p 29501)"
  - name: workers
    commands:
      - echo "worker $GPUFLEET_NODE_RANK sends to ${{{{ groups[0].nodes[0].IP_ADDRESS }}}}"
      - echo hello-from-the-worker > /tmp/msg
      - nc -w 2 ${{{{ groups[0].nodes[0].IP_ADDRESS }}}} 29501 < /tmp/msg
""")
    p = mcli("apply", "-f", str(path), "-y", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ps(mcli)["mfirst"]["status"] == "done"
    head, worker = (mcli("logs", "mfirst", "--node", str(n), check=0).stdout for n in (0, 1))
    ips = [n.address for n in lab.nodes]
    assert f"head 0 sees worker {ips[1]}" in head and "got=hello-from-the-worker" in head, head
    assert f"worker 1 sends to {ips[0]}" in worker and "head" not in worker, worker
    assert started_at(lab, 0, "mfirst") < started_at(lab, 1, "mfirst")


def test_workers_first_then_master_done_stops_the_workers(lab, mcli, tmp_path):
    # the worker would sleep 10 minutes (and ends on SIGTERM, as a trainer would): the run ends when
    # the master exits, and the server stops the worker
    task = write(tmp_path, "wfirst", "startup_order: workers-first\nstop_criteria: master-done\n"
                                     "commands: ['if [ $GPUFLEET_NODE_RANK = 0 ]; then sleep 1; exit 0; fi',\n"
                                     "           'trap \"exit 143\" TERM; sleep 600 & wait']\n")
    began = time.monotonic()
    mcli("apply", "-f", str(task), "-y", "-d", timeout=300, check=0)
    run = wait_for("wfirst to end", lambda: (r := ps(mcli)["wfirst"])["status"] not in
                   ("pending", "starting", "running", "stopping") and r, timeout=60)
    took = time.monotonic() - began
    assert run["status"] == "done" and run["exit_code"] == 0, run
    assert "stop_criteria: master-done" in run["message"]
    assert took < 120, took  # not the worker's 600 s: the server stopped it by itself
    assert started_at(lab, 1, "wfirst") < started_at(lab, 0, "wfirst")  # the worker first
    master, worker = inspect(lab, 0, "wfirst")["State"], inspect(lab, 1, "wfirst")["State"]
    assert master["Status"] == "exited" and master["ExitCode"] == 0
    assert worker["Status"] == "exited" and worker["ExitCode"] != 0  # stopped, not finished
    assert worker["ExitCode"] == 143  # SIGTERM
    # a few reconcile passes (1 s apart) and a stop playbook after the master's end
    stopped_after = (timestamp(worker["FinishedAt"]) - timestamp(master["FinishedAt"])).total_seconds()
    assert 0 < stopped_after < 15, stopped_after
    fleets = json.loads(mcli("fleet", "list", "--json", check=0).stdout)
    assert sorted(i["status_text"] for f in fleets for i in f["instances"]) == ["0/2 busy", "0/2 busy"]


def test_master_first_with_a_master_that_dies_fails_the_start_and_never_starts_the_worker(lab, mcli, tmp_path):
    task = write(tmp_path, "mdies", "startup_order: master-first\n"
                                    "commands: ['if [ $GPUFLEET_NODE_RANK = 0 ]; then exit 3; fi', 'sleep 600']\n")
    p = mcli("apply", "-f", str(task), "-y", "-d", timeout=300)
    run = wait_for("mdies to fail", lambda: (r := ps(mcli)["mdies"])["status"] == "failed" and r, timeout=60)
    assert run["message"] == (f"node 0 ({lab.nodes[0].address}): its container exited with code 3 before the "
                              f"other nodes started (startup_order: master-first)"), (run, p.stdout, p.stderr)
    assert inspect(lab, 1, "mdies") is None  # the worker was never started
