"""Multi-node tasks' `startup_order` and `stop_criteria` (dstack's): how they are read, the order
nodes start in (launch.start_stages) and when a run is over (runs.settle), without hosts."""

from __future__ import annotations

import pytest

from gpufleet.errors import ConfigError
from gpufleet.launch import start_stages
from gpufleet.models import Container, Run, RunStatus
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
