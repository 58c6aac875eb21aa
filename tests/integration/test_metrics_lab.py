"""The metrics sampler on the lab (issue 15): one sample of each host over the fleet's ssh masters,
through the real login node, with real podman; the GPUs are the lab's stand-ins, driven by gpu-burn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core
from gpufleet.metrics import sample
from gpufleet.paths import FleetFiles

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metrics-home")


@pytest.fixture(scope="module")
def lab(lab_factory, home):
    lab = lab_factory(nodes=2, gpus=4, vendor="nvidia")
    Cli(home)("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab


@pytest.fixture()
def store(home, monkeypatch):
    monkeypatch.setenv("GPUFLEET_HOME", str(home))
    from gpufleet.state import Store

    return Store()


def by_alias(samples) -> dict:
    return {s.alias: s for s in samples}


def test_every_ready_host_is_sampled_with_the_gpus_its_probe_found(lab, store):
    fleet = core.fleet_name(lab)
    facts = store.fleet(fleet).facts()
    samples = by_alias(sample.sample_all(store))
    assert sorted(samples) == sorted(facts) == sorted(n.address for n in lab.nodes)
    for alias, s in samples.items():
        assert s.error == "" and s.fleet == fleet
        assert [(g.index, g.uuid) for g in s.gpus] == [(g.index, g.uuid) for g in facts[alias].gpus]
        assert all(g.utilization == 0 and g.memory_total_mib == 81559 and not g.faults for g in s.gpus)
        assert s.processes == [] and s.container_ids == {}


def test_a_faulty_gpu_reports_why(lab, store):
    node = lab.nodes[0]
    core.fault(lab, node, 2, "ecc")
    try:
        s = by_alias(sample.sample_all(store))[node.address]
    finally:
        core.fault(lab, node, 2, None)
    assert s.error == ""
    faults = {g.index: g.faults for g in s.gpus if g.faults}
    assert list(faults) == [2]
    assert any("uncorrected ECC error" in f for f in faults[2]) and any("recovery" in f for f in faults[2]), faults
    assert not any(g.faults for g in by_alias(sample.sample_all(store))[node.address].gpus)


def test_an_unreachable_host_is_named_with_its_cause(lab, store):
    fleet = core.fleet_name(lab)
    state = store.fleet(fleet)
    down, up = lab.nodes
    core.stop_sshd(lab, down)
    try:
        runtimes = {a: state.runtime_argv(a) for a in (down.address, up.address)}
        samples = by_alias(sample.sample_fleet(FleetFiles.of(fleet), fleet, runtimes))
    finally:
        core.start_sshd(lab, down)
    assert samples[up.address].error == "" and len(samples[up.address].gpus) == 4
    lost = samples[down.address]
    assert lost.gpus == [] and lost.error.startswith(f"{down.address}: ")
    assert "the login node cannot reach it" in lost.error or "Connection refused" in lost.error, lost.error


def test_a_runs_gpu_burn_is_its_containers_and_one_by_hand_is_outside(lab, home, store, tmp_path):
    cli = Cli(home)
    task = tmp_path / "burn.yml"
    task.write_text(f"""type: task
name: burn
image: {IMAGE}
resources:
  gpu: 2
commands:
  - gpu-burn --seconds 120 --percent 80
""")
    cli("apply", "-f", str(task), "-y", "-d", check=0)
    run = wait_for("the run to start", lambda: next(
        (r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)
         if r["name"] == "burn" and r["status"] == "running"), None), timeout=120)
    [node] = run["nodes"]
    host = next(n for n in lab.nodes if n.address == node["alias"])
    other = next(n for n in lab.nodes if n is not host)
    run_gpus = sorted(g["index"] for g in node["gpus"])
    by_hand = core.start_gpu_burn(lab, other, "--gpus", "3", "--seconds", "120")
    try:
        def busy():
            s = by_alias(sample.sample_all(store))
            return s if s[host.address].processes else None

        samples = wait_for("the run's gpu-burn to hold its GPUs", busy, timeout=60)
        mine = samples[host.address]
        assert mine.error == ""
        [(cid, name)] = mine.container_ids.items()
        assert name == store.run("burn").container
        assert sorted(g.index for g in mine.gpus if g.utilization == 80) == run_gpus
        assert sorted(p.gpu_index for p in mine.processes) == run_gpus
        assert {p.container for p in mine.processes} == {cid}  # gpu-burn's PID's cgroup is the run's container
        assert sample.outside(mine) == {}
        assert [c.name for c in mine.containers] == [name] and mine.containers[0].memory_bytes > 0
        theirs = samples[other.address]
        assert [p.pid for p in theirs.processes] == [by_hand.pid] and theirs.processes[0].container is None
        assert {i: [p.pid for p in ps] for i, ps in sample.outside(theirs).items()} == {3: [by_hand.pid]}
        assert [g.index for g in theirs.gpus if g.utilization] == [3]
    finally:
        by_hand.stop()
        cli("stop", "burn", "-y")
