"""Multi-node tasks' `startup_order`, `stop_criteria` and `groups` (dstack's): how they are read, the
order nodes start in (launch.start_stages), when a run is over (runs.settle), and each node's commands
with the nodes' addresses filled (launch.container_vars), without hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet import cluster
from gpufleet.errors import ConfigError
from gpufleet.interpolate import group_addresses
from gpufleet.launch import container_vars, start_stages
from gpufleet.models import GPU, RUN_CONFIG, Container, HostFacts, Run, RunStatus
from gpufleet.runconfig import UNSUPPORTED, parse_run
from gpufleet.runs import settle


def task(extra: str) -> str:
    return f"type: task\nimage: busybox\nnodes: 3\ncommands: [true]\n{extra}"


@pytest.mark.parametrize("line,order,criteria", [
    ("", None, None),
    ("startup_order: any\nstop_criteria: all-done\n", "any", "all-done"),
    ("startup_order: master-first\n", "master-first", None),
    ("startup_order: workers-first\nstop_criteria: master-done\n", "workers-first", "master-done"),
    ("startup_order: null\nstop_criteria: null\n", None, None),
])
def test_dstack_values_are_read(line, order, criteria):
    cfg = parse_run(task(line), "t.yml").config
    assert (cfg.startup_order, cfg.stop_criteria) == (order, criteria)
    spec = cfg.model_dump(mode="json")
    assert (spec["startup_order"], spec["stop_criteria"]) == (order, criteria)


@pytest.mark.parametrize("line,where", [
    ("startup_order: master_first\n", "5:16: startup_order: "),
    ("stop_criteria: first-done\n", "5:16: stop_criteria: "),
    ("stop_criteria: [all-done]\n", "5:16: stop_criteria: "),
])
def test_a_wrong_value_is_refused_with_its_line(line, where):
    with pytest.raises(ConfigError) as e:
        parse_run(task(line), "t.yml")
    text = str(e.value)
    assert f"t.yml:{where}" in text, text
    assert "master-first" in text or "master-done" in text, text


def test_they_are_no_longer_listed_as_unsupported():
    assert "startup_order" not in UNSUPPORTED["task"] and "stop_criteria" not in UNSUPPORTED["task"]


@pytest.mark.parametrize("order,nodes,stages", [
    (None, 3, [[0, 1, 2]]),
    ("any", 3, [[0, 1, 2]]),
    ("master-first", 3, [[0], [1, 2]]),
    ("workers-first", 3, [[1, 2], [0]]),
    ("workers-first", 2, [[1], [0]]),
    ("master-first", 1, [[0]]),
    ("workers-first", 1, [[0]]),
])
def test_start_stages(order, nodes, stages):
    assert start_stages(order, nodes) == stages


# --------------------------------------------------------------------------- stop_criteria

def run(criteria: str | None, aliases=("m", "w1", "w2")) -> Run:
    nodes = [{"rank": i, "alias": a, "instance_id": i + 1, "blocks": [0], "gpus": []} for i, a in enumerate(aliases)]
    spec = {"type": "task", "stop_criteria": criteria}
    return Run(name="r", run_id="id", type="task", fleet="f", instance_id=1, alias=aliases[0],
               status=RunStatus.RUNNING, message="", spec=spec, container="gpufleet-r", nodes=nodes,
               created_at=0, updated_at=0)


def box(state: str, code: int | None = None) -> Container:
    return Container(name="gpufleet-r", state=state, exit_code=code, run_id="id")


def test_master_done_ends_the_run_when_the_master_exits_zero_and_stops_the_rest():
    s = settle(run("master-done"), [("m", box("exited", 0)), ("w1", box("running")), ("w2", box("exited", 0))], "")
    assert (s.status, s.exit_code, s.stop) == (RunStatus.DONE, 0, ["w1"])
    assert "stop_criteria: master-done" in s.message


def test_master_done_with_a_host_that_cannot_be_asked_still_ends():
    s = settle(run("master-done"), [("m", box("exited", 0)), ("w1", box("running"))], "cannot check w2: timeout")
    assert (s.status, s.stop) == (RunStatus.DONE, ["w1"])


def test_all_done_waits_for_every_node():
    states = [("m", box("exited", 0)), ("w1", box("running")), ("w2", box("running"))]
    assert settle(run("all-done"), states, "").status is None
    assert settle(run(None), states, "").status is None


def test_master_done_keeps_running_while_the_master_runs():
    states = [("m", box("running")), ("w1", box("exited", 0)), ("w2", box("exited", 0))]
    assert settle(run("master-done"), states, "").status is None


def test_a_failure_fails_the_run_whatever_the_criteria():
    failed_master = settle(run("master-done"), [("m", box("exited", 3)), ("w1", box("running")),
                                                ("w2", box("running"))], "")
    assert (failed_master.status, failed_master.exit_code, failed_master.stop) == (RunStatus.FAILED, 3, ["w1", "w2"])
    failed_worker = settle(run("master-done"), [("m", box("exited", 0)), ("w1", box("exited", 1)),
                                                ("w2", box("running"))], "")
    assert (failed_worker.status, failed_worker.exit_code) == (RunStatus.FAILED, 1)  # as dstack: a failure first


def test_master_done_means_nothing_on_one_node():
    s = settle(run("master-done", aliases=("m",)), [("m", box("exited", 0))], "")
    assert (s.status, s.message) == (RunStatus.DONE, "")


# --------------------------------------------------------------------------- groups

GROUPS = """type: task
name: g
image: busybox
startup_order: workers-first
groups:
  - name: head
    commands: ["echo head ${{ groups[1].nodes[1].IP_ADDRESS }}"]
    ports: [8265]
    resources: {gpu: 2}
  - nodes: 2
    commands: ["echo worker $GPUFLEET_NODE_RANK of ${{ groups[0].nodes[0].IP_ADDRESS }}"]
    resources: {gpu: 2}
"""


def test_groups_give_the_task_its_nodes_resources_ports_and_per_node_commands():
    cfg = parse_run(GROUPS, "g.yml").config
    assert [g.name for g in cfg.groups] == ["head", "1"]  # dstack names an unnamed group by its index
    assert (cfg.nodes, cfg.group_sizes, cfg.ports, cfg.resources.gpu.count.min) == (3, [1, 2], [8265], 2)
    assert cfg.host_network  # multi-node: the hosts' network
    assert cfg.node_commands(0) == ["echo head ${{ groups[1].nodes[1].IP_ADDRESS }}"]
    assert cfg.node_commands(1) == cfg.node_commands(2) != cfg.node_commands(0)
    assert RUN_CONFIG.validate_python(cfg.model_dump(mode="json")) == cfg  # a stored spec reads back the same
    assert "groups" not in UNSUPPORTED["task"]


def test_each_node_gets_its_groups_commands_with_the_addresses_filled():
    req = parse_run(GROUPS, "g.yml")
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    gpus = [GPU(vendor="nvidia", index=i, uuid=f"GPU-{i}") for i in range(2)]
    scripts = [container_vars(req, "r1", {}, facts, gpus, 2, 1024, set(), cluster.node_env(rank, ips, 2)
                              )["workload_command"][-1] for rank in range(3)]
    assert scripts[0].endswith("echo head 10.0.0.3")
    assert scripts[1].endswith("echo worker $GPUFLEET_NODE_RANK of 10.0.0.1") and scripts[2] == scripts[1]


def test_node_addresses_work_in_a_plain_multi_node_task_too():
    req = parse_run("type: task\nimage: busybox\nnodes: 2\ncommands: ['ping ${{ groups[0].nodes[1].IP_ADDRESS }}']\n",
                    "t.yml")
    facts = HostFacts(runtime={"name": "podman"})
    v = container_vars(req, "r1", {}, facts, [], 2, 1024, set(), cluster.node_env(0, ["1.1.1.1", "2.2.2.2"], 0))
    assert v["workload_command"][-1].endswith("ping 2.2.2.2")
    assert group_addresses([2, 1], ["a", "b", "c"]) == {"[0].nodes[0].IP_ADDRESS": "a", "[0].nodes[1].IP_ADDRESS": "b",
                                                         "[1].nodes[0].IP_ADDRESS": "c"}


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_run(text, "g.yml")
    return str(e.value)


@pytest.mark.parametrize("extra,where,message", [
    ("nodes: 2\n", "13:8: nodes", "takes no top-level `nodes` (as in dstack)"),
    ("commands: [x]\n", "13:11: commands", "takes no top-level `commands`"),
    ("ports: [80]\n", "13:8: ports", "takes no top-level `ports`"),
    ("entrypoint: x\n", "13:13: entrypoint", "takes no top-level `entrypoint`"),
    ("resources: {gpu: 2}\n", "13:12: resources", "takes no top-level `resources`"),
])
def test_top_level_fields_dstack_refuses_beside_groups(extra, where, message):
    text = _problems(GROUPS + extra)
    assert f"g.yml:{where}: a task with `groups` {message}" in text, text


@pytest.mark.parametrize("change,where,message", [
    (("resources: {gpu: 2}\n  - nodes", "resources: {gpu: 1}\n  - nodes"), "12:16: groups[1].resources",
     "not the resources of groups[0]: gpufleet places every node of a multi-node task alike"),
    (("  - nodes: 2\n", "  - nodes: 2\n    ports: [9000]\n"), "11:12: groups[1].ports",
     "forwards the ports of the master (node 0, the first group's first node) only"),
    (("  - nodes: 2\n", "  - nodes: 2\n    name: head\n"), "11:11: groups[1].name",
     "'head' is also the name of groups[0]"),
    (("name: head", "name: Head"), "6:11: groups[0].name", "a node group's name is 1 to 40 lower-case letters"),
    (("groups[1].nodes[1]", "groups[1].nodes[2]"), "7:27: groups[0].commands[0]", "group 1 has 2 node(s), 0..1"),
    (("groups[1].nodes[1]", "groups[2].nodes[0]"), "7:27: groups[0].commands[0]", "there is no group 2"),
    (("image: busybox\n", "image: busybox\nenv: ['H=${{ groups[0].nodes[0].IP_ADDRESS }}']\n"), "4:10: env[0]",
     "a node's address is filled in `commands` only"),
])
def test_groups_errors_name_the_field_and_line(change, where, message):
    text = GROUPS.replace(*change)
    assert text != GROUPS
    problems = _problems(text)
    assert f"g.yml:{where}: " in problems and message in problems, problems


def test_a_node_address_in_a_single_node_task_is_refused():
    text = _problems("type: task\nimage: busybox\ngroups:\n"
                     "  - commands: ['echo ${{ groups[0].nodes[0].IP_ADDRESS }}']\n")
    assert "is set only on the nodes of a multi-node task" in text


def test_empty_groups_are_refused():
    text = _problems("type: task\nimage: busybox\ngroups: []\n")
    assert "g.yml:3:9: groups: `groups` cannot be an empty list" in text


REAL = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "dstack-configs" / "corpus"


@pytest.mark.parametrize("path,sizes,refused", [
    ("md-head/md-head-166/miles-qwen32b-h100.dstack.yml", [1, 1], ""),
    ("md-head/md-head-167/ray-cluster.dstack.yml", [1, 1], ""),
    ("unit-edge/unit-edge-036/task-groups.yml", [2, 1], ""),
    ("md-head/md-head-087/.dstack.yml", None, "groups[1].resources: not the resources of groups[0]"),
])
def test_dstacks_real_files_with_groups(path, sizes, refused, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("HF_TOKEN", "t")
    text = (REAL / path).read_text()
    if refused:
        assert refused in _problems(text)
    else:
        assert parse_run(text, path).config.group_sizes == sizes
