"""What a run's containers mean for it (runs.settle and its recording), what a probe's result means
for each host (probe.probe_outcomes), and how a probed host is recorded (apply.record): each on
real data and a real SQLite store, without hosts."""

from __future__ import annotations

import pytest

from gpufleet.allocator import Request, place
from gpufleet.apply import record
from gpufleet.blocks import split
from gpufleet.models import (
    GPU,
    Container,
    GPUSpec,
    HostFacts,
    HostStatus,
    InstanceStatus,
    Run,
    RunStatus,
    Target,
)
from gpufleet.probe import MAX_DIAGNOSES, ProbeOutcome, probe_outcomes
from gpufleet.runner import HostOutcome, PlaybookResult
from gpufleet.runs import _record, settle
from gpufleet.state import Store


def run(status=RunStatus.RUNNING, aliases=("a",), message="") -> Run:
    nodes = [{"rank": i, "alias": a, "instance_id": i + 1, "blocks": [0], "gpus": []} for i, a in enumerate(aliases)]
    return Run(name="r", run_id="id", type="task", fleet="f", instance_id=1, alias=aliases[0], status=status,
               message=message, spec={}, container="gpufleet-r", nodes=nodes, created_at=0, updated_at=0)


def box(state: str, code: int | None = None) -> Container:
    return Container(name="gpufleet-r", state=state, exit_code=code, run_id="id")


# --------------------------------------------------------------------------- settle

def test_done_when_every_node_exited_zero():
    s = settle(run(aliases=("a", "b")), [("a", box("exited", 0)), ("b", box("stopped", 0))], "")
    assert (s.status, s.exit_code, s.message, s.stop) == (RunStatus.DONE, 0, "", [])


def test_one_failed_node_fails_the_run_and_stops_the_others():
    s = settle(run(aliases=("a", "b", "c")), [("a", box("running")), ("b", box("exited", 3)), ("c", box("exited", 0))],
               "")
    assert (s.status, s.exit_code, s.message, s.stop) == (RunStatus.FAILED, 3, "exited with code 3 on b", ["a"])
    assert settle(run(), [("a", box("dead", 137))], "").message == "exited with code 137"  # one node: no host named


def test_a_vanished_container_fails_the_run_and_says_why():
    s = settle(run(), [("a", None)], "")
    assert (s.status, s.exit_code) == (RunStatus.FAILED, None)
    assert s.message == "the container on a is gone (host rebooted or removed by hand)"
    interrupted = settle(run(RunStatus.STARTING), [("a", None)], "")
    assert interrupted.message == "its start did not complete (gpufleet was interrupted); blocks freed"


def test_a_host_that_cannot_be_asked_keeps_the_run_with_a_note():
    s = settle(run(aliases=("a", "b")), [("a", box("exited", 0))], "cannot check b: Connection refused")
    assert (s.status, s.message) == (RunStatus.RUNNING, "cannot check b: Connection refused")


def test_starting_becomes_running_and_an_old_note_is_cleared():
    assert settle(run(RunStatus.STARTING), [("a", box("running"))], "").status == RunStatus.RUNNING
    cleared = settle(run(message="cannot check a: timeout"), [("a", box("running"))], "")
    assert (cleared.status, cleared.message) == (RunStatus.RUNNING, "")
    assert settle(run(), [("a", box("running"))], "").status is None  # nothing to write


def _store_with_a_run(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.save_fleet("f", "f.yml", {"type": "fleet"})
    gpus = [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559) for i in range(2)]
    store.record_instance("f", "a", "a", 22, InstanceStatus.READY, "", "2xH100",
                          HostFacts(gpus=gpus, cpu={"count": 4}, memory_mib=8000), split(gpus, "auto", 4, 8000))
    req = Request(gpu=GPUSpec.model_validate(1))
    store.allocate("r", "id", "task", {}, "gpufleet-r", lambda hosts: place(req, hosts))
    return store


def test_recording_a_settlement_ends_the_run_and_frees_its_blocks(tmp_path):
    store = _store_with_a_run(tmp_path)
    _record(store, store.run("r"), settle(store.run("r"), [("a", box("running"))], ""))
    assert store.run("r").status == RunStatus.RUNNING and store.fleet("f").instances[0].blocks_busy == 1
    _record(store, store.run("r"), settle(store.run("r"), [("a", box("exited", 2))], ""))
    ended = store.run("r")
    assert (ended.status, ended.exit_code, ended.message) == (RunStatus.FAILED, 2, "exited with code 2")
    assert store.fleet("f").instances[0].blocks_busy == 0


# --------------------------------------------------------------------------- probe outcomes

FACTS = {"hostname": "n0", "gpus": [{"index": 0, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "model": "H100",
                                     "memory_mib": 81559, "uuid": "GPU-0", "bus_id": "0000:18:00.0", "numa_node": 0}],
         "drivers": {"nvidia": "565.57.01"}, "cpu": {"count": 8, "numa_nodes": {"0": "0-7"}}, "memory_mib": 64000,
         "disk": {"path": "/", "total_mib": 1000, "free_mib": 500},
         "runtime": {"name": "podman", "version": "4.3.1", "usable": True, "via_sudo": True, "root": "/var/lib",
                     "gpu_support": {"nvidia": "cdi"}}, "problems": []}


def target(alias: str) -> Target:
    return Target(alias=alias, hostname=alias, port=22, user="u", identity_file=None, jumps=(), blocks=1,
                  internal_ip=None)


def outcome(alias, status, message="", facts=None) -> HostOutcome:
    o = HostOutcome(alias, status, message)
    if facts is not None:
        o.results["gpufleet_probe"] = {"ansible_facts": {"gpufleet_probe": facts}}
    return o


def test_probe_outcomes_type_the_facts_and_name_each_failure():
    hosts = {"ok": outcome("ok", HostStatus.OK, facts=FACTS), "bad": outcome("bad", HostStatus.FAILED, "sudo: denied"),
             "empty": outcome("empty", HostStatus.OK),
             "odd": outcome("odd", HostStatus.OK, facts={**FACTS, "memory_mib": "lots"}),
             "far": outcome("far", HostStatus.UNREACHABLE, "ssh: connect to host far port 22: Connection refused")}
    result = PlaybookResult("failed", 2, hosts, "/tmp")
    got = probe_outcomes(result, [target(a) for a in [*hosts, "lost"]], "/kh", lambda t: pytest.fail("no diagnosis"))
    assert got["ok"].status == HostStatus.OK and isinstance(got["ok"].facts, HostFacts)
    assert got["ok"].facts.gpus[0].model == "H100" and got["ok"].facts.runtime.argv() == ["sudo", "-n", "podman"]
    assert (got["bad"].status, got["bad"].reason) == (HostStatus.FAILED, "sudo: denied")
    assert (got["empty"].status, got["empty"].reason) == (HostStatus.FAILED, "the probe returned no facts")
    assert got["odd"].status == HostStatus.FAILED and "memory_mib" in got["odd"].reason
    assert (got["far"].status, got["far"].reason) == (HostStatus.UNREACHABLE,
                                                      "ssh: connect to host far port 22: Connection refused")
    assert (got["lost"].status, got["lost"].reason) == (HostStatus.FAILED, "no result from the probe")


def test_hidden_causes_are_diagnosed_one_by_one_up_to_a_bound():
    hidden = "kex_exchange_identification: Connection closed by remote host"
    aliases = [f"n{i}" for i in range(MAX_DIAGNOSES + 3)]
    result = PlaybookResult("failed", 4, {a: outcome(a, HostStatus.UNREACHABLE, hidden) for a in aliases}, "/tmp")
    asked = []

    def diagnose(t: Target) -> str:
        asked.append(t.alias)
        return "channel 0: open failed: connect failed: No route to host"

    got = probe_outcomes(result, [target(a) for a in aliases], "/kh", diagnose)
    assert asked == aliases[:MAX_DIAGNOSES]
    assert got["n0"].reason == "the login node cannot reach it: No route to host"
    assert got[aliases[-1]].reason == "kex_exchange_identification: Connection closed by remote host"


# --------------------------------------------------------------------------- apply.record

def facts(**changes) -> HostFacts:
    data = {**FACTS, "gpus": [{**FACTS["gpus"][0], "index": i, "uuid": f"GPU-{i}"} for i in range(4)], **changes}
    return HostFacts.model_validate(data)


@pytest.fixture()
def store(tmp_path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    s.save_fleet("f", "f.yml", {"type": "fleet"})
    return s


def test_record_a_ready_host_with_its_blocks_and_warnings(store):
    problem = {"what": "NVIDIA GPUs", "reason": "no CDI spec", "fix": "nvidia-ctk cdi generate"}
    ready, notes = record(store, "f", target("a").model_copy(update={"blocks": 2}),
                          ProbeOutcome("a", HostStatus.OK, "", facts(problems=[problem])))
    assert ready and notes == ["no CDI spec (nvidia-ctk cdi generate)"]
    [i] = store.fleet("f").instances
    assert (i.status, i.resources, i.blocks_total, i.status_text) == (InstanceStatus.READY, "4xH100 (80GB)", 2,
                                                                        "0/2 busy")
    assert i.facts == facts(problems=[problem])


def test_record_what_stops_a_host(store):
    assert record(store, "f", target("u"), ProbeOutcome("u", HostStatus.UNREACHABLE, "Connection refused")) == \
        (False, [])
    assert record(store, "f", target("x"), ProbeOutcome("x", HostStatus.FAILED, "module failed")) == (False, [])
    runtime = {"name": "docker", "usable": False, "via_sudo": False}
    problems = [{"what": "container runtime", "reason": "user u cannot run docker", "fix": "add u to docker"},
                {"what": "disk", "reason": "disk almost full", "fix": None}]
    assert record(store, "f", target("r"), ProbeOutcome("r", HostStatus.OK, "", facts(runtime=runtime,
                                                                                        problems=problems))) == \
        (False, ["disk almost full"])
    assert record(store, "f", target("s").model_copy(update={"blocks": 3}),
                  ProbeOutcome("s", HostStatus.OK, "", facts())) == (False, [])
    got = {i.alias: (i.status, i.reason, i.blocks_total) for i in store.fleet("f").instances}
    assert got == {"u": (InstanceStatus.UNREACHABLE, "Connection refused", 0),
                   "x": (InstanceStatus.ERROR, "module failed", 0),
                   "r": (InstanceStatus.ERROR, "user u cannot run docker (add u to docker)", 0),
                   "s": (InstanceStatus.ERROR, "4 GPUs cannot be split into 3 blocks (blocks must divide the GPU "
                                               "count, or be auto)", 0)}


def test_artifact_rotation_never_removes_a_play_still_running(tmp_path):
    """The server runs plays in parallel: pruning old artifacts must spare those of plays in progress."""
    import os

    from gpufleet import runner

    artifacts = tmp_path / "artifacts"
    for i in range(runner.ROTATE_ARTIFACTS + 5):
        d = artifacts / f"play-{i:02d}"
        d.mkdir(parents=True)
        os.utime(d, (1000 + i, 1000 + i))
    runner._plays_running.add("play-00")  # the oldest, still running
    try:
        runner._rotate(artifacts, "play-new")
        left = sorted(d.name for d in artifacts.iterdir())
        assert "play-00" in left  # running: kept however old
        assert left == ["play-00"] + [f"play-{i:02d}" for i in range(5, runner.ROTATE_ARTIFACTS + 5)]
        assert "play-new" in runner._plays_running
    finally:
        runner._plays_running.discard("play-00")
        runner._plays_running.discard("play-new")
